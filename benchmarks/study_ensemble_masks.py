"""Why the later predictor of an Eq. 35 ensemble adds nothing (issue 16), in numpy on a small deep network.

    python benchmarks/study_ensemble_masks.py [--depth 12] [--width 96] [--bits 4] [--seed 0]

A feed-forward net of ``--depth`` layers (He-initialised weights, per-channel BN-like shift/scale folded in so that
the share of units a ReLU6 passes varies per channel, as after BatchNorm), weight-only ``--bits`` REx orders,
split [2, 2]. Every construction is run on the same Gaussian inputs and compared with the FP32 output (relative
L2 error). Rows:

* dense K=2 / dense K=4: the REx expansion at K_1 and K orders;
* Eq. 35 (as the paper writes it, predictors independent): predictor 1 = σ(W_{1,2} g + b) + W_{3,4} g,
  predictor 2 = σ(W_{1,2} h) + W_{3,4} h from h_1 = σ(W_{3,4} x) (Eq. 31); and predictor 1 alone;
* Eq. 35 with predictor 1's masks (oracle): every σ(·) of predictor 2 and every outside term replaced by the
  same term gated by σ'(a) of predictor 1's pre-activation a — what σ(x + ε) − σ(x) is to first order;
* Eq. 35 with the expected masks: the gate replaced by its mean over the data (the best an independent predictor
  can know of predictor 1's masks without computing them);
* difference form: predictor 1 = dense K=2, predictor 2 = σ(a + ε) − σ(a), ε = W_{3,4} (g + h) + W_{1,2} h (or
  W_{1} h only) — the paper's "h̃ is the expansion of f^(K) − f^(K_1)" (Appendix B) made exact; it reads
  predictor 1's a and g at every layer.

The Eq. 35 gap per layer (||outside term on units σ does not pass|| / ||layer output||) and the dense K=2's
miss per layer (the same orders on the units σ passes) are printed too. Prints
a Markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

Arr = np.ndarray


def orders(w: Arr, bits: int, k: int) -> list[Arr]:
    """Dequantized residual orders Q^-1(R^1..R^k), per output channel (axis 0), symmetric."""
    qmax = 2 ** (bits - 1) - 1
    res, out = w.astype(np.float64).copy(), []
    for _ in range(k):
        s = np.abs(res).max(axis=1, keepdims=True) / qmax
        s[s == 0] = 1.0
        q = np.clip(np.round(res / s), -qmax, qmax) * s
        out.append(q)
        res = res - q
    return out


def relu6(t: Arr) -> Arr:
    return np.clip(t, 0.0, 6.0)


def gate(t: Arr) -> Arr:
    """σ' of ReLU6: 1 where it passes its input."""
    return ((t > 0.0) & (t < 6.0)).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=512)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    depth, width = a.depth, a.width
    ws, bs = [], []
    x = rng.standard_normal((a.samples, width))
    h = x
    for li in range(depth):  # BN folded: per-channel scale/shift chosen on the data, so each unit's mean varies
        w = rng.normal(0, np.sqrt(2.0 / width), (width if li < depth - 1 else 10, width))
        z = h @ w.T
        if li < depth - 1:
            mu, sd = z.mean(0), z.std(0) + 1e-9
            gamma_, beta = rng.uniform(0.5, 2.0, width), rng.normal(0.3, 1.0, width)
            w = w * (gamma_ / sd)[:, None]
            b = beta - mu * gamma_ / sd
            h = relu6(h @ w.T + b)
        else:
            b = rng.normal(0, 0.1, 10)
        ws.append(w)
        bs.append(b)
    last = depth - 1
    ro = [orders(w, a.bits, 4) for w in ws]

    def W(li: int, ks: range | list[int]) -> Arr:
        return sum((ro[li][k - 1] for k in ks), np.zeros_like(ws[li]))

    def fp32(x: Arr) -> Arr:
        t = x
        for li in range(last):
            t = relu6(t @ ws[li].T + bs[li])
        return t @ ws[last].T + bs[last]

    def dense(x: Arr, k: int) -> Arr:
        t = x
        for li in range(last):
            t = relu6(t @ W(li, range(1, k + 1)).T + bs[li])
        return t @ W(last, range(1, k + 1)).T + bs[last]

    in12, out34, all4 = [1, 2], [3, 4], [1, 2, 3, 4]
    mean_gate: list[Arr] = []  # E[σ'(a)] per unit, over the data, of predictor 1's pre-activation (dense K=2)
    t = x
    for li in range(last):
        pre = t @ W(li, in12).T + bs[li]
        mean_gate.append(gate(pre).mean(0))
        t = relu6(pre)

    needed: list[float] = []  # per layer: the correction dense K=4 makes on the units σ passes / layer output

    def eq35(x: Arr, mode: str, own: list[int] = in12) -> tuple[Arr, Arr, list[float]]:
        """(predictor 1, predictor 2, gap per layer). mode: 'paper', 'oracle', 'expected', 'exact'; ``own``: the
        orders the exact difference applies to predictor 2's own input."""
        gaps: list[float] = []
        needed.clear()
        a1 = x @ W(0, in12).T + bs[0]
        g = relu6(a1)
        if mode == "paper":
            hh = relu6(x @ W(0, out34).T)  # Eq. 31
        elif mode == "oracle":
            hh = gate(a1) * (x @ W(0, out34).T)
        elif mode == "expected":
            hh = mean_gate[0] * (x @ W(0, out34).T)
        else:
            hh = relu6(a1 + x @ W(0, out34).T) - g
        for li in range(1, last):
            a = g @ W(li, in12).T + bs[li]
            gout = g @ W(li, out34).T
            gaps.append(float(np.linalg.norm((1 - gate(a)) * gout) / np.linalg.norm(relu6(a))))
            needed.append(float(np.linalg.norm(gate(a) * gout) / np.linalg.norm(relu6(a))))
            if mode == "paper":
                g_new = relu6(a) + gout
                hh = relu6(hh @ W(li, in12).T) + hh @ W(li, out34).T
            elif mode == "oracle":
                g_new = relu6(a)
                hh = gate(a) * (gout + hh @ W(li, all4).T)
            elif mode == "expected":
                g_new = relu6(a)
                hh = mean_gate[li] * (gout + hh @ W(li, all4).T)
            else:
                g_new = relu6(a)
                hh = relu6(a + (g + hh) @ W(li, out34).T + hh @ W(li, own).T) - g_new
            g = g_new
        tail = all4 if mode != "exact" else own
        return (
            g @ W(last, in12).T + bs[last] if mode == "exact" else g @ W(last, all4).T + bs[last],
            (hh @ W(last, tail).T + ((g + hh) @ W(last, out34).T if mode == "exact" else 0.0)),
            gaps,
        )

    ref = fp32(x)

    def err(y: Arr) -> float:
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    rows: list[tuple[str, Callable[[], Arr]]] = [
        ("dense K=2", lambda: dense(x, 2)),
        ("dense K=4", lambda: dense(x, 4)),
    ]
    p1, p2, gaps = eq35(x, "paper")
    print(f"depth {depth}, width {width}, int{a.bits}, [2,2]; mean share of units ReLU6 passes "
          f"{np.mean([m.mean() for m in mean_gate]):.2f}")  # fmt: skip
    print("| construction | rel. error vs FP32 | × dense K=2 | × dense K=4 |\n|---|---|---|---|")
    d2, d4 = err(dense(x, 2)), err(dense(x, 4))
    table = [(n, err(f())) for n, f in rows]
    table += [("Eq. 35 (paper, independent)", err(p1 + p2)), ("Eq. 35: predictor 1 alone", err(p1))]
    for mode, label in (("oracle", "Eq. 35 gated by predictor 1's masks (oracle)"),
                        ("expected", "Eq. 35 gated by the expected masks (independent)"),
                        ("exact", "difference form σ(a+ε) − σ(a) (reads predictor 1)")):  # fmt: skip
        q1, q2, _ = eq35(x, mode)
        table += [(label, err(q1 + q2))]
        if mode == "exact":
            table += [("difference form: predictor 1 alone (= dense K=2)", err(q1))]
            q1, q2, _ = eq35(x, mode, [1])
            table += [("difference form, order 1 only on predictor 2's own input", err(q1 + q2))]
    for n, e in table:
        print(f"| {n} | {e:.3g} | {e / d2:.3f} | {e / d4:.1f} |")
    print(f"\npredictor 2 / predictor 1 output norm (paper Eq. 35): {np.linalg.norm(p2) / np.linalg.norm(p1):.4f}")
    print("Eq. 35 gap per layer (outside orders on units ReLU6 does not pass / layer output): "
          + ", ".join(f"{g:.3g}" for g in gaps))  # fmt: skip
    print("dense K=2's miss per layer (orders 3-4 on units ReLU6 passes / layer output): "
          + ", ".join(f"{g:.3g}" for g in needed))  # fmt: skip
    # the correction predictor 2 must add at a unit is ε·σ'(a) (to first order); Eq. 35's independent
    # predictor 2 adds σ(ε)-like terms: the share of units where its gate agrees with predictor 1's
    a1 = x @ W(0, in12).T + bs[0]
    e1 = x @ W(0, out34).T
    print(f"first layer: share of units where gate(ε) == gate(a): {np.mean(gate(e1) == gate(a1)):.3f}")


if __name__ == "__main__":
    main()
