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

import dataclasses
import math

import numpy as np
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


# -- DMD (dynamic mode decomposition) -------------------------------------------------------------
#
# cache-dit's exponential-basis calibrator (DMDCalibratorConfig). The state keeps the stream's last
# ``Hs`` computed residuals (``residual_k`` (S, Hs, *stream), most recent first, shifted on computed
# steps like TaylorSeer's differences) and their steps in ``cal_nodes``. On a cached step at
# ``step``, with ``x0 > x1 > ...`` the computed steps kept:
#
#   window   the newest ``dmd_history`` snapshots; its uniformly spaced tail: the newest L of them
#            whose steps are ``s = x0 - x1`` apart
#   L >= 4   DMD on the tail, per batch item (axis 0), oldest first: X = columns 0..L-2, X' = 1..L-1,
#            X = U S V^T (rank r: dmd_rank, or the singular values above 1e-4 of the largest),
#            A = U_r^T X' V_r / (S_r + ridge),  A W = W diag(lam),  Phi = X' V_r / (S_r + ridge) W,
#            b = lstsq(Phi, newest),  forecast = Re(Phi (lam^k * b)),  k = (step - x0) / s
#   L < 4    cache-dit's Taylor fallback of order ``dmd_fallback_order`` (default 1)
#
# Everything but X and X' is small (L <= Hs columns): the fit reads the tail's Gram matrix T^T T
# ((B, Hs, Hs) float64, one pass over the snapshots; under context parallelism summed over the
# ranks where dim 0 is the batch, see dmd_forecast) and returns the forecast as weights of the
# snapshots, so the graph's only large work is the Gram matrix and one weighted sum. X's SVD comes
# from X^T X's eigendecomposition (U = X V / S): in float64 the singular values that the 1e-4 cut
# keeps are exact to about 1e-8 of themselves. ``lstsq(Phi, newest)`` solves its normal equations
# in the same basis.
#
# The fit runs eagerly on the host (the op dmd_weights): a nonsymmetric eigendecomposition has no
# GPU kernel in PyTorch that does not synchronize (torch.linalg.eig copies to the host), and the
# rank cut and the tail's length are decisions. So a DMD-forecast cached step reads the streams'
# (B, Hs, Hs) Gram matrices and the (Hs + 2,) timing to the host in one copy, after its branch
# predicate.
#
# Fallbacks, as cache-dit's: a degenerate fit (a batch item whose weights are not finite) reuses
# the newest snapshot for the whole batch, and so does a forecast that is not finite in the
# stream's dtype (checked in the graph, over all ranks).
#
# cache-dit's Taylor fallback (dmd_fallback="cache-dit", the default) differs from its TaylorSeer:
# at a computed step x_j it differences against the ladder of two computed steps back, x_{j+2},
# over the gap x_j - x_{j+1}:
#   d_0(x_j) = Y(x_j),   d_{i+1}(x_j) = (d_i(x_j) - d_i(x_{j+2})) / (x_j - x_{j+1})
# defined while d_i(x_{j+2}) is and x_j > 1; forecast sum_i d_i(x0) e^i / i!, e = step - x0.
# (Its ladder updates the differences before it shifts them, TaylorSeer's after.) That is what
# cache-dit 1.5.3 computes, so it is the default, for parity; Hs = max(dmd_history, 2 * order + 1)
# snapshots are kept for it. dmd_fallback="taylorseer" differences against x_{j+1}: the
# TaylorSeer calibrator's forecast of the same order (its "taylor" form), with Hs =
# max(dmd_history, order + 1). On the trained tiny FLUX that is worth 4 to 10.5 dB (README).

DMD_HISTORY = 6  # cache-dit's dmd_history default
DMD_MIN_TAIL = 4  # snapshots a fit needs (one complex pole: two real degrees of freedom)
DMD_RANK_CUT = 1e-4  # automatic rank: singular values above this share of the largest


CACHE_DIT, TAYLORSEER = "cache-dit", "taylorseer"
FALLBACKS = (CACHE_DIT, TAYLORSEER)  # dmd_fallback


def dmd_snapshots(history: int, order: int, fallback: str = CACHE_DIT) -> int:
    """Snapshots a DMD-calibrated stream keeps: the window and the Taylor fallback's ladder."""
    return max(history, (2 if fallback == CACHE_DIT else 1) * order + 1)


def dmd_timing(step: torch.Tensor, nodes: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
    """``(2 + Hs,)`` float64: the step, the computed steps in the request, and their steps
    (most recent first): what the fit reads besides the Gram matrix."""
    return torch.cat([step.to(torch.float64).reshape(1), computed.to(torch.float64).reshape(1),
                      nodes.to(torch.float64)])


def _uniform_tail(steps: list[int]) -> tuple[int, int]:
    """(L, s): the newest L of ``steps`` (most recent first) that are ``s`` apart (L < 2: none)."""
    if len(steps) < 2 or steps[0] - steps[1] <= 0:
        return 0, 0
    s, n = steps[0] - steps[1], 2
    while n < len(steps) and steps[n - 1] - steps[n] == s:
        n += 1
    return n, s


def _taylor_fallback(steps: list[int], step: int, order: int, hs: int, fallback: str = CACHE_DIT) -> np.ndarray:
    """The DMD's Taylor fallback as ``(hs,)`` weights of the snapshots (comment above)."""
    back = 2 if fallback == CACHE_DIT else 1
    ladders: dict[int, list[np.ndarray]] = {}
    for j in range(len(steps) - 1, -1, -1):  # oldest first: a ladder reads the one ``back`` older
        out = [np.eye(hs)[j]]
        older = ladders.get(j + back, [])
        # (cache-dit also asks for step x_j > 1, which a ladder two computed steps back implies)
        for i in range(min(order, len(older))):
            out.append((out[i] - older[i]) / (steps[j] - steps[j + 1]))
        ladders[j] = out
    e = step - steps[0]
    return sum(d * (e ** i / math.factorial(i)) for i, d in enumerate(ladders[0]))


def _dmd_fit(gram: np.ndarray, tail: int, k: float, rank: int, ridge: float) -> np.ndarray | None:
    """Weights of the newest ``tail`` snapshots (most recent first) giving the DMD forecast at
    horizon ``k`` for one batch item, from their Gram matrix (most recent first); None if degenerate.
    NumPy: on these few-by-few matrices its LAPACK calls cost a tenth of torch's dispatch."""
    g = gram[:tail, :tail][::-1, ::-1]  # oldest first
    if not np.isfinite(g).all():
        return None
    gxx, gxp, gpp = g[:-1, :-1], g[:-1, 1:], g[1:, 1:]
    try:
        ev, v = np.linalg.eigh(gxx)
    except np.linalg.LinAlgError:  # no convergence
        return None
    ev, v = ev[::-1], v[:, ::-1]  # descending
    s = np.sqrt(np.clip(ev, 0.0, None))
    if not s[0] > 0:
        return None
    r = min(rank or max(int((s > s[0] * DMD_RANK_CUT).sum()), 1), s.size)
    sr, vr = s[:r], v[:, :r]
    if not (sr > 0).all():
        return None
    sinv = 1.0 / (sr + ridge)
    a = (vr.T @ gxp @ vr) / sr[:, None] * sinv[None, :]  # U_r^T X' V_r diag(sinv)
    try:
        lam, w = np.linalg.eig(a)
        c = (vr * sinv) @ w  # Phi = X' c
        normal = c.conj().T @ gpp @ c  # Phi^H Phi
        rhs = c.conj().T @ gpp[:, -1]  # Phi^H newest
        b = np.linalg.lstsq(normal, rhs, rcond=None)[0]
    except np.linalg.LinAlgError:
        return None
    with np.errstate(all="ignore"):  # a zero eigenvalue's power; a non-finite result is degenerate
        coef = (c @ (lam.astype(np.complex128) ** k * b)).real  # weights of X' = tail columns 1..L-1
    if not np.isfinite(coef).all():
        return None
    return np.concatenate([coef[::-1], [0.0]])  # most recent first


def dmd_weights_reference(gram: torch.Tensor, timing: torch.Tensor, history: int, rank: int, ridge: float,
                          order: int, fallback: str = CACHE_DIT) -> torch.Tensor:
    """``(B, Hs)`` float64 weights of the snapshots (most recent first) forecasting each batch item
    at the timing's step; computed on the host (module comment). ``gram``: (B, Hs, Hs)."""
    w, _ = _dmd_weights(gram.detach().to("cpu", torch.float64).numpy(), timing.detach().to("cpu").tolist(),
                        history, rank, ridge, order, fallback)
    return torch.from_numpy(w)


def _dmd_weights(gram: np.ndarray, timing: list[float], history, rank, ridge, order,
                 fallback) -> tuple[np.ndarray, bool]:
    """:func:`dmd_weights_reference`'s weights, and whether a degenerate fit made them the newest's."""
    step, computed, nodes = int(timing[0]), int(timing[1]), [int(x) for x in timing[2:]]
    batch, hs = gram.shape[0], gram.shape[-1]
    steps = nodes[:min(computed, hs)]
    newest = np.zeros((batch, hs))
    newest[:, 0] = 1.0
    tail, spacing = _uniform_tail(steps[:min(history, hs)])
    if tail >= DMD_MIN_TAIL:
        k = (step - steps[0]) / spacing
        fits = [_dmd_fit(gram[i], tail, k, rank, ridge) for i in range(batch)]
        if any(f is None for f in fits):
            return newest, True
        out = np.zeros((batch, hs))
        out[:, :tail] = np.stack(fits)
        return out, False
    if not steps:
        return newest, False
    return np.tile(_taylor_fallback(steps, step, order, hs, fallback), (batch, 1)), False


@torch.library.custom_op("cdcompile::dmd_weights", mutates_args=())
def dmd_weights(grams: list[torch.Tensor], timing: torch.Tensor, history: int, rank: int, ridge: float,
                order: int, fallback: str) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dmd_weights_reference` for several streams in one read to the host: ``grams`` (B_k,
    Hs, Hs) per stream; returns their weights concatenated ((sum B_k, Hs) float64, on the grams'
    device) and per stream 1.0 where a degenerate fit made them the newest snapshot's ((K,))."""
    dev = grams[0].device
    packed = torch.cat([g.detach().reshape(-1).to(torch.float64) for g in grams]
                       + [timing.detach().to(torch.float64)]).cpu().numpy()  # the one host read
    parts = np.split(packed, np.cumsum([g.numel() for g in grams]))
    timing_list = parts[-1].tolist()
    out, flags = [], []
    for g, part in zip(grams, parts):
        w, degenerate = _dmd_weights(part.reshape(tuple(g.shape)), timing_list, history, rank, ridge, order, fallback)
        out.append(w)
        flags.append(float(degenerate))
    return (torch.from_numpy(np.concatenate(out)).to(dev),
            torch.tensor(flags, dtype=torch.float64).to(dev))


@dmd_weights.register_fake
def _(grams, timing, history, rank, ridge, order, fallback):
    first = grams[0]
    return (first.new_empty((sum(g.shape[0] for g in grams), first.shape[-1]), dtype=torch.float64),
            first.new_empty((len(grams),), dtype=torch.float64))


@dataclasses.dataclass(frozen=True)
class DMDSpec:
    """The DMD options a forecast needs (CacheConfig's dmd_*); under context parallelism the process
    group whose ranks hold the streams' other tokens and the token dim the streams are cut along
    (sharding's -2 or 0)."""

    history: int = DMD_HISTORY
    rank: int = 0
    ridge: float = 1e-8
    order: int = 1
    fallback: str = CACHE_DIT
    group: str | None = None
    token_dim: int | None = None

    @property
    def snapshots(self) -> int:
        return dmd_snapshots(self.history, self.order, self.fallback)


def dmd_forecast(streams: list[torch.Tensor], timing: torch.Tensor, history: int, rank: int, ridge: float,
                 order: int, fallback: str, group: str | None, token_dim: int | None) -> list[torch.Tensor]:
    """The DMD forecasts of the streams from their snapshots (``streams[k]``: (Hs, B, ...), most
    recent first) at the step ``timing`` (:func:`dmd_timing`) gives; a stream's newest snapshot
    where its forecast is not finite. One fit of all streams on the host. The rest: a
    :class:`DMDSpec`'s fields (the graph's calls take them as plain constants).

    Under context parallelism each rank holds some tokens of every snapshot. Where dim 0 of a
    stream is the batch, the per-item Gram matrices are summed over the ranks: every rank fits the
    whole sequence, as one process does. Where dim 0 is the token dim (a stream without a batch
    dim, or sequence-first), each row is its own fit, as in one process, and holds on one rank
    alone: nothing is summed but the degenerate and non-finite flags."""
    from .distributed.ulysses import all_reduce_sum

    flats = [r.reshape(r.shape[0], r.shape[1], -1).to(torch.float64) for r in streams]
    grams = [torch.einsum("ibd,jbd->bij", f, f) for f in flats]
    shared = [k for k, r in enumerate(streams) if group is not None and token_dim % (r.dim() - 1) != 0]
    if shared:
        summed = all_reduce_sum(torch.cat([grams[k] for k in shared]), group)
        for k, g in zip(shared, summed.split([grams[k].shape[0] for k in shared])):
            grams[k] = g
    w, degenerate = torch.ops.cdcompile.dmd_weights(grams, timing, history, rank, ridge, order, fallback)
    outs = [torch.einsum("bi,ibd->bd", wk, f).reshape(r.shape[1:]).to(r.dtype)
            for r, f, wk in zip(streams, flats, w.split([g.shape[0] for g in grams]))]
    bad = torch.stack([(~torch.isfinite(out)).any() for out in outs]).to(torch.float64) + degenerate
    if group is not None:
        bad = all_reduce_sum(bad, group)
    return [torch.where(bad[k] > 0, r[0], out) for k, (r, out) in enumerate(zip(streams, outs))]


def nodes_width(dmd: DMDSpec | None) -> int:
    """Computed steps a calibrator's clock keeps: three (TaylorSeer, FoCa), or one per DMD snapshot."""
    return 3 if dmd is None else dmd.snapshots
