"""Calibrators: forecast the skipped middle residual on cached steps (reference/algorithms.md §2).

TaylorSeer of order ``n`` keeps, per slot and stream, differences of the residual over the last
``n + 1`` computed steps (nodes ``x0 > x1 > x2``, most recent first) in one of two forms
(option ``taylorseer_form``):

``"taylor"`` (the default; algorithms.md §2 literally, and cache-dit's formula)::

    d0 = Y(x0),  d(i+1) = (d_i(now) - d_i(before)) / w,  w = x0 - x1
    Y(x0 + k) = sum_i d_i k^i / i!

Every order is divided by the same gap ``w`` between the last two computed steps: ``d1`` is a
backward slope and ``d2`` a backward second difference, read as derivatives at ``x0``. Exact on
residuals linear in the step for any spacing; at order 2 it is off by ``d2 w k / 2`` on an exact
quadratic (the backward slope belongs half a gap back).

``"newton"``::

    d1 = (Y(x0) - Y(x1)) / (x0 - x1),  d2 = (d1(x0) - d1(x1)) / (x0 - x2)
    Y(s) = d0 + d1 (s - x0) + d2 (s - x0)(s - x1)

the Newton form of the interpolating polynomial: exact for residuals that are polynomials of
degree <= n in the step, for any spacing of the computed steps. Order 1 is the same in both forms.
Which extrapolates a real model's residual better is an empirical question: on the trained tiny
FLUX (bench/results/quality.md) the Taylor form's damped second-order term wins at high thresholds.

Orders with too little history are dropped. State moves only on computed steps; calibrators never
change *when* to cache. ``Y`` is M's residual, or with ``calibrator_cache_type="hidden_states"``
M's output (the forecast then replaces the stream instead of being added to F's output); a stream
``calibrated_streams`` leaves out keeps its last residual alone.

State: ``residual_k`` (S, n + 1, *stream) holds d0..dn; ``cal_nodes`` (S, 3) float32 the nodes;
``slot_ctr[:, 3]`` counts computed steps in the request.

FoCa (forecast then calibrate: a Heun / trapezoidal step anchored at the last computed residual).
With ``x0 > x1`` the slot's last two computed steps, ``e = s - x0`` (steps since the last
computed step, >= 1 on a cached step) and ``w = x0 - x1``:

    DF = F_full - F_full_prev            the change between the last two computed residuals
    DC = F_k - F_km1                     the change of the values used at the last two steps
    F  = F_full + e/2 * (DF + DC)                 e <= 3
    F  = (3/e) F3 + (1 - 3/e) F_full              e > 3, F3 = the e = 3 value (damped toward F_full)

``F_k`` / ``F_km1`` are the residuals *used* at steps ``s - 1`` / ``s - 2`` of this slot: the
computed residual on a computed step, the forecast on a cached one. So, unlike TaylorSeer, FoCa's
state moves on cached steps too: the forecast recurses on its own previous increment. That is the
only well-defined reading of algorithms.md's ``DC = F_k - F_km1`` with ``F_k`` "the forecast":
on the first cached step after a computed one there is no previous forecast, and the value used
there is the computed residual. (It is also what cache-dit's FoCa keeps: a rolling window advanced
by every step.) Until two computed steps exist the forecast is ``F_full``.

``DF`` as algorithms.md writes it (and cache-dit computes it) is the change over the gap ``w``
between the two computed steps, whatever ``w`` is: ``foca_slope="gap"``, the default; the
trained tiny FLUX then gives cache-dit's image. Between computed steps ``w`` apart that is ``w``
times the per-step slope, so the forecast overshoots ``(w - 1) e/2`` increments even on a residual
exactly linear in the step. ``foca_slope="step"`` divides ``DF`` by ``w``: exact on linear
residuals for any spacing (e <= 3); the same as "gap" when ``w = 1``.

State: ``residual_k`` (S, 4, *stream) holds ``F_full, F_full_prev, F_k, F_km1``; the nodes and the
computed-step count are TaylorSeer's. The forecast is a fixed linear combination of the four, so the
cache branch evaluates it with :func:`forecast` like TaylorSeer; the branch also returns the value
it used so that :func:`foca_update` can advance ``F_k`` outside the ``cond``.
"""

from __future__ import annotations

import torch


TAYLOR, NEWTON = "taylor", "newton"
FORMS = (TAYLOR, NEWTON)


def coefficients(step: torch.Tensor, nodes: torch.Tensor, computed: torch.Tensor, order: int,
                 form: str = TAYLOR) -> torch.Tensor:
    """``(order + 1,)`` float32 weights of d0..dn at ``step`` (0 for orders without history)."""
    s = step.to(torch.float32)
    k = s - nodes[0]
    terms = [torch.ones_like(s)]
    if order >= 1:
        terms.append(k)
    if order >= 2:
        terms.append(k * k / 2 if form == TAYLOR else k * (s - nodes[1]))
    avail = torch.arange(order + 1, device=step.device) < computed
    return torch.where(avail, torch.stack(terms), torch.zeros_like(s))


def forecast(res: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``sum_i coef[i] * res[i]`` in the residual's dtype (``res``: (n + 1, *stream))."""
    if res.shape[0] == 1:
        return res[0]
    w = coef.reshape(-1, *([1] * (res.ndim - 1)))
    return (w * res).sum(0).to(res.dtype)


def differences(y: torch.Tensor, old: torch.Tensor, step: torch.Tensor, nodes: torch.Tensor,
                computed: torch.Tensor, form: str = TAYLOR) -> torch.Tensor:
    """New d0..dn after a computed step at ``step`` with residual ``y`` (``old``: previous d's)."""
    order = old.shape[0] - 1
    new = [y]
    acc = torch.promote_types(y.dtype, torch.float32)  # at least fp32 for the differences
    s = step.to(acc)
    prev = y.to(acc)
    for i in range(1, order + 1):
        # d_i = (d_{i-1}(now) - d_{i-1}(before)) / gap; zero while history is short. The gap is
        # x_now - x0 in the Taylor form, x_now - x_{i-1} in the Newton form.
        gap = s - nodes[0 if form == TAYLOR else i - 1].to(acc)
        ok = computed >= i
        d = (prev - old[i - 1].to(acc)) / torch.where(ok, gap, torch.ones_like(gap))
        d = torch.where(ok, d, torch.zeros_like(d))
        new.append(d.to(y.dtype))
        prev = d
    return torch.stack(new)


FOCA_HISTORY = 4  # F_full, F_full_prev, F_k, F_km1
GAP, STEP = "gap", "step"  # foca_slope: DF over the computed steps' gap, or per step
SLOPES = (GAP, STEP)
FOCA_HORIZON = 3.0  # steps after which the forecast is damped toward F_full


def foca_coefficients(step: torch.Tensor, nodes: torch.Tensor, computed: torch.Tensor,
                      slope: str = GAP) -> torch.Tensor:
    """``(4,)`` float32 weights of ``F_full, F_full_prev, F_k, F_km1`` in the FoCa forecast at ``step``.

    ``F = F_full + c (DF + DC)`` with ``c = e/2`` for ``e <= 3`` and ``(3/e)(3/2)`` beyond;
    ``DF = F_full - F_full_prev`` (``slope="step"``: divided by ``w``), ``DC = F_k - F_km1``
    (module docstring).
    """
    s = step.to(torch.float32)
    e = s - nodes[0]
    ok = computed >= 2
    safe_e = torch.where(e > FOCA_HORIZON, e, torch.full_like(e, FOCA_HORIZON))
    c = torch.where(e <= FOCA_HORIZON, e / 2, (FOCA_HORIZON / safe_e) * (FOCA_HORIZON / 2))
    c = torch.where(ok, c, torch.zeros_like(c))
    if slope == STEP:
        w = nodes[0] - nodes[1]
        a = c / torch.where(ok, w, torch.ones_like(w))
    else:
        a = c
    return torch.stack([1 + a, -a, c, -c])


def foca_update(cache: torch.Tensor, used: torch.Tensor, old: torch.Tensor, over: torch.Tensor) -> torch.Tensor:
    """New ``F_full, F_full_prev, F_k, F_km1`` after a call that used the residual ``used``.

    A computed step shifts the anchors (``used`` is the computed residual); every step shifts the
    window ``F_k, F_km1``. ``over`` (a call of the overflow CFG slot, which has no state of its
    own) keeps ``old`` whole.
    """
    hold = cache | over
    return torch.stack([torch.where(hold, old[0], used), torch.where(hold, old[1], old[0]),
                        torch.where(over, old[2], used), torch.where(over, old[3], old[2])])
