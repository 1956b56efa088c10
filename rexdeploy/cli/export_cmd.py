"""``rexdeploy export triton OUT_DIR --from BUILD_DIR``: a Triton Inference Server model repository from a build."""

from __future__ import annotations

import argparse

from rexdeploy.cli import common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="export a built engine for a serving system (triton)",
        description="Export the engine of a rexdeploy build directory for a serving system.",
    )
    targets = p.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True
    t = targets.add_parser(
        "triton",
        help="write a Triton Inference Server model repository",
        description="Write OUT_DIR/<name>/config.pbtxt and OUT_DIR/<name>/1/<engine> (OpenVINO IR → backend "
        "openvino on KIND_CPU; TensorRT plan → platform tensorrt_plan on KIND_GPU) from a rexdeploy build directory. "
        "--backend python writes a Python-backend model (1/model.py) that compiles an OpenVINO engine with the "
        "runtime options it was measured with. The config is validated against Triton's ModelConfig schema when "
        "tritonclient is installed.",
    )
    t.add_argument("out_dir", metavar="OUT_DIR", help="model repository directory (other models in it are kept)")
    t.add_argument(
        "--from", dest="build_dir", required=True, metavar="BUILD_DIR", help="rexdeploy build --out directory"
    )
    t.add_argument("--name", help="model name in the repository (default: the model file's stem)")
    t.add_argument(
        "--max-batch",
        type=int,
        help="Triton max_batch_size for a dynamic batch axis (default: 1 for OpenVINO, the engine's max for TensorRT)",
    )
    t.add_argument("--instances", type=int, default=1, help="instance_group count (default 1)")
    t.add_argument("--which", default="rex", help="which engine of the build: rex (default) or fp32")
    t.add_argument(
        "--backend",
        help="Triton backend: the engine's own (default: openvino, tensorrt or onnxruntime) or python (OpenVINO "
        "engines: model.py loads the IR with its runtime_options.json; run it with rexdeploy serve)",
    )
    t.add_argument("--json", action="store_true", help="print what was written as one JSON document on stdout")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from rexdeploy.triton import export_triton

    result = export_triton(
        args.build_dir,
        args.out_dir,
        name=args.name,
        max_batch=args.max_batch,
        instances=args.instances,
        which=args.which,
        backend=args.backend,
    )
    c = result.config
    if args.json:
        doc = {
            "model_dir": str(result.model_dir),
            "files": list(result.files),
            "backend": c.backend,
            "platform": c.platform,
            "max_batch_size": c.max_batch_size,
            "validated": result.validated,
            "notes": list(result.notes),
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
    for f in result.files:
        common.stderr(f"wrote {result.model_dir / f}")
    common.stderr(
        f"model {c.name!r}: backend {c.backend}, max_batch_size {c.max_batch_size}, "
        f"{c.instance_count} x {c.instance_kind}"
    )
    if result.validated:
        common.stderr("config.pbtxt validated against Triton's ModelConfig schema")
    for note in result.notes:
        common.stderr(f"note: {note}")
    repository = result.repository.resolve()
    if c.backend == "python":
        common.stderr(
            f"serve: pip install --no-deps nvidia-pytriton; rexdeploy serve {args.build_dir} (or start "
            f"pytriton/tritonserver/bin/tritonserver --model-repository={repository} with the stub for this Python: "
            "docs/triton.md)"
        )
    else:
        common.stderr(
            f"serve: docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v {repository}:/models "
            "nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models"
        )
    return 0
