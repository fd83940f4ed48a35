"""Build the 4-bit peers' decoder folders that ``benchmarks/llm_int4.py --peers`` measures (issue #29):
onnxruntime-genai's model builder on a Hugging Face folder, and onnxruntime's MatMulNBitsQuantizer
and NNCF's ``compress_weights`` on graphopt's fp32 export of that folder.

Run it with the peers' interpreter (a venv made as ``benchmarks/requirements-llm-peers.txt`` says),
from the repository root; builds run one at a time:

    /work/llmpeers/.venv/bin/python -m benchmarks.llm_peers --hf work/bench/float_twin \\
        --onnx work/bench/float_twin_onnx --out work/bench/twin_peers [--only NAME]…

Each peer gets the folder OUT/NAME with what graphopt's ``OrtDecoder`` reads: the model, its
tokenizer and ``genai_config.json`` (copied from the export for the quantizers, which write only a
model). Each is checked to load in onnxruntime and to give finite logits on a short prompt. OUT/manifest.json
lists every peer (name, tool with its version, settings, seconds, ok, error, folder); a peer that
fails is recorded there with its error, not raised. onnxruntime's GPTQ is not built: it took over
20 minutes on SmolLM2-135M's shapes (issue #21), beyond this benchmark's 15-minute limit per build.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

THREADS = 2
# Files of a graphopt export that are not the model: what a quantized copy of it still needs.
NOT_COPIED = ("model.onnx", "model.onnx.data", "graphopt_export.json")


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    package: str  # the distribution whose version is recorded
    settings: str
    build: Callable[[argparse.Namespace, Path], None]  # (args, empty output folder)


def genai_builder(precision: str, *options: str) -> Callable[[argparse.Namespace, Path], None]:
    def build(args: argparse.Namespace, folder: Path) -> None:
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(args.hf), "-o", str(folder),
                   "-p", precision, "-e", "cpu", "-c", str(args.out / "genai-cache")]
        if options:
            command += ["--extra_options", *options]
        with open(folder.with_suffix(".log"), "wb") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        if code != 0:
            lines = folder.with_suffix(".log").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"builder exit {code}: {lines[-1] if lines else 'no output'}")
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the builder writes these; be sure
            if not (folder / name).is_file() and (args.hf / name).is_file():
                shutil.copy2(args.hf / name, folder / name)
    return build


def ort_quantizer(algorithm: str, block: int) -> Callable[[argparse.Namespace, Path], None]:
    def build(args: argparse.Namespace, folder: Path) -> None:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        config = {"rtn": lambda: nbits.RTNWeightOnlyQuantConfig(),
                  "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=4)}[algorithm]()
        # The model in memory, not its path: given a path, the RTN path keeps the weights it leaves
        # as references into the source's data file, which the copy's own data file then contradicts.
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(args.onnx / "model.onnx"), block_size=block,
                                               is_symmetric=False, accuracy_level=4, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(folder / "model.onnx"), use_external_data_format=True)
        copy_support_files(args.onnx, folder)
    return build


def nncf_compress(mode: str, group: int) -> Callable[[argparse.Namespace, Path], None]:
    def build(args: argparse.Namespace, folder: Path) -> None:
        import nncf
        import onnx

        model = onnx.load(args.onnx / "model.onnx")
        compressed = nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode), group_size=group,
                                           ratio=1.0)
        onnx.save(compressed, folder / "model.onnx", save_as_external_data=True, location="model.onnx.data")
        copy_support_files(args.onnx, folder)
    return build


PEERS = (
    Peer("genai-int4-b32", "onnxruntime-genai", "builder -p int4 -e cpu (defaults: block 32, symmetric, "
         "accuracy level 4, RTN)", genai_builder("int4")),
    Peer("genai-int4-b32-asym", "onnxruntime-genai", "builder -p int4 -e cpu is_symmetric=false",
         genai_builder("int4", "is_symmetric=false")),
    Peer("genai-int4-kquant", "onnxruntime-genai", "builder -p int4 -e cpu algo_config=k_quant",
         genai_builder("int4", "algo_config=k_quant")),
    Peer("genai-int4-kquant-last", "onnxruntime-genai", "builder -p int4 -e cpu algo_config=k_quant_last "
         "(LM head int8)", genai_builder("int4", "algo_config=k_quant_last")),
    Peer("genai-int4-kquant-mixed", "onnxruntime-genai", "builder -p int4 -e cpu algo_config=k_quant_mixed "
         "(LM head and sensitive layers int8)", genai_builder("int4", "algo_config=k_quant_mixed")),
    Peer("genai-int8", "onnxruntime-genai", "builder -p int8 -e cpu", genai_builder("int8")),
    Peer("ort-rtn-b32-asym", "onnxruntime", "MatMulNBitsQuantizer RTN, block 32 asymmetric, accuracy level 4 "
         "(on the fp32 export)", ort_quantizer("rtn", 32)),
    Peer("ort-hqq-b32", "onnxruntime", "MatMulNBitsQuantizer HQQ, block 32 (on the fp32 export)",
         ort_quantizer("hqq", 32)),
    Peer("nncf-int4-sym-g32", "nncf", "compress_weights INT4_SYM, group 32, ratio 1, data-free "
         "(on the fp32 export)", nncf_compress("INT4_SYM", 32)),
    Peer("nncf-int4-asym-g32", "nncf", "compress_weights INT4_ASYM, group 32, ratio 1, data-free "
         "(on the fp32 export)", nncf_compress("INT4_ASYM", 32)),
)


def copy_support_files(source: Path, folder: Path) -> None:
    for path in source.iterdir():
        if path.is_file() and path.name not in NOT_COPIED:
            shutil.copy2(path, folder / path.name)


def check_logits(model: Path) -> None:
    """Load the model in onnxruntime and run a 5-token prompt with an empty cache; raise unless
    every logit is finite. The cache's shape is genai_config.json's (the builder leaves head_size symbolic)."""
    import onnxruntime as ort

    decoder = json.loads((model.parent / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    ids = np.array([[1, 504, 3458, 314, 260]], np.int64)
    feed: dict[str, np.ndarray] = {}
    for given in session.get_inputs():
        if given.name == "input_ids":
            feed[given.name] = ids
        elif given.name == "attention_mask":
            feed[given.name] = np.ones_like(ids)
        elif given.name == "position_ids":
            feed[given.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif given.name.startswith("past_key_values"):
            dtype = np.float16 if given.type == "tensor(float16)" else np.float32
            feed[given.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype)
        else:
            raise ValueError(f"unexpected input {given.name}")
    logits = session.run(["logits"], feed)[0]
    if not np.isfinite(logits).all():
        raise ValueError(f"non-finite logits ({int((~np.isfinite(logits)).sum())} of {logits.size})")


def build_peer(peer: Peer, args: argparse.Namespace) -> dict[str, object]:
    folder = args.out / peer.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tool = f"{peer.package} {importlib.metadata.version(peer.package)}"
    record: dict[str, object] = {"name": peer.name, "tool": tool, "settings": peer.settings, "seconds": None,
                                 "ok": False, "error": None, "folder": str(folder.resolve())}
    started = time.perf_counter()
    try:
        peer.build(args, folder)
        record["seconds"] = round(time.perf_counter() - started, 1)
        check_logits(folder / "model.onnx")
        record["ok"] = True
    except Exception as exc:  # any tool's failure is a result to record, not a reason to stop
        record["seconds"] = record["seconds"] or round(time.perf_counter() - started, 1)
        record["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    print(f"{peer.name}: {'ok' if record['ok'] else record['error']} ({record['seconds']} s)", file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--hf", type=Path, required=True, help="the Hugging Face folder (the builder's input)")
    parser.add_argument("--onnx", type=Path, required=True, help="graphopt's fp32 export of it (the quantizers' input)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", action="append", choices=[p.name for p in PEERS],
                        help="build only this peer (repeatable); the manifest keeps the others' records")
    args = parser.parse_args(argv)
    args.hf, args.onnx, args.out = args.hf.resolve(), args.onnx.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    previous = {m["name"]: m for m in json.loads(manifest_path.read_text())} if manifest_path.is_file() else {}
    records = []
    for peer in PEERS:
        if args.only and peer.name not in args.only:
            if peer.name in previous:
                records.append(previous[peer.name])
            continue
        records.append(build_peer(peer, args))
        manifest_path.write_text(json.dumps(records, indent=1))
    manifest_path.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
