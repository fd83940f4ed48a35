"""A small CNN on scikit-learn's handwritten digits, exported to ONNX, plus labelled data.

    python examples/digits/make_digits_model.py --out work/digits

writes ``digits.onnx`` (input ``images`` float32[N,1,8,8] in [0,1], output ``logits``
float32[N,10], dynamic batch, opset 17) and ``digits.npz`` (``images`` and ``labels`` int64).

The CNN is trained on a stratified 40% of the 1797 digits; ``digits.npz`` holds only the
other 60% (1079 images the network never saw), so that evaluating it there measures real
errors rather than memorised ones. Deterministic for a given ``--seed`` and torch version.

    graphopt evaluate work/digits/digits.onnx --data work/digits/digits.npz --labels labels \
        --folds 5 --stratified --recipe int8 --json work/digits/r.json
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

INPUT = "images"
OUTPUT = "logits"


def build_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="work/digits", help="output folder (default work/digits)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    train_x, eval_x, train_y, eval_y = train_test_split(
        images, labels, train_size=0.4, stratify=labels, random_state=args.seed
    )
    model = build_cnn()
    train(model, train_x, train_y, epochs=args.epochs, seed=args.seed)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(eval_x)).argmax(1).numpy() == eval_y).mean()

    with warnings.catch_warnings():  # the TorchScript exporter is asked for on purpose: stable names
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.from_numpy(eval_x[:1]),), str(out / "digits.onnx"),
            input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
            opset_version=17, dynamo=False,
        )
    np.savez(out / "digits.npz", **{INPUT: eval_x, "labels": eval_y})
    print(f"wrote {out / 'digits.onnx'} and {out / 'digits.npz'} ({len(eval_y)} unseen images); "
          f"torch accuracy on them {accuracy:.4f}")


if __name__ == "__main__":
    main()
