"""Stop signals: SIGTERM is handled like Ctrl-C (temporary files and folders removed, one line, exit 143).

One subprocess test stops a real ``rexdeploy build`` with SIGTERM. The others call, at a chosen point, the
handler ``main`` installed, as the interpreter would on delivery: nothing depends on timing, and no real
signal hits the test process (after an OpenVINO build in the same process the main thread can be left with
a dangling alternate signal stack, and Python runs its C-level handlers on that stack: a real in-process
signal then crashes the interpreter, whoever handles it).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from models import small_cnn, write_ort_profile

import rexdeploy.graph
from rexdeploy.cli.main import main
from rexdeploy.demo import demo_model_path

EXPAND = ["--profile", "x86-avx512", "--bits", "8", "--order", "2"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    import onnx

    path = tmp_path / "src" / "cnn.onnx"
    path.parent.mkdir()
    onnx.save(small_cnn(), str(path))
    return path


def _needs(signum: int, default: object) -> None:
    if signal.getsignal(signum) is not default:
        pytest.skip(f"{signal.Signals(signum).name} is handled by the test runner here")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_a_build_cleanly(tmp_path: Path) -> None:
    profile = write_ort_profile(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "demo"
    argv = [sys.executable, "-m", "rexdeploy", "build", str(demo_model_path()), "--profile", str(profile)]
    argv += ["--order", "2", "--bits", "8", "--out", str(out), "--duration", "600s", "--warmup", "50ms"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:  # progress lines: stop it while it times the FP32 engine (600 s)
            seen.append(line)
            if line.startswith("timing the FP32 baseline"):
                break
        else:
            pytest.fail(f"the build ended before timing started: exit {proc.wait()}: {''.join(seen)}")
        assert [p.name for p in work.iterdir() if p.name.startswith(".demo.")], "no temporary folder to clean up"
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=300)  # its stderr output is a few lines: the pipe never fills
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM did not stop the build: {''.join(seen)}")
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 143, "".join(seen) + rest
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == "rexdeploy: terminated by SIGTERM"
    assert list(work.iterdir()) == []  # no output folder, no hidden temporary folder


@contextlib.contextmanager
def _raising_after_write(signum: int, default: object, seen: list[Path]) -> Iterator[None]:
    """Patch save_model's atomic_path so that ``signum`` arrives once the temporary file is written."""
    real = rexdeploy.graph.atomic_path

    @contextlib.contextmanager
    def stopping(path: Path) -> Iterator[Path]:
        with real(path) as tmp:
            yield tmp
            assert tmp.stat().st_size > 0
            seen.append(tmp)
            handler = signal.getsignal(signum)
            assert callable(handler) and handler is not default, "main installed no handler"
            handler(signum, None)
            pytest.fail("the signal did not stop the run")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rexdeploy.graph, "atomic_path", stopping)
        yield


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    ("signame", "default", "code", "line"),
    [
        ("SIGTERM", signal.SIG_DFL, 143, "rexdeploy: terminated by SIGTERM"),
        ("SIGINT", signal.default_int_handler, 130, "rexdeploy: interrupted"),
    ],
)
def test_signal_while_writing_leaves_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, signame: str, default: object, code: int, line: str
) -> None:
    signum = getattr(signal, signame)
    _needs(signum, default)
    out = tmp_path / "dst" / "x.onnx"
    seen: list[Path] = []
    with _raising_after_write(signum, default, seen):
        rc = main(["expand", str(model), "-o", str(out), *EXPAND])
    captured = capsys.readouterr()
    assert rc == code
    assert captured.err.strip().splitlines() == [line]
    assert len(seen) == 1 and not seen[0].exists()
    assert list(out.parent.iterdir()) == []
    assert signal.getsignal(signum) is default  # main restores the handler it replaced


def test_ignored_sigterm_stays_ignored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``nohup``-like set-ups a signal the caller ignores is left ignored."""
    import rexdeploy.api

    during: list[object] = []
    real = rexdeploy.api.expand_model

    def spy(*args: object, **kwargs: object) -> object:
        during.append(signal.getsignal(signal.SIGTERM))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rexdeploy.api, "expand_model", spy)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert main(["expand", str(model), "-o", str(tmp_path / "x.onnx"), *EXPAND]) == 0
        assert during == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    capsys.readouterr()
