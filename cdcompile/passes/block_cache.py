"""DBCache rewrite: F | guard | cond(cache, compute M) | B, with the cache state as graph inputs.

Algorithm (reference/algorithms.md §1, §5):
1. Stack. The discovered groups chained along the hidden stream (a group whose hidden entry is
   computed from the previous group's hidden exit) form one stack of N blocks; the longest chain
   wins (FLUX: 19 double + 38 single = 57). One decision covers the whole stack. When it has no
   residual across it, its largest group alone, then the other chains, largest first, are tried
   (Krea 2, whose text-only blocks feed its transformer blocks; Wan-Animate, whose 5-block motion
   encoder narrows its stream); the report says so.
2. Split. F = the first ``Fn_compute_blocks`` blocks, B = the last ``Bn_compute_blocks``, M = the
   rest. The M region is M's block nodes plus the nodes between them that depend on them, and
   whole scopes opened and closed around them (``torch.autocast``). A ``torch.vmap`` scope inside
   the blocks is lowered to the aten ops it runs when it reads the streams, and otherwise stays
   before the cond (raw functorch calls cannot run in a branch). A call nobody reads between
   the M blocks (a side effect, e.g. an in-place write to a side input) that would not move with
   the region whole refuses the cache with a reason.
   M's outputs must be stream values at M's exit, each with an M-entry stream of the same label
   and shape (the residual ``exit - entry``); anything else leaving M makes the graph uncacheable.
   Where glue between two groups of M gives a stream a new form (text and image tokens joined for
   single-stream blocks: FLUX.2, Chroma, AuraFlow), that glue is replayed before the cond on the
   earlier group's entries, and the result is the joined stream's entry (``cat(EF, HF)``).
   An exit length that is a fresh unbacked size (a block slicing its joint sequence at a
   data-dependent length) is checked equal to the entry's in the compute branch (``torch._check``).
   (The region, its operands, its exits and the branch subgraphs: ``passes/_branch.py``, shared
   with DBPrune.)
3. Guard. ``R = HF - H0`` (the hidden stream after F minus the stack's hidden input) is compared
   with the slot's anchor by :func:`cdcompile.guard.decide`; the step/slot/request clock comes from
   the timestep input (:func:`cdcompile.guard.tick`), found structurally: a number input per
   sample (or per token) that feeds a sinusoidal embedding (``sin``/``cos``).
4. Branch. ``torch.ops.higher_order.cond(cache, cache_branch, compute_branch, operands)``: the
   compute branch is M copied into a subgraph; the cache branch returns ``entry + residual`` per
   stream (the calibrator's forecast of the residual, or of M's output itself with
   ``calibrator_cache_type="hidden_states"``). Both return contiguous tensors that alias nothing
   (not even each other: a stream's output is not returned twice).
5. State. Anchor, residuals, counters and history are new placeholders appended after Dynamo's;
   :func:`cdcompile.guard.commit` updates them in place *outside* the cond (torch.export refuses
   mutation inside a branch).

Before/after::

    H0 -> F -> M -> B -> out            H0 -> F -> tick, decide -> cond(cache: HF + CH | M) -> B -> out
                                                                    commit(anchor, CH, counters)

Invariants relied on: blocks are contiguous runs in the graph (discovery), shapes are static.
Guaranteed: branch outputs are contiguous and alias no input; no state mutation inside a branch;
the original placeholders keep their order (state placeholders come after them).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from typing import Any, Sequence

import torch
import torch.fx as fx

from .. import calibrators, diffusers_hooks, guard
from ..config import CacheType
from ..distributed import ulysses
from . import _branch, _fx
from .discover import BlockGroup


@dataclasses.dataclass
class StreamPlan:
    label: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def calibrator_history(calibrator: str | None, order: int, dmd: calibrators.DMDSpec | None = None) -> int:
    """Entries a calibrated residual keeps: d0..dn (TaylorSeer), FoCa's four, DMD's snapshots, or
    the last residual."""
    if dmd is not None:
        return dmd.snapshots
    return calibrators.FOCA_HISTORY if calibrator == "foca" else order + 1


def dmd_spec(ctx) -> calibrators.DMDSpec | None:
    """The DMD calibrator's options (None when another or none is on); where the context parallel
    pass sharded the graph, its group and the token dim it cut the streams along."""
    cfg = ctx.cfg
    if cfg.calibrator is None or cfg.calibrator.value != "dmd":
        return None
    cp = getattr(ctx, "context_parallel", None)
    sharded = cp is not None and cp.applied
    return calibrators.DMDSpec(cfg.dmd_history, cfg.dmd_rank, float(cfg.dmd_ridge), cfg.dmd_fallback_order,
                               cfg.dmd_fallback, ulysses.process_group(cfg.ulysses_degree)[0] if sharded else None,
                               cp.token_dim if sharded else None)


class _StreamCalibration:
    """What the state keeps of residual stream ``k``, from the plan's ``calibrated`` (per stream:
    the calibrator forecasts it; ``()``: none), ``history`` and ``values``."""

    def calibrates(self, k: int) -> bool:
        return bool(self.calibrated) and self.calibrated[k]

    def history_of(self, k: int) -> int:
        """Entries kept: the calibrator's history, or the last residual alone."""
        return self.history if self.calibrates(k) else 1

    def keeps_value(self, k: int) -> bool:
        """Whether the stream keeps M's (DBPrune: the block's) output, calibrator_cache_type="hidden_states"."""
        return self.values and self.calibrates(k)


@dataclasses.dataclass
class CachePlan(_StreamCalibration):
    """What the runtime must allocate and pass: built by the pass, read by runtime.CacheState."""

    slots: int
    anchor: StreamPlan
    residuals: list[StreamPlan]
    key_input: int  # index of a weight input identifying the model instance
    timestep_input: str | None
    state_names: list[str]
    # Where the clock reads the timestep: "own" (timestep_index, an input of this graph; the
    # runtime publishes it for later graphs of the call), "borrowed" (the timestep an earlier
    # graph of the same call published, appended by the runtime as one more input) or None.
    timestep_source: str | None = None
    timestep_index: int | None = None
    order: int = 0  # calibrator order (TaylorSeer); 0 keeps the last residual only
    calibrator: str | None = None  # None, "taylorseer", "foca" or "dmd"
    dmd: calibrators.DMDSpec | None = None  # the DMD calibrator's options
    form: str = calibrators.TAYLOR  # TaylorSeer's form (cdcompile.calibrators)
    mask_spec: Any = None  # steps_computation_mask option (None: no mask state)
    num_inference_steps: int | None = None
    budget: float | None = None  # max_accumulated_residual_diff_threshold (None: no slot_acc state)
    share_diff: bool = False  # cfg_diff_compute_separate=False: step_diff state
    # per residual stream: the calibrator forecasts it (calibrated_streams; () = none); a stream
    # it does not keeps the last residual alone (history 1)
    calibrated: tuple[bool, ...] = ()
    values: bool = False  # calibrator_cache_type="hidden_states": calibrated streams keep M's output
    downsample: int = 1  # downsample_factor: anchors keep every downsample-th channel (guard.downsample)
    prune_blocks: list["PruneBlockPlan"] | None = None  # DBPrune: the prunable blocks' state
    num_blocks: int = 0  # N, the stack's blocks
    # What the graph does with its state (options, stack, F/M/B, timestep input): graphs of one model
    # with equal fingerprints and state tensors share one state (runtime.CacheState.layout)
    fingerprint: str = ""

    @property
    def history(self) -> int:
        """Entries kept per calibrated residual (calibrator_history)."""
        return calibrator_history(self.calibrator, self.order, self.dmd)

    # Dynamic sizes (a graph Dynamo compiled with symbolic token counts): each symbol in the state's
    # shapes -> (graph input position, dim) it is read from at call time; empty for static shapes.
    size_sources: dict[Any, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def allocate(self, args: Sequence[Any] | None = None):
        """Fresh state. With dynamic sizes: for the sizes of ``args`` (the graph's inputs), or with
        symbolic shapes when ``args`` is None (under a fake mode, as compile-time example inputs)."""
        from ..runtime import CacheState

        sizes = None if args is None else dict(zip(self.size_sources, self.sizes_of(args)))
        return CacheState.allocate(self, sizes)

    def sizes_of(self, args: Sequence[Any]) -> tuple[int, ...]:
        """The values of the dynamic sizes in a call's inputs (``()`` for static shapes)."""
        return tuple(args[k].shape[d] for k, d in self.size_sources.values())


@dataclasses.dataclass
class PruneBlockPlan(_StreamCalibration):
    """DBPrune state of one prunable block: its input anchor, one residual per stream (with the
    calibrator's history for the streams it forecasts) and, with a calibrator, its clock."""

    index: int  # position in the stack (0..N-1)
    anchor: StreamPlan
    residuals: list[StreamPlan]
    calibrated: tuple[bool, ...] = ()  # per residual: the calibrator forecasts it (() = none)
    history: int = 1  # entries a calibrated residual keeps (calibrator_history)
    values: bool = False  # calibrator_cache_type="hidden_states": calibrated streams keep the block's output
    dmd: calibrators.DMDSpec | None = None  # the DMD calibrator's options

    @property
    def anchor_name(self) -> str:
        return f"anchor_b{self.index}"

    @property
    def cal_name(self) -> str | None:
        """The block's calibrator clock (guard.prune_calibration), when it forecasts a stream."""
        return f"cal_b{self.index}" if any(self.calibrated) else None

    def residual_name(self, label: str) -> str:
        return f"residual_b{self.index}_{label}"

    def state_names(self) -> list[str]:
        return ([self.anchor_name] + ([self.cal_name] if self.cal_name else [])
                + [self.residual_name(r.label) for r in self.residuals])


def run(gm: fx.GraphModule, ctx) -> None:
    """Insert the block cache into ``gm`` for the stack of discovered groups (see module doc)."""
    cfg, report = ctx.cfg, ctx.report
    if not cfg.enable_cache:
        report.not_cached.append("enable_cache=False")
        return
    if foreign := diffusers_hooks.caches(report.diffusers_hooks):
        why = diffusers_hooks.advice(foreign)[0]
        report.not_cached.append(why)
        warnings.warn(f"cachedit: not cached: {why}", stacklevel=2)
        return
    groups = ctx.discovery.groups if ctx.discovery else []
    if not groups:
        return
    if _branch.lower_stream_vmaps(gm, groups):
        from . import discover

        ctx.discovery = discover.find_block_groups(gm, ctx.example_inputs)
        report.groups = [g.as_dict() for g in ctx.discovery.groups]
        groups = ctx.discovery.groups
        if not groups:
            report.not_cached.append("no repeated block group after lowering the torch.vmap scopes")
            return
    stack = _choose_stack(groups)
    blocks = [(g, i) for g in stack for i in range(g.num_blocks)]
    n = len(blocks)
    fn, bn = cfg.Fn_compute_blocks, cfg.Bn_compute_blocks
    names = " + ".join(f"{g.name} ({g.num_blocks})" for g in stack)
    if fn + bn > n:
        raise ValueError(
            f"cachedit: Fn_compute_blocks + Bn_compute_blocks = {fn} + {bn} = {fn + bn} exceeds the "
            f"N = {n} blocks of the stack {names}; choose Fn + Bn <= {n}")
    if fn + bn == n:
        report.not_cached.append(f"Fn + Bn = {n} covers every block of {names}: nothing to cache")
        return
    reason = _try(gm, ctx, stack, blocks, fn, bn)
    fallback = None
    # A chain of groups whose streams change form between them other than by a join the pass can
    # replay (Krea 2 joins image tokens to its text-only blocks' output; see _replayed_entry) has
    # no residual across the whole chain; then the largest single group of the chain that can be
    # cached is, with F and B counted inside it.
    # Failing that, the next chains (a model may hold a smaller stack of its own, e.g. Wan-Animate's
    # motion encoder, whose stream does not keep its form), largest first.
    singles = sorted(stack, key=lambda g: -g.num_blocks) if len(stack) > 1 else []
    others = [c for c in _chains(groups) if c != stack]
    for alt in ([[g] for g in singles] + others) if reason is not None else []:
        size = sum(g.num_blocks for g in alt)
        if fn + bn < size and _try(gm, ctx, alt, [(g, i) for g in alt for i in range(g.num_blocks)], fn, bn) is None:
            what = " + ".join(f"{g.name} ({g.num_blocks})" for g in alt)
            how = "alone, F and B counted inside it" if len(alt) == 1 and alt[0] in stack else "instead"
            fallback = f"the stack {names} has no residual across it ({reason}); cached {what} {how}"
            warnings.warn(f"cachedit: {fallback}", stacklevel=2)
            stack, n, reason = alt, size, None
            break
    if reason is not None:
        report.not_cached.append(reason)
        # Block groups exist but the cache could not go in: say so rather than run slower silently.
        warnings.warn(f"cachedit: compiling without the block cache: {reason}", stacklevel=2)
        return
    if fallback is not None:
        report.cache["fallback"] = fallback
    report.cache["groups"] = [g.name for g in stack]
    report.cache.update(num_blocks=n, Fn=fn, Mn=n - fn - bn, Bn=bn, cache_type=cfg.cache_type.value,
                        size_asserts=cfg.size_asserts, threshold=cfg.residual_diff_threshold,
                        refresh=None if cfg.force_refresh_step_hint is None else
                        {"hint": cfg.force_refresh_step_hint, "policy": cfg.force_refresh_step_policy})
    plan = ctx.cache_plan
    plan.num_blocks = n
    plan.fingerprint = repr((cfg, report.cache["groups"], fn, bn, report.cache["streams"], plan.timestep_input))


def _try(gm, ctx, stack, blocks, fn, bn) -> str | None:
    """Rewrite ``gm`` for ``stack``, or return why not (then ``gm`` is untouched)."""
    if ctx.cfg.cache_type is CacheType.DBPRUNE:
        from . import block_prune

        reason = block_prune.rewrite(gm, ctx, stack, blocks, fn, bn)
    else:
        reason = _rewrite(gm, ctx, stack, blocks, fn, bn)
    if reason is not None:  # symbol operands and replayed entries made for this attempt go again
        for n in reversed([m for m in gm.graph.nodes if "cdcompile_symbol" in m.meta or "cdcompile_replay" in m.meta]):
            if not n.users:
                gm.graph.erase_node(n)
    return reason


def _choose_stack(groups: list[BlockGroup]) -> list[BlockGroup]:
    """The longest chain of groups linked along the hidden stream."""
    return _chains(groups)[0]


def _chains(groups: list[BlockGroup]) -> list[list[BlockGroup]]:
    """The chains of groups linked along the hidden stream, one from each start, most blocks first
    (the first of equal size first; a chain inside a longer one is left out)."""
    chains: list[list[BlockGroup]] = []
    for start in range(len(groups)):
        chain = [groups[start]]
        for g in groups[start + 1:]:
            prev = chain[-1].stream("hidden")
            cur = g.stream("hidden")
            if prev is not None and cur is not None and prev.exit is not None and (
                    cur.entry is prev.exit or prev.exit in _fx.ancestors(cur.entry)):
                chain.append(g)
        if not any(all(g in c for g in chain) for c in chains):
            chains.append(chain)
    return sorted(chains, key=lambda c: -sum(x.num_blocks for x in c))


def _boundary(group: BlockGroup, i: int, label: str, *, before: bool) -> fx.Node | None:
    """The value of stream ``label`` entering (``before``) or leaving block ``i`` of ``group``."""
    s = group.stream(label)
    if s is None:
        return None
    if before:
        return s.entry if i == 0 else s.outputs[i - 1]
    return s.outputs[i]


def _rewrite(gm, ctx, stack, blocks, fn, bn) -> str | None:
    cfg, report = ctx.cfg, ctx.report
    graph = gm.graph
    order = {n: k for k, n in enumerate(graph.nodes)}
    g0 = stack[0]
    h0 = g0.stream("hidden").entry
    gf, i_f = blocks[fn - 1]
    hf = _boundary(gf, i_f, "hidden", before=False)
    if hf is None:
        return f"block {gf.name}.{gf.blocks[i_f].index} has no hidden output"
    gm_first, i_m = blocks[fn]
    gx, i_x = blocks[len(blocks) - bn - 1]

    # M region: M's block nodes plus in-between nodes depending on them.
    nodes = list(graph.nodes)
    sources = tuple(e for s in gm_first.streams
                    if (e := _boundary(gm_first, i_m, s.label, before=True)) is not None)
    middle = _branch.block_nodes(nodes, [g.blocks[i] for g, i in blocks[fn:len(blocks) - bn]])
    found = _branch.region(nodes, order, middle, "the middle blocks", sources)
    if isinstance(found, str):
        return found
    region, m_nodes = found
    exit_label = {s.outputs[i_x]: s.label for s in gx.streams if s.outputs[i_x] is not None}
    # M spans groups, and a stream of the group it starts in is one a later group reads without
    # returning it (text tokens the first group refines and the next only attends to): the stream
    # leaves M as its last value inside that group, and is cached like the others (the later
    # groups carry it unchanged, so entry + residual is what the B blocks and the glue read).
    if gm_first is not gx:
        last = max(i for g, i in blocks[fn:len(blocks) - bn] if g is gm_first)
        for s in gm_first.streams:
            if s.label not in exit_label.values() and s.outputs[last] is not None:
                exit_label[s.outputs[last]] = s.label

    m_blocks = blocks[fn:len(blocks) - bn]
    m_groups: list[BlockGroup] = []  # M's groups in order, and the last block of each in M
    last_in: list[int] = []
    for g, i in m_blocks:
        if not m_groups or m_groups[-1] is not g:
            m_groups.append(g)
            last_in.append(i)
        last_in[-1] = i

    def plain_entry(label: str) -> fx.Node | None:
        e = _boundary(gm_first, i_m, label, before=True)
        if e is not None:
            return e
        # ... and the reverse: a stream of a later group of M that the group M starts in only reads
        # (text the first group attends to across, the next updates) enters M as it was before M
        # (or as context parallelism shards it at that group, from that value: not from M)
        for g, _ in m_blocks:
            s = g.stream(label)
            if s is not None and s.entry not in m_nodes:
                return s.entry
        return None

    not_replayed: list[str] = []

    def entry_of(label: str, out: fx.Node) -> fx.Node | None:
        e = plain_entry(label)
        if e is not None and _fx.same_meta(_fx.fake_value(e), _fx.fake_value(out)):
            return e
        # A stream whose form glue between two groups of M changed (FLUX.2, Chroma, AuraFlow join
        # text and image tokens for the single blocks) enters M as that glue makes it from the
        # previous group's entries.
        replayed = _replayed_entry(graph, order, m_groups, last_in, middle, m_nodes, label, out, entry_of)
        if isinstance(replayed, str):
            not_replayed.append(replayed)
            return e
        return replayed if replayed is not None else e

    found = _branch.pair_exits(region, m_nodes, exit_label, entry_of, "the middle blocks",
                               "the middle blocks cannot be skipped")
    if isinstance(found, str):
        return found + "".join(f"; {why}" for why in dict.fromkeys(not_replayed))
    pairs, checked, exit_sizes = found
    nodes = list(graph.nodes)  # with the replayed entries
    order = {n: k for k, n in enumerate(nodes)}
    inputs, pulled = _branch.operands(region, m_nodes, [e for _, e, _ in pairs], order)
    bad = _branch.non_operand(inputs)
    if bad is not None:
        return f"the middle blocks read {bad}"
    hv = _fx.fake_value(hf)
    if not _fx.same_meta(_fx.fake_value(h0), hv):
        return "the hidden stream changes shape inside F; the decision residual is undefined"
    # A checked exit has its entry's shape once the compute branch has checked it: plan with that.
    shaped = [_fx.fake_value(e if o in checked else o) for _, e, o in pairs]
    sources = size_sources(nodes, [hv] + shaped)
    if isinstance(sources, str):
        return sources

    weights = _fx.weight_placeholders(gm, ctx.example_inputs)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    key_input = next((k for k, p in enumerate(placeholders) if p in weights), None)
    if key_input is None:
        return "no parameter among the graph inputs to tell model instances apart"
    timestep, clock = clock_input(gm, nodes, weights, order[g0.blocks[0].nodes[0]], ctx,
                                  order[g0.blocks[0].nodes[-1]] + 1)

    plan = CachePlan(
        slots=cfg.cache_slots, anchor=_stream_plan("hidden", hv),
        residuals=[_stream_plan(label, v) for (label, _, _), v in zip(pairs, shaped)],
        key_input=key_input, **clock,
        state_names=[], order=cfg.taylorseer_order, form=cfg.taylorseer_form,
        calibrator=cfg.calibrator.value if cfg.calibrator is not None else None, dmd=dmd_spec(ctx),
        mask_spec=cfg.steps_computation_mask, num_inference_steps=cfg.num_inference_steps,
        budget=cfg.max_accumulated_residual_diff_threshold, downsample=cfg.downsample_factor,
        share_diff=not cfg.cfg_diff_compute_separate,
        calibrated=tuple(calibrated(cfg, label) for label, _, _ in pairs),
        values=cfg.calibrator_cache_type == "hidden_states",
        size_sources=sources)
    forecast = [label for k, (label, _, _) in enumerate(pairs) if plan.calibrates(k)]
    warn_uncalibrated(cfg, forecast, "M")
    inputs, floats = _branch.specialize_floats(inputs)
    _emit(gm, region, pulled, inputs, pairs, h0, hf, timestep, plan, cfg, checked, exit_sizes)
    ctx.cache_plan = plan
    report.cache = {"streams": [label for label, _, _ in pairs],
                    "timestep_input": plan.timestep_input, "timestep_source": plan.timestep_source,
                    "constant_float_arguments": constant_float_arguments() if timestep is None else {},
                    "slots": plan.slots,
                    "middle_ops": len(region), "branch_operands": len(inputs),
                    "dynamic_sizes": describe_sizes(nodes, sources), "specialized_floats": floats,
                    "guard": cfg.guard_rule()}
    if plan.calibrator is not None:
        report.cache["calibrated"] = forecast
    if checked:
        report.cache["runtime_size_checks"] = [
            f"{label} dim {d}: {_fx.fake_value(o).shape[d]} == {_fx.fake_value(e).shape[d]}"
            for label, e, o in pairs for d in checked.get(o, [])]
    return None



def _replayed_entry(graph: fx.Graph, order: dict[fx.Node, int], m_groups: list[BlockGroup], last_in: list[int],
                    middle: set[fx.Node], m_nodes: set[fx.Node], label: str, out: fx.Node,
                    entry_of) -> fx.Node | str | None:
    """The entry of stream ``label`` leaving M as ``out``, when glue between two groups of M gave the
    stream a new form: the later group's stream is computed, between the groups, from the earlier
    group's outputs (``torch.cat([text, image], dim=1)`` before single-stream blocks). That glue is
    replayed, before the cond, on the earlier group's entries to M (``entry_of`` of its streams),
    so that ``entry + residual`` has the exit's form.

    None if ``out`` belongs to no later group of M whose stream entry M computes; why not (then the
    caller falls back to a smaller stack) if the glue reads other values computed in M, has an
    effect, is written in place (Lumina 2 joins its streams by ``joint[i, :n] = text[i, :n]`` into
    ``new_zeros``), or joins in tokens from outside the earlier group's streams. Krea 2 joins image
    tokens to the text its text-only blocks refined: a stack starting there would decide from the
    text, the same at every step. (A value from outside joined along the feature dim, Bria FIBO's
    text layer, is fine.)"""
    k = next((k for k, g in enumerate(m_groups) if (s := g.stream(label)) is not None and out in s.outputs), 0)
    if k == 0:
        return None
    target = m_groups[k].stream(label).entry
    if target is None or target not in m_nodes:
        return None
    prev = m_groups[k - 1]
    what = f"the glue from {prev.name} to {m_groups[k].name} is not replayed on the entries"
    subst = {}
    for s in prev.streams:
        o = s.outputs[last_in[k - 1]]
        if o is not None and isinstance(e := entry_of(s.label, o), fx.Node):
            subst[o] = e
    glue, todo = set(), [target]
    while todo:
        n = todo.pop()
        if n in subst or n in glue or n not in m_nodes:
            continue
        if n in middle or n.op not in ("call_function", "call_method") or _fx.writes_in_place(n) or n.is_impure():
            return f"{what}: it reads {n.name}{_fx.source(n)}, computed in the middle blocks"
        glue.add(n)
        todo.extend(n.all_input_nodes)
    ordered = sorted(glue, key=order.__getitem__)
    for n in ordered:
        if _written_in_place(n):
            return f"{what}: {n.name}{_fx.source(n)} is written in place"
        if _joins_outside_tokens(n, subst.keys() | glue):
            return (f"{what}: {n.name}{_fx.source(n)} joins in tokens that are no stream of {prev.name}, "
                    f"and a decision there would not see them")
    env = dict(subst)
    with graph.inserting_before(target):
        for n in ordered:
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
            env[n].meta.update(cdcompile_pass="block_cache", cdcompile_replay=True)
            _fx.set_fake(env[n])
    return env[target]


def _written_in_place(n: fx.Node) -> bool:
    """Whether a call writes into ``n`` or into a view of it."""
    todo, seen = [n], set()
    while todo:
        v = todo.pop()
        for u in v.users:
            if u in seen:
                continue
            seen.add(u)
            if _fx.writes_in_place(u) and u.args and u.args[0] is v:
                return True
            if _branch.is_view(u):
                todo.append(u)
    return False


def _joins_outside_tokens(n: fx.Node, inside) -> bool:
    """Whether ``n`` concatenates, along a dim other than the last (the tokens, not the features),
    a tensor that is not in ``inside``."""
    if _fx.target_name(n) not in ("cat", "concat", "concatenate", "cat.default") or not n.args:
        return False
    parts, dim = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", n.kwargs.get("axis", 0))
    v = _fx.fake_value(n)
    if not isinstance(v, torch.Tensor) or not isinstance(dim, int) or dim % v.ndim == v.ndim - 1:
        return False
    return any(isinstance(p, fx.Node) and p not in inside for p in parts)


def _stream_plan(label: str, v: torch.Tensor) -> StreamPlan:
    """A state tensor's plan; a dynamic size stays a SymInt (runtime.CacheState.allocate resolves it)."""
    return StreamPlan(label, tuple(d if isinstance(d, torch.SymInt) else int(d) for d in v.shape), v.dtype, v.device)


def size_sources(nodes: list[fx.Node], values: list[torch.Tensor]) -> dict[Any, tuple[int, int]] | str:
    """Where a call's inputs hold each dynamic size in the shapes of ``values`` (the state to allocate):
    symbol -> (input position, dim). A reason string when some size is no input's size (an unbacked
    size is data, and a size Dynamo derived only arithmetically cannot be read back)."""
    symbols = {sym for v in values for d in v.shape if isinstance(d, torch.SymInt) for sym in d.node.expr.free_symbols}
    found: dict[Any, tuple[int, int]] = {}
    if not symbols:
        return found
    for k, p in enumerate(n for n in nodes if n.op == "placeholder"):
        v = p.meta.get("example_value")
        for dim, d in enumerate(v.shape if isinstance(v, torch.Tensor) else ()):
            if isinstance(d, torch.SymInt) and d.node.expr in symbols:
                found.setdefault(d.node.expr, (k, dim))
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    missing = symbols - set(found)
    data = sorted(str(x) for x in missing if free_unbacked_symbols(x))
    if data:  # dynamic=False does not fix these: they come from tensor values
        return (f"the cache state's shapes hold sizes {data} read from tensor data (under "
                f"capture_scalar_outputs / capture_dynamic_output_shape_ops), which no input's shape "
                f"holds, so the state cannot be allocated before the call")
    if missing:
        return (f"the cache state's shapes hold dynamic sizes {sorted(map(str, missing))} that are no "
                f"input's size; compile with dynamic=False")
    return found


def describe_sizes(nodes: list[fx.Node], sources: dict[Any, tuple[int, int]]) -> list[str]:
    """``["s0 = l_hidden_states_.shape[1]", ...]``: the dynamic sizes the state is allocated for."""
    placeholders = [n for n in nodes if n.op == "placeholder"]
    return [f"{sym} = {placeholders[k].name}.shape[{d}]" for sym, (k, d) in sources.items()]


def _find_timestep(nodes: list[fx.Node], weights: set[fx.Node], stop: int, *,
                   strict: bool = False) -> fx.Node | None:
    """The user input carrying the diffusion timestep, found structurally.

    Candidates are float or integer inputs (DDIM and DPM-Solver timesteps are int64) from which a
    ``sin``/``cos`` (a sinusoidal embedding) is computed before the first block: one value per
    sample (ndim <= 1), or one per token or frame (Wan 2.2 TI2V's per-token timesteps, whose
    conditioning frame is at 0) when the sinusoid then feeds a matrix product before the first
    block, as a timestep embedding's MLP does and a rotary table (position ids) does not. When
    several qualify (FLUX-dev's and HunyuanVideo's guidance is embedded the same way), a name
    containing "timestep" wins and one containing "guidance" loses (a guidance scale is the same at
    every call: read as the timestep, every call would be one more CFG slot of one step), then one
    value per sample, then the first by input order (Dynamo's: the order of first use). The clock reads the largest
    value (:func:`cdcompile.guard.tick`). ``strict`` asks for the matrix product whatever the
    shape (a graph without blocks, searched to its end).
    """
    order = {n: k for k, n in enumerate(nodes)}

    def early_users(n):
        return [u for u in n.users if order.get(u, math.inf) < stop]

    def reaches(starts, names) -> list[fx.Node]:
        seen, todo, hits = set(starts), list(starts), []
        while todo:
            n = todo.pop()
            if _fx.target_name(n) in names:
                hits.append(n)
                continue
            for u in early_users(n):
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        return hits

    found = []
    for k, p in enumerate(nodes):
        if p.op != "placeholder" or p in weights:
            continue
        v = _fx.fake_value(p)
        if not isinstance(v, torch.Tensor) or v.dtype == torch.bool or v.is_complex():
            continue
        sinusoids = reaches([p], _SINUSOID)
        if not sinusoids or ((v.ndim > 1 or strict) and not reaches(sinusoids, _MATMUL)):
            continue
        found.append((0 if "timestep" in p.name else 2 if "guidance" in p.name else 1, v.ndim > 1, k, p))
    return min(found)[-1] if found else None


def timestep_position(gm: fx.GraphModule, example_inputs) -> int | None:
    """The input position of the timestep of a graph with no block cache (``None`` if none): the
    runtime publishes it on each call for a later graph of the same call that caches but lost
    its timestep input to a graph break (Lumina 2 embeds it before its ``.item()`` break)."""
    nodes = list(gm.graph.nodes)
    t = _find_timestep(nodes, _fx.weight_placeholders(gm, example_inputs), len(nodes), strict=True)
    return None if t is None else [n for n in nodes if n.op == "placeholder"].index(t)


def clock_input(gm: fx.GraphModule, nodes: list[fx.Node], weights: set[fx.Node], stop: int,
                ctx, first_block_end: int | None = None) -> tuple[fx.Node | None, dict]:
    """The node the guard's clock reads, and the plan fields saying where it comes from: this
    graph's timestep input, else a new last placeholder for the timestep an earlier graph of the
    call published (``ctx.borrowed_timestep``: its example value), else None (every call a step).

    A model that embeds its timestep inside every block (DiT-XL's AdaLayerNormZero, the class
    conditioned DiTs) has no sinusoid before its first block: then an input whose sinusoid feeds a
    matrix product within the first block (``first_block_end``: the index after its last node)
    qualifies, the strict test, as a timestep MLP passes it and a rotary table does not."""
    t = _find_timestep(nodes, weights, stop)
    if t is None and first_block_end is not None:
        t = _find_timestep(nodes, weights, first_block_end, strict=True)
    if t is not None:
        index = [n for n in nodes if n.op == "placeholder"].index(t)
        return t, dict(timestep_input=t.name, timestep_source="own", timestep_index=index)
    if ctx.borrowed_timestep is None:
        return None, dict(timestep_input=None)
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        t = gm.graph.placeholder("cdcompile_timestep")
    t.meta["val"] = t.meta["example_value"] = ctx.borrowed_timestep
    return t, dict(timestep_input="published by an earlier graph of the call", timestep_source="borrowed")


def constant_float_arguments() -> dict[str, float]:
    """The Python floats among the arguments of the frame Dynamo translated (``forward(x, t: float)``):
    Dynamo makes each a constant of the first graph it compiles, and an input only of the graph it
    compiles at the next value, so a timestep passed so has no clock in the first graph. Read from
    Dynamo's private translator state; any failure gives ``{}`` (only a hint is lost)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        code = tx.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        return {n: v for n in names if type(v := tx.f_locals.get(n)) is float}
    except Exception:
        return {}


_SINUSOID = ("sin", "cos", ".sin", ".cos")
_MATMUL = ("linear", "addmm", "mm", "matmul", "bmm", ".matmul")


def _emit(gm, region, pulled, inputs, pairs, h0, hf, timestep, plan, cfg, checked=None, exit_sizes=None) -> None:
    """Rebuild ``gm.graph``: original nodes minus M, state placeholders, guard, cond, commit."""
    old = gm.graph
    new = fx.Graph()
    new._codegen = old._codegen
    env: dict[fx.Node, fx.Node] = {}
    region_set = set(region)
    last_m = region[-1]

    placeholders = [n for n in old.nodes if n.op == "placeholder"]
    for p in placeholders:
        env[p] = new.node_copy(p, env.__getitem__)
    state_nodes = {}
    from ..runtime import CacheState

    for name in CacheState.names(plan):
        state_nodes[name] = new.placeholder(f"cdcompile_{name}")
    plan.state_names = list(state_nodes)

    compute_outputs, cache_outputs = branch_outputs(pairs, checked or {}, plan, plan.calibrator == "foca")
    compute_gm = _branch.subgraph(gm, inputs, pulled, len(pairs), region, compute_outputs, "ComputeMiddle")
    cache_gm = _branch.subgraph(gm, inputs, pulled, len(pairs), [], cache_outputs, "ReuseMiddle")
    gm.add_submodule("cdcompile_compute_branch", compute_gm)
    gm.add_submodule("cdcompile_cache_branch", cache_gm)

    for n in old.nodes:
        if n.op == "placeholder":
            continue
        if n in region_set:
            if n is last_m:
                before = set(new.nodes)
                _emit_guard(new, env, state_nodes, inputs, pairs, h0, hf, timestep, plan, cfg)
                for size, (out, dim) in (exit_sizes or {}).items():
                    env[size] = new.call_function(torch.ops.aten.sym_size.int, (env[out], dim))
                for m in new.nodes:
                    if m not in before:
                        m.meta["cdcompile_pass"] = "block_cache"
            continue
        env[n] = new.node_copy(n, env.__getitem__)
    gm.graph = new


def _emit_guard(g, env, st, inputs, pairs, h0, hf, timestep, plan, cfg) -> None:
    call = g.call_function
    t = env[timestep] if timestep is not None else None
    tick = call(guard.tick, (t, st["clock"], st["counters"], st["reset"]),
                dict(borrowed=plan.timestep_source == "borrowed"))
    step, slot, new_req = (call(_getitem, (tick, k)) for k in range(3))
    call(guard.fold_nodes, (st["cal_nodes"], st["counters"]))
    local, wipe = _refresh(call, step, slot, new_req, cfg)
    r = call(torch.sub, (env[hf], env[h0]))
    if plan.downsample > 1:
        r = call(guard.downsample, (r, plan.downsample))
    dec = call(guard.decide, (r, st["anchor"], st["slot_ctr"], local, slot, wipe, st.get("mask"),
                              st.get("slot_acc"), st.get("step_diff")), dict(
        threshold=cfg.residual_diff_threshold, budget=plan.budget, important=cfg.important_condition_threshold,
        warmup_steps=cfg.max_warmup_steps,
        warmup_interval=cfg.warmup_interval, max_cached=cfg.max_cached_steps,
        max_continuous=cfg.max_continuous_cached_steps, slots=plan.slots,
        static_mask=cfg.steps_computation_policy == "static",
        # Context parallel: r holds this rank's tokens; the guard all-reduces its diff so that
        # every rank takes the same branch (the compute branch holds collectives).
        group=ulysses.process_group(cfg.ulysses_degree)[0] if cfg.ulysses_degree > 1 else None))
    cache, diff, idx, a, ctr, row, over = (call(_getitem, (dec, k)) for k in range(7))
    res_slots = [call(_index_slot, (st[f"residual_{k}"], row)) for k in range(len(pairs))]
    nodes = call(_index_slot, (st["cal_nodes"], idx))
    computed = call(_getitem, (ctr, 3))
    if plan.calibrator == "foca":
        coef = call(calibrators.foca_coefficients, (step, nodes, computed, cfg.foca_slope))
    elif plan.dmd is not None:
        coef = call(calibrators.dmd_timing, (step, nodes, computed))
    else:
        coef = call(calibrators.coefficients, (step, nodes, computed, plan.order, plan.form))
    operands = tuple(env[n] for n in inputs) + tuple(res_slots) + (coef,)
    true_fn = g.get_attr("cdcompile_cache_branch")
    false_fn = g.get_attr("cdcompile_compute_branch")
    cond = call(torch.ops.higher_order.cond, (cache, true_fn, false_fn, operands))
    for k, (_, entry, out) in enumerate(pairs):
        env[out] = call(_getitem, (cond, k))
        call(guard.commit_residual, (cache, over, st[f"residual_{k}"], row, res_slots[k], env[out], env[entry],
                                     step, nodes, computed, used_value(call, cond, env, pairs, k, plan,
                                                                        plan.calibrator == "foca"), plan.form),
             dict(keep_value=plan.keeps_value(k), snapshots=plan.dmd is not None))
    call(guard.commit_nodes, (cache, st["cal_nodes"], idx, nodes, step))
    call(guard.commit, (cache, over, diff, idx, row, r, a, ctr, st["anchor"], st["slot_ctr"], step, slot,
                        new_req, st["counters"], st["hist_flag"], st["hist_diff"], st["hist_meta"]))


def calibrated(cfg, label: str) -> bool:
    """Whether the calibrator forecasts stream ``label``: one is on and the calibrated_streams option
    selects the stream ("encoder": all but "hidden")."""
    return cfg.calibrator is not None and (
        cfg.calibrated_streams == "all" or (label == "hidden") == (cfg.calibrated_streams == "hidden"))


def warn_uncalibrated(cfg, forecast: list[str], where: str) -> None:
    """Say so when a calibrator is on but calibrated_streams leaves it no stream of ``where``."""
    if cfg.calibrator is not None and not forecast:
        warnings.warn(f"cachedit: calibrated_streams={cfg.calibrated_streams!r} selects none of the streams "
                      f"{where} changes: the {cfg.calibrator.value} calibrator forecasts nothing; use "
                      'calibrated_streams="all"', stacklevel=3)


# FoCa's state moves on skipped steps too, by the residual the call used: both branches return it
# after the streams (the computed residual | the forecast), for each stream FoCa forecasts. A stream
# that keeps M's output (calibrator_cache_type="hidden_states") used the stream's value itself, which
# the branches return once (outputs alias nothing, not even each other). ``plan``: a CachePlan, or
# DBPrune's PruneBlockPlan for one block.

def _foca_used(plan, streams: int, foca: bool) -> list[int]:
    """The streams whose used residual the branches return after the streams."""
    return [k for k in range(streams) if foca and plan.calibrates(k) and not plan.keeps_value(k)]


def branch_outputs(pairs, checked: dict, plan, foca: bool, coef: bool = True):
    """The output builders of the compute and the reuse branch (``_branch.subgraph``) for the
    ``(label, entry, exit)`` stream ``pairs``: the exits (checked ones checked) | the entries plus
    the forecast residuals (or the forecast outputs), then FoCa's used residuals. Without ``coef``
    (no calibrator in the graph) the reuse branch adds the last residuals."""
    used = _foca_used(plan, len(pairs), foca)

    def compute(g, env, res):
        outs = [_branch.checked_exit(g, env[o], env[e], checked[o], _fx.fake_value(e)) if o in checked
                else env[o] for _, e, o in pairs]
        return outs + [g.call_function(torch.sub, (outs[k], env[pairs[k][1]])) for k in used]

    def reuse(g, env, res):
        dmd = [k for k in range(len(pairs)) if plan.dmd is not None and plan.calibrates(k)]
        fc = [g.call_function(calibrators.forecast, (res[k], res[-1] if coef else None)) if k not in dmd else None
              for k in range(len(pairs))]
        if dmd:  # one fit of the DMD streams (calibrators.dmd_forecast)
            both = g.call_function(calibrators.dmd_forecast, ([res[k] for k in dmd], res[-1],
                                                              *dataclasses.astuple(plan.dmd)))
            for j, k in enumerate(dmd):
                fc[k] = g.call_function(operator.getitem, (both, j))
        outs = [fc[k] if plan.keeps_value(k) else g.call_function(torch.add, (env[e], fc[k]))
                for k, (_, e, _) in enumerate(pairs)]
        return outs + [fc[k] for k in used]

    return compute, reuse


def used_value(call, cond, env, pairs, k: int, plan, foca: bool):
    """FoCa's used residual (or output) of stream ``k`` after the branch ``cond``; None without FoCa."""
    used = _foca_used(plan, len(pairs), foca)
    if k in used:
        return call(_getitem, (cond, len(pairs) + used.index(k)))
    return env[pairs[k][2]] if foca and plan.keeps_value(k) else None


def _refresh(call, step, slot, new_req, cfg):
    """The guard's step and request-start flags: the request's own, or with
    force_refresh_step_hint those of the context since the last refresh (guard.refresh)."""
    if cfg.force_refresh_step_hint is None:
        return step, new_req
    ref = call(guard.refresh, (step, slot, new_req), dict(
        hint=cfg.force_refresh_step_hint, repeat=cfg.force_refresh_step_policy == "repeat"))
    return call(_getitem, (ref, 0)), call(_getitem, (ref, 1))


def _getitem(x, k):
    return x[k]


def _index_slot(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, idx)[0]


