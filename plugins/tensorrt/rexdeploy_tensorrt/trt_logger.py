"""One process-wide TensorRT logger whose messages each build collects for itself.

TensorRT keeps the first logger it is given while any ``IBuilder`` or ``IRuntime`` lives: a logger
passed to a later ``trt.Builder(...)`` / ``trt.Runtime(...)`` is ignored (TensorRT warns "The logger
passed into createInferBuilder differs from one already provided for an existing builder, runtime, or
refitter"). rexdeploy keeps the runtimes of live engines for the whole process, so a fresh logger per
build would, from the second build on, never see a message, and every ``BuildError`` would say "no
error logged". So there is one logger (:func:`process_logger`, made on first use), and it forwards every
message to :data:`SINK`; a build wraps its TensorRT calls in ``with SINK.collect() as log:`` and reads
the errors that arrived meanwhile (:meth:`LogRecords.summary`). Messages outside any collection go to
a short ring (:attr:`LogSink.unclaimed`) so nothing TensorRT says is lost from view.

Pure part (unit-tested anywhere): :class:`LogSink` and :class:`LogRecords`; ``trt`` is imported by the
caller and passed to :func:`process_logger`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# trt.ILogger.Severity values: INTERNAL_ERROR=0 < ERROR=1 < WARNING=2 < INFO=3 < VERBOSE=4
INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)
UNCLAIMED = 50  # messages kept from outside any collection


@dataclass
class LogRecords:
    """The (severity, message) pairs logged while one collection was open (INFO and more severe)."""

    messages: list[tuple[int, str]] = field(default_factory=list)

    def errors(self) -> list[str]:
        """First lines of the ERROR / INTERNAL_ERROR messages, in order, without repeats."""
        seen: dict[str, None] = {}
        for severity, msg in self.messages:
            if severity <= ERROR:
                line = msg.strip().splitlines()[0] if msg.strip() else ""
                if line:
                    seen.setdefault(line, None)
        return list(seen)

    def warnings(self) -> list[str]:
        return [m.strip().splitlines()[0] for s, m in self.messages if s == WARNING and m.strip()]

    def summary(self, limit: int = 3) -> str:
        """The errors on one line: the first ``limit`` joined by " | ", then "(+N more)"; "" when none."""
        errs = self.errors()
        if not errs:
            return ""
        more = f" (+{len(errs) - limit} more)" if len(errs) > limit else ""
        return " | ".join(errs[:limit]) + more


class LogSink:
    """Where the process logger's messages go: every open collection, else the ``unclaimed`` ring."""

    def __init__(self, keep: int = INFO) -> None:
        self.keep = keep
        self.unclaimed: deque[tuple[int, str]] = deque(maxlen=UNCLAIMED)
        self._open: list[LogRecords] = []
        self._lock = threading.Lock()

    def log(self, severity: int, message: str) -> None:
        """What ``ILogger.log`` calls (any thread)."""
        severity = int(severity)
        if severity > self.keep:
            return
        entry = (severity, str(message))
        with self._lock:
            if self._open:
                for records in self._open:
                    records.messages.append(entry)
            else:
                self.unclaimed.append(entry)

    @contextmanager
    def collect(self) -> Iterator[LogRecords]:
        """Collect the messages logged inside the ``with`` block (nested collections each get them)."""
        records = LogRecords()
        with self._lock:
            self._open.append(records)
        try:
            yield records
        finally:
            with self._lock:
                self._open.remove(records)


SINK = LogSink()
_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def process_logger(trt: Any) -> Any:
    """The one ``trt.ILogger`` of this process (every Builder, OnnxParser and Runtime gets it)."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:

            class _Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    SINK.log(int(severity), msg)

            _LOGGER = _Logger()
        return _LOGGER
