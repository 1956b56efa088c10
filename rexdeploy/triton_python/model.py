"""Triton Python-backend model written by ``rexdeploy export triton --backend python``.

It serves the OpenVINO IR in this version folder (``model.xml`` / ``model.bin``) compiled with the properties
the engine was measured with (``runtime_options.json`` beside it: inference precision, dynamic quantization,
performance hint), which Triton's own OpenVINO backend cannot set.

Packages: Triton's Python stub embeds its own interpreter and ignores ``PYTHONPATH``, so ``initialize`` puts
on ``sys.path`` the directories named by the config parameter ``REXDEPLOY_SITE_PACKAGES`` (recorded at export
time: where numpy and openvino were installed; ``os.pathsep``-separated, edit it to serve from another
environment) and then those in ``PYTHONPATH``, before importing numpy, openvino or Triton's utilities.

Batching: with ``max_batch_size`` > 1 in ``config.pbtxt`` the IR (built at batch 1) is also compiled at the
static batches 2, 4, 8, ... up to ``max_batch_size``; the samples of all requests of one ``execute`` call
(Triton's dynamic batcher gathers them) are joined and run in chunks of those sizes, largest first, then split
back per request. Static shapes keep the engine's kernels: each sample's output is the batch-1 engine's (a
dynamic batch axis makes OpenVINO pick other kernels: 0.1 off the engine's logits on the bf16 demo engine).
With ``max_batch_size`` <= 1 every request runs as sent.

Errors are one ``rexdeploy model <name>: ...`` line in the server log (and, for a request, in its response).
This file uses only the standard library, numpy and openvino: it does not import rexdeploy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

OPTIONS_FILE = "runtime_options.json"
SITE_PACKAGES_KEY = "REXDEPLOY_SITE_PACKAGES"
PYTHON_KEY = "REXDEPLOY_PYTHON"
DEVICE_KEY = "REXDEPLOY_DEVICE"


class ModelSetupError(Exception):
    """The model cannot be loaded; the message is one line saying what to do."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    raw = model_config.get("parameters") or {}
    return {str(k): str(v.get("string_value", "")) for k, v in raw.items() if isinstance(v, dict)}


def add_site_packages(parameters: dict[str, str]) -> list[str]:
    """Put the recorded package directories and ``PYTHONPATH`` on ``sys.path``; the ones added, in order."""
    added = []
    for entry in [
        *parameters.get(SITE_PACKAGES_KEY, "").split(os.pathsep),
        *os.environ.get("PYTHONPATH", "").split(os.pathsep),
    ]:
        if entry and entry not in sys.path and Path(entry).is_dir():
            sys.path.append(entry)
            added.append(entry)
    return added


def read_options(version_dir: Path) -> dict[str, str]:
    """The compile properties of ``runtime_options.json`` ({} when the IR came without one)."""
    path = version_dir / OPTIONS_FILE
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text(encoding="utf-8"))["options"]
        return {str(k): str(v) for k, v in options.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelSetupError(
            f"{path} is not a rexdeploy runtime options file ({_one_line(exc)}): export again"
        ) from exc


class TritonPythonModel:
    """Triton's Python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        self.name = args.get("model_name", "model")
        config = json.loads(args["model_config"])
        parameters = _parameters(config)
        add_site_packages(parameters)
        try:
            import numpy as np
            import triton_python_backend_utils as pb_utils
        except ImportError as exc:
            raise self._fail(
                f"cannot import {exc.name or exc} in Triton's Python stub (Python {sys.version.split()[0]}): set "
                f"parameters {SITE_PACKAGES_KEY} in config.pbtxt to the site-packages that holds numpy and openvino"
            ) from None
        self.np, self.pb_utils = np, pb_utils
        try:
            self._setup(args, config, parameters)
        except ModelSetupError as exc:
            raise self._fail(str(exc)) from None
        except Exception as exc:
            raise self._fail(f"{type(exc).__name__}: {_one_line(exc)}") from None

    def _fail(self, message: str) -> Exception:
        """Log ``message`` as one line and return the exception that makes Triton refuse the model."""
        line = f"rexdeploy model {self.name}: {message}"
        utils = getattr(self, "pb_utils", None) or sys.modules.get("triton_python_backend_utils")
        if utils is not None:
            utils.Logger.log_error(line)
            return utils.TritonModelException(line)
        sys.stderr.write(line + "\n")
        return RuntimeError(line)

    def _setup(self, args: dict[str, str], config: dict[str, Any], parameters: dict[str, str]) -> None:
        wanted = parameters.get(PYTHON_KEY, "")
        running = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if wanted and wanted != running:
            raise ModelSetupError(
                f"exported for Python {wanted} but Triton's stub runs Python {running}: start tritonserver with "
                f"the {wanted} stub (rexdeploy serve does) or export again from a Python {running} environment"
            )
        try:
            import openvino as ov
        except ImportError as exc:
            raise ModelSetupError(
                f"openvino does not import in Triton's Python stub ({_one_line(exc)}): pip install openvino in the "
                f"environment named by {SITE_PACKAGES_KEY} in config.pbtxt"
            ) from None
        version_dir = Path(args["model_repository"]) / args["model_version"]
        xml = version_dir / "model.xml"
        if not xml.is_file() or not xml.with_suffix(".bin").is_file():
            raise ModelSetupError(f"{xml} or its model.bin is missing: export the model again")
        self.options = read_options(version_dir)
        self.max_batch = int(config.get("max_batch_size", 0))
        device = parameters.get(DEVICE_KEY, "") or "CPU"
        core = ov.Core()
        self.sizes = _batch_sizes(self.max_batch)
        self.requests: dict[int, Any] = {}
        for size in self.sizes:  # 0: the IR as it is
            model = core.read_model(str(xml))
            if size:
                model.reshape({port: _with_batch(ov, port.get_partial_shape(), size) for port in model.inputs})
            try:
                compiled = core.compile_model(model, device, dict(self.options))
            except Exception as exc:
                raise ModelSetupError(
                    f"OpenVINO cannot compile model.xml for {device} with {self.options}"
                    + (f" at batch {size}" if size else "")
                    + f": {_one_line(exc)}"
                ) from None
            self.requests[size] = compiled.create_infer_request()
        self.compiled = compiled
        self.input_names = [i["name"] for i in config.get("input", [])]
        self.output_names = [o["name"] for o in config.get("output", [])]
        ports = {n for p in self.compiled.inputs for n in p.get_names()}
        missing = [n for n in self.input_names if n not in ports]
        if missing:
            raise ModelSetupError(f"config.pbtxt inputs {missing} are not inputs of model.xml: export the model again")
        self.pb_utils.Logger.log_info(
            f"rexdeploy model {self.name}: OpenVINO {ov.get_version()} on {device}, options {self.options}, "
            f"max_batch_size {self.max_batch}"
            + (f" (compiled at batch {', '.join(map(str, self.sizes))})" if self.max_batch > 1 else "")
            + f", Python {sys.version.split()[0]}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        pb_utils = self.pb_utils
        try:
            feeds = [
                [self._array(pb_utils.get_input_tensor_by_name(r, name)) for name in self.input_names] for r in requests
            ]
        except Exception as exc:
            return [self._error(f"cannot read the request's inputs: {_one_line(exc)}") for _ in requests]
        if self.max_batch > 1:
            sizes = [int(f[0].shape[0]) for f in feeds]
            try:
                joined = [self.np.concatenate([f[i] for f in feeds]) for i in range(len(self.input_names))]
                outputs = self._infer_chunks(joined, sum(sizes))
            except Exception as exc:
                message = (
                    f"batched inference of {sum(sizes)} samples ({len(requests)} requests) failed: {_one_line(exc)}"
                )
                return [self._error(message) for _ in requests]
            bounds = self.np.cumsum([0, *sizes])
            return [self._response([o[bounds[k] : bounds[k + 1]] for o in outputs]) for k in range(len(requests))]
        responses = []
        for feed in feeds:
            try:
                responses.append(self._response(self._infer(feed)))
            except Exception as exc:
                shapes = [tuple(a.shape) for a in feed]
                responses.append(self._error(f"inference on inputs of shape {shapes} failed: {_one_line(exc)}"))
        return responses

    def _infer(self, arrays: list[Any], size: int = -1) -> list[Any]:
        request = self.requests[size] if size >= 0 else next(iter(self.requests.values()))
        request.infer(dict(zip(self.input_names, arrays, strict=True)))
        return [request.get_tensor(name).data.copy() for name in self.output_names]

    def _infer_chunks(self, arrays: list[Any], total: int) -> list[Any]:
        """``total`` samples in chunks of the compiled batch sizes, largest first; outputs joined again."""
        parts: list[list[Any]] = []
        start = 0
        while start < total:
            size = max(s for s in self.sizes if s <= total - start)
            parts.append(self._infer([a[start : start + size] for a in arrays], size))
            start += size
        if len(parts) == 1:
            return parts[0]
        return [self.np.concatenate([p[k] for p in parts]) for k in range(len(self.output_names))]

    def _array(self, tensor: Any) -> Any:
        """A request tensor as numpy, through DLPack: the stub's numpy C API is numpy 1's, whose array layout
        numpy 2 changed (its ``as_numpy`` / ``Tensor(name, array)`` misread a numpy 2 array's size)."""
        try:
            return self.np.from_dlpack(tensor)
        except Exception:  # a type DLPack has no code for (TYPE_STRING)
            return tensor.as_numpy()

    def _tensor(self, name: str, array: Any) -> Any:
        try:
            return self.pb_utils.Tensor.from_dlpack(name, self.np.ascontiguousarray(array))
        except Exception:
            return self.pb_utils.Tensor(name, array)

    def _response(self, outputs: list[Any]) -> Any:
        tensors = [self._tensor(n, a) for n, a in zip(self.output_names, outputs, strict=True)]
        return self.pb_utils.InferenceResponse(output_tensors=tensors)

    def _error(self, message: str) -> Any:
        line = f"rexdeploy model {self.name}: {message}"
        self.pb_utils.Logger.log_error(line)
        return self.pb_utils.InferenceResponse(error=self.pb_utils.TritonError(line))

    def finalize(self) -> None:
        self.requests.clear()
        self.compiled = None


def _batch_sizes(max_batch: int) -> list[int]:
    """The static batches to compile: 1, 2, 4, ... <= max_batch (any batch up to it is a sum of them); [0] (the
    IR's own shapes) without batching."""
    if max_batch <= 1:
        return [0]
    sizes = [1]
    while sizes[-1] * 2 <= max_batch:
        sizes.append(sizes[-1] * 2)
    return sizes


def _with_batch(ov: Any, shape: Any, size: int) -> Any:
    """``shape`` with its first axis ``size`` (the IR was built with a batch of 1)."""
    dims = list(shape)
    if not dims:
        return shape
    return ov.PartialShape([ov.Dimension(size), *dims[1:]])
