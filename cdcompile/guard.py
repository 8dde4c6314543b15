"""The DBCache guard as plain tensor functions the rewritten graph calls (reference/algorithms.md §1, §5).

The block_cache pass inserts ``call_function`` nodes to :func:`tick`, :func:`decide` and
:func:`commit`; Dynamo's inner compilers and ``torch.export`` trace through them like any other
Python code, so the whole per-step logic compiles into the graph: no host read but the branch
predicate. The same functions run eagerly in tests.

State tensors (allocated by :class:`cdcompile.runtime.CacheState`; ``S`` = slots + 1, the last
slot being the overflow slot that never caches; ``C`` = slots: the overflow slot keeps no anchor and
no residuals, since it never reads them, so the tensors of the streams' size hold one row per CFG
slot and no more):

    reset      bool ()              set by new_request(); read and cleared by the graph
    clock      float32 (1,)         timestep of the previous call (-inf: next call starts a request)
    counters   int64 (6,)           step in request, slot (call index within the step), request count,
                                    time rises (0/1), lone-step requests in a row, this call flipped (0/1)
    anchor     (C, *R)              F's hidden residual at the slot's last computed step (every
                                    downsample_factor-th channel of it)
    slot_ctr   int64 (S, 4)         has_anchor, cached steps in request, current run of cached
                                    steps, computed steps in request
    slot_acc   float32 (S,)         with max_accumulated_residual_diff_threshold only: the slot's sum
                                    of the positive diffs compared with the threshold in the request
    step_diff  float32 (1,)         with cfg_diff_compute_separate=False only: the diff the step's
                                    first call compared with the threshold (nan: none), which
                                    the step's later calls take
    residual_k (C, n+1, *stream_k)  middle residual of stream k at the slot's last computed step,
                                    and its divided differences for a calibrator of order n
    cal_nodes  float32 (S, 3)       the slot's last computed steps, most recent first (calibrators;
                                    DMD: (S, Hs), one per snapshot)
    hist_flag  int8 (H, S, T)       per request (ring of H), slot and step: -1 no call, 0 computed, 1 cached
    hist_diff  float32 (H, S, T)    the residual diff of each call (nan where no anchor existed)
    hist_meta  int64 (H, 2)         steps and slots seen in each request

DBPrune (cache_type="dbprune") keeps no ``anchor``/``residual_k``/``cal_nodes`` but, per prunable
block ``b`` (its index in the stack), ``anchor_b{b}`` (C, *hidden input) and ``residual_b{b}_{label}``
(C, n+1, *stream) per stream the block changes, with a calibrator ``cal_b{b}`` float32 (S, 4) (the
block's last computed steps, most recent first, and how many times it computed in the request;
DMD: (S, Hs + 1)),
plus ``hist_pruned`` int16 (H, S, T), the blocks pruned per call; ``hist_diff`` then holds the mean
of the call's block diffs.
"""

from __future__ import annotations

import torch

from . import calibrators

HISTORY = 8  # requests kept for cdcompile.summary
MAX_STEPS = 1000  # steps per request recorded in the history (later steps share the last entry)


def tick(t: torch.Tensor | None, clock: torch.Tensor, counters: torch.Tensor,
         reset: torch.Tensor, *, borrowed: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advance the step/slot clock from the timestep input; returns (step, slot, new_request).

    A new timestep value starts a step; one that moves against the model's direction of time (or
    ``reset``, or the first call) starts a request; calls sharing a timestep are CFG slots 0, 1, ...
    Without a timestep input (``t`` is None, or NaN when ``borrowed``) every call is a new step and
    only ``reset`` starts a request.

    Direction: time is taken to fall over a request (diffusers' samplers count down) until the
    calls show otherwise. A model whose time rises (flow matching from t = 0 to 1, as Proteina
    samples) would then make every call a request of one step: two such requests in a row, each
    begun by the direction rule, flip the direction, and the call that flips continues the request
    the first of them began, at step 2 (the history moves the lone step of the second into it).
    The same evidence flips it back, so a few calls with rising timesteps (a warm-up, a probe)
    cost a later request its first steps at most. The first request of a rising model thus
    computes its steps 0 and 1 whatever the options, as ``max_warmup_steps >= 2`` (default 8) does.
    """
    last = clock[0]
    if t is not None:
        t = t.amax().to(torch.float32)  # per-token timesteps: the noisiest token's
    if t is None or borrowed:  # a step per call; a borrowed NaN: its publisher did not run this call
        step_t = torch.where(torch.isinf(last), torch.zeros_like(last), last - 1)
        t = step_t if t is None else torch.where(torch.isnan(t), step_t, t)
    rising = counters[3] == 1
    fresh = reset | torch.isinf(last)
    by_rule = torch.where(rising, t < last, t > last) & ~fresh
    same = (t == last) & ~fresh
    # consecutive requests of one step begun by the direction rule (kept across CFG slots)
    lone = torch.where(same, counters[4], torch.where(by_rule & (counters[0] == 0), counters[4] + 1, 0))
    flip = lone >= 2
    new_req = fresh | (by_rule & ~flip)
    step = torch.where(new_req, 0, torch.where(same, counters[0], torch.where(flip, lone, counters[0] + 1)))
    slot = torch.where(same, counters[1] + 1, 0)
    request = counters[2] + new_req.to(torch.int64) - torch.where(flip, lone - 1, 0)
    counters.copy_(torch.stack([step, slot, request, (rising ^ flip).to(torch.int64),
                                torch.where(flip, 0, lone), flip.to(torch.int64)]))
    clock.copy_(t.reshape(1))
    reset.copy_(torch.zeros_like(reset))
    return step, slot, new_req


def refresh(step: torch.Tensor, slot: torch.Tensor, new_req: torch.Tensor, *, hint: int,
            repeat: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """cache-dit's force_refresh_step_hint: the request's cache context starts afresh at step
    ``hint`` (``repeat``: at every multiple of it). Returns ``(step, wipe)`` for the guard: the
    step counted from the context's start (warmup and the steps mask restart there) and
    ``new_req`` or the first call (slot 0) of a refresh step, which makes :func:`gate` forget
    every slot's counters and budget, as a new request does. Anchors, residuals and calibrator
    history are then unread until recomputed (``has_anchor`` and the computed-step count are 0),
    so the refresh step computes. The history keeps the request's own steps.

    Steps come from :func:`tick`, which numbers the first request of a model whose time rises
    0, 0, 2, ... (it learns the direction at step 2): a refresh at step 1 does not happen there.
    """
    if repeat:
        local = step % hint
        at = (step > 0) & (local == 0)
    else:
        local = torch.where(step >= hint, step - hint, step)
        at = step == hint
    return local, new_req | (at & (slot == 0))


def fold_nodes(cal_nodes: torch.Tensor, counters: torch.Tensor) -> None:
    """At the call where :func:`tick` learned that time rises, the slots' newest computed step
    is step 1 of this request, recorded as step 0 of the lone request it seemed to begin: make
    it 1, so that the calibrators' step distances hold (the older entries are no longer counted)."""
    cal_nodes[:, 0].add_(counters[5].to(cal_nodes.dtype))


def gate(slot_ctr: torch.Tensor, step: torch.Tensor, slot: torch.Tensor, new_req: torch.Tensor,
         mask: torch.Tensor | None = None, acc: torch.Tensor | None = None, *, threshold: float,
         warmup_steps: int, warmup_interval: int, max_cached: int, max_continuous: int, slots: int,
         static_mask: bool = False, budget: float | None = None):
    """The per-step part of the guard chain (algorithms.md §1.4 a-e), before any diff.

    ``acc`` (with ``budget``, max_accumulated_residual_diff_threshold): the slots' sums of the
    positive diffs compared with the threshold in this request; a slot whose sum reached
    ``budget`` is not ``checked`` (a new request zeroes them, as it does the counters).

    Returns ``(free, checked, idx, ctr, row, over)``: ``free`` caches without consulting the diff
    (a 0 of a static mask), ``checked`` caches iff the diff is below the threshold. ``idx`` is the
    slot index as a (1,) tensor, clamped to the overflow slot ``slots``; ``ctr`` the slot's counters
    as they stood before this call; ``row`` the slot's row in the anchor and residual tensors, which
    have none for the overflow slot (clamped to ``slots - 1``); ``over``: this call is the overflow
    slot's, whose writes to that row must keep what is there.
    """
    # A new request forgets every slot's anchor and counters.
    slot_ctr.mul_((~new_req).to(slot_ctr.dtype))
    if acc is not None:
        acc.mul_((~new_req).to(acc.dtype))
    idx = torch.clamp(slot, max=slots).reshape(1)
    row = torch.clamp(slot, max=slots - 1).reshape(1)
    over = slot >= slots
    ctr = slot_ctr.index_select(0, idx)[0]
    warm = (step < warmup_steps) & (step % warmup_interval == 0)
    usable = ~warm & (ctr[0] > 0) & ~over
    never = torch.zeros_like(usable)
    if mask is not None:
        must = mask.index_select(0, torch.clamp(step, max=mask.shape[0] - 1).reshape(1))[0] == 1
        usable = usable & ~must
        if static_mask:
            return usable, never, idx, ctr, row, over
    if threshold <= 0:
        usable = usable & False
    if max_cached >= 0:
        usable = usable & (ctr[1] < max_cached)
    if max_continuous >= 0:
        usable = usable & (ctr[2] < max_continuous)
    if acc is not None:
        usable = usable & (acc.index_select(0, idx)[0] < budget)
    return never, usable, idx, ctr, row, over


def downsample(x: torch.Tensor, k: int) -> torch.Tensor:
    """Every ``k``-th channel (last dim) of ``x``, the part the guard compares and keeps as anchor
    (cache-dit's downsample_factor: ``k`` times less anchor memory; the diff is a sample's)."""
    return x[..., ::k]


def relative_l1(r: torch.Tensor, a: torch.Tensor, has_anchor: torch.Tensor, group: str | None = None,
                important: float = 0.0):
    """``mean|r - a| / mean|a|`` in float32 (nan without an anchor).

    ``group`` (context parallelism: a process group name) makes every rank see the same diff
    (algorithms.md §1.8): ``r`` and ``a`` are this rank's tokens only, so the sums and element
    counts of numerator and denominator are all-reduced before dividing.

    ``important`` (cache-dit's important_condition_threshold) > 0: only the tokens (entries of the
    leading dims) whose own ``mean|r - a| / mean|a|`` over the channels exceeds it enter both means,
    or every token when none does (under ``group``: none on any rank).
    """
    if important > 0:
        return _important_l1(r, a, has_anchor, group, important)
    num = (r - a).abs().mean(dtype=torch.float32)
    den = a.abs().mean(dtype=torch.float32)
    if group is not None:  # context parallel: global means from per-rank sums and counts
        from .distributed.ulysses import all_reduce_sum

        count = torch.full_like(num, float(r.numel()))
        total = all_reduce_sum(torch.stack([num * count, den * count, count]), group)
        num, den = total[0] / total[2], total[1] / total[2]
    return torch.where(has_anchor, num / den, torch.full_like(num, float("nan")))


def _important_l1(r, a, has_anchor, group, important: float):
    # per token, the sums over the channels (a token's ratio of means is the ratio of its sums)
    d = (r - a).abs().sum(-1, dtype=torch.float32)
    m = a.abs().sum(-1, dtype=torch.float32)
    keep = (d / m > important).to(torch.float32)  # nan > x is False
    # the sums over all tokens and over the kept ones, and how many tokens were kept
    sums = torch.stack([d.sum(), m.sum(), (d * keep).sum(), (m * keep).sum(), keep.sum()])
    if group is not None:
        from .distributed.ulysses import all_reduce_sum

        sums = all_reduce_sum(sums, group)
    ratio = torch.where(sums[4] > 0, sums[2] / sums[3], sums[0] / sums[1])
    return torch.where(has_anchor, ratio, torch.full_like(ratio, float("nan")))


def decide(r: torch.Tensor, anchor: torch.Tensor, slot_ctr: torch.Tensor, step: torch.Tensor,
           slot: torch.Tensor, new_req: torch.Tensor, mask: torch.Tensor | None = None,
           acc: torch.Tensor | None = None, step_diff: torch.Tensor | None = None, *, threshold: float,
           warmup_steps: int, warmup_interval: int, max_cached: int, max_continuous: int, slots: int,
           static_mask: bool = False, budget: float | None = None, important: float = 0.0,
           group: str | None = None):
    """Whether this call may reuse the cached middle residual (algorithms.md §1.4, in order).

    ``mask`` (int8, one entry per step; steps past the mask are 0) is the steps computation
    mask: 1 forces a computed step; with ``static_mask`` a 0 caches without consulting the limits
    or the threshold (still only once a residual exists). ``acc``/``budget``: see :func:`gate`;
    a diff compared with the threshold adds to the slot's sum when positive (cache-dit's
    max_accumulated_residual_diff_threshold). ``group``, ``important``: see :func:`relative_l1`.
    ``step_diff`` (cfg_diff_compute_separate=False): slot 0 leaves there the diff it compared
    (nan if it compared none); the later slots of the step use it instead of their own if any.

    Returns ``(cache, diff, idx, anchor_slot, ctr_slot, row, over)`` (see :func:`gate`); the
    overflow slot's diff is nan (it has no anchor of its own).
    """
    free, checked, idx, ctr, row, over = gate(slot_ctr, step, slot, new_req, mask, threshold=threshold,
                                              warmup_steps=warmup_steps, warmup_interval=warmup_interval,
                                              max_cached=max_cached, max_continuous=max_continuous,
                                              slots=slots, static_mask=static_mask, budget=budget, acc=acc)
    a = anchor.index_select(0, row)[0]
    diff = relative_l1(r, a, (ctr[0] > 0) & ~over, group, important)
    if step_diff is not None:
        first = slot == 0
        shared = step_diff[0]
        step_diff.copy_(torch.where(first, torch.where(checked, diff, torch.full_like(diff, float("nan"))),
                                    shared).reshape(1))
        diff = torch.where(~first & ~over & ~torch.isnan(shared), shared, diff)
    if acc is not None:  # checked implies an anchor, so diff is a number there
        acc.index_add_(0, idx, torch.where(checked & (diff > 0), diff, torch.zeros_like(diff)).reshape(1))
    return free | (checked & (diff < threshold)), diff, idx, a, ctr, row, over


def commit(cache: torch.Tensor, over: torch.Tensor, diff: torch.Tensor, idx: torch.Tensor, row: torch.Tensor,
           r: torch.Tensor, a: torch.Tensor, ctr: torch.Tensor, anchor: torch.Tensor, slot_ctr: torch.Tensor,
           step: torch.Tensor, slot: torch.Tensor, new_req: torch.Tensor, counters: torch.Tensor,
           hist_flag: torch.Tensor, hist_diff: torch.Tensor, hist_meta: torch.Tensor) -> None:
    """Write the slot's anchor, counters and the history after the branch ran.

    The anchor moves only on computed steps of a slot that has one (not the overflow slot); any
    computed step ends the run of cached steps.
    """
    anchor.index_put_((row,), torch.where(cache | over, a, r).unsqueeze(0))
    _count(cache, idx, ctr, slot_ctr)
    _record(cache, diff, idx, step, slot, new_req, counters, hist_flag, hist_diff, hist_meta)


def _count(cache: torch.Tensor, idx: torch.Tensor, ctr: torch.Tensor, slot_ctr: torch.Tensor) -> None:
    c = cache.to(torch.int64)
    new_ctr = torch.stack([torch.ones_like(ctr[0]), ctr[1] + c, (ctr[2] + 1) * c, ctr[3] + 1 - c])
    slot_ctr.index_put_((idx,), new_ctr.unsqueeze(0))


def _record(cache, diff, idx, step, slot, new_req, counters, hist_flag, hist_diff, hist_meta,
            pruned=None, hist_pruned=None) -> None:
    """Write this call into the history row of the current request (cleared on a new request)."""
    row = (counters[2] % HISTORY).reshape(1)
    keep = ~new_req
    s = torch.clamp(step, max=MAX_STEPS - 1).reshape(1)
    # the direction of time flipped at this call (tick): the request before took one step, step 1
    # of this request (every slot); move it here
    moved = (counters[5] == 1).reshape(1)
    lone_row = ((counters[2] + 1) % HISTORY).reshape(1)
    one = torch.ones_like(s)
    written = [(hist_flag, -1, cache.to(torch.int8)), (hist_diff, float("nan"), diff)]
    if hist_pruned is not None:
        written.append((hist_pruned, 0, pruned.to(hist_pruned.dtype)))
    for hist, empty, value in written:
        here = hist.index_select(0, row)
        lone = hist.index_select(0, lone_row).index_select(2, torch.zeros_like(s))
        here = torch.where(moved, here.index_copy(2, one, lone), here)
        hist.index_put_((row,), torch.where(keep, here, empty))
        hist.index_put_((row, idx, s), value.reshape(1))
    meta = hist_meta.index_select(0, row)[0] * keep.to(torch.int64)
    seen = torch.stack([torch.maximum(meta[0], step + 1), torch.maximum(meta[1], slot + 1)])
    hist_meta.index_put_((row,), seen.unsqueeze(0))


def commit_residual(cache: torch.Tensor, over: torch.Tensor, residual: torch.Tensor, row: torch.Tensor,
                    res_slot: torch.Tensor, exit_value: torch.Tensor, entry_value: torch.Tensor,
                    step: torch.Tensor, nodes: torch.Tensor, computed: torch.Tensor,
                    used: torch.Tensor | None = None, form: str = calibrators.TAYLOR, *,
                    keep_value: bool = False, snapshots: bool = False) -> None:
    """Store the middle residual of one stream (and its divided differences) in the slot's
    ``row``: kept on cached steps and overflow calls, ``exit - entry`` on computed ones (with
    ``keep_value``, calibrator_cache_type="hidden_states": ``exit``, M's output). ``nodes`` and
    ``computed`` are the calibrator's computed steps and their count before this call. ``used``
    (FoCa) is what the branch used: the state's window moves on every step of a slot
    (cdcompile.calibrators). ``snapshots`` (DMD): the history holds the last computed residuals
    themselves, shifted. DBPrune stores each block's residual with it (cache = pruned)."""
    if used is not None:
        residual.index_put_((row,), calibrators.foca_update(cache, used, res_slot, over).unsqueeze(0))
        return
    y = exit_value if keep_value else exit_value - entry_value
    if res_slot.shape[0] == 1:
        new = y.unsqueeze(0)
    elif snapshots:
        new = torch.cat([y.unsqueeze(0), res_slot[:-1]])
    else:
        new = calibrators.differences(y, res_slot, step, nodes, computed, form)
    residual.index_put_((row,), torch.where(cache | over, res_slot, new).unsqueeze(0))


def commit_nodes(cache: torch.Tensor, cal_nodes: torch.Tensor, idx: torch.Tensor,
                 nodes: torch.Tensor, step: torch.Tensor) -> None:
    """Shift the slot's computed-step nodes on a computed step (after every stream used them)."""
    shifted = torch.cat([step.to(torch.float32).reshape(1), nodes[:-1]])
    cal_nodes.index_put_((idx,), torch.where(cache, nodes, shifted).unsqueeze(0))


# DBPrune (algorithms.md §4). The block_cache pass emits, per call: tick, prune_gate; for every
# prunable block prune_decide, a cond (add the block's cached residuals | run the block) and
# prune_commit_block / commit_residual (with a calibrator: prune_calibration before the cond and
# prune_commit_calibration after); then prune_commit. ``acc`` is a float32 (5,) value
# threaded from block to block within the call (not state): sum and count of the diffs feeding the
# dynamic threshold, blocks pruned, sum and count of all defined diffs (for the history).

PRUNE_RELAX = 1.25  # dynamic threshold = PRUNE_RELAX * mean of the first diffs of the call (defaults) ...
PRUNE_SAMPLES = 5  # ... over at most this many positive diffs ...
PRUNE_CAP = 2.0  # ... used only while below PRUNE_CAP * residual_diff_threshold


def prune_gate(slot_ctr, step, slot, new_req, mask=None, **guard_options):
    """The step-level guard chain for DBPrune; returns ``(free, checked, idx, ctr, acc, row, over)``
    (see :func:`gate`).

    Warmup, mask, slots and the step limits gate every block of the call alike: the limits count
    steps as they stood when the call began (a step counts once, however many blocks it prunes).
    """
    free, checked, idx, ctr, row, over = gate(slot_ctr, step, slot, new_req, mask, **guard_options)
    return free, checked, idx, ctr, torch.zeros(5, dtype=torch.float32, device=slot_ctr.device), row, over


def prune_decide(h: torch.Tensor, anchor: torch.Tensor, row: torch.Tensor, over: torch.Tensor, free: torch.Tensor,
                 checked: torch.Tensor, ctr: torch.Tensor, acc: torch.Tensor, *, threshold: float,
                 dynamic: bool, relax: float = PRUNE_RELAX, cap: float | None = None, important: float = 0.0,
                 group: str | None = None):
    """Whether to prune one block: its input ``h`` against its input when last computed.

    Every block of a slot computes on the slot's first call of a request, so the slot's
    ``has_anchor`` counter stands for every block's. With ``dynamic``, the threshold is
    ``max(threshold, relax * mean(first 5 positive diffs of earlier blocks in this call))`` while
    that stays below ``cap`` (None: ``2 * threshold``); algorithms.md §4 has ``relax`` = 1.25 and
    the default cap. Returns ``(prune, a, acc)``; ``a`` is the block's anchor
    in the slot's ``row`` (the overflow slot has none: its diffs are nan).
    """
    a = anchor.index_select(0, row)[0]
    diff = relative_l1(h, a, (ctr[0] > 0) & ~over, group, important)
    thr = torch.full_like(diff, threshold)
    if dynamic:
        relaxed = relax * acc[0] / torch.clamp(acc[1], min=1)
        limit = PRUNE_CAP * threshold if cap is None else cap
        thr = torch.where((acc[1] > 0) & (relaxed < limit), torch.maximum(relaxed, thr), thr)
    prune = free | (checked & (diff < thr))
    sample = ((diff > 0) & (acc[1] < PRUNE_SAMPLES)).to(torch.float32)  # nan > 0 is False
    defined = (~torch.isnan(diff)).to(torch.float32)
    acc = acc + torch.stack([torch.nan_to_num(diff) * sample, sample, prune.to(torch.float32),
                             torch.nan_to_num(diff) * defined, defined])
    return prune, a, acc


def prune_commit_block(prune: torch.Tensor, over: torch.Tensor, row: torch.Tensor, h: torch.Tensor,
                       a: torch.Tensor, anchor: torch.Tensor) -> None:
    """The block's anchor moves to its input when it computed (not in an overflow call)."""
    anchor.index_put_((row,), torch.where(prune | over, a, h).unsqueeze(0))


def prune_calibration(cal: torch.Tensor, idx: torch.Tensor, ctr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's calibrator clock in the slot: ``(nodes, computed)``, its last three computed
    steps and how many times it computed in this request. Every block of a slot computes on the
    slot's first call of a request (no anchor yet), so the slot's ``has_anchor`` counter, zeroed by
    a new request, tells a count of an earlier request (read as 0)."""
    mine = cal.index_select(0, idx)[0]
    return mine[:-1], torch.where(ctr[0] > 0, mine[-1], torch.zeros_like(mine[-1]))


def prune_commit_calibration(prune: torch.Tensor, over: torch.Tensor, cal: torch.Tensor, idx: torch.Tensor,
                             nodes: torch.Tensor, computed: torch.Tensor, step: torch.Tensor) -> None:
    """A block that computed (not in an overflow call) shifts its computed steps and counts one more."""
    kept = torch.cat([nodes, computed.reshape(1)])
    moved = torch.cat([step.to(cal.dtype).reshape(1), nodes[:-1], (computed + 1).reshape(1)])
    cal.index_put_((idx,), torch.where(prune | over, kept, moved).unsqueeze(0))


def prune_commit(acc: torch.Tensor, idx: torch.Tensor, ctr: torch.Tensor, slot_ctr: torch.Tensor,
                 step: torch.Tensor, slot: torch.Tensor, new_req: torch.Tensor, counters: torch.Tensor,
                 hist_flag: torch.Tensor, hist_diff: torch.Tensor, hist_meta: torch.Tensor,
                 hist_pruned: torch.Tensor) -> None:
    """Count the step (cached iff any block was pruned) and record blocks pruned and mean diff."""
    cache = acc[2] > 0
    diff = torch.where(acc[4] > 0, acc[3] / torch.clamp(acc[4], min=1), torch.full_like(acc[3], float("nan")))
    _count(cache, idx, ctr, slot_ctr)
    _record(cache, diff, idx, step, slot, new_req, counters, hist_flag, hist_diff, hist_meta,
            pruned=acc[2], hist_pruned=hist_pruned)
