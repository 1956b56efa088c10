"""Failures that are not the user's: one line, exit 1, never a traceback; atomic output under stops and races."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import onnx
import pytest
from models import small_cnn
from onnx import helper

import rexdeploy.api
import rexdeploy.fileio
from rexdeploy.cli.main import main
from rexdeploy.errors import InternalError, ModelError
from rexdeploy.fileio import atomic_dir, atomic_path, interrupts_deferred, raise_or_defer
from rexdeploy.graph import file_sha256, fold_batchnorm, load_model, save_model

EXPAND = ["--profile", "x86-avx512", "--bits", "8", "--order", "2"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "cnn.onnx"
    path.parent.mkdir()
    onnx.save(small_cnn(), str(path))
    return path


def _single_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rexdeploy: error: "), captured.err
    return lines[0]


def test_emitted_graph_failing_the_checker_is_reported_as_a_bug(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = rexdeploy.api.expand_model

    def broken(*args: object, **kwargs: object) -> object:
        expanded = real(*args, **kwargs)  # type: ignore[arg-type]
        expanded.model.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["dangling"], name="bug"))
        return expanded

    monkeypatch.setattr(rexdeploy.api, "expand_model", broken)
    out = tmp_path / "dst" / "x.onnx"
    line = _single_error(capsys, main(["expand", str(model), "-o", str(out), *EXPAND]))
    assert "fails the ONNX checker" in line and "this is a rexdeploy bug, please report it" in line
    assert f"sha256 {file_sha256(model)}" in line
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_save_model_raises_internal_error(tmp_path: Path) -> None:
    bad = small_cnn()
    bad.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["dangling"], name="bug"))
    with pytest.raises(InternalError, match="please report"):
        save_model(bad, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("exc", "needle", "bug"),
    [
        (
            ZeroDivisionError("float division by zero"),
            "internal error (ZeroDivisionError: float division by zero)",
            True,
        ),
        (ValueError("line one\nline two"), "internal error (ValueError: line one line two)", True),
        (
            PermissionError(13, "Permission denied", "/some/where"),
            "rexdeploy: error: Permission denied: /some/where",
            False,
        ),
        (MemoryError(), "rexdeploy: error: out of memory", False),
    ],
)
def test_unexpected_exceptions_end_in_one_line(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    model: Path,
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
    needle: str,
    bug: bool,
) -> None:
    def fail(*args: object, **kwargs: object) -> object:
        raise exc

    monkeypatch.setattr(rexdeploy.api, "expand_model", fail)
    out = tmp_path / "x.onnx"
    line = _single_error(capsys, main(["expand", str(model), "-o", str(out), *EXPAND]))
    assert needle in line
    assert ("please report" in line and f"sha256 {file_sha256(model)}" in line) == bug
    assert not out.exists()


def test_verbose_shows_the_traceback_of_a_bug(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> object:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(rexdeploy.api, "expand_model", fail)
    assert main(["-v", "expand", str(model), "-o", str(tmp_path / "x.onnx"), *EXPAND]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("rexdeploy: error: internal error")


def test_load_model_unreadable_and_bad_batchnorm(tmp_path: Path) -> None:
    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    with pytest.raises(Exception, match="is not a file"):
        load_model(folder)
    bad = small_cnn()
    scale = next(i for i in bad.graph.initializer if i.name == "bn_s")
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale)[:4], "bn_s"))
    with pytest.raises(ModelError, match="cannot fold BatchNormalization 'bn1' into Conv 'conv1'"):
        fold_batchnorm(bad)


def test_deferred_interrupt_is_raised_at_the_end_of_the_block() -> None:
    done: list[str] = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        with interrupts_deferred():
            raise_or_defer(KeyboardInterrupt())
            done.append("inner")
        done.append("outer")
    assert done == ["inner", "outer"]
    with pytest.raises(KeyboardInterrupt):  # nothing left pending; outside a block it raises at once
        raise_or_defer(KeyboardInterrupt())


def test_interrupt_during_commit_completes_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop arriving mid-commit waits for it: the target is whole, then the stop is raised."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real = rexdeploy.fileio._commit_dir

    def commit(tmp: Path, dst: Path) -> None:
        raise_or_defer(KeyboardInterrupt())
        real(tmp, dst)

    monkeypatch.setattr(rexdeploy.fileio, "_commit_dir", commit)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_interrupt_inside_atomic_outputs_leaves_the_target_alone(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("before")
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "f.txt") as tmp:
        tmp.write_text("after")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("x")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    assert (tmp_path / "f.txt").read_text() == "before"


def test_commit_retries_when_another_writer_lands_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer's result appears between our move-aside and our rename: ours still lands, whole."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("first")
    real_replace = os.replace
    raced: list[bool] = []

    def racing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == target and not raced:  # our rename onto the target: another writer got there first
            raced.append(True)
            target.mkdir()
            (target / "a.txt").write_text("other writer")
        real_replace(src, dst)

    monkeypatch.setattr(rexdeploy.fileio.os, "replace", racing_replace)
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("ours")
    assert raced
    assert (target / "a.txt").read_text() == "ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_concurrent_writers_of_one_folder_leave_one_complete_result(tmp_path: Path) -> None:
    target = tmp_path / "out"
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(25):
                with atomic_dir(target) as tmp:
                    for name in ("a.txt", "b.txt", "c.txt"):
                        (tmp / name).write_text(f"{k}-{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    contents = {p.name: p.read_text() for p in target.iterdir()}
    assert sorted(contents) == ["a.txt", "b.txt", "c.txt"] and len(set(contents.values())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
