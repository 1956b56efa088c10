"""``examples/edge_deploy.py`` run as a user would: a subprocess, its output lines, its files, its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "edge_deploy.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_builds_and_compares_with_fp32_here(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    out = tmp_path / "deploy"
    proc = run("--profile", "x86-avx2", "--duration", "0.1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "profile  x86-avx2 (openvino on CPU)"
    assert lines[1].startswith("plan     ")
    assert lines[2].startswith("latency  REx ") and " vs FP32 " in lines[2] and "REx/FP32 = " in lines[2]
    assert lines[3] == "budget   2 ms: met"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["profile"] == "x86-avx2"
    assert report["budget_ms"] == 2.0
    assert report["fits_budget"] is True
    assert (out / "plan.json").is_file()


def test_falls_back_to_plan_and_expand_when_engine_missing(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed: the fallback path is not taken")
    except ImportError:
        pass
    out = tmp_path / "for-target"
    proc = run("--profile", "a100", "--duration", "0.1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "engine   tensorrt not installed here" in proc.stdout
    assert "on the target: pip install 'rexdeploy[tensorrt]'" in proc.stdout
    assert f"rexdeploy bench {out / 'expanded.onnx'} --profile a100" in proc.stdout
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    assert plan["profile"] == "a100"
    onnx.checker.check_model(onnx.load(str(out / "expanded.onnx")))


def test_errors_exit_1_with_one_line(tmp_path: Path) -> None:
    proc = run("--profile", "no-such-profile", "--out", str(tmp_path / "x"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("edge_deploy: error: unknown profile 'no-such-profile'")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()
