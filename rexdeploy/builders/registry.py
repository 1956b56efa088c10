"""Find engine builders through the ``rexdeploy.builders`` entry points.

Each engine plugin (``plugins/<engine>/``) registers one entry point naming its builder class; the
registry loads a plugin only when it is asked for, once per process, and never imports the engine
itself (``openvino``, ``tensorrt``): plugins import those lazily, inside their methods. Nothing here
runs at import time.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from rexdeploy.builders.base import Builder
from rexdeploy.errors import EngineUnavailableError, ProfileError

if TYPE_CHECKING:
    from rexdeploy.profile import Profile

GROUP = "rexdeploy.builders"


def install_hint(engine: str, pip_extra: str) -> str:
    """The one-line message saying that ``engine`` is missing and which pip extra installs it."""
    target = f"'rexdeploy[{pip_extra}]'" if pip_extra else "rexdeploy"
    return f"the {engine} engine is not installed here: pip install {target}"


def unavailable_error(engine: str, pip_extra: str) -> EngineUnavailableError:
    """An :class:`EngineUnavailableError` carrying :func:`install_hint`'s message (for plugins)."""
    return EngineUnavailableError(install_hint(engine, pip_extra))


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)  # the first distribution that registers a name wins
    return found


def known_engines() -> list[str]:
    """Names of the registered engine plugins, sorted."""
    return sorted(_entry_points())


@functools.cache
def get_builder(engine: str) -> Builder:
    """The builder registered as ``engine`` (one instance per process).

    Raises :class:`ProfileError` for an unknown engine name and :class:`EngineUnavailableError`
    when the plugin itself fails to load. The engine may still be missing: see :func:`require_available`.
    """
    eps = _entry_points()
    ep = eps.get(engine)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none (is rexdeploy installed?)"
        raise ProfileError(f"unknown engine {engine!r}; known engines: {known}")
    try:
        loaded = ep.load()
    except Exception as exc:  # a broken plugin must not take the whole tool down
        raise EngineUnavailableError(
            f"the {engine} builder plugin ({ep.value}) failed to load: {type(exc).__name__}: {exc}; reinstall rexdeploy"
        ) from exc
    builder = loaded() if isinstance(loaded, type) else loaded
    if not isinstance(builder, Builder):
        raise EngineUnavailableError(
            f"the {engine} builder plugin ({ep.value}) does not implement the Builder protocol; reinstall rexdeploy"
        )
    return builder


def require_available(engine: str) -> Builder:
    """The builder for ``engine``, checked to run here; else an :class:`EngineUnavailableError` whose
    one-line message names the pip extra that installs it."""
    builder = get_builder(engine)
    if not builder.available():
        raise unavailable_error(builder.name, builder.pip_extra)
    return builder


def list_builders() -> dict[str, bool]:
    """Every registered engine → whether it can run here (a plugin that fails to load counts as False)."""
    status: dict[str, bool] = {}
    for name in known_engines():
        try:
            status[name] = get_builder(name).available()
        except EngineUnavailableError:
            status[name] = False
    return status


def builder_for(profile: Profile) -> Builder:
    builder = get_builder(profile.engine)
    if not builder.available():
        extra = f"pip install 'rexdeploy[{builder.pip_extra}]'" if builder.pip_extra else "pip install rexdeploy"
        raise EngineUnavailableError(
            f"the {profile.engine} engine of profile {profile.name!r} is not installed here: {extra} "
            "(or run `rexdeploy expand` here and build on the target)"
        )
    return builder
