"""The public error hierarchy.

Every error rexdeploy raises on purpose is a :class:`RexError`. Its message says what was wrong and
what to do about it, in one line, so that the CLI can print it as is and exit 1.
"""

from __future__ import annotations


class RexError(Exception):
    """Base class of every error rexdeploy raises on purpose."""


class InputError(RexError):
    """A file, path or argument given by the user is missing or malformed."""


class ModelError(RexError):
    """The ONNX model cannot be read or is not something rexdeploy can process."""


class UnsupportedModelError(ModelError):
    """The model is valid ONNX but holds a construct the compiler pass does not handle."""


class ProfileError(RexError):
    """A hardware profile is unknown or holds unknown keys / bad values."""


class PlanError(RexError):
    """A Plan (or the flags that make one) is inconsistent or does not fit the model."""


class BudgetError(RexError):
    """The latency budget is malformed, or no engine meets it."""


class EngineUnavailableError(RexError):
    """The engine a profile needs is not installed here."""


class BuildError(RexError):
    """An engine failed to compile or run the model."""


class InternalError(RexError):
    """A bug in rexdeploy itself (e.g. an emitted graph the ONNX checker rejects); the message asks to report it."""
