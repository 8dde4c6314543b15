"""Calibrators: forecast the skipped middle residual on cached steps (reference/algorithms.md §2).

TaylorSeer of order ``n`` keeps, per slot and stream, the divided differences of the residual over
the last ``n + 1`` computed steps (nodes ``x0 > x1 > x2``, most recent first) and forecasts

    Y(s) = d0 + d1 (s - x0) + d2 (s - x0)(s - x1)

with ``d0 = Y(x0)``, ``d1 = (Y(x0) - Y(x1)) / (x0 - x1)``, ``d2 = (d1(x0) - d1(x1)) / (x0 - x2)``.
This is the Newton form of the interpolating polynomial: it is exact for residuals that are
polynomials of degree <= n in the step, for any spacing of the computed steps. (The Taylor form
``sum d_i k^i / i!`` with ``d2`` divided by the last gap, as algorithms.md writes it, agrees at
order 1 but is off by ``d2 * w * k / 2`` at order 2 on an exact quadratic.) Orders with too little
history are dropped. State moves only on computed steps; calibrators never change *when* to cache.

State: ``residual_k`` (S, n + 1, *stream) holds d0..dn; ``cal_nodes`` (S, 3) float32 the nodes;
``slot_ctr[:, 3]`` counts computed steps in the request.
"""

from __future__ import annotations

import torch


def coefficients(step: torch.Tensor, nodes: torch.Tensor, computed: torch.Tensor, order: int) -> torch.Tensor:
    """``(order + 1,)`` float32 weights of d0..dn at ``step`` (0 for orders without history)."""
    s = step.to(torch.float32)
    terms = [torch.ones_like(s)]
    if order >= 1:
        terms.append(s - nodes[0])
    if order >= 2:
        terms.append((s - nodes[0]) * (s - nodes[1]))
    avail = torch.arange(order + 1, device=step.device) < computed
    return torch.where(avail, torch.stack(terms), torch.zeros_like(s))


def forecast(res: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``sum_i coef[i] * res[i]`` in the residual's dtype (``res``: (n + 1, *stream))."""
    if res.shape[0] == 1:
        return res[0]
    w = coef.reshape(-1, *([1] * (res.ndim - 1)))
    return (w * res).sum(0).to(res.dtype)


def differences(y: torch.Tensor, old: torch.Tensor, step: torch.Tensor, nodes: torch.Tensor,
                computed: torch.Tensor) -> torch.Tensor:
    """New d0..dn after a computed step at ``step`` with residual ``y`` (``old``: previous d's)."""
    order = old.shape[0] - 1
    new = [y]
    acc = torch.promote_types(y.dtype, torch.float32)  # at least fp32 for the differences
    s = step.to(acc)
    prev = y.to(acc)
    for i in range(1, order + 1):
        # d_i = (d_{i-1}(now) - d_{i-1}(before)) / (x_now - x_{i-1}); zero while history is short
        gap = s - nodes[i - 1].to(acc)
        ok = computed >= i
        d = (prev - old[i - 1].to(acc)) / torch.where(ok, gap, torch.ones_like(gap))
        d = torch.where(ok, d, torch.zeros_like(d))
        new.append(d.to(y.dtype))
        prev = d
    return torch.stack(new)
