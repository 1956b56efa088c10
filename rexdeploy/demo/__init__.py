"""The demo model: a small CNN trained on scikit-learn's digits, shipped as ONNX.

``digits_cnn.onnx`` is made by ``scripts/make_demo_model.py``. It classifies the 8x8 hand-written
digits of :func:`sklearn.datasets.load_digits` (the UCI ML hand-written digits data set, CC BY 4.0,
bundled with scikit-learn, BSD-3). See ``README.md`` in this folder for its architecture and provenance.

The preprocessing lives here, in :func:`preprocess_digits`, and nowhere else: the training script and
:func:`load_digits_inputs` both call it, so that what the model was trained on is what it is fed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rexdeploy.errors import InputError

__all__ = [
    "DEMO_BATCH_DIM",
    "DEMO_INPUT_NAME",
    "DEMO_INPUT_SHAPE",
    "DEMO_NUM_CLASSES",
    "DEMO_OUTPUT_NAME",
    "DIGITS_PIXEL_MAX",
    "DIGITS_PIXEL_MEAN",
    "DIGITS_PIXEL_STD",
    "demo_model_path",
    "load_digits_inputs",
    "preprocess_digits",
]

DEMO_MODEL_FILENAME = "digits_cnn.onnx"
DEMO_INPUT_NAME = "input"
DEMO_OUTPUT_NAME = "logits"
DEMO_BATCH_DIM = "batch"
DEMO_INPUT_SHAPE: tuple[str, int, int, int] = (DEMO_BATCH_DIM, 1, 8, 8)
DEMO_NUM_CLASSES = 10

# The digits pixels are integers in 0..16. After dividing by DIGITS_PIXEL_MAX they are standardized
# with the mean / std over every pixel of all 1,797 images (computed in float64, population std).
DIGITS_PIXEL_MAX = 16.0
DIGITS_PIXEL_MEAN = 0.30526028624095713
DIGITS_PIXEL_STD = 0.3760492217920148


def demo_model_path() -> Path:
    """Return the path of the shipped demo model, ``digits_cnn.onnx``."""
    return Path(__file__).resolve().parent / DEMO_MODEL_FILENAME


def preprocess_digits(pixels: np.ndarray) -> np.ndarray:
    """Turn raw digits pixels (values 0..16) into the demo model's input.

    ``pixels`` is shaped ``(N, 64)`` (``load_digits().data``) or ``(N, 8, 8)`` (``.images``). The result
    is float32, shaped ``(N, 1, 8, 8)``: ``((pixels / 16) - DIGITS_PIXEL_MEAN) / DIGITS_PIXEL_STD``.
    """
    x = np.asarray(pixels, dtype=np.float64)
    if x.ndim not in (2, 3) or x.shape[1:] not in ((64,), (8, 8)):
        raise InputError(f"digits pixels must be shaped (N, 64) or (N, 8, 8), got {x.shape}")
    x = x.reshape(-1, 1, 8, 8) / DIGITS_PIXEL_MAX
    return ((x - DIGITS_PIXEL_MEAN) / DIGITS_PIXEL_STD).astype(np.float32)


def load_digits_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Return all 1,797 digits as the model's input (float32, ``(N, 1, 8, 8)``) and their labels (int64).

    Needs scikit-learn (the data set is bundled with it; nothing is downloaded).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise InputError("scikit-learn is needed for the digits data: pip install scikit-learn") from exc
    digits = load_digits()
    inputs = preprocess_digits(digits.images)
    labels = np.asarray(digits.target, dtype=np.int64)
    return inputs, labels
