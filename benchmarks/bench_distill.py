"""Issue #8: students made by ``graphopt.torch.compress`` and trained by ``graphopt.torch.distill``.

1. scikit-learn digits, stratified 5-fold cross-validation: a teacher CNN; a student pruned
   from it (≥ 4× fewer parameters) and distilled; the same student architecture trained from
   scratch on the labels alone (no teacher); and, to separate the two effects, the pruned
   student fine-tuned on labels alone. Each fold holds out 15% of its training part
   (stratified) for validation / early stopping; accuracy is on the fold's test part.
2. all-MiniLM-L6-v2: every ``nn.Linear`` of the encoder at half its rank and the word
   embeddings at a third (activation-aware SVD on the training sentences), distilled with a
   cosine loss under a wall-clock budget, exported with ``graphopt.torch.export``, quantized
   with ``graphopt optimize --recipe int8 --calib``; cosine to the teacher on the 256 unseen
   evaluation sentences the other benchmarks use, size against the teacher's fp32 ONNX.

``python -m benchmarks.bench_distill [--quick] [--only digits|minilm]`` prints the section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BENCH_DIR, MINILM_EVAL, markdown_table

FOLDS = 5
MINILM_SECONDS = 9 * 60
QUICK_MINILM_SECONDS = 60


# -- digits -----------------------------------------------------------------------------------


def digits_teacher() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10),
    )


DIGITS_PRUNE = 0.55


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)


def _dataset(x: np.ndarray, y: np.ndarray) -> Any:
    import torch

    return torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def fit_on_labels(model: Any, train: Any, val: Any, *, epochs: int, seed: int) -> Any:
    """Plain supervised training (cross-entropy), the same optimizer, schedule and early stopping
    as distill's, so that the only difference to distillation is the teacher."""
    import torch
    from torch import nn

    from graphopt.torch import DistillOptions, distill

    class _Silent(nn.Module):  # distill needs a teacher; with alpha = 0 its outputs weigh nothing
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 10)

    options = DistillOptions(task="classification", alpha=0.0, epochs=epochs, lr=2e-3, batch_size=64,
                             patience=8, seed=seed, quiet=True)
    return distill(_Silent(), model, train, val=val, options=options)


def accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())


def digits_fold(x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray, *,
                epochs: int, seed: int) -> dict[str, float]:
    import torch
    from sklearn.model_selection import train_test_split

    from graphopt.torch import DistillOptions, compress, distill, parameter_count

    fit_idx, val_idx = train_test_split(train_idx, test_size=0.15, stratify=y[train_idx], random_state=seed)
    train, val = _dataset(x[fit_idx], y[fit_idx]), _dataset(x[val_idx], y[val_idx])
    torch.manual_seed(seed)
    teacher = digits_teacher()
    fit_on_labels(teacher, train, val, epochs=epochs, seed=seed)
    student, _ = compress(teacher, prune_ratio=DIGITS_PRUNE)
    fine_tuned = compress(teacher, prune_ratio=DIGITS_PRUNE)[0]
    torch.manual_seed(seed + 1)
    scratch = compress(digits_teacher(), prune_ratio=DIGITS_PRUNE)[0]  # same shapes, fresh random weights
    for module in scratch.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    fit_on_labels(scratch, train, val, epochs=epochs, seed=seed)
    fit_on_labels(fine_tuned, train, val, epochs=epochs, seed=seed)
    options = DistillOptions(task="classification", temperature=4.0, alpha=0.7, epochs=epochs, lr=2e-3,
                             batch_size=64, patience=8, seed=seed, quiet=True)
    distill(teacher, student, train, val=val, options=options)
    test_x, test_y = x[test_idx], y[test_idx]
    return {
        "teacher": accuracy(teacher, test_x, test_y),
        "distilled": accuracy(student, test_x, test_y),
        "scratch": accuracy(scratch, test_x, test_y),
        "pruned_labels_only": accuracy(fine_tuned, test_x, test_y),
        "teacher_params": parameter_count(teacher),
        "student_params": parameter_count(student),
    }


def digits_benchmark(quick: bool) -> dict[str, Any]:
    import torch
    from sklearn.model_selection import StratifiedKFold

    torch.set_num_threads(1)
    x, y = digits_arrays()
    epochs = 10 if quick else 40
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=0).split(x, y)
    started = time.perf_counter()
    results = [digits_fold(x, y, tr, te, epochs=epochs, seed=fold) for fold, (tr, te) in enumerate(folds)]
    summary = {k: [r[k] for r in results] for k in results[0]}
    return {"folds": results, "summary": summary, "epochs": epochs, "seconds": time.perf_counter() - started}


def _pct(values: list[float]) -> str:
    return f"{100 * np.mean(values):.2f} ± {100 * np.std(values):.2f}"


def digits_section(result: dict[str, Any]) -> str:
    s = result["summary"]
    ratio = s["teacher_params"][0] / s["student_params"][0]
    rows = [
        ["teacher CNN", f"{s['teacher_params'][0]:,}", _pct(s["teacher"])],
        [f"student: pruned {DIGITS_PRUNE:.0%} + distilled (T=4, α=0.7)", f"{s['student_params'][0]:,}", _pct(s["distilled"])],
        ["student architecture from scratch, labels only (no teacher)", f"{s['student_params'][0]:,}", _pct(s["scratch"])],
        ["student pruned from the teacher, labels only", f"{s['student_params'][0]:,}", _pct(s["pruned_labels_only"])],
    ]
    gap = 100 * (np.mean(s["teacher"]) - np.mean(s["distilled"]))
    gain = 100 * (np.mean(s["distilled"]) - np.mean(s["scratch"]))
    checks = [
        f"- parameters: {ratio:.2f}× fewer (acceptance ≥ 4×): **{'pass' if ratio >= 4 else 'FAIL'}**",
        f"- distilled − scratch: {gain:+.2f} points (acceptance ≥ 0): **{'pass' if gain >= 0 else 'FAIL'}**",
        f"- teacher − distilled: {gap:.2f} points (acceptance ≤ 1.0): **{'pass' if gap <= 1.0 else 'FAIL'}**",
        "- per fold (teacher / distilled / scratch / pruned labels-only): "
        + "; ".join(f"{100 * f['teacher']:.1f} / {100 * f['distilled']:.1f} / {100 * f['scratch']:.1f} / "
                    f"{100 * f['pruned_labels_only']:.1f}" for f in result["folds"]),
    ]
    return "\n".join([
        f"### Digits (scikit-learn `load_digits`, 1,797 8×8 images), stratified {FOLDS}-fold CV",
        "",
        f"Test accuracy, mean ± std over the folds (%), up to {result['epochs']} epochs with early stopping "
        f"on a stratified 15% validation split of each training fold; {result['seconds']:.0f} s on 1 thread.",
        "",
        markdown_table(["model", "parameters", "accuracy %"], rows),
        "",
        *checks,
    ])


# -- MiniLM -----------------------------------------------------------------------------------


class SentenceBatches:
    """Tokenized sentences in seeded shuffled batches, padded only to each batch's longest."""

    def __init__(self, feeds: dict[str, np.ndarray], batch_size: int, *, seed: int, shuffle: bool) -> None:
        self.feeds, self.batch_size, self.shuffle = feeds, batch_size, shuffle
        self.rng = np.random.default_rng(seed)
        self.rows = len(feeds["input_ids"])

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __iter__(self) -> Any:
        import torch

        order = self.rng.permutation(self.rows) if self.shuffle else np.arange(self.rows)
        for start in range(0, self.rows, self.batch_size):
            rows = np.sort(order[start:start + self.batch_size])
            length = int(self.feeds["attention_mask"][rows].sum(1).max())
            yield {k: torch.from_numpy(np.ascontiguousarray(v[rows, :length])) for k, v in self.feeds.items()}


def _cosine_to(reference: np.ndarray, candidate: np.ndarray) -> float:
    num = (reference * candidate).sum(1)
    den = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return float(np.mean(num / den))


def _embed(model: Any, batches: SentenceBatches) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(**b).numpy() for b in batches])


def minilm_benchmark(quick: bool) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from benchmarks import datasets
    from benchmarks.common import minilm_workload
    from graphopt.torch import DistillOptions, compress, distill, export, factorize, parameter_count

    torch.set_num_threads(2)
    work = BENCH_DIR / "distill"
    work.mkdir(parents=True, exist_ok=True)
    workload = minilm_workload()
    eval_count = 32 if quick else MINILM_EVAL
    eval_pool = datasets.sentences(datasets.split_size("eval"), split="eval")
    train_text = datasets.sentences(datasets.split_size("calib"), split="calib") + eval_pool[MINILM_EVAL:]
    eval_text = eval_pool[:eval_count]  # the first 256 eval sentences: never trained on
    train_feeds = datasets.tokenize_sentences(train_text, seq_len=128)
    eval_feeds = datasets.tokenize_sentences(eval_text, seq_len=128)
    train = SentenceBatches(train_feeds, 32, seed=0, shuffle=True)
    evaluation = SentenceBatches(eval_feeds, 64, seed=0, shuffle=False)

    teacher = datasets._minilm_encoder()
    teacher_eval = _embed(teacher, evaluation)
    calibration = list(SentenceBatches(train_feeds, 64, seed=1, shuffle=False))[: 2 if quick else 8]
    started = time.perf_counter()
    student, report = compress(teacher, rank_ratio=0.5, lowrank_include=["bert.encoder.*"], calibration=calibration)
    embedding = factorize(student, rank_ratio=1 / 3, include=["bert.embeddings.word_embeddings"], embeddings=True,
                          calibration=calibration)
    compress_seconds = time.perf_counter() - started
    post_compression = _cosine_to(teacher_eval, _embed(student, evaluation))

    budget = QUICK_MINILM_SECONDS if quick else MINILM_SECONDS
    options = DistillOptions(task="embedding", loss="cosine", epochs=100, lr=3e-4, warmup_steps=20,
                             max_seconds=budget, patience=None, seed=0, quiet=True)
    result = distill(teacher, student, train, options=options)  # no validation: eval sentences stay unseen
    distilled = _cosine_to(teacher_eval, _embed(student, evaluation))
    torch.save(student.state_dict(), work / "student.pt")

    example = {k: torch.from_numpy(v[:2, :32]) for k, v in eval_feeds.items()}
    names = list(datasets.MINILM_INPUTS)
    export_report = export(student, tuple(example[k] for k in names), work / "student.onnx", exporter="torchscript",
                           opset=datasets.MINILM_OPSET, input_names=names, output_names=[datasets.MINILM_OUTPUT],
                           dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in names},
                                         datasets.MINILM_OUTPUT: {0: "batch"}})
    eval_npz = work / "eval.npz"
    np.savez(eval_npz, **eval_feeds)
    int8_path = work / "student.int8.onnx"
    command = [sys.executable, "-m", "graphopt", "optimize", str(work / "student.onnx"), "-o", str(int8_path),
               "--recipe", "int8", "--calib", str(workload.calib_npz), "--data", str(eval_npz), "--no-latency",
               "--threads", "2", "--report", str(work / "student.int8.json"), "-q"]
    subprocess.run(command, check=True)
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    int8_eval = np.concatenate([session.run(None, {k: v[i:i + 1] for k, v in eval_feeds.items()})[0]
                                for i in range(eval_count)])
    teacher_bytes = workload.model.stat().st_size
    return {
        "train_sentences": len(train_text), "eval_sentences": eval_count,
        "calibration_sentences": sum(len(b["input_ids"]) for b in calibration),
        "teacher_params": parameter_count(teacher), "student_params": parameter_count(student),
        "factorized_linears": len(report["factorized"]), "embedding": embedding,
        "compress_seconds": compress_seconds, "post_compression_cosine": post_compression,
        "distilled_cosine": distilled, "int8_cosine": _cosine_to(teacher_eval, int8_eval),
        "distill": result.to_dict(), "budget_seconds": budget,
        "teacher_onnx_bytes": teacher_bytes, "student_onnx_bytes": export_report["bytes"],
        "student_int8_bytes": int8_path.stat().st_size, "export": export_report["exporter"],
        "export_max_abs": export_report["parity"]["max_abs"], "quick": quick,
    }


def minilm_section(r: dict[str, Any]) -> str:
    steps = r["distill"]["history"]
    ratio = r["student_int8_bytes"] / r["teacher_onnx_bytes"]
    rows = [
        ["teacher (fp32 ONNX)", f"{r['teacher_params']:,}", f"{r['teacher_onnx_bytes'] / 1e6:.1f} MB", "1", "1.000000"],
        ["student after compress (no training)", f"{r['student_params']:,}", "", "", f"{r['post_compression_cosine']:.6f}"],
        ["student distilled (fp32 ONNX)", f"{r['student_params']:,}", f"{r['student_onnx_bytes'] / 1e6:.1f} MB",
         f"{r['student_onnx_bytes'] / r['teacher_onnx_bytes']:.3f}", f"{r['distilled_cosine']:.6f}"],
        ["student distilled, `--recipe int8`", "", f"{r['student_int8_bytes'] / 1e6:.1f} MB", f"{ratio:.3f}",
         f"{r['int8_cosine']:.6f}"],
    ]
    return "\n".join([
        "### MiniLM (all-MiniLM-L6-v2): half-rank encoder, distilled on sentences" + (" (quick run)" if r["quick"] else ""),
        "",
        f"All {r['factorized_linears']} encoder `nn.Linear` at half rank and the word embeddings at rank "
        f"{next(iter(r['embedding'].values()))['rank']} (activation-aware SVD on {r.get('calibration_sentences', 512)} training sentences), "
        f"{r['compress_seconds']:.0f} s; then `distill` with a cosine loss on the pooled embedding, AdamW lr 3e-4, "
        f"batch 32, cosine schedule over a {r['budget_seconds'] / 60:.0f}-minute wall-clock budget on 2 threads "
        f"(shared machine): {len(steps)} epochs, {r['distill']['seconds']:.0f} s. Training sentences: "
        f"{r['train_sentences']}, all of the `calib` split and the `eval` sentences after the first {MINILM_EVAL}; "
        f"cosine to the teacher is measured on the first {r['eval_sentences']} `eval` sentences, never trained on. "
        f"Exported with `graphopt.torch.export` ({r['export']}, max abs {r['export_max_abs']:.2g} vs torch); "
        f"int8 by `graphopt optimize --recipe int8 --calib` (128 calib sentences). Size ratios are against the "
        f"teacher's fp32 ONNX.",
        "",
        markdown_table(["model", "parameters", "size", "size ratio", "cosine to teacher"], rows),
        "",
        f"- cosine after distillation {r['distilled_cosine']:.4f} (acceptance ≥ 0.98): "
        f"**{'pass' if r['distilled_cosine'] >= 0.98 else 'FAIL'}**",
        f"- int8 size {ratio:.3f}× the fp32 ONNX (acceptance ≤ 0.15): **{'pass' if ratio <= 0.15 else 'FAIL'}**",
    ])


def main(quick: bool = False, only: str | None = None) -> str:
    parts = ["## Distillation: torch students (`graphopt.torch`)"]
    if only in (None, "digits"):
        parts.append(digits_section(digits_benchmark(quick)))
    if only in (None, "minilm"):
        result = minilm_benchmark(quick)
        (BENCH_DIR / "distill").mkdir(parents=True, exist_ok=True)
        (BENCH_DIR / "distill" / f"minilm{'-quick' if quick else ''}.json").write_text(json.dumps(result, indent=2, default=str))
        parts.append(minilm_section(result))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_distill")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["digits", "minilm"])
    args = parser.parse_args()
    print(main(args.quick, args.only))
