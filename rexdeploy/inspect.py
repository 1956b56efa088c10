"""``rexdeploy inspect``: what the compiler pass would quantize, how big it is, and the weight error
REx leaves per bit-width and order (relative L2 of the reconstructed weight, paper Lemma A.1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import onnx

from rexdeploy.analyze import ConstantResolver, Layer, Skipped, discover, layer_weight
from rexdeploy.graph import fold_batchnorm
from rexdeploy.numerics import expand_weight, weight_error


@dataclass(frozen=True)
class LayerReport:
    layer: Layer
    flops: int  # 2 × MACs per sample
    weight_bytes: int  # FP32 bytes
    errors: dict[str, float]  # "W{bits}K{order}" → relative L2 error of the weight

    def to_dict(self) -> dict[str, Any]:
        return {**self.layer.to_dict(), "flops": self.flops, "weight_bytes": self.weight_bytes, "errors": self.errors}


@dataclass(frozen=True)
class InspectReport:
    layers: tuple[LayerReport, ...]
    skipped: tuple[Skipped, ...]
    folded_batchnorms: int
    bits: tuple[int, ...]
    orders: tuple[int, ...]

    @property
    def total_flops(self) -> int:
        return sum(r.flops for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [r.to_dict() for r in self.layers],
            "float_nodes": [asdict(s) for s in self.skipped],
            "folded_batchnorms": self.folded_batchnorms,
            "total_flops": self.total_flops,
            "bits": list(self.bits),
            "orders": list(self.orders),
        }

    def table(self) -> list[str]:
        keys = [f"W{b}K{k}" for b in self.bits for k in self.orders]
        head = f"{'layer':<28} {'op':<13} {'class':<9} {'weight shape':<16} {'MFLOPs':>8} {'KB':>8}  " + " ".join(
            f"{k:>8}" for k in keys
        )
        lines = [head, "-" * len(head)]
        for r in self.layers:
            shape = "x".join(map(str, r.layer.weight_shape))
            name = r.layer.name if len(r.layer.name) <= 28 else "…" + r.layer.name[-27:]
            errs = " ".join(f"{r.errors[k]:>8.1e}" for k in keys)
            lines.append(
                f"{name:<28} {r.layer.op_type:<13} {r.layer.op_class:<9} {shape:<16} {r.flops / 1e6:>8.2f} "
                f"{r.weight_bytes / 1024:>8.1f}  {errs}"
            )
        lines.append(
            f"{len(self.layers)} quantizable layers, {self.total_flops / 1e6:.1f} MFLOPs per sample, "
            f"{self.folded_batchnorms} BatchNormalization folded; errors: relative L2 of the REx weight"
        )
        lines += [f"stays float: {s.name} ({s.op_type}): {s.reason}" for s in self.skipped]
        return lines


def inspect_model(
    model: onnx.ModelProto, bits: Sequence[int] = (8, 4, 2), orders: Sequence[int] = (1, 2, 3)
) -> InspectReport:
    """Fold BN, discover the layers, and measure the REx weight error per (bits, K)."""
    folded, bn_stats = fold_batchnorm(model)
    layers, skipped = discover(folded)
    consts = ConstantResolver(folded)
    top = max(orders)
    reports = []
    for layer in layers:
        w = layer_weight(folded, layer, consts)
        errors: dict[str, float] = {}
        for b in bits:
            expansion = expand_weight(w, b, top)
            for k in orders:
                errors[f"W{b}K{k}"] = weight_error(w, expansion[:k])["rel_l2"]
        reports.append(LayerReport(layer, 2 * layer.macs, layer.weight_bytes_fp32, errors))
    return InspectReport(tuple(reports), tuple(skipped), len(bn_stats), tuple(bits), tuple(orders))
