"""Regressions found by running the CLI on architectures the other tests do not cover (benchmarks/zoo.py).

Each case is a small inline ONNX model with the construct that broke: expected is exit 0 with a correct
expansion, or exit 1 with one line naming what is unsupported and what to do — never an internal error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rexdeploy.cli.main import main

PROFILE = ["--profile", "x86-avx512"]


def _unet(h: int | str, w: int | str, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x[N,2,H,W] → Conv → Relu (skip) → MaxPool 2 → Conv → Relu → Resize ×2 → Concat(skip) → Conv → y[N,3,H,W]."""
    rng = np.random.default_rng(0)
    np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 2, 3, 3)) * 0.4).astype(np_type), "w1"),
        numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np_type), "w2"),
        numpy_helper.from_array((rng.standard_normal((3, 8, 1, 1)) * 0.4).astype(np_type), "w3"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"),  # float in any model
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="enc", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["s1"], name="enc_relu"),
        helper.make_node("MaxPool", ["s1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], name="mid", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="mid_relu"),
        helper.make_node("Resize", ["r2", "", "scales"], ["u2"], name="up", mode="nearest"),
        helper.make_node("Concat", ["u2", "s1"], ["cat"], name="skip", axis=1),
        helper.make_node("Conv", ["cat", "w3"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "unet",
        [helper.make_tensor_value_info("x", dtype, ["N", 2, h, w])],
        [helper.make_tensor_value_info("y", dtype, ["N", 3, h, w])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _sequence_model(seq: int | str) -> onnx.ModelProto:
    """x[N,S,8] → MatMul(8→8) → Softmax over S → MatMul(8→4): a dynamic S was probed with S = 1."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "wa"),
        numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.3).astype(np.float32), "wb"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"], name="fc_a"),
        helper.make_node("Softmax", ["a"], ["s"], name="softmax", axis=1),
        helper.make_node("MatMul", ["s", "wb"], ["y"], name="fc_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", seq, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", seq, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _single_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "Traceback" not in captured.err
    lines = [line for line in captured.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rexdeploy: error: "), captured.err
    assert "internal error" not in lines[0] and "rexdeploy bug" not in lines[0], lines[0]
    return lines[0]


def _ort(model: str | Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


@pytest.mark.parametrize("command", ["expand", "plan"])
def test_dynamic_height_width_is_one_clear_line(
    command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A UNet exported with dynamic H / W was probed at 1×1: its skip Concat failed inside onnxruntime and the
    CLI printed 'internal error ... this is a rexdeploy bug'."""
    path = tmp_path / "unet_dyn.onnx"
    onnx.save(_unet("H", "W"), str(path))
    extra = ["-o", str(tmp_path / "out.onnx")] if command == "expand" else ["--budget", "1ms", "--estimate"]
    line = _single_error(capsys, main(["-q", command, str(path), *PROFILE, *extra]))
    assert "'x' has dynamic dimension 2 ('H')" in line and "make_dynamic_shape_fixed" in line, line
    assert not (tmp_path / "out.onnx").exists()


def test_dynamic_sequence_axis_is_refused_not_probed_on_one_token(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A dynamic sequence axis was silently probed with length 1 (activation ranges of a one-token sequence)."""
    path = tmp_path / "seq_dyn.onnx"
    onnx.save(_sequence_model("S"), str(path))
    line = _single_error(capsys, main(["-q", "expand", str(path), *PROFILE, "-o", str(tmp_path / "out.onnx")]))
    assert "'x' has dynamic dimension 1 ('S')" in line, line


def test_static_unet_expands_close_to_fp32(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The same UNet with fixed H / W (and a dynamic batch) expands, and the expansion stays near FP32."""
    path, out = tmp_path / "unet.onnx", tmp_path / "unet_w8a8.onnx"
    onnx.save(_unet(16, 16), str(path))
    code = main(["-q", "expand", str(path), *PROFILE, "--bits", "8", "--order", "1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    x = np.random.default_rng(3).standard_normal((4, 2, 16, 16)).astype(np.float32)
    ref, got = _ort(path, x), _ort(out, x)
    assert got.shape == ref.shape == (4, 3, 16, 16)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert 1e-4 < rel < 0.1, rel  # quantized (not a copy of FP32), and close


def test_float16_model_is_one_clear_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A float16 export (model.half()) ended as 'the model rexdeploy emitted fails the ONNX checker ... this is
    a rexdeploy bug' (expand) and an onnxruntime type error reported as an internal error (plan)."""
    path = tmp_path / "unet_fp16.onnx"
    onnx.save(_unet(16, 16, TensorProto.FLOAT16), str(path))
    for argv in (
        ["expand", str(path), *PROFILE, "-o", str(tmp_path / "out.onnx")],
        ["plan", str(path), *PROFILE, "--budget", "1ms", "--estimate"],
    ):
        line = _single_error(capsys, main(["-q", *argv]))
        assert "float16 model" in line and "float32" in line, line


def test_initializers_listed_as_inputs_stay_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """torch.onnx.export(keep_initializers_as_inputs=True) lists every weight as a graph input too: the
    expansion dropped the weights' initializers but kept their input entries, so the written model required
    the weights as inputs and onnxruntime refused to run it on the real input alone."""
    model = _unet(16, 16)
    model.graph.input.extend(
        helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in model.graph.initializer
    )
    onnx.checker.check_model(model, full_check=True)
    path, out = tmp_path / "weights_as_inputs.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(path))
    code = main(["-q", "expand", str(path), *PROFILE, "--bits", "8", "--order", "1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert [i.name for i in onnx.load(str(out)).graph.input] == ["x"]
    x = np.random.default_rng(4).standard_normal((2, 2, 16, 16)).astype(np.float32)
    ref, got = _ort(path, x), _ort(out, x)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert 1e-4 < rel < 0.1, rel


def _token_model() -> onnx.ModelProto:
    """ids[N,8] int64 → Gather(table[64,16], row 0 = 0: a padding row) → MatMul(16→16) → Relu → MatMul(16→4);
    mask[N,8] int64 → Cast → Unsqueeze → y scaled by the mask."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((64, 16)).astype(np.float32)
    table[0] = 0.0  # nn.Embedding(padding_idx=0)
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((16, 4)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="fc2"),
        helper.make_node("Cast", ["mask"], ["mf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axis2"], ["m3"], name="unsq"),
        helper.make_node("Mul", ["o", "m3"], ["y"], name="apply_mask"),
    ]
    graph = helper.make_graph(
        nodes,
        "tokens",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 8]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_token_ids_are_probed_within_the_vocabulary(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The data-free activation ranges probed integer inputs with zeros: every token id 0 (the padding row,
    all zeros here) and every mask 0, so the embedding's readers were ranged on nothing; a BERT-style encoder
    came out at 0.052 relative error (W8A8 K=1) where probing real token ids gives 0.018."""
    path, out = tmp_path / "tokens.onnx", tmp_path / "tokens_w8a8.onnx"
    onnx.save(_token_model(), str(path))
    code = main(["-q", "expand", str(path), *PROFILE, "--bits", "8", "--order", "1", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    rng = np.random.default_rng(6)
    feeds = {"ids": rng.integers(1, 64, (16, 8)).astype(np.int64), "mask": np.ones((16, 8), dtype=np.int64)}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref, got = (
        ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0] for p in (path, out)
    )
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert 1e-4 < rel < 0.05, rel


_FORK_AND_TERMINATE = """
import multiprocessing, sys, time
from rexdeploy.cli.main import _stop_signals_raise

def sleep(started):
    started.set()
    time.sleep(30)

def deadlocked(started):  # blocked inside C, as a child forked while another thread held a lock: no bytecode runs
    import ctypes
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER, a normal (non-recursive) mutex
    libc.pthread_mutex_lock(mutex)
    started.set()
    libc.pthread_mutex_lock(mutex)  # relocking a normal mutex waits forever; a signal's Python handler never runs

if __name__ == "__main__":
    context = multiprocessing.get_context("fork")
    started = context.Event()
    target = deadlocked if sys.argv[1:] == ["deadlocked"] else sleep
    with _stop_signals_raise():
        child = context.Process(target=target, args=(started,))
        child.start()
        assert started.wait(20)  # running its target (a signal in the fork window itself is dropped by Python)
        child.terminate()
        child.join(20)
    if child.exitcode is None:
        child.kill()
    print(child.exitcode)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (OpenVINO's telemetry forks its sender)")
def test_forked_child_deadlocked_in_c_still_dies_on_sigterm(tmp_path: Path) -> None:
    """A child forked while the CLI's stop handlers are installed, then blocked inside C (a lock held at fork time:
    OpenVINO's telemetry sender): a Python handler never runs there, so it ignored SIGTERM and the parent waited for it
    forever at exit (a test run hung 33 minutes after its last test). The child now gets the default action at fork."""
    script = tmp_path / "fork_and_terminate.py"
    script.write_text(_FORK_AND_TERMINATE, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script), "deadlocked"], capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(-signal.SIGTERM), (done.stdout, done.stderr)  # not None: killed, not hung


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (OpenVINO's telemetry forks its sender)")
def test_forked_child_terminated_dies_quietly(tmp_path: Path) -> None:
    """OpenVINO's telemetry (openvino.convert_model) sends from a forked process and terminates it after a
    timeout where there is no network: the child inherited the CLI's SIGTERM handler, raised Terminated and
    printed two tracebacks into a successful build's output (audio_m5 build). It now dies as by default.
    In a fresh interpreter: a fork of this test process (onnxruntime / OpenVINO threads) may crash on its own."""
    script = tmp_path / "fork_and_terminate.py"
    script.write_text(_FORK_AND_TERMINATE, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(-signal.SIGTERM), (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr


def _static_batch_unet() -> onnx.ModelProto:
    """The UNet with a fixed batch of 1 everywhere: torch.onnx.export without dynamic_axes."""
    model = _unet(16, 16)
    for t in (*model.graph.input, *model.graph.output):
        t.type.tensor_type.shape.dim[0].ClearField("dim_param")
        t.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.checker.check_model(model, full_check=True)
    return model


def test_batch_of_one_export_is_probed_on_every_probe() -> None:
    """A fixed batch of 1 made the data-free ranges run on a single probe instead of ``batch`` (MobileNetV3-like
    at 96 px, W8A8 K=1: 0.245 rel. error vs 0.171 for the same weights with a dynamic batch; 0.192 after)."""
    from rexdeploy.ranges import probe_ranges

    model = _static_batch_unet()
    taps = ["x", "s1", "r2", "cat"]
    many = probe_ranges(model, taps, batch=8, seed=3)
    each = [probe_ranges(model, taps, batch=1, seed=3 + i) for i in range(8)]
    for tap in taps:
        assert many[tap] == pytest.approx(max(e[tap] for e in each), rel=1e-6), tap
    assert any(many[t] > each[0][t] for t in taps)  # more than the first probe was seen


def test_calibration_batch_on_a_batch_of_one_export(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--calib with N > 1 samples on a fixed-batch-1 model ended in 'internal error (... Got invalid dimensions
    for input ...)'; the samples now run one at a time."""
    path, out, calib = tmp_path / "unet_b1.onnx", tmp_path / "out.onnx", tmp_path / "calib.npy"
    onnx.save(_static_batch_unet(), str(path))
    np.save(calib, np.random.default_rng(8).standard_normal((5, 2, 16, 16)).astype(np.float32))
    argv = ["-q", "expand", str(path), *PROFILE, "--bits", "8", "--order", "1", "--calib", str(calib), "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    x = np.random.default_rng(9).standard_normal((1, 2, 16, 16)).astype(np.float32)
    ref, got = _ort(path, x), _ort(out, x)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert 1e-4 < rel < 0.1, rel


def _label_first_model() -> onnx.ModelProto:
    """x[N,3,8,8] → Conv → Relu → GlobalAveragePool → Gemm → logits; outputs (ArgMax label, logits)."""
    rng = np.random.default_rng(12)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((10, 16)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2"], ["logits"], name="fc", transB=1),
        helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "label_first",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fidelity_and_self_check_read_the_float_output(tmp_path: Path) -> None:
    """A model whose first output is an ArgMax label: the fidelity measurement and the build's self-check
    compared the integer labels (a bf16 engine read 'relative error 0.00e+00') and never the logits."""
    from rexdeploy_onnxruntime import OnnxRuntimeBuilder

    from rexdeploy.api import expand_model
    from rexdeploy.fidelity import compare_outputs, measure_fidelity_on
    from rexdeploy.profile import Parallel, Profile
    from rexdeploy.selfcheck import engine_outputs, reference_outputs

    model = _label_first_model()
    paths = {"fp32": tmp_path / "fp32.onnx", "q": tmp_path / "q.onnx"}
    onnx.save(model, str(paths["fp32"]))
    onnx.save(expand_model(model, bits=8, order=1, act_bits=8).model, str(paths["q"]))
    builder = OnnxRuntimeBuilder()
    profile = Profile(name="test-cpu", engine="onnxruntime", device="CPU", parallel=Parallel(cores=1))
    engines = {name: builder.build(path, profile, tmp_path / name) for name, path in paths.items()}
    x = np.random.default_rng(13).standard_normal((6, 3, 8, 8)).astype(np.float32)
    got = measure_fidelity_on(builder, engines["fp32"], engines["q"], {"x": x})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    logits = {
        name: ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
        for name, path in paths.items()
    }
    want = compare_outputs(logits["fp32"], logits["q"])
    assert want.relative_error > 1e-4  # W8A8: not exact
    assert got.relative_error == pytest.approx(want.relative_error, rel=0.15)
    ref = reference_outputs(paths["q"], {"x": x})
    eng = engine_outputs(builder, engines["q"], {"x": x}, ["label", "logits"])
    assert list(ref) == list(eng) == ["logits"]  # the labels are not compared
    assert ref["logits"].dtype == eng["logits"].dtype == np.float32 and ref["logits"].shape == (6, 10)


def _audio_net(batchnorm: bool) -> onnx.ModelProto:
    """x[1,1,256] (a waveform) → Conv1d k9 [→ BatchNormalization] → Relu → GlobalAveragePool → Flatten → Gemm."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 1, 9)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((4, 8)) * 0.5).astype(np.float32), "fc")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    act_in = "c"
    if batchnorm:  # trained on RMS-0.1 waveforms: the conv's output std is 0.1·‖w_o‖
        std = 0.1 * np.linalg.norm(numpy_helper.to_array(inits[0]).reshape(8, -1), axis=1)
        inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
                  (("g", np.ones(8)), ("b", np.zeros(8)), ("m", np.zeros(8)), ("v", std**2))]  # fmt: skip
        nodes.append(helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"))
        act_in = "n"
    nodes += [
        helper.make_node("Relu", [act_in], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="head", transB=1),
    ]
    graph = helper.make_graph(nodes, "audio", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize(("batchnorm", "calibrate", "warned"), [(False, False, True), (True, False, False),
                                                                (False, True, False)])  # fmt: skip
def test_build_warns_when_nothing_says_an_int8_model_input_scale(tmp_path: Path, batchnorm: bool, calibrate: bool,
                                                                 warned: bool) -> None:  # fmt: skip
    """An audio net whose export folded its BatchNorm: the int8 range of the waveform input assumes N(0, 1) values,
    and so does the estimate (a waveform of RMS 0.1 erred 0.146 at W8A8 K=1, 0.015 with --calib; zoo). The build
    says so; not where the BatchNorm gives the scale, nor with --calib."""
    from rexdeploy.builders.base import TimingSettings
    from rexdeploy.closedloop import build
    from rexdeploy.profile import Parallel, Profile

    path = tmp_path / "audio.onnx"
    onnx.save(_audio_net(batchnorm), str(path))
    calib = None
    if calibrate:
        calib = tmp_path / "calib.npy"
        np.save(calib, (0.1 * np.random.default_rng(0).standard_normal((4, 1, 256))).astype(np.float32))
    profile = Profile(name="test-cpu", engine="onnxruntime", device="CPU", parallel=Parallel(cores=1))
    report = build(path, profile, out_dir=tmp_path / "out", bits=8, order=1, act_bits=8, calibration_path=calib,
                   timing=TimingSettings(warmup_s=0.01, duration_s=0.05, min_runs=3))  # fmt: skip
    warnings = [w for w in report.warnings if "int8 range of model input 'x'" in w]
    assert bool(warnings) == warned, report.warnings
    if warned:
        assert "--calib" in warnings[0] and "N(0, 1)" in warnings[0]
