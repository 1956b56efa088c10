"""Seeded byte-flip fuzzing of the CLI: every corrupted model is expanded or refused in one line.

Mutants of the shipped demo model and of a small model whose weights are Constant nodes (1, 5 or 50
random bytes replaced in the first 200 KB) go through ``rexdeploy expand --bits 8 --order 2`` (and a
few through ``inspect`` and through ``build`` with onnxruntime) in-process. For every mutant: exit 0 with an output that passes the full ONNX
check, or exit 1 with exactly one ``rexdeploy: error:`` line that is not a bug report; never a
traceback, never a partial output or temporary file. The seeds are fixed, so a failure replays.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import write_ort_profile
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.cli.main import main
from rexdeploy.demo import demo_model_path

MUTANTS_PER_MODEL = 150
BUILD_MUTANTS_PER_MODEL = 15
FLIPS = (1, 5, 50)
WINDOW = 200_000
EXPAND = ["--profile", "x86-avx512", "--bits", "8", "--order", "2"]


def constant_weights_model(seed: int = 0) -> onnx.ModelProto:
    """x(N,3,8,8) → Conv 3→6 3x3 (W, B Constant nodes) → Relu → GlobalAveragePool → Flatten → Gemm 6→10
    (W, B Constant nodes): no initializers at all."""
    rng = np.random.default_rng(seed)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        tensor = numpy_helper.from_array(value.astype(np.float32), f"{name}_value")
        return helper.make_node("Constant", [], [name], name=f"const_{name}", value=tensor)

    nodes = [
        const("conv_w", rng.normal(0, 0.3, (6, 3, 3, 3))),
        const("conv_b", rng.normal(0, 0.1, 6)),
        const("fc_w", rng.normal(0, 0.3, (10, 6))),
        const("fc_b", rng.normal(0, 0.1, 10)),
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "constant_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def mutate(data: bytes, seed: int) -> bytes:
    """``data`` with 1, 5 or 50 (seeded choice) bytes in its first 200 KB replaced by seeded random bytes."""
    rng = random.Random(seed)
    out = bytearray(data)
    window = min(len(out), WINDOW)
    for _ in range(rng.choice(FLIPS)):
        out[rng.randrange(window)] = rng.randrange(256)
    return bytes(out)


@pytest.fixture(scope="module")
def originals() -> dict[str, bytes]:
    return {
        "demo": demo_model_path().read_bytes(),
        "constants": constant_weights_model().SerializeToString(),
    }


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _check_outcome(
    capsys: pytest.CaptureFixture[str],
    code: int,
    folder: Path,
    model: Path,
    out: Path | None,
    label: str,
    onnx_out: Path | None = None,
) -> str:
    """Assert the CLI contract for one run in ``folder``; return 'ok' or the error line.

    ``out`` is what the run writes in ``folder`` (a file or a folder); ``onnx_out`` the model it writes (``out``
    by default when that is an .onnx file), which must pass the full ONNX check.
    """
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, f"{label}: {captured.err}"
    err_lines = captured.err.strip().splitlines()
    keep = {model.name}
    if code == 0:
        if out is not None:
            assert out.exists(), label
            keep.add(out.name)
            checked = onnx_out or (out if out.suffix == ".onnx" else None)
            if checked is not None:
                onnx.checker.check_model(str(checked), full_check=True)
        assert not any(line.startswith("rexdeploy: error") for line in err_lines), f"{label}: {captured.err}"
        result = "ok"
    else:
        assert code == 1, f"{label}: exit {code}: {captured.err}"
        assert len(err_lines) == 1, f"{label}: {captured.err}"
        result = err_lines[0]
        assert result.startswith("rexdeploy: error: "), f"{label}: {result}"
        # a corrupted input is the user's problem, reported as such; a bug report here is a real bug
        assert "please report" not in result and "internal error" not in result, f"{label}: {result}"
        assert captured.out == "", label
    assert _leftovers(folder, keep) == [], f"{label}: left {_leftovers(folder, keep)}"
    return result


@pytest.mark.parametrize("which", ["demo", "constants"])
def test_unmutated_models_expand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, originals: dict[str, bytes], which: str
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(originals[which])
    out = tmp_path / "out.onnx"
    code = main(["expand", str(model), "-o", str(out), *EXPAND])
    assert _check_outcome(capsys, code, tmp_path, model, out, which) == "ok"
    expanded = onnx.load(str(out))
    assert sum(n.op_type == "DequantizeLinear" for n in expanded.graph.node) >= 4  # both layers, 2 orders each


@pytest.mark.parametrize("which", ["demo", "constants"])
def test_fuzz_expand(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, originals: dict[str, bytes], which: str
) -> None:
    outcomes: Counter[str] = Counter()
    for seed in range(MUTANTS_PER_MODEL):
        folder = tmp_path / f"m{seed}"
        folder.mkdir()
        model = folder / "model.onnx"
        model.write_bytes(mutate(originals[which], seed))
        out = folder / "out.onnx"
        code = main(["expand", str(model), "-o", str(out), *EXPAND])
        line = _check_outcome(capsys, code, folder, model, out, f"{which} seed {seed}")
        if line != "ok":
            assert str(model) in line or "weight" in line, line  # names the file (or the bad weight)
        outcomes["ok" if line == "ok" else "refused"] += 1
    # both kinds occur: flips in weights are legal models, flips in the structure are refused
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes


def test_fuzz_inspect(capsys: pytest.CaptureFixture[str], tmp_path: Path, originals: dict[str, bytes]) -> None:
    """inspect reads every layer's weights (REx error per bits and K): the later stages see corrupted models too."""
    for which, data in originals.items():
        for seed in range(0, MUTANTS_PER_MODEL, 4):
            folder = tmp_path / f"{which}{seed}"
            folder.mkdir()
            model = folder / "model.onnx"
            model.write_bytes(mutate(data, seed))
            code = main(["inspect", str(model)])
            _check_outcome(capsys, code, folder, model, None, f"inspect {which} seed {seed}")


def test_fuzz_build(capsys: pytest.CaptureFixture[str], tmp_path: Path, originals: dict[str, bytes]) -> None:
    """build writes a folder (atomically) and runs engines on the mutant: the whole folder or nothing."""
    profile = write_ort_profile(tmp_path)
    outcomes: Counter[str] = Counter()
    for which, data in originals.items():
        for seed in range(BUILD_MUTANTS_PER_MODEL):
            folder = tmp_path / f"{which}{seed}"
            folder.mkdir()
            model = folder / "model.onnx"
            model.write_bytes(mutate(data, seed))
            out = folder / "out"
            argv = ["-q", "build", str(model), "--profile", str(profile), "--bits", "8", "--order", "2"]
            code = main([*argv, "--out", str(out), "--duration", "0.02s", "--warmup", "10ms"])
            line = _check_outcome(capsys, code, folder, model, out, f"build {which} seed {seed}", out / "expanded.onnx")
            if code == 0:
                assert (out / "report.json").is_file() and (out / "plan.json").is_file()
                assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
            else:
                assert not out.exists(), line
            outcomes["ok" if code == 0 else "refused"] += 1
    assert outcomes["ok"] > 0 and outcomes["refused"] > 0, outcomes


def test_refusals_name_the_file_and_the_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The three failures of the issue, reproduced by construction rather than by chance."""
    good = constant_weights_model()
    # a node name that is not UTF-8 (the Python protobuf runtime hands it back as bytes)
    data = good.SerializeToString()
    assert data.count(b"const_fc_w") == 1
    bad_name = tmp_path / "name" / "bad_name.onnx"
    bad_name.parent.mkdir()
    bad_name.write_bytes(data.replace(b"const_fc_w", b"const_fc\x83\xff"))
    # shapes strict shape inference rejects (Conv weight 3x3 but pads of the wrong length)
    bad_shape = onnx.ModelProto()
    bad_shape.CopyFrom(good)
    conv = next(n for n in bad_shape.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("pads", [1, 1, 1]))
    shape_path = tmp_path / "shape" / "bad_shape.onnx"
    shape_path.parent.mkdir()
    shape_path.write_bytes(bad_shape.SerializeToString())
    for path, needle in ((bad_name, "not valid UTF-8"), (shape_path, "ShapeInferenceError")):
        out = path.parent / "out.onnx"
        code = main(["expand", str(path), "-o", str(out), *EXPAND])
        line = _check_outcome(capsys, code, path.parent, path, out, path.name)
        assert line.startswith(f"rexdeploy: error: {path} is not a valid ONNX model: "), line
        assert needle in line, line
