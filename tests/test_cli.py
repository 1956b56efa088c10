"""The CLI contract: exit codes, one-line errors without traceback, no partial output, --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import no_conv_model, small_cnn

from rexdeploy.cli.main import main
from rexdeploy.demo import demo_model_path
from rexdeploy.plans import load_plan


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    errors = [line for line in lines if line.startswith("rexdeploy: error: ")]
    assert errors == [lines[-1]], captured.err  # one error line, last; progress lines may precede it
    assert needle in lines[-1]
    assert "Traceback" not in captured.err
    assert captured.out == ""


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    good = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), str(good))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    relu = tmp_path / "relu.onnx"
    onnx.save(no_conv_model(), str(relu))
    return {"text": text, "good": good, "truncated": truncated, "relu": relu, "missing": tmp_path / "nope.onnx"}


@pytest.mark.parametrize(
    ("which", "extra", "needle"),
    [
        ("missing", [], "not found"),
        ("text", [], "is not a readable ONNX model"),
        ("truncated", [], "is not a readable ONNX model"),
        ("relu", [], "no Conv or Gemm node"),
        ("good", ["--profile", "nope"], "unknown profile 'nope'"),
        ("good", ["--budget", "5"], "malformed budget '5'"),
        ("good", ["--budget=-1ms"], "malformed budget '-1ms'"),
        ("good", ["--budget", "fast"], "malformed budget 'fast'"),
        ("good", ["--bits", "9"], "9-bit weights exceed what profile 'x86-avx512'"),
    ],
)
def test_build_bad_input(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    bad_files: dict[str, Path],
    which: str,
    extra: list[str],
    needle: str,
) -> None:
    out = tmp_path / "out"
    code = main(["build", str(bad_files[which]), "--out", str(out), "--profile", "x86-avx512", *extra])
    _one_line_error(capsys, code, needle)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("which", "extra", "needle"),
    [
        ("missing", [], "not found"),
        ("truncated", [], "is not a readable ONNX model"),
        ("relu", [], "no Conv or Gemm node"),
        ("good", ["--order", "3", "--ensemble", "1,1"], "summing to K=3"),
        ("good", ["--plan", "missing.json"], "plan file missing.json not found"),
    ],
)
def test_expand_bad_input(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    bad_files: dict[str, Path],
    which: str,
    extra: list[str],
    needle: str,
) -> None:
    out = tmp_path / "x.onnx"
    code = main(["expand", str(bad_files[which]), "-o", str(out), *extra])
    _one_line_error(capsys, code, needle)
    assert not out.exists()


def test_expand_writes_checked_model_and_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bad_files: dict[str, Path]
) -> None:
    out = tmp_path / "x.onnx"
    code = main(
        [
            "expand",
            str(bad_files["good"]),
            "-o",
            str(out),
            "--profile",
            "x86-avx512",
            "--bits",
            "4",
            "--order",
            "3",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["plan"] == "W4A8 K=3 branches on 4 layers"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_plan_file_and_flags_make_the_same_plan(
    tmp_path: Path, bad_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from rexdeploy.api import default_plan, quantizable_layers
    from rexdeploy.graph import fold_batchnorm
    from rexdeploy.profile import load_profile

    folded, _ = fold_batchnorm(small_cnn())
    plan = default_plan(quantizable_layers(folded), load_profile("x86-avx512"), bits=4, order=3)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["expand", str(bad_files["good"]), "-o", str(a), "--plan", str(plan_path)]) == 0
    assert (
        main(["expand", str(bad_files["good"]), "-o", str(b), "--profile", "x86-avx512", "--bits", "4", "--order", "3"])
        == 0
    )
    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    assert [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]
    assert {i.name: i.raw_data for i in ma.graph.initializer} == {i.name: i.raw_data for i in mb.graph.initializer}


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["build"])
    assert exc.value.code == 2


ENGINE_MODULES = ("openvino", "tensorrt", "onnxruntime", "onnx")
COMMANDS = ("build", "plan", "expand", "inspect", "bench", "profile", "export", "serve")


def test_help_without_engines_and_no_traceback_in_subprocess(tmp_path: Path) -> None:
    # `rexdeploy --help` in a fresh interpreter: usage on stdout, exit 0, no engine (nor onnx) imported
    code = (
        "import sys\nfrom rexdeploy.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as exc:\n    status = exc.code\nelse:\n    status = 'returned'\n"
        f"print('STATUS', status, sorted(m for m in sys.modules if m.split('.')[0] in {ENGINE_MODULES!r}))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert res.stdout.startswith("usage: rexdeploy"), res.stdout
    assert res.stdout.strip().splitlines()[-1] == "STATUS 0 []"
    assert all(f"    {command} " in res.stdout for command in COMMANDS), res.stdout
    assert res.stderr == ""
    # every subcommand's help, through the console entry point's module
    for command in COMMANDS:
        sub = subprocess.run([sys.executable, "-m", "rexdeploy", command, "--help"], capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: rexdeploy {command}"), (command, sub.stderr)
    res = subprocess.run(
        [sys.executable, "-m", "rexdeploy", "build", str(tmp_path / "none.onnx")], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"rexdeploy: error: model file {tmp_path / 'none.onnx'} not found"]


def test_profile_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "list"]) == 0
    out = capsys.readouterr().out
    assert "x86-avx512" in out and "h100" in out
    assert main(["profile", "show", "a100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == "tensorrt"


@pytest.mark.openvino
def test_build_demo_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    out = tmp_path / "build"
    code = main(
        [
            "build",
            str(demo_model_path()),
            "--order",
            "2",
            "--budget",
            "50ms",
            "--out",
            str(out),
            "--duration",
            "0.3s",
            "--warmup",
            "50ms",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["fits_budget"] is True
    assert report["rex"]["timing"]["median_ms"] > 0 and report["baselines"]["fp32"]["timing"]["median_ms"] > 0
    assert report["ratios"]["rex_vs_fp32"] == pytest.approx(
        report["rex"]["timing"]["median_ms"] / report["baselines"]["fp32"]["timing"]["median_ms"]
    )
    for name in ("expanded.onnx", "plan.json", "report.json", "report.md", "rex/model.xml", "fp32/model.xml"):
        assert (out / name).is_file(), name
    # the reported fidelity is what the expanded graph itself computes against FP32 on the same 32 synthetic
    # probes (seeds 1..32, batch 1), both evaluated exactly by onnxruntime with optimizations off
    from reference import run_exact

    from rexdeploy.fidelity import compare_outputs
    from rexdeploy.graph import load_model
    from rexdeploy.ranges import synthetic_inputs

    fp32_model, expanded = load_model(demo_model_path()), onnx.load(str(out / "expanded.onnx"))
    probes = [synthetic_inputs(fp32_model, batch=1, seed=1 + i)["input"] for i in range(32)]
    exact = compare_outputs(np.concatenate([run_exact(fp32_model, x, "input") for x in probes]),
                            np.concatenate([run_exact(expanded, x, "input") for x in probes]))  # fmt: skip
    assert 0.005 < exact.relative_error < 0.05  # W8A8 (W7A8 without VNNI), K = 2 on the demo: ~0.021
    # the estimate's Gaussian family is these probes; the estimate itself is the worst figure over the families
    estimate = report["fidelity"]["estimate"]
    assert report["fidelity"]["relative_error"] == max(f["relative_error"] for f in estimate["families"].values())
    fidelity = estimate["families"]["gaussian"]
    assert fidelity["probes"] == 32
    # f32 engines add only a few flipped activation codes (measured: 0.2 % of the error on AVX-512 VNNI,
    # 2e-5 % on x86-avx2); bf16 float layers (the profiles of AVX-512 BF16 and AMX hosts) add their own rounding
    # and flip the int8 codes of values they round across a step (+6 % measured, up to ~20 % on some probe sets)
    bf16 = any("bf16" in kinds for kinds in report["rex"]["precisions"].values())
    tol = 0.3 if bf16 else 0.02
    assert fidelity["relative_error"] == pytest.approx(exact.relative_error, rel=tol)
    assert 1.0 - fidelity["cosine"] == pytest.approx(1.0 - exact.cosine, rel=2 * tol)
    assert fidelity["top1_agreement"] == pytest.approx(exact.top1_agreement, abs=2 / 32)
    assert json.loads((out / "report.json").read_text())["plan_hash"] == report["plan_hash"]
    assert "expanding digits_cnn.onnx" in captured.err  # progress on stderr


def test_inspect_lists_layers_errors_and_float_nodes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
            helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
            helper.make_node("MatMul", ["h", "ht"], ["y"], name="attention_scores"),
        ],
        "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])],
        [onnx.numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "attn.onnx"
    onnx.save(model, str(path))
    assert main(["inspect", str(path), "--bits", "8,4", "--orders", "1,2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["name"] for layer in report["layers"]] == ["proj"]
    errors = report["layers"][0]["errors"]
    assert errors["W8K2"] < errors["W8K1"] / 50 and errors["W4K2"] < errors["W4K1"] / 5
    assert report["float_nodes"] == [
        {"name": "attention_scores", "op_type": "MatMul", "reason": "no constant weight (both inputs are activations)"}
    ]
    assert main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert "proj" in table and "stays float: attention_scores" in table
    assert main(["inspect", str(path), "--bits", "9"]) == 1
    assert "weight bits 9 not supported" in capsys.readouterr().err


@pytest.mark.openvino
def test_build_with_planner_and_budget_ratio(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    out = tmp_path / "planned"
    args = ["build", str(demo_model_path()), "--budget-ratio", "1.5", "--out", str(out), "--duration", "0.3s", "--json"]
    code = main([*args, "--warmup", "50ms"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    from rexdeploy_openvino import OpenVINOBuilder

    from rexdeploy.profile import load_profile

    default = OpenVINOBuilder().default_float_precision(load_profile("auto"))  # bf16 on AVX-512 BF16 / AMX CPUs
    expected = {"fp32", "int8"} | ({f"{default} (default)"} if default == "bf16" else set())
    assert set(report["baselines"]) == expected
    assert report["baselines"]["fp32"]["precisions"]  # the FP32 reference ran in f32 whatever the host's default
    assert all("bf16" not in p for p in report["baselines"]["fp32"]["precisions"].values())
    fastest = min((k for k in expected if k != "int8"), key=lambda k: report["baselines"][k]["timing"]["median_ms"])
    assert report["fastest_float"] == fastest
    assert report["budget_ms"] == pytest.approx(1.5 * report["baselines"]["int8"]["timing"]["median_ms"])
    assert report["latency_model"]["source"] == "measured" and report["latency_model"]["planning_s"] > 0
    returned = [e for e in report["latency_model"]["engines"] if e["returned"]]
    assert len(returned) == 1 and returned[0]["fits"] and returned[0]["median_ms"] == report["rex"]["timing"]["median_ms"]
    # the choice among engines that fit compares errors measured on the probes, the returned one's is the report's
    for e in report["latency_model"]["engines"]:
        if e["fits"] and e["plan"].startswith("no layer quantized (fp32"):
            assert e["error_source"] == "exact" and e["predicted_error"] == 0.0
        elif e["fits"]:
            assert e["error_source"] == "measured on the probes", e
    if returned[0]["error_source"] != "exact":
        assert returned[0]["predicted_error"] == pytest.approx(report["fidelity"]["relative_error"], rel=1e-9)
    assert report["pareto_front"]
    assert report["fits_budget"] is True
    assert (out / "pareto.png").is_file() and (out / "plan.json").is_file()
    assert "plan (attempt 1)" in captured.err


@pytest.mark.openvino
def test_budget_ratio_relative_to_the_default_float_engine(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--relative-to default: the budget is the ratio times the engine a user gets by just loading the model (bf16 on
    AVX-512 BF16 / AMX hosts, else FP32), timed in the same run; no plain int8 baseline is built for it."""
    pytest.importorskip("openvino")
    out = tmp_path / "rel"
    args = ["build", str(demo_model_path()), "--budget-ratio", "1", "--relative-to", "default", "--out", str(out),
            "--duration", "0.3s", "--warmup", "50ms", "--json"]  # fmt: skip
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert "int8" not in report["baselines"]
    default = next((k for k in report["baselines"] if k.endswith("(default)")), "fp32")
    # where the build measured fewer inference threads faster (runtime_threads; it depends on the host), the budget is
    # relative to the engine as a user loads it, on the runtime's default threads: not a candidate, the reference
    ref_key = default
    if report["threads"].get("threads"):
        ref_key = "reference"
        label = f"{'FP32' if default == 'fp32' else default}, as loaded ({report['threads']['default_threads']} threads)"
        assert report["baselines"]["reference"]["label"] == label
        assert f"({label})" in captured.err
    else:
        assert "reference" not in report["baselines"]
    line = next(line for line in captured.err.splitlines() if line.startswith("budget: 1 x the default float engine"))
    assert f"({default}" in line
    # settled at the end: that engine and the engines near the budget timed again in interleaved rounds, the budget
    # 1 x its timing there (what the report shows for it), the returned engine's timing from the same rounds
    assert "interleaved rounds" in captured.err and "budget settled at" in captured.err
    assert report["budget_ms"] == pytest.approx(report["baselines"][ref_key]["timing"]["median_ms"], rel=1e-12)
    assert report["latency_model"]["budget_ms"] == report["budget_ms"]
    assert report["rex"]["timing"]["median_ms"] <= report["budget_ms"]


def test_relative_to_needs_a_budget_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", str(demo_model_path()), "--relative-to", "fp32"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--relative-to" in err and "give --budget-ratio too" in err


@pytest.mark.openvino
def test_plan_measures_on_this_device_once_then_reads_the_cached_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    args = ["plan", str(demo_model_path()), "--profile", "x86-avx512", "--budget", "10s", "-o", str(tmp_path / "p.json")]
    assert main(args) == 0
    err = capsys.readouterr().err
    from rexdeploy.analyze import quantizable_layers
    from rexdeploy.graph import fold_batchnorm, load_model
    from rexdeploy.probing import probe_plans
    from rexdeploy.profile import load_profile

    layers = quantizable_layers(fold_batchnorm(load_model(demo_model_path()))[0])
    n_probes = len(probe_plans(layers, load_profile("x86-avx512")))  # 7: the demo's Gemm adds the dynamic probe
    assert f"probing: {n_probes} probe engines" in err and "latencies: measured on this device (cost table)" in err
    assert "planner: FP32" in load_plan(tmp_path / "p.json").notes[0]  # everything fits 10 s: the exact engine
    assert "latency measured on the device" in load_plan(tmp_path / "p.json").notes[0]
    assert main(args) == 0
    err = capsys.readouterr().err
    from rexdeploy_openvino import OpenVINOBuilder

    # the probes, the FP32 engine, and the default float engine where the host's is not f32 (bf16 CPUs)
    floats = 1 + (OpenVINOBuilder().default_float_precision(load_profile("x86-avx512")) != "fp32")
    assert f"cost table: cached ({n_probes + floats} probe engines" in err and "probing" not in err


@pytest.mark.openvino
def test_build_budget_nothing_fits(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    out = tmp_path / "none"
    code = main(["build", str(demo_model_path()), "--budget", "1us", "--out", str(out), "--duration", "0.1s"])
    _one_line_error(capsys, code, "no engine fits the 1 us budget on")
    assert not out.exists()


def test_quiet_and_verbose(capsys: pytest.CaptureFixture[str], tmp_path: Path, bad_files: dict[str, Path]) -> None:
    import logging

    args = ["plan", str(bad_files["good"]), "--profile", "x86-avx512", "--budget", "1s", "--estimate"]
    assert main(["-v", *args]) == 0
    err = capsys.readouterr().err
    assert "DEBUG rexdeploy.planner.search: planner:" in err
    assert main(["-q", *args]) == 0
    assert "DEBUG" not in capsys.readouterr().err
    assert logging.getLogger("rexdeploy").level == logging.WARNING
    with pytest.raises(SystemExit):
        main(["-q", "-v", *args])


def test_verbose_logs_follow_the_stderr_of_each_run(monkeypatch: pytest.MonkeyPatch, bad_files: dict[str, Path]) -> None:
    """``main`` run twice in one process (a script, the tests), each time under another stderr: the debug log goes
    to the current one (a handler kept from the first run wrote to its closed stream: '--- Logging error ---')."""
    import io
    import sys

    args = ["-v", "plan", str(bad_files["good"]), "--profile", "x86-avx512", "--budget", "1s", "--estimate"]
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert main(args) == 0
    assert "DEBUG rexdeploy.planner.search: planner:" in first.getvalue()
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    assert main(args) == 0
    assert "DEBUG rexdeploy.planner.search: planner:" in second.getvalue()
    assert "Logging error" not in second.getvalue()
