"""Blockwise 4-bit weights, side by side (issue #21): graphopt's `int4` recipe and its block-128
symmetric setting against onnxruntime's MatMulNBitsQuantizer (RTN, HQQ, GPTQ), onnxruntime-genai's
builder (`-p int4 -e cpu`) and NNCF's `compress_weights`, on SmolLM2-135M-Instruct.

Every model is measured in this one process against the fp32 export (`benchmarks/llm_export.py`'s
graphopt folder): file size, perplexity ratio and teacher-forced next-token agreement on held-out
English prose (the license texts installed beside the packages; calibration uses the bundled
corpus, or license text after the held-out windows, never these), greedy 32-token agreement on the
default prompts, prefill ms of 128 tokens and decode ms/token, rounds interleaved across models.

The peers' folders are built in their own venv (see `benchmarks/requirements-llm-peers.txt`) and
listed in a manifest (``--peers DIR/manifest.json``: name, tool, settings, seconds, ok); this
script builds graphopt's own with its CLI.

    python -m benchmarks.llm_int4 --base work/bench/llm_export/graphopt --peers /path/to/int4/manifest.json \\
        --genai-int4 /path/to/genai-int4

With ``--graphopt NAME=PATH`` (repeatable; a model folder or a model file) it measures graphopt
models built before instead of building its own; ``--title`` and ``--note`` then say what was measured,
e.g. the float twin's export as ``--base`` and peers built by ``benchmarks/llm_peers.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BENCH_DIR, THREADS, markdown_table, one_line
from benchmarks.llm_export import build, prefill_and_decode
from graphopt.io import model_bytes
from graphopt.verify.latency import SESSION_SWITCH_PAUSE

WINDOWS = 64
WINDOW = 128
DECODE_TOKENS = 32
ROUNDS = 5
NEW_TOKENS = 32

BLOCKS = """\
description = "graphopt at the peers' common setting: 4-bit symmetric, block {block}, 8-bit head"
# Compared, not gated: every model of this setting is measured (no tool reaches 1.03 here).
max_ppl_ratio = 100.0
min_token_agree = 0.0

[[steps]]
pass = "quantize-blockwise"
bits = 4
block_size = {block}
symmetric = true
method = "{method}"
search = false
"""
# graphopt's symmetric runs: (block, method, calibration). "licenses": license prose the measurement never
# reads (``calibration_prose``); "bundled": the bundled corpus, what the peers' GPTQ was given. Block 64 is
# what NNCF's "group 128" became on this model's K = 576 layers.
SYMMETRIC_RUNS = ((128, "gptq", "licenses"), (128, "awq", "licenses"), (128, "gptq", "bundled"), (128, "rtn", None),
                  (64, "gptq", "licenses"))


TITLE = "Blockwise 4-bit weights (issue #21): SmolLM2-135M-Instruct"
NOTE = ("The checkpoint's linear weights lie on Q4_1 grids of 32 (its table on Q8_0): block-32 asymmetric "
        "float offsets rebuild them exactly, so block 128 symmetric is the setting where that alignment helps "
        "no tool.")
# The row "decode / builder" divides by: the builder's -p int4 -e cpu at its defaults (--genai-int4, or
# benchmarks/llm_peers.py's name for it).
BUILDER_INT4 = ("genai builder int4 b32", "genai-int4-b32")

# What each peer folder (named by the peers' build, see the module docstring) holds; a manifest's own
# "settings" comes first.
PEER_LABELS = {
    "ort-rtn-b32-asym": "onnxruntime MatMulNBitsQuantizer RTN, block 32 asym, level 4; LM head + table fp32",
    "ort-rtn-b128-sym": "onnxruntime RTN, block 128 sym, level 4; LM head + table fp32",
    "ort-hqq-b128": "onnxruntime HQQ, block 128 (asym, float zero points); LM head + table fp32",
    "ort-gptq-b128-sym": "onnxruntime GPTQ, block 128 sym, 16×128 tokens of the bundled corpus; LM head + table fp32",
    "ort-gptq-b128-sym-licenses": "onnxruntime GPTQ, block 128 sym, 16×128 tokens of license calibration; "
                                  "LM head + table fp32",
    "genai-int4-b128": "onnxruntime-genai builder -p int4, block_size=128; 4-bit LM head",
    "nncf-int4-sym-g32": "NNCF compress_weights INT4_SYM, group 32, data-free; table 8-bit",
    "nncf-int4-sym-g128": "NNCF INT4_SYM, group 128 (64 where K = 576); table 8-bit",
    "nncf-int4-asym-g32": "NNCF INT4_ASYM, group 32",
    "nncf-int4-asym-g128": "NNCF INT4_ASYM, group 128 (64 where K = 576)",
}


def license_prose(path: Path) -> Path:
    """Held-out English prose: the distinct license texts installed beside this environment's
    packages (copyright lines dropped), in name order."""
    import site

    seen, texts = set(), []
    roots = [Path(p) for p in site.getsitepackages()]
    files = sorted(f for root in roots for pattern in ("*.dist-info/LICENSE*", "*.dist-info/licenses/**/*")
                   for f in root.glob(pattern) if f.is_file())
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        key = hashlib.sha256(re.sub(r"\s+", " ", re.sub(r"(?i)copyright.*", "", text)).strip()[:2000].encode()).hexdigest()
        if key not in seen and len(text) > 500:
            seen.add(key)
            texts.append(text.strip())
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return path


def calibration_prose(held: Path, out: Path, base: Path) -> Path:
    """License prose for calibration that the measurement never reads: the text after the held-out
    windows (and one window of gap), decoded back from the tokens."""
    from graphopt.verify.decoder import open_folder

    tokenizer = open_folder(base).tokenizer
    ids = tokenizer.encode(held.read_text(encoding="utf-8")).ids
    path = out / "licenses-calibration.txt"
    path.write_text(tokenizer.decode(ids[(WINDOWS + 1) * WINDOW:]), encoding="utf-8")
    return path


def graphopt_builds(base: Path, out: Path, held: Path, calibration: Path, only: str | None = None,
                    previous: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    runs: list[tuple[str, str, list[str]]] = [("graphopt int4 (b32 asym offsets, search)", "int4", [])]
    for block, method, calibrated in SYMMETRIC_RUNS:
        recipe = out / f"int4-b{block}-sym-{method}.toml"
        recipe.write_text(BLOCKS.format(block=block, method=method))
        label = {"licenses": ", license calibration", "bundled": ", bundled calibration", None: ""}[calibrated]
        runs.append((f"graphopt b{block} sym {method.upper()}{label}", str(recipe),
                     ["--calib", str(calibration)] if calibrated == "licenses" else []))
    models = []
    for name, chosen, extra in runs:
        if only and only not in name:
            models += [m for m in previous if m["name"] == name]
            continue
        folder = out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        command = [sys.executable, "-m", "graphopt", "optimize", str(base), "-o", str(folder), "--recipe", chosen,
                   "--data", str(held), "--threads", str(THREADS), "--no-latency",
                   "--report", str(folder.with_suffix(".json")), *extra]
        model = build(name, command, folder, folder.with_suffix(".log"))
        model.update(tool="graphopt", settings=chosen if chosen == "int4" else f"quantize-blockwise {Path(chosen).stem}")
        models.append(model)
    return models


def prebuilt(name: str, path: Path) -> dict[str, Any]:
    """A graphopt model built before; its build seconds and recipe from the report beside it
    (``PATH.json``, as ``graphopt_builds`` and ``optimize --report`` name it), if there is one."""
    report_path = path.with_suffix(".json")
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    recipe = report.get("recipe", {}).get("name") if isinstance(report.get("recipe"), dict) else report.get("recipe")
    return {"name": name, "tool": "graphopt", "settings": f"--recipe {recipe}" if recipe else "",
            "folder": path, "build_seconds": report.get("seconds")}


def machine() -> str:
    """The CPU's model name, whether it has AVX-512 VNNI, and the measuring onnxruntime."""
    import onnxruntime

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    vnni = "with" if re.search(r"\bavx512_vnni\b", cpuinfo) else "without"
    return f"CPU: {name}, {vnni} avx512_vnni. onnxruntime {onnxruntime.__version__}."


def measure(models: list[dict[str, Any]], base: Path, held: Path) -> None:
    from graphopt.io import model_file
    from graphopt.torch.decoder import DEFAULT_PROMPTS
    from graphopt.verify.decoder import OrtDecoder, open_folder
    from graphopt.verify.text import TextJudge, text_windows

    tokenizer = open_folder(base).tokenizer
    windows = text_windows(held, tokenizer, window=WINDOW, limit=WINDOWS)
    reference = OrtDecoder(base / "model.onnx", threads=THREADS, optimize=False)
    judge = TextJudge(reference, windows, threads=THREADS)
    prompts = [tokenizer.encode(text).ids for text in DEFAULT_PROMPTS]
    base_greedy = [list(reference.greedy(ids, NEW_TOKENS)) for ids in prompts]
    decoders = {"fp32 export": OrtDecoder(base / "model.onnx", threads=THREADS)}
    for model in models:
        decoder = OrtDecoder(model_file(model["folder"]), threads=THREADS)
        decoders[model["name"]] = decoder
        model.update(judge.score(decoder).to_dict())
        same = [sum(a == b for a, b in zip(list(decoder.greedy(ids, NEW_TOKENS)), ref)) / NEW_TOKENS
                for ids, ref in zip(prompts, base_greedy)]
        model["greedy_agreement"] = float(np.mean(same))
        model["bytes"] = model_bytes(model["folder"])
        print(f"measured {model['name']}: ppl x{model['ppl_ratio']:.4f}, agree {model['token_agreement']:.3f}",
              file=sys.stderr)
    prompt = np.asarray([windows[0]], np.int64)
    timings: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in decoders}
    for round_ in range(ROUNDS + 1):
        for name, decoder in (decoders.items() if round_ % 2 else reversed(list(decoders.items()))):
            time.sleep(SESSION_SWITCH_PAUSE)  # the previous session's worker threads stop spinning
            prefill, decode = prefill_and_decode(decoder, prompt, DECODE_TOKENS)
            if round_:
                timings[name]["prefill"].append(prefill * 1000)
                timings[name]["decode"].append(decode * 1000)
    base_timing = {key: statistics.median(values) for key, values in timings["fp32 export"].items()}
    for model in models:
        for key in ("prefill", "decode"):
            model[f"{key}_ms"] = statistics.median(timings[model["name"]][key])
            model[f"{key}_ratio"] = model[f"{key}_ms"] / base_timing[key]
    models.insert(0, {"name": "fp32 export", "tool": "graphopt export", "settings": "float32", "bytes": model_bytes(base),
                      "ppl_ratio": 1.0, "perplexity": judge.perplexity, "token_agreement": 1.0,
                      "greedy_agreement": 1.0, "prefill_ms": base_timing["prefill"], "decode_ms": base_timing["decode"],
                      "prefill_ratio": 1.0, "decode_ratio": 1.0, "build_seconds": None})


def section(models: list[dict[str, Any]], failed: list[dict[str, Any]], held: Path, tokens: int,
            title: str = TITLE, note: str = NOTE) -> str:
    base = models[0]
    genai = next((m for m in models if m["name"] in BUILDER_INT4), None)
    rows = []
    for m in models:
        rows.append([m["name"], m.get("settings", ""), "—" if m.get("build_seconds") is None else f"{m['build_seconds']:.0f}",
                     f"{m['bytes'] / 1e6:.0f}", f"{m['bytes'] / base['bytes']:.3f}", f"{m['ppl_ratio']:.4f}",
                     f"{m['token_agreement']:.3f}", f"{m['greedy_agreement']:.2f}", f"{m['prefill_ms']:.0f}",
                     f"{m['prefill_ratio']:.2f}", f"{m['decode_ms']:.1f}", f"{m['decode_ratio']:.2f}",
                     f"{m['decode_ms'] / genai['decode_ms']:.2f}" if genai else "—"])
    text = [f"## {title}", "",
            f"`python -m benchmarks.llm_int4` — measured in one process, {THREADS} intra-op threads, against the fp32 "
            f"export. Held-out prose: {WINDOWS} windows of {WINDOW} tokens of {held.name} ({tokens} tokens of "
            "license texts); perplexity of the fp32 export "
            f"{base['perplexity']:.2f}. Greedy: {NEW_TOKENS} tokens on the 16 default prompts. Prefill of {WINDOW} "
            f"tokens and decode ms/token over {DECODE_TOKENS} cached steps, median of {ROUNDS} interleaved rounds. "
            f"{machine()} {note}".rstrip(), "",
            markdown_table(["model", "settings", "build s", "MB", "size ×", "ppl ×", "token agree", "greedy agree",
                            "prefill ms", "prefill ×", "decode ms/tok", "decode ×", "decode / builder"], rows)]
    for m in failed:
        text.append(f"\n{m['name']}: not measured: {m['error']}")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=BENCH_DIR / "llm_export" / "graphopt",
                        help="the fp32 export folder (benchmarks/llm_export.py)")
    parser.add_argument("--peers", type=Path, help="manifest.json of the peers' int4 folders")
    parser.add_argument("--genai-int4", type=Path, help="onnxruntime-genai builder's -p int4 folder (block 32)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "llm_int4")
    parser.add_argument("--skip-build", action="store_true", help="measure graphopt's folders from a previous run")
    parser.add_argument("--build-only", action="store_true", help="build graphopt's folders, measure nothing")
    parser.add_argument("--only", help="rebuild only graphopt's runs whose name holds this (others from built.json)")
    parser.add_argument("--graphopt", action="append", default=[], metavar="NAME=PATH",
                        help="measure this graphopt model built before (a folder or a model file; repeatable) "
                             "instead of building graphopt's own")
    parser.add_argument("--title", default=TITLE, help="the section's title: the model and issue measured")
    parser.add_argument("--note", default=NOTE, help="a sentence after the method (what is special about the model)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    held = license_prose(args.out / "licenses.txt")
    if args.graphopt:
        built = [prebuilt(name, Path(path)) for name, _, path in (given.partition("=") for given in args.graphopt)]
    elif args.skip_build:
        previous = json.loads((args.out / "built.json").read_text())
        built = [{**m, "folder": Path(m["folder"])} if "folder" in m else m for m in previous]
    else:
        previous = json.loads((args.out / "built.json").read_text()) if args.only else []
        built = graphopt_builds(args.base, args.out, held, calibration_prose(held, args.out, args.base), args.only, previous)
        (args.out / "built.json").write_text(json.dumps(built, default=str, indent=1))
        if args.build_only:
            return ""
    built = [{**m, "folder": Path(m["folder"])} if "folder" in m else m for m in built]
    models = [m for m in built if "folder" in m]
    failed = [m for m in built if "folder" not in m]
    if args.genai_int4:
        models.append({"name": "genai builder int4 b32", "tool": "onnxruntime-genai",
                       "settings": "onnxruntime-genai builder -p int4 -e cpu (block 32); 4-bit LM head",
                       "folder": args.genai_int4, "build_seconds": None})
    if args.peers:
        for entry in json.loads(args.peers.read_text()):
            folder = Path(entry.get("folder") or args.peers.parent / entry["name"])
            record = {"name": entry["name"], "tool": entry.get("tool", ""),
                      "settings": entry.get("settings") or PEER_LABELS.get(entry["name"], ""),
                      "build_seconds": entry.get("seconds")}
            if entry.get("ok") and (folder / "model.onnx").is_file():
                models.append({**record, "folder": folder})
            else:
                failed.append({**record, "error": one_line(str(entry.get("error") or "no model"))})
    measure(models, args.base, held)
    from graphopt.verify.decoder import open_folder

    tokens = len(open_folder(args.base).tokenizer.encode(held.read_text(encoding="utf-8")).ids)
    text = section(models, failed, held, tokens, args.title, args.note)
    (args.out / "results.json").write_text(json.dumps(models, default=str, indent=1))
    (args.out / "section.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
