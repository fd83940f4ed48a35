"""Factories for `graphopt distill distill.toml` on scikit-learn's digits, and the data files
the ONNX steps need.

    python digits.py npz OUT_DIR              # OUT_DIR/calib.npz (training images), test.npz
    python digits.py accuracy MODEL.onnx      # test accuracy of an exported model
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from graphopt.torch import compress


def _split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """70% train, 15% validation, 15% test, stratified, always the same."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=0)
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def _dataset(part: tuple[np.ndarray, np.ndarray]) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.from_numpy(part[0]), torch.from_numpy(part[1]))


def teacher(epochs: int = 30, seed: int = 0) -> nn.Module:
    """A CNN trained on the labels (a few seconds on one core)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10),
    )
    loader = torch.utils.data.DataLoader(_dataset(_split()["train"]), batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


def student(teacher_model: nn.Module, prune_ratio: float = 0.55) -> nn.Module:
    """The teacher with 55% of its hidden channels removed (about 4.8× fewer parameters)."""
    pruned, _ = compress(teacher_model, prune_ratio=prune_ratio)
    return pruned


def data() -> dict[str, object]:
    parts = _split()
    return {"train": _dataset(parts["train"]), "val": _dataset(parts["val"]), "example": torch.zeros(1, 1, 8, 8)}


def _accuracy(model_path: str) -> float:
    import onnxruntime as ort

    x, y = _split()["test"]
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(-1) == y).mean())


if __name__ == "__main__":
    command, target = sys.argv[1], sys.argv[2]
    if command == "npz":
        out = Path(target)
        out.mkdir(parents=True, exist_ok=True)
        parts = _split()
        np.savez(out / "calib.npz", x=parts["train"][0][:128])
        np.savez(out / "test.npz", x=parts["test"][0])
        print(f"wrote {out / 'calib.npz'} (128 training images) and {out / 'test.npz'} ({len(parts['test'][0])} test images)")
    elif command == "accuracy":
        print(f"{target}: test accuracy {100 * _accuracy(target):.2f}%")
    else:
        sys.exit(f"unknown command {command}")
