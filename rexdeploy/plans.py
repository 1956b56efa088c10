"""The Plan: what the compiler pass carries out, per layer. Frozen, JSON round-trip, stable hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rexdeploy.errors import InputError, PlanError

if TYPE_CHECKING:
    from rexdeploy.analyze import Layer
    from rexdeploy.profile import Profile

PLAN_FORMAT = 1
FLOAT_PRECISIONS = ("", "fp32", "bf16", "fp16")  # "": the profile's float precision
FORMS = ("branches", "concat")
MAX_ACT_ORDER = 3


def validate_smooth_alpha(alpha: float) -> float:
    """A LayerNorm smoothing strength α as a float in [0, 1] (:mod:`rexdeploy.passes.smooth`), else a PlanError."""
    value = float(alpha)
    if not 0.0 <= value <= 1.0:
        raise PlanError(
            f"smoothing strength alpha {alpha} must be in [0, 1] (0.5 is SmoothQuant's default; "
            "higher moves more of the activation range into the weights)"
        )
    return value


@dataclass(frozen=True)
class LayerPlan:
    """One layer's REx setting.

    bits: weight bit-width (2 = ternary … 8); order: K, the number of residual orders;
    gamma: sparse budget of the orders ≥ 2 (paper §3.2), None = dense; split: the ensemble
    grouping K_1..K_M of the orders (one predictor = ``(K,)``); act_bits: 8 (int8 Q/DQ on the
    layer input) or 0 (the input stays float: weight-only); act_order: J, the number of residual
    orders of the int8 input (x ≈ x_1 + … + x_J, each x_j an int8 Q/DQ of the previous remainder;
    :mod:`rexdeploy.passes.expand`); form: ``branches`` (one conv per order, summed with Add) or
    ``concat`` (one conv over the concatenated kernels, then reduce).
    """

    bits: int = 8
    order: int = 1
    gamma: float | None = None
    split: tuple[int, ...] = ()
    act_bits: int = 8
    form: str = "branches"
    block: int = 0  # > 0: int4 weight-only with one scale per block of this many inputs (Gemm/MatMul)
    act_order: int = 1

    def __post_init__(self) -> None:
        if not self.split:
            object.__setattr__(self, "split", (self.order,))
        object.__setattr__(self, "split", tuple(int(k) for k in self.split))
        self.validate()

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise PlanError(f"weight bits {self.bits} not supported; use 2 (ternary) to 8")
        if not 1 <= self.order <= 16:
            raise PlanError(f"expansion order {self.order} not supported; use 1 to 16")
        if self.gamma is not None and not self.gamma >= 0.0:
            raise PlanError(f"sparsity budget gamma {self.gamma} must be >= 0 (e.g. 0.5 for +50 % compute)")
        if any(k < 1 for k in self.split) or sum(self.split) != self.order:
            raise PlanError(
                f"ensemble split {','.join(map(str, self.split))} must be positive orders summing to K={self.order}"
            )
        if self.act_bits not in (0, 8):
            raise PlanError(f"activation bits {self.act_bits} not supported; use 8 or fp (float)")
        if not 1 <= self.act_order <= MAX_ACT_ORDER:
            raise PlanError(f"activation order {self.act_order} not supported; use 1 to {MAX_ACT_ORDER}")
        if self.act_order > 1 and self.act_bits != 8:
            raise PlanError(f"activation order {self.act_order} expands an int8 input: it needs act_bits 8, not float")
        if self.form not in FORMS:
            raise PlanError(f"form {self.form!r} unknown; use one of {', '.join(FORMS)}")
        if self.block:
            if self.block < 16 or self.block & (self.block - 1):
                raise PlanError(f"int4 block size {self.block} must be a power of two >= 16 (e.g. 64 or 128)")
            if self.bits != 4 or self.act_bits != 0 or self.gamma is not None:
                raise PlanError("block-quantized weights are int4 weight-only: use bits 4, act_bits fp and no gamma")

    @property
    def predictors(self) -> int:
        return len(self.split)


@dataclass(frozen=True)
class Plan:
    """A whole-network plan: a LayerPlan per quantized layer (by node name), plus provenance.

    Layers absent from ``layers`` stay float. ``predicted_*`` and ``bound`` are filled by the
    planner; a plan made from flags leaves them None. ``float_precision`` is the precision the engine runs
    the float parts in (float layers, weight-only layers, activation remainders): ``""`` leaves it to the
    profile and the engine (:func:`rexdeploy.costmodel.engine_float_precision`); the planner sets ``fp32``
    on a plan it priced as an f32 engine.
    """

    layers: dict[str, LayerPlan]
    profile: str = ""
    model_sha256: str = ""
    predicted_latency_ms: float | None = None
    predicted_error: float | None = None
    bound: float | None = None
    # ensembles (M > 1): U_ens (Theorem B.3, Eq. 20), the Eq. 35 gap estimate and the expected logit norm from
    # the last BatchNorm statistics they were checked against (Appendix L; rexdeploy.planner.ensembles)
    u_ens: float | None = None
    u_ens_eq35: float | None = None
    logit_norm: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    float_precision: str = ""
    # weight-only Gemm/MatMul inputs quantized by the engine at run time (None: the profile's setting)
    dynamic_activations: bool | None = None
    # SmoothQuant strength α of the data-free LayerNorm smoothing run before the expansion (None: off;
    # rexdeploy.passes.smooth)
    smooth_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.smooth_alpha is not None:
            object.__setattr__(self, "smooth_alpha", validate_smooth_alpha(self.smooth_alpha))
        if self.float_precision not in FLOAT_PRECISIONS:
            raise PlanError(
                f"plan float precision {self.float_precision!r} unknown; use one of "
                f"{', '.join(p for p in FLOAT_PRECISIONS if p)} (or leave it out: the profile's)"
            )

    @property
    def predictors(self) -> int:
        return max((lp.predictors for lp in self.layers.values()), default=1)

    def summary(self) -> str:
        """One line: the uniform setting if all layers agree (γ may vary: linear+), else the spread; and the
        engine's float precision when the plan sets it."""
        text = self._layers_summary()
        text = f"{text}, {self.float_precision} engine" if self.float_precision else text
        text = f"{text}, LayerNorm smoothing alpha={self.smooth_alpha:g}" if self.smooth_alpha is not None else text
        return f"{text}, dynamic activations" if self.dynamic_activations else text

    def _layers_summary(self) -> str:
        settings = {(lp.bits, lp.order, lp.split, lp.act_bits, lp.form, lp.act_order) for lp in self.layers.values()}
        gammas = sorted({lp.gamma for lp in self.layers.values()}, key=lambda g: -1.0 if g is None else g)
        if len(settings) == 1:
            bits, order, split, act, form, act_order = settings.pop()
            blocks = sorted({lp.block for lp in self.layers.values() if lp.block})
            parts = [f"W{bits}A{act or 'fp'}" + (f" (int4 blocks of {blocks[0]})" if blocks else ""), f"K={order}"]
            if act_order > 1:
                parts.append(f"act_order={act_order}")
            if gammas != [None] and order > 1:
                if len(gammas) == 1:
                    parts.append(f"gamma={gammas[0]:g}")
                else:
                    mean = sum(lp.gamma or 0.0 for lp in self.layers.values()) / len(self.layers)
                    parts.append(
                        f"gamma per layer {min(g or 0.0 for g in gammas):.2g}..{max(g or 0.0 for g in gammas):.2g} (mean {mean:.2g})"
                    )
            if len(split) > 1:
                parts.append(f"ensemble={','.join(map(str, split))}")
            parts.append(form)
            return " ".join(parts) + f" on {len(self.layers)} layers"
        return f"per-layer plan over {len(self.layers)} layers ({len(settings)} distinct settings)"

    def to_dict(self) -> dict[str, Any]:
        return (
            {
                "format": PLAN_FORMAT,
                "profile": self.profile,
                "model_sha256": self.model_sha256,
                "predicted_latency_ms": self.predicted_latency_ms,
                "predicted_error": self.predicted_error,
                "bound": self.bound,
                "notes": list(self.notes),
                "layers": {name: _layer_dict(lp) for name, lp in sorted(self.layers.items())},
            }
            | self._ensemble_dict()
            | ({"float_precision": self.float_precision} if self.float_precision else {})
            | ({"dynamic_activations": self.dynamic_activations} if self.dynamic_activations is not None else {})
            | ({"smooth_alpha": self.smooth_alpha} if self.smooth_alpha is not None else {})
        )

    def _ensemble_dict(self) -> dict[str, Any]:
        """U_ens and what it was checked against, when set (plans without an ensemble keep their JSON)."""
        values = {"u_ens": self.u_ens, "u_ens_eq35": self.u_ens_eq35, "logit_norm": self.logit_norm}
        return {k: v for k, v in values.items() if v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the layer settings + model + profile (not predictions)."""
        # unset precision / dynamic activations / smoothing: the hash plans had before these fields
        keys = ("format", "profile", "model_sha256", "layers", "float_precision", "dynamic_activations", "smooth_alpha")
        core = {k: v for k, v in self.to_dict().items() if k in keys}
        return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Plan:
        if not isinstance(raw, dict) or "layers" not in raw or not isinstance(raw["layers"], dict):
            raise PlanError("not a rexdeploy plan: expected a JSON object with a 'layers' table")
        if raw.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"plan format {raw.get('format')} unknown; this rexdeploy reads format {PLAN_FORMAT}")
        allowed = set(LayerPlan.__dataclass_fields__)
        layers: dict[str, LayerPlan] = {}
        for name, lp in raw["layers"].items():
            if not isinstance(lp, dict):
                raise PlanError(f"plan layer {name!r}: expected an object")
            unknown = sorted(set(lp) - allowed)
            if unknown:
                raise PlanError(f"plan layer {name!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
            values = dict(lp)
            if "split" in values:
                values["split"] = tuple(values["split"])
            layers[name] = LayerPlan(**values)
        return cls(
            layers=layers,
            profile=str(raw.get("profile", "")),
            model_sha256=str(raw.get("model_sha256", "")),
            predicted_latency_ms=raw.get("predicted_latency_ms"),
            predicted_error=raw.get("predicted_error"),
            bound=raw.get("bound"),
            u_ens=raw.get("u_ens"),
            u_ens_eq35=raw.get("u_ens_eq35"),
            logit_norm=raw.get("logit_norm"),
            notes=tuple(raw.get("notes", ())),
            float_precision=str(raw.get("float_precision", "")),
            dynamic_activations=None if raw.get("dynamic_activations") is None else bool(raw["dynamic_activations"]),
            smooth_alpha=None if raw.get("smooth_alpha") is None else float(raw["smooth_alpha"]),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    def with_predictions(self, **kwargs: Any) -> Plan:
        return replace(self, **kwargs)


def _layer_dict(lp: LayerPlan) -> dict[str, Any]:
    d = asdict(lp)
    d["split"] = list(lp.split)
    if lp.act_order == 1:  # the default is left out: plans written before act_order keep their hash
        del d["act_order"]
    return d


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"plan file {path} not found")
    return Plan.from_json(path.read_text(encoding="utf-8"))


def uniform_plan(
    layer_names: Iterable[str],
    *,
    bits: int,
    order: int,
    gamma: float | None = None,
    split: Sequence[int] = (),
    act_bits: int = 8,
    form: str = "branches",
    block: int = 0,
    act_order: int = 1,
    profile: str = "",
    model_sha256: str = "",
) -> Plan:
    """The same LayerPlan on every named layer."""
    lp = LayerPlan(bits=bits, order=order, gamma=gamma, split=tuple(split), act_bits=act_bits, form=form, block=block,
                   act_order=act_order)  # fmt: skip
    return Plan(layers={name: lp for name in layer_names}, profile=profile, model_sha256=model_sha256)


def default_plan(layers: list[Layer], profile: Profile, model_sha256: str = "", **overrides: object) -> Plan:
    """The uniform plan of the profile's [defaults], with flag overrides (bits, order, act_bits, form, ...;
    ``smooth_alpha``: the plan's LayerNorm smoothing)."""
    smooth_alpha = overrides.pop("smooth_alpha", None)
    if smooth_alpha is not None:
        plan = default_plan(layers, profile, model_sha256, **overrides)
        return replace(plan, smooth_alpha=float(smooth_alpha))  # type: ignore[arg-type]
    d = profile.defaults
    settings: dict[str, object] = {"bits": d.bits, "order": d.order, "act_bits": d.act_bits, "form": d.form}
    if overrides.get("block"):  # int4 weight-only unless told otherwise
        settings.update(bits=4, act_bits=0)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    bits = int(settings["bits"])  # type: ignore[call-overload]
    for layer in layers:
        allowed = profile.weight_bits(layer.op_class)
        if bits > max(allowed):
            raise PlanError(
                f"{bits}-bit weights exceed what profile {profile.name!r} runs on {layer.op_class} layers "
                f"(at most {max(allowed)} bits, e.g. layer {layer.name!r}); use --bits {max(allowed)} or lower"
            )
    plan = uniform_plan(
        [layer.name for layer in layers],
        profile=profile.name,
        model_sha256=model_sha256,
        **settings,  # type: ignore[arg-type]
    )
    first = plan.layers[layers[0].name]
    if first.block:
        return _int4_blocks(plan, layers, profile, first.block)
    gamma = first.gamma
    if gamma is None or len(layers) < 2 or first.predictors > 1:
        return plan  # ensembles keep a uniform γ: linear+ can leave a layer 0 channels, killing a predictor
    from rexdeploy.numerics import layer_gammas

    # paper Eq. 30 (linear+): later layers get more of the budget, sum |W_l| γ_l = γ sum |W_l|
    gammas = layer_gammas(gamma, [layer.weight_count for layer in layers], first.order)
    layer_plans = {
        layer.name: replace(plan.layers[layer.name], gamma=g) for layer, g in zip(layers, gammas, strict=True)
    }
    return replace(plan, layers=layer_plans, notes=(*plan.notes, f"gamma={gamma:g} split linear+ over layers (Eq. 30)"))


def _int4_blocks(plan: Plan, layers: list[Layer], profile: Profile, block: int) -> Plan:
    """Blocked int4 weights where the engine has them (Gemm/MatMul whose input size the block divides);
    the other layers keep per-channel int4 weights, weight-only."""
    if not profile.quantization.int4_weight_only:
        raise PlanError(
            f"profile {profile.name!r} has no int4 weight-only kernels (int4_weight_only = false); drop --block"
        )
    if block not in profile.quantization.int4_block_sizes:
        sizes = ", ".join(map(str, profile.quantization.int4_block_sizes))
        raise PlanError(f"int4 block size {block} is not one profile {profile.name!r} supports ({sizes})")
    layer_plans = {
        layer.name: replace(plan.layers[layer.name], block=block)
        if layer.op_type in ("Gemm", "MatMul") and layer.weight_shape[1] % block == 0
        else replace(plan.layers[layer.name], block=0)
        for layer in layers
    }
    return replace(plan, layers=layer_plans)
