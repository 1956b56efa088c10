"""Train rexdeploy's demo CNN on scikit-learn's digits and export it to ``rexdeploy/demo/digits_cnn.onnx``.

Usage (dev only; torch is not a runtime dependency of rexdeploy)::

    pip install torch==2.13.0 scikit-learn
    python scripts/make_demo_model.py            # writes rexdeploy/demo/digits_cnn.onnx
    python scripts/make_demo_model.py --output /tmp/digits_cnn.onnx

The model is a small ResNet/MobileNet-flavoured CNN, so that rexdeploy's compiler pass meets real ops::

    input (batch, 1, 8, 8)
    conv1 3x3 1->16 pad 1   + BatchNorm + ReLU                 8x8
    conv2 3x3 16->32 s2 p1  + BatchNorm + ReLU   ----+          4x4
    dw    3x3 32->32 group 32 pad 1 + BatchNorm + ReLU |
    pw    1x1 32->32        + BatchNorm                |
    Add (residual) <-------------------------------------+
    ReLU, GlobalAveragePool, Flatten, Gemm 32->10 -> logits (batch, 10)

The BatchNormalization nodes are kept in the ONNX graph (exported with ``TrainingMode.PRESERVE`` from a
model in eval mode, which skips the exporter's Conv+BN fusion): rexdeploy folds them itself and uses
their running statistics for data-free activation ranges.

Preprocessing is :func:`rexdeploy.demo.preprocess_digits` (pixels / 16, then standardized with the
global mean / std of the digits pixels); it is the one definition the script and the package share.

Training is deterministic: fixed seed, ``torch.use_deterministic_algorithms(True)``, 2 threads, a
stratified 80/20 train / held-out split (``sklearn.model_selection.train_test_split``, ``random_state``
= seed). Only the 80 % split is trained on; light augmentation shifts each image by -1, 0 or +1 px in
each direction (zero fill). The accuracies measured after export (with onnxruntime, on the exported
file) are written into the model's ``metadata_props`` so that tests can check what the file claims.

Data provenance and license: the digits are the "Optical Recognition of Handwritten Digits" data set
of the UCI Machine Learning Repository (E. Alpaydin, C. Kaynak, 1998; https://doi.org/10.24432/C50P49),
licensed CC BY 4.0, in the 8x8 form bundled with scikit-learn (BSD-3-Clause) as
``sklearn.datasets.load_digits`` (its test part: 1,797 images, nothing is downloaded). The trained
weights are derived from it; credit the data set when redistributing them.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from rexdeploy.demo import (
    DEMO_BATCH_DIM,
    DEMO_INPUT_NAME,
    DEMO_NUM_CLASSES,
    DEMO_OUTPUT_NAME,
    demo_model_path,
    preprocess_digits,
)

OPSET = 17
HELDOUT_FRACTION = 0.2
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 60
BATCH_SIZE = 256
LEARNING_RATE = 2e-2
WEIGHT_DECAY = 1e-4
THREADS = 2
EXPECTED_OP_TYPES = frozenset(
    {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
)


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stem, strided conv, depthwise-separable residual block, GAP, linear classifier."""

    def __init__(self, num_classes: int = DEMO_NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, kernel_size=3, padding=1, groups=32, bias=False)
        self.bn_dw = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 32, kernel_size=1, bias=False)
        self.bn_pw = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        y = self.relu(self.bn_dw(self.dw(x)))
        y = self.bn_pw(self.pw(y))
        x = self.relu(x + y)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: where the model went and the accuracies measured on the exported file."""

    output: Path
    accuracy_all: float
    accuracy_heldout: float
    accuracy_train: float
    n_train: int
    n_heldout: int
    train_seconds: float
    size_bytes: int


def set_determinism(seed: int) -> None:
    """Seed torch, force deterministic kernels and pin the thread count."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    with contextlib.suppress(RuntimeError):  # already set: parallel work has started in this process
        torch.set_num_interop_threads(THREADS)


def split_indices(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, held-out) indices: a stratified 80/20 split with ``random_state=seed``."""
    train, heldout = train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, stratify=labels, random_state=seed
    )
    return np.sort(train), np.sort(heldout)


def random_shift(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shift each raw (N, 8, 8) image by -1, 0 or +1 px along each axis, filling with 0 (background)."""
    n = images.shape[0]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    dy = np.asarray(rng.integers(0, 3, size=n))
    dx = np.asarray(rng.integers(0, 3, size=n))
    rows = dy[:, None] + np.arange(8)[None, :]  # (N, 8)
    cols = dx[:, None] + np.arange(8)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def train(images: np.ndarray, labels: np.ndarray, seed: int, epochs: int) -> DigitsCNN:
    """Train a :class:`DigitsCNN` on raw (N, 8, 8) images with Adam + cosine LR and shift augmentation."""
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(labels) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    y_all = torch.from_numpy(labels.astype(np.int64))
    model.train()
    for _ in range(epochs):
        x_all = torch.from_numpy(preprocess_digits(random_shift(images, rng)))
        order = torch.from_numpy(rng.permutation(len(labels)))
        for start in range(0, len(labels), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(x_all[idx]), y_all[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def export_onnx(model: DigitsCNN) -> onnx.ModelProto:
    """Export to ONNX (TorchScript exporter, opset 17) keeping BatchNormalization nodes; dynamic batch."""
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        path = Path(tmp) / "model.onnx"
        # dynamo=False is deliberate: the TorchScript exporter keeps BatchNormalization with PRESERVE.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            path,
            input_names=[DEMO_INPUT_NAME],
            output_names=[DEMO_OUTPUT_NAME],
            dynamic_axes={DEMO_INPUT_NAME: {0: DEMO_BATCH_DIM}, DEMO_OUTPUT_NAME: {0: DEMO_BATCH_DIM}},
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,  # nothing to fold; keeps the BN initializers as they are
            dynamo=False,
        )
        proto = onnx.load(path)
    op_types = {node.op_type for node in proto.graph.node}
    if op_types != EXPECTED_OP_TYPES:
        raise RuntimeError(f"unexpected op types in the export: {sorted(op_types)}")
    return proto


def onnx_accuracy(model_bytes: bytes, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model run by onnxruntime (CPU, 2 threads)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    (logits,) = session.run([DEMO_OUTPUT_NAME], {DEMO_INPUT_NAME: inputs})
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def make_demo_model(output: Path, seed: int = DEFAULT_SEED, epochs: int = DEFAULT_EPOCHS) -> TrainResult:
    """Train, export, measure and write the demo model; return what was measured."""
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, heldout_idx = split_indices(labels, seed)

    start = time.perf_counter()
    model = train(images[train_idx], labels[train_idx], seed, epochs)
    train_seconds = time.perf_counter() - start

    proto = export_onnx(model)
    inputs = preprocess_digits(images)
    raw = proto.SerializeToString()
    acc_all = onnx_accuracy(raw, inputs, labels)
    acc_heldout = onnx_accuracy(raw, inputs[heldout_idx], labels[heldout_idx])
    acc_train = onnx_accuracy(raw, inputs[train_idx], labels[train_idx])

    proto.doc_string = (
        "rexdeploy demo CNN for scikit-learn's 8x8 digits (UCI ML hand-written digits, CC BY 4.0). "
        "Input: pixels / 16, standardized with the digits' global pixel mean / std "
        "(rexdeploy.demo.preprocess_digits). Made by scripts/make_demo_model.py."
    )
    metadata = {
        "dataset": "sklearn.datasets.load_digits (UCI ML hand-written digits, CC BY 4.0)",
        "preprocessing": "rexdeploy.demo.preprocess_digits: (pixels / 16 - mean) / std",
        "seed": str(seed),
        "epochs": str(epochs),
        "heldout_fraction": str(HELDOUT_FRACTION),
        "split": f"train_test_split(stratify=labels, test_size={HELDOUT_FRACTION}, random_state={seed})",
        "n_train": str(len(train_idx)),
        "n_heldout": str(len(heldout_idx)),
        "accuracy_all_fp32": f"{acc_all:.6f}",
        "accuracy_heldout_fp32": f"{acc_heldout:.6f}",
        "accuracy_train_fp32": f"{acc_train:.6f}",
    }
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)

    output.parent.mkdir(parents=True, exist_ok=True)
    data = proto.SerializeToString()
    output.write_bytes(data)
    return TrainResult(
        output=output,
        accuracy_all=acc_all,
        accuracy_heldout=acc_heldout,
        accuracy_train=acc_train,
        n_train=len(train_idx),
        n_heldout=len(heldout_idx),
        train_seconds=train_seconds,
        size_bytes=len(data),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=demo_model_path(), help="where to write the model")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    args = parser.parse_args(argv)
    result = make_demo_model(args.output, seed=args.seed, epochs=args.epochs)
    print(f"wrote {result.output} ({result.size_bytes} bytes)")
    print(f"training: {result.train_seconds:.1f} s on {THREADS} threads, {args.epochs} epochs")
    print(
        f"fp32 accuracy (onnxruntime): all {result.accuracy_all:.4f}, "
        f"held-out {result.accuracy_heldout:.4f} (n={result.n_heldout}), "
        f"train {result.accuracy_train:.4f} (n={result.n_train})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
