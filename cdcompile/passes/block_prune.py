"""DBPrune rewrite: one guard and one ``cond`` per prunable block (reference/algorithms.md §4).

``cache_type="dbprune"`` routes the ``block_cache`` pass here after it chose the stack and
checked F and B (block_cache.run). Algorithm:
1. Prunable blocks: the stack's blocks outside F = [0, Fn), B = [N - Bn, N) and the
   ``non_prune_block_ids`` option (indices into the stack; one >= N is a ValueError naming N).
2. Per prunable block b: its region (the block's nodes plus in-between nodes depending on them) and
   its outputs, each a stream value at the block's exit with a same-shape entry (the residual
   ``exit - entry``); anything else leaving the block makes the graph unprunable, with a reason.
3. Guard. Once per call, before the first prunable block: :func:`cdcompile.guard.tick` (step,
   slot, request from the timestep) and :func:`cdcompile.guard.prune_gate` (warmup, mask, slots
   and the step limits, DBCache's chain). Per block, :func:`cdcompile.guard.prune_decide` compares
   the block's *input* hidden state with its input at the step it last computed (relative
   mean-abs L1) against the threshold, or the dynamic threshold.
4. Branch. ``cond(prune_b, entry + residual per stream, the block)``; both branches return
   contiguous tensors that alias nothing. One host read per prunable block. With a calibrator the
   residual is its forecast from the steps this block computed (``guard.prune_calibration``), or
   the block's output itself with ``calibrator_cache_type="hidden_states"``.
5. State. Per block ``anchor_b{b}``, ``residual_b{b}_{label}`` (one slice per CFG slot, with the
   calibrator's history) and, with a calibrator, ``cal_b{b}`` (its computed steps) are new
   placeholders, written in place *outside* the cond (prune_commit_block / commit_residual /
   prune_commit_calibration);
   after the last prunable block :func:`cdcompile.guard.prune_commit` counts the step as cached iff
   any block was pruned and records the blocks pruned.

Before/after (N = 4, F1B0, block 2 in non_prune_block_ids)::

    H -> b0 -> b1 -> b2 -> b3 -> out
    H -> b0 -> tick, gate -> decide1, cond(H1 + R1 | b1), commit1 -> b2
            -> decide3, cond(H3 + R3 | b3), commit3 -> prune_commit -> out

Glue between two blocks (discover.py: ops outside any block carrying a stream from block b - 1 to
block b, e.g. a control hint added) stays in the main graph and runs every step; the residual of
block b is taken from block b - 1's output, so it absorbs the glue as DBCache's middle residual
does, and the decision compares block b - 1's output (the glue's input).

Invariants relied on and guaranteed: block_cache's (contiguous blocks, static shapes, no state
mutation inside a branch, original placeholders first).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx as fx

from .. import calibrators, guard
from ..config import Calibrator
from ..distributed import ulysses
from . import _branch, _fx
from .block_cache import (CachePlan, PruneBlockPlan, _boundary, _getitem, _index_slot, _refresh, _stream_plan,
                          branch_outputs, calibrated, calibrator_history, clock_input, constant_float_arguments, dmd_spec,
                          describe_sizes, size_sources, used_value, warn_uncalibrated)


@dataclasses.dataclass
class _BlockRewrite:
    index: int  # position in the stack
    region: list[fx.Node]
    members: set[fx.Node]
    pulled: list[fx.Node]  # view nodes replayed inside the branches
    inputs: list[fx.Node]  # branch operands
    pairs: list[tuple[str, fx.Node, fx.Node]]  # (label, entry, exit)
    hidden: fx.Node  # the block's hidden input: the decision signal
    where: str  # "block 3 (single_transformer_blocks.1)", for messages
    # exit -> dims equal to the entry's only at run time (_branch.pair_exits)
    checked: dict[fx.Node, list[int]] = dataclasses.field(default_factory=dict)
    # a size of an exit read after the block (a check Dynamo placed on a slice): node -> (exit, dim)
    exit_sizes: dict[fx.Node, tuple[fx.Node, int]] = dataclasses.field(default_factory=dict)
    plan: PruneBlockPlan | None = None  # its state, once rewrite() knows the shapes the conds before it leave


def rewrite(gm: fx.GraphModule, ctx, stack, blocks, fn: int, bn: int) -> str | None:
    """Insert per-block prune decisions; returns a reason when the graph cannot be pruned."""
    cfg, report = ctx.cfg, ctx.report
    n = len(blocks)
    names = " + ".join(f"{g.name} ({g.num_blocks})" for g in stack)
    outside = [i for i in cfg.non_prune_block_ids if i >= n]
    if outside:
        raise ValueError(
            f"cachedit: non_prune_block_ids {outside} lie outside the N = {n} blocks of the stack "
            f"{names}; use indices 0..{n - 1}")
    prunable = [i for i in range(fn, n - bn) if i not in cfg.non_prune_block_ids]
    if not prunable:
        return (f"no prunable block: F = {fn}, B = {bn} and non_prune_block_ids "
                f"{list(cfg.non_prune_block_ids)} cover the N = {n} blocks of {names}")

    graph = gm.graph
    nodes = list(graph.nodes)
    order = {node: k for k, node in enumerate(nodes)}
    rewrites = []
    for b in prunable:
        found = _block(blocks, b, nodes, order)
        if isinstance(found, str):
            return found
        rewrites.append(found)
    # A checked exit leaves its cond with its entry's shape; the blocks after it read that shape.
    shape_of: dict[fx.Node, torch.Tensor] = {}
    state_values: list[torch.Tensor] = []  # what the state is allocated for
    dmd = dmd_spec(ctx)
    history = calibrator_history(cfg.calibrator, cfg.taylorseer_order, dmd)
    for r in rewrites:
        for _, e, o in r.pairs:
            if o in r.checked or (e in shape_of and _fx.same_meta(_fx.fake_value(e), _fx.fake_value(o))):
                shape_of[o] = shape_of.get(e, _fx.fake_value(e))
        anchor = shape_of.get(r.hidden, _fx.fake_value(r.hidden))
        residuals = [shape_of.get(o, _fx.fake_value(o)) for _, _, o in r.pairs]
        r.plan = PruneBlockPlan(index=r.index, anchor=_stream_plan("hidden", anchor), residuals=[
            _stream_plan(_ident(label), v) for (label, _, _), v in zip(r.pairs, residuals)],
            calibrated=tuple(calibrated(cfg, label) for label, _, _ in r.pairs),
            history=history, values=cfg.calibrator_cache_type == "hidden_states", dmd=dmd)
        state_values += [anchor, *residuals]
    fresh = {o for r in rewrites for _, _, o in r.pairs}
    for r in rewrites:
        reason = _operands_of(r, order, fresh)
        if reason is not None:
            return reason
    sources = size_sources(nodes, state_values)
    if isinstance(sources, str):
        return sources

    weights = _fx.weight_placeholders(gm, ctx.example_inputs)
    placeholders = [p for p in nodes if p.op == "placeholder"]
    key_input = next((k for k, p in enumerate(placeholders) if p in weights), None)
    if key_input is None:
        return "no parameter among the graph inputs to tell model instances apart"
    first = stack[0].blocks[0].nodes
    timestep, clock = clock_input(gm, nodes, weights, order[first[0]], ctx, order[first[-1]] + 1)

    plan = CachePlan(
        slots=cfg.cache_slots, anchor=_stream_plan("hidden", _fx.fake_value(stack[0].stream("hidden").entry)),
        residuals=[], key_input=key_input, **clock,
        state_names=[], mask_spec=cfg.steps_computation_mask, num_inference_steps=cfg.num_inference_steps,
        prune_blocks=[r.plan for r in rewrites], downsample=cfg.downsample_factor, size_sources=sources)
    forecast = sorted({label for r in rewrites for k, (label, _, _) in enumerate(r.pairs) if r.plan.calibrates(k)})
    warn_uncalibrated(cfg, forecast, "the prunable blocks")
    # Blocks share operands (a float every block reads): specialize each node once.
    kept, floats = _branch.specialize_floats(list(dict.fromkeys(a for r in rewrites for a in r.inputs)))
    kept = set(kept)
    for r in rewrites:
        r.inputs = [a for a in r.inputs if a in kept]
    _emit(gm, rewrites, timestep, plan, cfg)
    ctx.cache_plan = plan
    report.cache = {"streams": sorted({label for r in rewrites for label, _, _ in r.pairs}),
                    "timestep_input": plan.timestep_input, "timestep_source": plan.timestep_source,
                    "constant_float_arguments": constant_float_arguments() if timestep is None else {},
                    "slots": plan.slots,
                    "prunable_blocks": prunable, "non_prune_block_ids": list(cfg.non_prune_block_ids),
                    "dynamic_threshold": cfg.enable_dynamic_prune_threshold,
                    "dynamic_rule": _dynamic_rule(cfg),
                    "branch_operands": sum(len(r.inputs) for r in rewrites),
                    "dynamic_sizes": describe_sizes(nodes, sources), "specialized_floats": floats,
                    "guard": cfg.guard_rule()}
    if cfg.calibrator is not None:
        report.cache["calibrated"] = forecast
    return None


def _dynamic_rule(cfg) -> str:
    """The dynamic threshold in words (summary), or "" when it is off."""
    if not cfg.enable_dynamic_prune_threshold:
        return ""
    cap = cfg.max_dynamic_prune_threshold
    cap = f"{guard.PRUNE_CAP:g} x {cfg.residual_diff_threshold:g}" if cap is None else f"{cap:g}"
    return (f"max({cfg.residual_diff_threshold:g}, {cfg.dynamic_prune_threshold_relax_ratio:g} x mean of the "
            f"call's first {guard.PRUNE_SAMPLES} positive block diffs) while below {cap}")


def _block(blocks, b: int, nodes, order) -> _BlockRewrite | str:
    g, i = blocks[b]
    where = f"block {b} ({g.blocks[i].path})"
    sources = tuple(e for s in g.streams if (e := _boundary(g, i, s.label, before=True)) is not None)
    found = _branch.region(nodes, order, _branch.block_nodes(nodes, [g.blocks[i]]), where, sources)
    if isinstance(found, str):
        return found
    region, members = found
    exit_label = {s.outputs[i]: s.label for s in g.streams if s.outputs[i] is not None}
    found = _branch.pair_exits(region, members, exit_label, lambda label, _: _boundary(g, i, label, before=True),
                               where, "the block cannot be pruned")
    if isinstance(found, str):
        return found
    pairs, checked, exit_sizes = found
    hidden = _boundary(g, i, "hidden", before=True)
    if hidden is None or not isinstance(_fx.fake_value(hidden), torch.Tensor):
        return f"{where} has no hidden input to compare"
    return _BlockRewrite(b, region, members, [], [], pairs, hidden, where, checked, exit_sizes)


def _operands_of(r: _BlockRewrite, order, fresh: set[fx.Node]) -> str | None:
    # An earlier block's exit is a cond output (a fresh tensor) even where the original was a view
    # (FLUX's single blocks slice text and image tokens out of one tensor): never replay it.
    r.inputs, r.pulled = _branch.operands(r.region, r.members, [e for _, e, _ in r.pairs], order, fresh)
    bad = _branch.non_operand(r.inputs)
    return None if bad is None else f"{r.where} reads {bad}"


def _ident(label: str) -> str:
    return re.sub(r"\W", "_", label)


def _emit(gm, rewrites: list[_BlockRewrite], timestep, plan, cfg) -> None:
    """Rebuild ``gm.graph``: original nodes minus the prunable blocks, state placeholders, and per
    block a decision, a cond and its commits."""
    from ..runtime import CacheState

    old = gm.graph
    new = fx.Graph()
    new._codegen = old._codegen
    env: dict[fx.Node, fx.Node] = {}
    for p in (x for x in old.nodes if x.op == "placeholder"):
        env[p] = new.node_copy(p, env.__getitem__)
    st = {name: new.placeholder(f"cdcompile_{name}") for name in CacheState.names(plan)}
    plan.state_names = list(st)

    skip = {x for r in rewrites for x in r.region}
    at_end = {r.region[-1]: r for r in rewrites}
    call = new.call_function
    guard_state = {}
    waiting: list[fx.Node] = []  # nodes that read an exit of a block whose cond comes later
    for x in old.nodes:
        if x.op == "placeholder":
            continue
        if x in skip:
            r = at_end.get(x)
            if r is not None:
                before = set(new.nodes)
                if not guard_state:
                    guard_state.update(_emit_gate(new, env, st, timestep, plan, cfg))
                _emit_block(gm, new, env, st, r, guard_state, cfg)
                if r is rewrites[-1]:
                    g = guard_state
                    call(guard.prune_commit, (g["acc"], g["idx"], g["ctr"], st["slot_ctr"], g["step"], g["slot"],
                                              g["new_req"], st["counters"], st["hist_flag"], st["hist_diff"],
                                              st["hist_meta"], st["hist_pruned"]))
                for m in new.nodes:
                    if m not in before:
                        m.meta["cdcompile_pass"] = "block_cache"
                # Nodes placed before the block's last node that read its exits (a size check
                # Dynamo put right after a slice) follow its cond.
                while waiting and all(a in env for a in waiting[0].all_input_nodes):
                    y = waiting.pop(0)
                    env[y] = new.node_copy(y, env.__getitem__)
            continue
        if waiting or not all(a in env for a in x.all_input_nodes):
            waiting.append(x)
            continue
        env[x] = new.node_copy(x, env.__getitem__)
    if waiting:
        raise AssertionError(f"cachedit: block_prune left {[y.name for y in waiting]} unplaced")
    gm.graph = new


def _emit_gate(g, env, st, timestep, plan, cfg) -> dict:
    call = g.call_function
    t = env[timestep] if timestep is not None else None
    tick = call(guard.tick, (t, st["clock"], st["counters"], st["reset"]),
                dict(borrowed=plan.timestep_source == "borrowed"))
    step, slot, new_req = (call(_getitem, (tick, k)) for k in range(3))
    local, wipe = _refresh(call, step, slot, new_req, cfg)
    gate = call(guard.prune_gate, (st["slot_ctr"], local, slot, wipe, st.get("mask")), dict(
        threshold=cfg.residual_diff_threshold, warmup_steps=cfg.max_warmup_steps,
        warmup_interval=cfg.warmup_interval, max_cached=cfg.max_cached_steps,
        max_continuous=cfg.max_continuous_cached_steps, slots=plan.slots,
        static_mask=cfg.steps_computation_policy == "static"))
    free, checked, idx, ctr, acc, row, over = (call(_getitem, (gate, k)) for k in range(7))
    return dict(step=step, slot=slot, new_req=new_req, free=free, checked=checked, idx=idx, ctr=ctr, acc=acc,
                row=row, over=over)


def _emit_block(gm, g, env, st, r: _BlockRewrite, gs: dict, cfg) -> None:
    call = g.call_function
    b = r.plan.index
    h = env[r.hidden]
    if cfg.downsample_factor > 1:  # what the anchor keeps of the input
        h = call(guard.downsample, (h, cfg.downsample_factor))
    # Context parallel: h holds this rank's tokens; the diff is all-reduced so that every rank
    # takes the same branch (the block holds collectives).
    group = ulysses.process_group(cfg.ulysses_degree)[0] if cfg.ulysses_degree > 1 else None
    dec = call(guard.prune_decide, (h, st[r.plan.anchor_name], gs["row"], gs["over"], gs["free"], gs["checked"],
                                    gs["ctr"], gs["acc"]),
               dict(threshold=cfg.residual_diff_threshold, dynamic=cfg.enable_dynamic_prune_threshold,
                    relax=cfg.dynamic_prune_threshold_relax_ratio, cap=cfg.max_dynamic_prune_threshold,
                    important=cfg.important_condition_threshold, group=group))
    prune, a, gs["acc"] = (call(_getitem, (dec, k)) for k in range(3))
    names = [r.plan.residual_name(p.label) for p in r.plan.residuals]
    res_slots = [call(_index_slot, (st[name], gs["row"])) for name in names]

    # The calibrator (cdcompile.calibrators) per block: its own computed steps, as DBCache's per slot.
    bp, cal = r.plan, r.plan.cal_name
    nodes = computed = None
    if cal:
        call(guard.fold_nodes, (st[cal], st["counters"]))
        clock = call(guard.prune_calibration, (st[cal], gs["idx"], gs["ctr"]))
        nodes, computed = (call(_getitem, (clock, k)) for k in range(2))
        coef = (call(calibrators.foca_coefficients, (gs["step"], nodes, computed, cfg.foca_slope))
                if cfg.calibrator is Calibrator.FOCA
                else call(calibrators.dmd_timing, (gs["step"], nodes, computed)) if bp.dmd is not None
                else call(calibrators.coefficients, (gs["step"], nodes, computed, cfg.taylorseer_order,
                                                     cfg.taylorseer_form)))
    pairs, foca = r.pairs, cfg.calibrator is Calibrator.FOCA
    compute_outputs, reuse_outputs = branch_outputs(pairs, r.checked, bp, foca, coef=bool(cal))
    compute_gm = _branch.subgraph(gm, r.inputs, r.pulled, len(pairs), r.region, compute_outputs,
                                  f"ComputeBlock{b}", coef=bool(cal))
    reuse_gm = _branch.subgraph(gm, r.inputs, r.pulled, len(pairs), [], reuse_outputs, f"ReuseBlock{b}",
                                coef=bool(cal))
    gm.add_submodule(f"cdcompile_compute_block{b}", compute_gm)
    gm.add_submodule(f"cdcompile_reuse_block{b}", reuse_gm)
    operands = tuple(env[x] for x in r.inputs) + tuple(res_slots) + ((coef,) if cal else ())
    cond = call(torch.ops.higher_order.cond, (prune, g.get_attr(f"cdcompile_reuse_block{b}"),
                                              g.get_attr(f"cdcompile_compute_block{b}"), operands))
    for k, (_, entry, out) in enumerate(pairs):
        env[out] = call(_getitem, (cond, k))
    for size, (out, dim) in r.exit_sizes.items():
        env[size] = call(torch.ops.aten.sym_size.int, (env[out], dim))
    for k, (_, entry, out) in enumerate(pairs):
        call(guard.commit_residual, (prune, gs["over"], st[names[k]], gs["row"], res_slots[k], env[out], env[entry],
                                     gs["step"], nodes, computed, used_value(call, cond, env, pairs, k, bp, foca),
                                     cfg.taylorseer_form), dict(keep_value=bp.keeps_value(k), snapshots=bp.dmd is not None))
    if cal:
        call(guard.prune_commit_calibration, (prune, gs["over"], st[cal], gs["idx"], nodes, computed, gs["step"]))
    call(guard.prune_commit_block, (prune, gs["over"], gs["row"], h, a, st[r.plan.anchor_name]))
