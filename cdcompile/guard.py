"""The DBCache guard as plain tensor functions the rewritten graph calls (reference/algorithms.md §1, §5).

The block_cache pass inserts ``call_function`` nodes to :func:`tick`, :func:`decide` and
:func:`commit`; Dynamo's inner compilers and ``torch.export`` trace through them like any other
Python code, so the whole per-step logic compiles into the graph: no host read but the branch
predicate. The same functions run eagerly in tests.

State tensors (allocated by :class:`cdcompile.runtime.CacheState`; ``S`` = slots + 1, the last
slot being the overflow slot that never caches):

    reset      bool ()              set by new_request(); read and cleared by the graph
    clock      float32 (1,)         timestep of the previous call (-inf: next call starts a request)
    counters   int64 (3,)           step in request, slot (call index within the step), request count
    anchor     (S, *R)              F's hidden residual at the slot's last computed step
    slot_ctr   int64 (S, 4)         has_anchor, cached steps in request, current run of cached
                                    steps, computed steps in request
    residual_k (S, n+1, *stream_k)  middle residual of stream k at the slot's last computed step,
                                    and its divided differences for a calibrator of order n
    cal_nodes  float32 (S, 3)       the slot's last computed steps, most recent first (calibrators)
    hist_flag  int8 (H, S, T)       per request (ring of H), slot and step: -1 no call, 0 computed, 1 cached
    hist_diff  float32 (H, S, T)    the residual diff of each call (nan where no anchor existed)
    hist_meta  int64 (H, 2)         steps and slots seen in each request
"""

from __future__ import annotations

import torch

from . import calibrators

HISTORY = 8  # requests kept for cdcompile.summary
MAX_STEPS = 1000  # steps per request recorded in the history (later steps share the last entry)


def tick(t: torch.Tensor | None, clock: torch.Tensor, counters: torch.Tensor,
         reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advance the step/slot clock from the timestep input; returns (step, slot, new_request).

    A new timestep value starts a step; a larger one (or ``reset``, or the first call) starts a
    request; calls sharing a timestep are CFG slots 0, 1, ... Without a timestep input (``t`` is
    None) every call is a new step and only ``reset`` starts a request.
    """
    last = clock[0]
    if t is None:
        t = torch.where(torch.isinf(last), torch.zeros_like(last), last - 1)
    else:
        t = t.reshape(-1)[0].to(torch.float32)
    new_req = reset | (t > last)
    same = (t == last) & ~new_req
    step = torch.where(new_req, 0, torch.where(same, counters[0], counters[0] + 1))
    slot = torch.where(same, counters[1] + 1, 0)
    request = counters[2] + new_req.to(torch.int64)
    counters.copy_(torch.stack([step, slot, request]))
    clock.copy_(t.reshape(1))
    reset.copy_(torch.zeros_like(reset))
    return step, slot, new_req


def decide(r: torch.Tensor, anchor: torch.Tensor, slot_ctr: torch.Tensor, step: torch.Tensor,
           slot: torch.Tensor, new_req: torch.Tensor, mask: torch.Tensor | None = None, *,
           threshold: float, warmup_steps: int, warmup_interval: int, max_cached: int,
           max_continuous: int, slots: int, static_mask: bool = False, group: str | None = None):
    """Whether this call may reuse the cached middle residual (algorithms.md §1.4, in order).

    ``mask`` (int8, one entry per step; steps past the mask are 0) is the steps computation
    mask: 1 forces a computed step; with ``static_mask`` a 0 caches without consulting the limits
    or the threshold (still only once a residual exists).

    ``group`` (context parallelism: a process group name) makes every rank take the same branch
    (algorithms.md §1.8): ``r`` and the anchor are this rank's tokens only, so the sums and element
    counts of the numerator and denominator are all-reduced before dividing.

    Returns ``(cache, diff, idx, anchor_slot, ctr_slot)``; ``idx`` is the slot index as a (1,)
    tensor, clamped to the overflow slot ``slots``.
    """
    # A new request forgets every slot's anchor and counters.
    slot_ctr.mul_((~new_req).to(slot_ctr.dtype))
    idx = torch.clamp(slot, max=slots).reshape(1)
    a = anchor.index_select(0, idx)[0]
    ctr = slot_ctr.index_select(0, idx)[0]
    has_anchor = ctr[0] > 0
    num = (r - a).abs().mean(dtype=torch.float32)
    den = a.abs().mean(dtype=torch.float32)
    if group is not None:  # context parallel: global means from per-rank sums and counts
        from .distributed.ulysses import all_reduce_sum

        count = torch.full_like(num, float(r.numel()))
        total = all_reduce_sum(torch.stack([num * count, den * count, count]), group)
        num, den = total[0] / total[2], total[1] / total[2]
    diff = torch.where(has_anchor, num / den, torch.full_like(num, float("nan")))

    warm = (step < warmup_steps) & (step % warmup_interval == 0)
    usable = ~warm & has_anchor & (slot < slots)
    if mask is not None:
        must = mask.index_select(0, torch.clamp(step, max=mask.shape[0] - 1).reshape(1))[0] == 1
        usable = usable & ~must
        if static_mask:
            return usable, diff, idx, a, ctr
    cache = usable & (diff < threshold)
    if threshold <= 0:
        cache = cache & False
    if max_cached >= 0:
        cache = cache & (ctr[1] < max_cached)
    if max_continuous >= 0:
        cache = cache & (ctr[2] < max_continuous)
    return cache, diff, idx, a, ctr


def commit(cache: torch.Tensor, diff: torch.Tensor, idx: torch.Tensor, r: torch.Tensor,
           a: torch.Tensor, ctr: torch.Tensor, anchor: torch.Tensor, slot_ctr: torch.Tensor,
           step: torch.Tensor, slot: torch.Tensor, new_req: torch.Tensor, counters: torch.Tensor,
           hist_flag: torch.Tensor, hist_diff: torch.Tensor, hist_meta: torch.Tensor) -> None:
    """Write the slot's anchor, counters and the history after the branch ran.

    The anchor moves only on computed steps; any computed step ends the run of cached steps.
    """
    anchor.index_put_((idx,), torch.where(cache, a, r).unsqueeze(0))
    c = cache.to(torch.int64)
    new_ctr = torch.stack([torch.ones_like(ctr[0]), ctr[1] + c, (ctr[2] + 1) * c, ctr[3] + 1 - c])
    slot_ctr.index_put_((idx,), new_ctr.unsqueeze(0))

    row = (counters[2] % HISTORY).reshape(1)
    keep = ~new_req
    hist_flag.index_put_((row,), torch.where(keep, hist_flag.index_select(0, row), -1))
    hist_diff.index_put_((row,), torch.where(keep, hist_diff.index_select(0, row), float("nan")))
    s = torch.clamp(step, max=MAX_STEPS - 1).reshape(1)
    hist_flag.index_put_((row, idx, s), c.to(torch.int8).reshape(1))
    hist_diff.index_put_((row, idx, s), diff.reshape(1))
    meta = hist_meta.index_select(0, row)[0] * keep.to(torch.int64)
    seen = torch.stack([torch.maximum(meta[0], step + 1), torch.maximum(meta[1], slot + 1)])
    hist_meta.index_put_((row,), seen.unsqueeze(0))


def commit_residual(cache: torch.Tensor, residual: torch.Tensor, idx: torch.Tensor,
                    res_slot: torch.Tensor, exit_value: torch.Tensor, entry_value: torch.Tensor,
                    step: torch.Tensor, nodes: torch.Tensor, ctr: torch.Tensor) -> None:
    """Store the middle residual of one stream (and its divided differences): kept on cached
    steps, ``exit - entry`` on computed ones."""
    y = exit_value - entry_value
    if res_slot.shape[0] == 1:
        new = y.unsqueeze(0)
    else:
        new = calibrators.differences(y, res_slot, step, nodes, ctr[3])
    residual.index_put_((idx,), torch.where(cache, res_slot, new).unsqueeze(0))


def commit_nodes(cache: torch.Tensor, cal_nodes: torch.Tensor, idx: torch.Tensor,
                 nodes: torch.Tensor, step: torch.Tensor) -> None:
    """Shift the slot's computed-step nodes on a computed step (after every stream used them)."""
    shifted = torch.cat([step.to(torch.float32).reshape(1), nodes[:2]])
    cal_nodes.index_put_((idx,), torch.where(cache, nodes, shifted).unsqueeze(0))
