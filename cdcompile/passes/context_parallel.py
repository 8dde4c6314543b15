"""Ulysses context parallelism compiled into the graph, for any model the discovery pass understands.

With ``ulysses_degree = W > 1`` every one of the W processes (torchrun) compiles the same graph
for its own rank and receives the same full inputs; each computes 1/W of the tokens of the block
groups and returns the full output. Algorithm:

1. Shard at the entry. Each token stream of the groups (the hidden stream and the encoder/text
   stream; a stream is a (batch, tokens, channels) value, or (tokens, channels) for a model that
   packs one sequence without a batch dim, like Cosmos 3 Omni) is cut along its token dim right
   before its group: rank r keeps tokens [o_r, o_r + n_r), the first ``S mod W`` ranks one more
   (layout.Axis.even). **Text tokens are sharded like image tokens**, each stream separately, so
   a joint sequence ``cat([text, image])`` holds rank r's text tokens followed by its image
   tokens; nothing is computed twice. (If sharding the text stream is impossible for some op,
   the plan falls back to sharding the hidden stream only, the text replicated until it joins;
   failing both, to sequence-first (tokens, batch, channels) streams, as ERNIE-Image keeps them.)
2. Propagate (cdcompile.distributed.sharding, analysis only): follow the sharded token dim
   through every op between the first and the last group. Per-token ops run unchanged on local
   tokens; replicated per-token operands (rotary tables, masks) are restricted to the rank's
   tokens where they meet sharded values; size constants of views and token-dim slices/splits
   become local; an op that mixes tokens other than attention refuses the plan (the graph then
   compiles unsharded, with a warning).
3. Attention. SDPA with sharded Q, K, V becomes all-to-all (scatter heads, gather tokens) ->
   local SDPA over all tokens with H/W heads -> all-to-all back. Heads not divisible by W are
   zero-padded to ``W * ceil(H/W)`` for the exchange and stripped after (attention of a zero head
   is zero); uneven token counts are uneven split sizes. Joint attention works unchanged: the
   gathered sequence is a permutation of the logical one, shared by Q, K and V, to which
   attention is indifferent; a mask is reordered the same way. SDPA whose K/V are replicated
   (cross-attention to text) runs locally with no communication. ``nn.MultiheadAttention``'s
   functional form is routed to cdcompile.distributed.ulysses.mha_forward.
   ``ulysses_fp8``: Q, V and the output travel as FP8 with per-(token, head) scales
   (cdcompile::quantize_fp8_a2a / dequantize_fp8_a2a); K travels in the model dtype.
   ``ulysses_async``: each all-to-all is issued right after its operand is computed (its pure
   producer chain hoisted as early as its inputs allow inside the block) and waited for right
   before the attention, so the exchange overlaps the remaining projections.
   Convolutions over the tokens (Sana's Mix-FFN) run on token grids: each rank's rows plus a
   halo exchanged by one all-to-all (``ulysses.halo``), narrowed back to its tokens after.
4. Gather at the exit. Sharded values read after the last group are all-gathered (padded to the
   longest rank, reordered to logical order) once.
5. Refresh the fake-tensor metadata of the graph (later passes read local shapes) and point the
   discovery's stream entries at the sharded values.

Before/after (one FLUX double block, rank r of W)::

    H (1,S,C), E (1,T,C)                      take(H, tokens of r), take(E, tokens of r)
    q = cat(Eq, Hq) * rope(72 rows)           q = cat(Eq_r, Hq_r) * take(rope, rows of r)
    o = sdpa(q, k, v)                         o = a2a_back(sdpa(a2a(q), a2a(k), a2a(v)))
    E', H' = split(o, [T, S])                 E'_r, H'_r = split(o, [T_r, S_r])
    ... -> proj_out(H_N)                      ... -> proj_out(gather(H_N))

Invariants relied on: static shapes; blocks are contiguous runs (discovery); every rank compiles
the same graph with the same options. Guaranteed: each logical token lives on exactly one rank
between the entry and the exit; the collectives of all ranks are issued in the same order; no
node of a block is removed (the SDPA node is retargeted in place), so the discovery's blocks stay
valid for block_cache; new nodes carry ``meta["cdcompile_pass"] = "context_parallel"``.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import warnings
from typing import Any

import torch
import torch.fx as fx

from ..distributed import sharding, ulysses
from ..distributed.sharding import Attention, Plan, Refused
from . import _fx

log = logging.getLogger("cdcompile")
PASS = "context_parallel"


@dataclasses.dataclass
class ContextParallelRecord:
    """What the pass did to one graph (``PassContext.context_parallel``)."""

    applied: bool
    world: int
    rank: int
    reason: str | None = None  # why not applied (sharding.Why value + detail)
    unsharded_groups: list[str] = dataclasses.field(default_factory=list)  # left out, with why, when applied
    sharded_streams: list[str] = dataclasses.field(default_factory=list)
    attention: dict[str, int] = dataclasses.field(default_factory=dict)  # kind -> count
    collectives: int = 0  # graph nodes that issue collectives
    gathers: int = 0
    halos: int = 0  # token-grid row exchanges (convolutions over the tokens)
    fp8: bool = False
    overlap: bool = False
    token_dim: int | None = None  # the streams' token dim, when applied: -2 (batch first) or 0 (tokens first)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run(gm: fx.GraphModule, ctx) -> None:
    """Shard the block groups over the ranks of the Ulysses group (see the module docstring)."""
    cfg = ctx.cfg
    if cfg.ulysses_degree == 1:
        return
    group, rank, world = ulysses.process_group(cfg.ulysses_degree)
    record = ContextParallelRecord(applied=False, world=world, rank=rank, fp8=cfg.ulysses_fp8,
                                   overlap=cfg.ulysses_async)
    ctx.context_parallel = ctx.report.context_parallel = record
    groups = ctx.discovery.groups if ctx.discovery else []
    if not groups:
        record.reason = "no repeated block group in this graph"
        warnings.warn(f"cachedit: ulysses_degree={world} but the graph is compiled unsharded: {record.reason}",
                      stacklevel=2)
        return
    # Every group first; failing that, fewer groups: a leading group that cannot shard (Krea 2's
    # layer-wise text fusion) leaves the rest to shard, and so does a trailing one.
    tries = [groups] + [groups[k:] for k in range(1, len(groups))] + [groups[:k] for k in range(len(groups) - 1, 0, -1)]
    # Streams are (batch, tokens, channels) first, then sequence-first (tokens, batch, channels).
    attempts = [(subset, streams, token_dim) for token_dim in (-2, 0) for subset in tries
                for streams in ("all", "hidden")]
    plan, errors = None, []
    for subset, streams, token_dim in attempts:
        try:
            plan = sharding.plan(gm, subset, world=world, rank=rank, shard_streams=streams, token_dim=token_dim)
            break
        except Refused as e:
            errors.append(str(e))
    if plan is None:
        record.reason = errors[0]
        warnings.warn(f"cachedit: ulysses_degree={world} but the graph is compiled unsharded: {errors[0]}",
                      stacklevel=2)
        return
    if subset is not groups:
        record.unsharded_groups = [g.name for g in groups if g not in subset]
        record.reason = errors[0]
        log.info("cachedit: context parallel leaves %s unsharded: %s", record.unsharded_groups, errors[0])
    apply(gm, plan, ctx.discovery, group=group, fp8=cfg.ulysses_fp8, overlap=cfg.ulysses_async)
    refresh_meta(gm)
    record.applied = True
    record.sharded_streams = plan.sharded_streams
    record.token_dim = token_dim
    for a in plan.attentions:
        kind = ("mha_" if a.mha else "") + a.kind
        record.attention[kind] = record.attention.get(kind, 0) + 1
    record.collectives = sum(_fx.target_name(n) in _COLLECTIVE_FNS for n in gm.graph.nodes)
    record.gathers = len(plan.gathers)
    record.halos = len(plan.halos)
    log.info("cachedit: context parallel rank %d/%d: %s", rank, world, record)


_COLLECTIVE_FNS = {"to_heads_start", "to_seq_start", "gather", "mha_forward", "halo"}


def apply(gm: fx.GraphModule, plan: Plan, discovery, *, group: str, fp8: bool, overlap: bool) -> None:
    """Rewrite ``gm`` as ``plan`` says (entries, aligns, new arguments, attention, gathers)."""
    graph = gm.graph
    region = set(plan.region)
    pos = {n: i for i, n in enumerate(graph.nodes)}
    first = plan.region[0]

    def new(fn, args, kwargs=None):
        node = graph.call_function(fn, args, kwargs or {})
        node.meta["cdcompile_pass"] = PASS
        return node

    # 1. Entries.
    sharded_entry: dict[fx.Node, tuple[fx.Node, int]] = {}  # entry -> (its shard, position of its group)
    for entry, before, how in plan.entries:
        with graph.inserting_before(before):
            sh = new(ulysses.take, (entry, how.dim, plan.local(how.axis)))
        for u in list(entry.users):
            if u in region and pos[u] >= pos[before]:
                u.replace_input_with(entry, sh)
        sharded_entry[entry] = (sh, pos[before])

    def local(a, user: fx.Node):
        """``a`` as ``user`` reads it after step 1 (arguments the plan recorded before it)."""
        if a in sharded_entry and pos[user] >= sharded_entry[a][1]:
            return sharded_entry[a][0]
        return a

    # 2. Replicated operands restricted to the rank's tokens (once per value for side inputs).
    hoisted: dict[tuple, fx.Node] = {}
    for user, full, dim, ranges in plan.aligns:
        key = (full, dim, ranges)
        if full not in region and key in hoisted:
            taken = hoisted[key]
        else:
            with graph.inserting_before(first if full not in region else user):
                taken = new(ulysses.take, (full, dim, ranges))
            if full not in region:
                hoisted[key] = taken
        user.replace_input_with(full, taken)

    # 3. Local sizes and bounds.
    for n, (target, args, kwargs) in plan.new_args.items():
        if target is not n.target:
            n.op, n.target = "call_function", target
        n.args, n.kwargs = fx.node.map_arg((tuple(args), kwargs), lambda a: local(a, n))

    # 3b. Token grids: rows exchanged before the view or convolution that starts the grid, and the
    # tokens this rank keeps taken out where the grid's tokens are whole again.
    for n, src, dim, send, recv in plan.halos:
        src = local(src, n)
        with graph.inserting_before(n):
            rows = new(ulysses.halo, (src,), dict(dim=dim, send=send, recv=recv, group=group))
        n.replace_input_with(src, rows)

    narrowed: dict[fx.Node, fx.Node] = {}
    for n, dim, ranges in plan.narrows:
        users = list(n.users)
        with graph.inserting_after(n):
            narrowed[n] = new(ulysses.take, (n, dim, ranges))
        for u in users:
            u.replace_input_with(n, narrowed[n])

    # 4. Partial sums over the token axis (sum/mean over tokens, linear attention): all-reduced.
    for n, share in plan.reductions:
        users = list(n.users)
        with graph.inserting_after(n):
            part = new(operator.mul, (n, share)) if share != 1.0 else n
        with graph.inserting_after(part):
            whole = new(ulysses.all_reduce_sum, (part, group))
        for u in users:
            u.replace_input_with(n, whole)

    # 5. Attention.
    owner = {m: b for g in (discovery.groups if discovery else []) for b in g.blocks for m in b.nodes}
    for att in plan.attentions:
        _rewrite_attention(graph, att, plan, new, group=group, fp8=fp8, overlap=overlap,
                           block=owner.get(att.node))

    # 6. Gathers after the last node of the groups.
    with graph.inserting_after(plan.region[-1]):
        for n, how, users in plan.gathers:
            block = max(how.axis.local_lens())
            n = narrowed.get(n, n)
            g = new(ulysses.gather, (n,), dict(dim=how.dim, block=block, ranges=how.axis.gather_ranges(block),
                                                group=group, world=plan.world))
            for u in users:
                u.replace_input_with(n, g)

    # The cached stack's decision signal and residuals are taken from the sharded entries.
    for g in (discovery.groups if discovery else []):
        for s in g.streams:
            if s.entry in sharded_entry:
                s.entry = sharded_entry[s.entry][0]
    graph.lint()
    gm.recompile()


def _rewrite_attention(graph: fx.Graph, att: Attention, plan: Plan, new, *, group, fp8, overlap, block) -> None:
    n = att.node
    rank, world = plan.rank, plan.world
    if att.mha:
        n.target = ulysses.mha_forward
        n.kwargs = {**n.kwargs, "q_lens": tuple(att.q_axis.local_lens()),
                    "kv_lens": tuple(att.kv_axis.local_lens()) if att.kind == "ulysses" else None,
                    "rank": rank, "group": group, "fp8": fp8}
        return
    if att.flex:
        kw = dict(query=n.args[0], key=n.args[1], value=n.args[2])
    else:
        kw = _fx.sdpa_args(n)
    mask = kw.get("attn_mask")
    if att.mask_takes:
        with graph.inserting_before(n):
            for dim, ranges in att.mask_takes:
                mask = new(ulysses.take, (mask, dim, ranges))
        kw["attn_mask"] = mask
    if att.kind == "gather_kv":
        with graph.inserting_before(n):
            for name, axis in (("key", att.kv_axis), ("value", att.kv_axis)):
                block_len = max(axis.local_lens())
                kw[name] = new(ulysses.gather, (kw[name],), dict(
                    dim=2, block=block_len, ranges=axis.gather_ranges(block_len), group=group, world=world))
    if att.kind == "ulysses" and att.expand_kv > 1:
        with graph.inserting_before(n):
            for name in ("key", "value"):
                kw[name] = new(torch.repeat_interleave, (kw[name], att.expand_kv), dict(dim=1))
    if att.kind == "ulysses":
        dtype = _fx.fake_value(att.q).dtype
        q_lens, kv_lens = tuple(att.q_axis.local_lens()), tuple(att.kv_axis.local_lens())
        shape = dict(batch=att.batch, heads=att.heads, head_dim=att.head_dim, dtype=dtype)
        kv_shape = dict(shape, heads=att.kv_heads or att.heads)
        # Issue order V, Q, K (algorithms.md §6: V needs no norm or rotary); with overlap each
        # is issued as early as its operand allows, but after the previous one.
        waits, floor = {}, None
        for name, lens, quant, shp in (("value", kv_lens, fp8, kv_shape), ("query", q_lens, fp8, shape),
                                       ("key", kv_lens, False, kv_shape)):
            operand = kw[name]
            with graph.inserting_before(n):
                start = new(ulysses.to_heads_start, (operand,), dict(lens=lens, rank=rank, group=group, fp8=quant))
                waits[name] = new(ulysses.to_heads_wait, (start,), dict(lens=lens, fp8=quant, **shp))
                if att.logical:
                    axis = att.q_axis if name == "query" else att.kv_axis
                    waits[name] = new(ulysses.take, (waits[name], 2, axis.gather_ranges()))
            if overlap and block is not None:
                _issue_early(graph, start, operand, set(block.nodes), floor)
                floor = start
        kw.update(waits)
        out = next(iter(n.users)) if att.flex else n  # flex_attention: its (output, lse, ...)[0]
        o = out
        if att.logical:  # back to the gathered order the exchange returns
            with graph.inserting_after(out):
                o = new(ulysses.take, (out, 2, att.q_axis.gathered_order()))
        with graph.inserting_after(o):
            back = new(ulysses.to_seq_start, (o,), dict(lens=q_lens, rank=rank, group=group, fp8=fp8))
        with graph.inserting_after(back):
            done = new(ulysses.to_seq_wait, (back,), dict(lens=q_lens, rank=rank, fp8=fp8, **shape))
        out.replace_all_uses_with(done, delete_user_cb=lambda u: u not in (back, o))
    if att.flex:
        n.args = (kw["query"], kw["key"], kw["value"], *n.args[3:])
    else:
        n.args, n.kwargs = (), kw


def _issue_early(graph: fx.Graph, start: fx.Node, operand: fx.Node, block_nodes: set[fx.Node],
                 floor: fx.Node | None) -> None:
    """Move ``start`` (and the pure chain computing ``operand`` inside the block) as early as the
    inputs allow, but below ``floor`` (the previous exchange) and never above an in-place write of
    the block (Wan's rotary writes into a buffer)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    block_first = min(block_nodes, key=order.__getitem__)
    if floor is not None:
        block_first = floor

    def movable(n: fx.Node) -> bool:
        return (n in block_nodes or n.meta.get("cdcompile_pass") == PASS) and n.op in (
            "call_function", "call_method") and not n.is_impure() and not _fx.writes_in_place(n)

    def barrier(n: fx.Node) -> fx.Node:
        best = block_first
        for m in block_nodes:
            if _fx.writes_in_place(m) and order[best] < order[m] < order[n]:
                best = m
        return best

    def hoist(n: fx.Node, seen: set) -> None:
        if n in seen:
            return
        seen.add(n)
        for a in n.all_input_nodes:
            if movable(a):
                hoist(a, seen)
        nonlocal order
        order = {m: i for i, m in enumerate(graph.nodes)}
        anchor = max([barrier(n)] + [a for a in n.all_input_nodes if a.op != "placeholder"],
                     key=order.__getitem__)
        if order[anchor] < order[n] and anchor.next is not n:  # only ever earlier
            anchor.append(n)

    if movable(operand):
        hoist(operand, set())
    operand.append(start)


def refresh_meta(gm: fx.GraphModule) -> None:
    """Re-run the graph on fake tensors so every node's ``example_value`` has its local shape."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [_fx.fake_value(p) for p in placeholders]
    mode = next((v.fake_mode for v in values if isinstance(v, torch._subclasses.FakeTensor)), None)
    assert mode is not None, "Dynamo records a fake tensor for every graph input"

    class _Prop(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op != "placeholder" and n.op != "output":
                n.meta["example_value"] = out
                if "val" in n.meta:
                    n.meta["val"] = out
            return out

    with mode:
        _Prop(gm).run(*values)
