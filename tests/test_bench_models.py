"""The real-model benchmark's helpers (``benchmarks/models.py``): the digits ViT exports to ONNX exactly, every
projection is a layer rexdeploy quantizes, and the digits splits are the ones claimed.

Fast checks only (an untrained ViT; the seeded training itself runs in ``benchmarks/bench_models.py``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest

from rexdeploy.analyze import find_layers

BENCH_MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "models.py"


def _bench_models() -> ModuleType:
    """``benchmarks/models.py`` under its own name (``tests/models.py`` already owns ``models``)."""
    spec = importlib.util.spec_from_file_location("rexdeploy_bench_models", BENCH_MODELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_vit_exports_to_onnx_like_torch_with_quantizable_matmuls(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    bm = _bench_models()
    cfg = bm.VIT_CONFIG
    torch.manual_seed(0)
    model = bm._vit_module(cfg["patch"], cfg["dim"], cfg["heads"], cfg["depth"], cfg["mlp"]).eval()
    path = tmp_path / "vit.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
                      do_constant_folding=True, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(bm.run_onnx(path, x), want, rtol=1e-4, atol=1e-5)
    layers = find_layers(onnx.load(str(path)))
    # embed + per block (qkv, proj, mlp.0, mlp.2) + head
    assert len(layers) == 2 + 4 * cfg["depth"]
    assert [layer.op_type for layer in layers].count("MatMul") == 1 + 4 * cfg["depth"]
    shapes = {layer.name.split("/")[-2]: layer.weight_shape for layer in layers}
    assert shapes["qkv"] == (3 * cfg["dim"], cfg["dim"])
    assert shapes["mlp.0"] == (cfg["mlp"], cfg["dim"])


@pytest.mark.slow
def test_digits_splits_are_disjoint_and_the_demo_heldout_split_is_the_recorded_one() -> None:
    pytest.importorskip("sklearn")
    bm = _bench_models()
    train, test = bm.digits_split(1797)
    assert len(test) == 359 and len(train) + len(test) == 1797
    assert not set(train.tolist()) & set(test.tolist())
    np.testing.assert_array_equal(bm.digits_split(1797)[1], test)  # seeded: the same every time

    digits = bm.digits_model()
    heldout = bm.demo_heldout_index(digits.labels)
    meta = {p.key: p.value for p in digits.model.metadata_props}
    assert len(heldout) == int(meta["n_heldout"])
    logits = bm.run_onnx(digits.model, digits.inputs[heldout], batch=512)
    assert bm.accuracy(logits, digits.labels[heldout]) == pytest.approx(float(meta["accuracy_heldout_fp32"]), abs=1e-5)
