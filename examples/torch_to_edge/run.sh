#!/usr/bin/env bash
# torch model → compress → distill → export → int8 → gate, on scikit-learn's digits.
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

graphopt distill distill.toml
python digits.py npz out
graphopt optimize out/student.onnx -o out/student.int8.onnx --recipe int8 --calib out/calib.npz \
    --data out/test.npz --report out/int8.json --threads 1
graphopt check out/student.onnx out/student.int8.onnx --data out/test.npz --min-top1 0.98 \
    --max-size-ratio 0.5 --markdown out/check.md --threads 1
python digits.py accuracy out/student.onnx
python digits.py accuracy out/student.int8.onnx
