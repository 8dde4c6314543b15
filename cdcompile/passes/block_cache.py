"""DBCache rewrite: F | guard | cond(cache, compute M) | B, with the cache state as graph inputs.

Algorithm (reference/algorithms.md §1, §5):
1. Stack. The discovered groups chained along the hidden stream (a group whose hidden entry is
   computed from the previous group's hidden exit) form one stack of N blocks; the longest chain
   wins (FLUX: 19 double + 38 single = 57). One decision covers the whole stack. When it has no
   residual across it, its largest group alone, then the other chains, largest first, are tried
   (Bria FIBO; Wan-Animate, whose 5-block motion encoder narrows its stream); the report says so.
2. Split. F = the first ``Fn_compute_blocks`` blocks, B = the last ``Bn_compute_blocks``, M = the
   rest. The M region is M's block nodes plus the nodes between them that depend on them, and
   whole scopes opened and closed around them (``torch.autocast``). A ``torch.vmap`` scope inside
   the blocks is lowered to the aten ops it runs when it reads the streams, and otherwise stays
   before the cond (raw functorch calls cannot run in a branch). A call nobody reads between
   the M blocks (a side effect, e.g. an in-place write to a side input) that would not move with
   the region whole refuses the cache with a reason.
   M's outputs must be stream values at M's exit, each with an M-entry stream of the same label
   and shape (the residual ``exit - entry``); anything else leaving M makes the graph uncacheable.
   An exit length that is a fresh unbacked size (a block slicing its joint sequence at a
   data-dependent length) is checked equal to the entry's in the compute branch (``torch._check``).
3. Guard. ``R = HF - H0`` (the hidden stream after F minus the stack's hidden input) is compared
   with the slot's anchor by :func:`cdcompile.guard.decide`; the step/slot/request clock comes from
   the timestep input (:func:`cdcompile.guard.tick`), found structurally: a scalar-per-sample
   float input that feeds a sinusoidal embedding (``sin``/``cos``).
4. Branch. ``torch.ops.higher_order.cond(cache, cache_branch, compute_branch, operands)``: the
   compute branch is M copied into a subgraph; the cache branch returns ``entry + residual`` per
   stream. Both return contiguous tensors that alias nothing.
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

from .. import calibrators, guard
from ..config import CacheType
from ..distributed import ulysses
from . import _fx
from .discover import BlockGroup


@dataclasses.dataclass
class StreamPlan:
    label: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclasses.dataclass
class CachePlan:
    """What the runtime must allocate and pass: built by the pass, read by runtime.CacheState."""

    slots: int
    anchor: StreamPlan
    residuals: list[StreamPlan]
    key_input: int  # index of a weight input identifying the model instance
    timestep_input: str | None
    state_names: list[str]
    order: int = 0  # calibrator order (TaylorSeer); 0 keeps the last residual only
    calibrator: str | None = None  # None, "taylorseer" or "foca"
    form: str = calibrators.TAYLOR  # TaylorSeer's form (cdcompile.calibrators)
    mask_spec: Any = None  # steps_computation_mask option (None: no mask state)
    num_inference_steps: int | None = None
    prune_blocks: list["PruneBlockPlan"] | None = None  # DBPrune: the prunable blocks' state
    num_blocks: int = 0  # N, the stack's blocks

    @property
    def history(self) -> int:
        """Entries kept per residual: d0..dn (TaylorSeer), FoCa's four, or the last residual."""
        if self.calibrator == "foca":
            return calibrators.FOCA_HISTORY
        return self.order + 1

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
class PruneBlockPlan:
    """DBPrune state of one prunable block: its input anchor and one residual per stream."""

    index: int  # position in the stack (0..N-1)
    anchor: StreamPlan
    residuals: list[StreamPlan]

    @property
    def anchor_name(self) -> str:
        return f"anchor_b{self.index}"

    def residual_name(self, label: str) -> str:
        return f"residual_b{self.index}_{label}"

    def state_names(self) -> list[str]:
        return [self.anchor_name] + [self.residual_name(r.label) for r in self.residuals]


def run(gm: fx.GraphModule, ctx) -> None:
    """Insert the block cache into ``gm`` for the stack of discovered groups (see module doc)."""
    cfg, report = ctx.cfg, ctx.report
    if not cfg.enable_cache:
        report.not_cached.append("enable_cache=False")
        return
    groups = ctx.discovery.groups if ctx.discovery else []
    if not groups:
        return
    if _lower_stream_vmaps(gm, groups):
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
    # A chain of groups whose streams change form between them (Bria FIBO's single blocks carry text
    # and image tokens in one stream) may not have a residual across the whole chain; then the
    # largest single group of the chain that can be cached is, with F and B counted inside it.
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
                        size_asserts=cfg.size_asserts)
    ctx.cache_plan.num_blocks = n


def _try(gm, ctx, stack, blocks, fn, bn) -> str | None:
    """Rewrite ``gm`` for ``stack``, or return why not (then ``gm`` is untouched)."""
    if ctx.cfg.cache_type is CacheType.DBPRUNE:
        from . import block_prune

        reason = block_prune.rewrite(gm, ctx, stack, blocks, fn, bn)
    else:
        reason = _rewrite(gm, ctx, stack, blocks, fn, bn)
    if reason is not None:  # symbol operands made for this attempt (_bind_symbol) go again
        for n in [m for m in gm.graph.nodes if "cdcompile_symbol" in m.meta and not m.users]:
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
    found = _region(nodes, order, _block_nodes(nodes, [g.blocks[i] for g, i in blocks[fn:len(blocks) - bn]]),
                    "the middle blocks", sources)
    if isinstance(found, str):
        return found
    region, m_nodes = found
    exit_label = {s.outputs[i_x]: s.label for s in gx.streams if s.outputs[i_x] is not None}
    found = _pair_exits(region, m_nodes, exit_label, lambda label: _boundary(gm_first, i_m, label, before=True),
                        "the middle blocks", "the middle blocks cannot be skipped")
    if isinstance(found, str):
        return found
    pairs, checked, exit_sizes = found
    inputs, pulled = _operands(region, m_nodes, [e for _, e, _ in pairs], order)
    bad = _non_operand(inputs)
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
    timestep = _find_timestep(nodes, weights, order[g0.blocks[0].nodes[0]])

    plan = CachePlan(
        slots=cfg.cache_slots, anchor=_stream_plan("hidden", hv),
        residuals=[_stream_plan(label, v) for (label, _, _), v in zip(pairs, shaped)],
        key_input=key_input, timestep_input=timestep.name if timestep is not None else None,
        state_names=[], order=cfg.taylorseer_order, form=cfg.taylorseer_form,
        calibrator=cfg.calibrator.value if cfg.calibrator is not None else None,
        mask_spec=cfg.steps_computation_mask, num_inference_steps=cfg.num_inference_steps,
        size_sources=sources)
    inputs, floats = specialize_floats(inputs)
    _emit(gm, region, pulled, inputs, pairs, h0, hf, timestep, plan, cfg, checked, exit_sizes)
    ctx.cache_plan = plan
    report.cache = {"streams": [label for label, _, _ in pairs],
                    "timestep_input": plan.timestep_input, "slots": plan.slots,
                    "middle_ops": len(region), "branch_operands": len(inputs),
                    "dynamic_sizes": describe_sizes(nodes, sources), "specialized_floats": floats}
    if checked:
        report.cache["runtime_size_checks"] = [
            f"{label} dim {d}: {_fx.fake_value(o).shape[d]} == {_fx.fake_value(e).shape[d]}"
            for label, e, o in pairs for d in checked.get(o, [])]
    return None


def _block_nodes(nodes: list[fx.Node], blocks: list) -> set[fx.Node]:
    """The blocks' nodes, with the size checks Dynamo emitted inside their modules (discovery leaves
    those out of the op signatures): they check the blocks' sizes and run with them."""
    paths = [b.path for b in blocks]
    out = {n for b in blocks for n in b.nodes}
    for n in nodes:
        if _fx.is_shape_bookkeeping(n) and any(
                p == q or p.startswith(q + ".") for p, _ in _fx.module_stack(n) for q in paths):
            out.add(n)
    return out


def _region(nodes: list[fx.Node], order: dict[fx.Node, int], core: set[fx.Node], what: str,
            sources: tuple[fx.Node, ...] = ()):
    """The nodes a branch takes over: ``core`` (block nodes) plus the nodes between its first and
    last node that depend on it. ``sources``: the stream values entering it. Returns ``(region,
    region_set)`` or a reason it cannot be skipped."""
    m_nodes = set(core)
    lo = min(order[n] for n in m_nodes)
    hi = max(order[n] for n in m_nodes)
    region = []
    for n in nodes[lo:hi + 1]:
        if n in m_nodes or (n.op not in ("placeholder", "get_attr", "output")
                            and any(a in m_nodes for a in n.all_input_nodes)):
            m_nodes.add(n)
            region.append(n)
    if sources:
        _hoist_vmaps(nodes[lo:hi + 1], order, m_nodes, region, set(sources))
    # A context a block opens and closes around region ops only (``with torch.amp.autocast(...)``
    # in an attention processor: _enter_autocast .. _exit_autocast) moves into the branch whole.
    balanced = _take_scopes(nodes[lo:hi + 1], order, m_nodes, region)
    # A call whose result nobody reads is there for its side effect (Dynamo drops dead pure ops):
    # e.g. the functorch nesting calls vmap leaves around a block. Moving such calls into a branch
    # that may not run, or leaving half of a pair outside it, would unbalance them.
    # (An in-place op on a tensor the region computed is fine: it moves with the region; a dead
    # view or cast, or Dynamo's idempotent lazy_load_decompositions, has no effect to unbalance.)
    effects = [n for n in nodes[lo:hi + 1] if n.op in ("call_function", "call_method") and not n.users
               and n not in balanced
               and _fx.target_name(n) not in _NO_EFFECT and _fx.target_name(n) not in _VIEW_OPS
               and (n not in m_nodes or not any(a in m_nodes for a in n.all_input_nodes))]
    if effects:
        name = _fx.target_name(effects[0])
        if name.startswith("_vmap_"):
            return (f"a torch.vmap ({effects[0].name}) runs inside {what}: Dynamo inlines it as raw functorch "
                    f"calls, which fail inside a torch.cond branch (functorch reports an escaped tensor)")
        return (f"side-effecting op {name} ({effects[0].name}) sits between "
                f"{what}; skipping them would unbalance it")
    # A getitem of a tuple made outside the region by a non-view op stays outside: operands must
    # be tensors.
    for n in list(region):
        if n.target is operator.getitem and n.args[0] not in m_nodes and not _is_view(n.args[0]):
            region.remove(n)
            m_nodes.discard(n)
    # A float Dynamo made symbolic but knows the value of (an unspecialized float input read with
    # .item(), a norm's eps under dynamic=True) reads no tensor the region computes: it stays
    # outside, becomes an operand, and specialize_floats makes it a guarded constant. Inside a
    # branch its .item() would be a data-dependent read.
    for n in list(region):
        if _specializable(_fx.fake_value(n)) and not any(a in m_nodes for a in n.all_input_nodes):
            region.remove(n)
            m_nodes.discard(n)
    return region, m_nodes


def _lower_stream_vmaps(gm: fx.GraphModule, groups: list[BlockGroup]) -> bool:
    """Lower to aten ops (``_fx.lower_scope``) every outermost ``torch.vmap`` scope inside the
    groups that reads the streams (Kandinsky 6 SR builds its NABLA block mask from pooled queries
    and keys). As raw functorch calls it could neither run inside a cond branch nor move before it;
    lowered, it is ordinary ops of its block. A scope that does not read the streams stays as it
    is (:func:`_hoist_vmaps` moves it before the cond). Returns whether any scope was lowered; one
    ``make_fx`` cannot trace stays, and the region refuses it with its reason."""
    nodes = list(gm.graph.nodes)
    order = {n: k for k, n in enumerate(nodes)}
    members = [n for g in groups for b in g.blocks for n in b.nodes]
    if not members:
        return False
    lo, hi = min(order[n] for n in members), max(order[n] for n in members)
    span = nodes[lo:hi + 1]
    dep = _stream_dependent(span, {s.entry for g in groups for s in g.streams})
    pairs = [(e, x) for e, x in _scope_pairs(span) if _fx.target_name(e) == "_vmap_increment_nesting"]
    outer = [(e, x) for e, x in pairs
             if not any(order[e2] < order[e] and order[x] < order[x2] for e2, x2 in pairs)]
    lowered = False
    for e, x in outer:
        scope = nodes[order[e]:order[x] + 1]
        if not dep.intersection(scope):
            continue
        try:
            _fx.lower_scope(gm, scope)
        except Exception as err:  # noqa: BLE001 - left as is; _region names the vmap it refuses
            warnings.warn(f"cachedit: could not lower the torch.vmap at {e.name}: {err}", stacklevel=3)
            continue
        lowered = True
    return lowered


def _stream_dependent(span: list[fx.Node], sources: set[fx.Node]) -> set[fx.Node]:
    """The nodes of ``span`` whose values change with ``sources``, through reads and in-place writes."""
    dep: set[fx.Node] = set()
    for n in span:
        if any(a in sources or a in dep for a in n.all_input_nodes):
            dep.add(n)
            if _fx.writes_in_place(n) and n.args and isinstance(n.args[0], fx.Node):
                dep.add(n.args[0])
    return dep


def _hoist_vmaps(span: list[fx.Node], order: dict[fx.Node, int], m_nodes: set[fx.Node], region: list[fx.Node],
                 sources: set[fx.Node]) -> None:
    """Leave out of the region every ``torch.vmap`` scope that does not depend on the streams, with
    the region nodes it reads: it then runs on every step, before the cond, and the branch reads
    its results (a vmap cannot run inside a cond branch, see _MOVABLE). Such a scope builds a
    block's attention mask from positions and side inputs (``create_block_mask`` for
    flex_attention: AnyFlow FAR). A scope that reads the streams was lowered before
    (:func:`_lower_stream_vmaps`)."""
    dep = _stream_dependent(span, sources)
    for e, x in _scope_pairs(span):
        if _fx.target_name(e) != "_vmap_increment_nesting":
            continue
        own = {n for n in span if order[e] <= order[n] <= order[x]}
        if own & dep or not own & m_nodes:
            continue
        stack = list(own)
        while stack:  # with the region nodes it reads (independent of the streams, as it is)
            for a in stack.pop().all_input_nodes:
                if a in m_nodes and a not in own:
                    own.add(a)
                    stack.append(a)
        if own & dep:
            continue
        m_nodes.difference_update(own)
        region[:] = [n for n in region if n not in own]


# Contexts Dynamo records as a pair of calls: autocast (the exit reads the enter's result) and
# torch.vmap / torch.func nesting (matched by nesting order; the decrement takes no argument).
_SCOPES = {"_enter_autocast": "_exit_autocast", "_vmap_increment_nesting": "_vmap_decrement_nesting"}
_CLOSES = {v: k for k, v in _SCOPES.items()}


# Scopes that may move into a cond branch. A vmap may not: Dynamo inlines it as raw functorch
# calls (_vmap_increment_nesting, _add_batch_dim, ...), and inside a torch.cond branch those fail,
# eager and traced alike (functorch reports an escaped tensor; Kandinsky 6 SR, AnyFlow FAR). Such
# a scope is lowered to aten ops first when it reads the streams, else left before the cond.
_MOVABLE = {"_enter_autocast"}


def _scope_pairs(span: list[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    pairs, open_ = [], []
    for n in span:
        name = _fx.target_name(n) if n.op == "call_function" else None
        if name in _SCOPES:
            open_.append(n)
        elif name in _CLOSES:
            if not open_ or _fx.target_name(open_[-1]) != _CLOSES[name]:
                open_.clear()  # closes a scope opened before the span (or out of order): no pair
                continue
            e = open_.pop()
            if name != "_exit_autocast" or e in n.all_input_nodes:
                pairs.append((e, n))
    return pairs


def _take_scopes(span: list[fx.Node], order: dict[fx.Node, int], m_nodes: set[fx.Node],
                 region: list[fx.Node]) -> set[fx.Node]:
    """Scopes (enter/exit pairs) in ``span``, innermost first. One that holds region nodes moves
    into the region whole, when the other nodes inside it only feed nodes inside it or the region
    (a context a block opens and closes: ``with torch.amp.autocast(...)`` around its RoPE). One
    that holds no region node stays out whole, balanced where it stands (a ``torch.vmap`` that
    builds a block's attention mask from side inputs). Returns the dead calls that stay balanced:
    the enter/exit of both kinds, and the in-place writes of the latter to tensors made inside it."""
    pairs = sorted(_scope_pairs(span), key=lambda p: order[p[1]] - order[p[0]])
    ends = {n for p in pairs for n in p}
    balanced: set[fx.Node] = set()
    for e, x in pairs:
        if any(a in m_nodes for a in e.all_input_nodes):
            continue
        inside = [n for n in span if order[e] < order[n] < order[x]]
        own = set(inside) | {e, x}
        if not any(n in m_nodes for n in own):
            writes_own = all(n.users or n in ends or _fx.target_name(n) in _NO_EFFECT
                             or (n.args and isinstance(n.args[0], fx.Node) and n.args[0] in own)
                             for n in inside)
            if writes_own:
                balanced |= {e, x} | {n for n in inside if not n.users}
            continue
        if _fx.target_name(e) not in _MOVABLE:
            continue
        outside = [n for n in inside if n not in m_nodes]
        if all(n in ends or (n.users and all(u in m_nodes or u in own for u in n.users))
               or (not n.users and _fx.target_name(n) in _NO_EFFECT) for n in outside):
            taken = [n for n in outside if n.users or n in ends] + [n for n in (e, x) if n not in m_nodes]
            m_nodes.update(taken)
            region.extend(taken)
            balanced |= {e, x}  # they move together: balanced inside the branch
    region.sort(key=order.__getitem__)
    return balanced


# Ops whose result may share storage with an input. Branch operands must not alias each other
# (torch.cond refuses it), so views are replayed inside the branches from their base tensors.
_VIEW_OPS = {"getitem", "view", ".view", "reshape", ".reshape", ".permute", "permute", "transpose",
             ".transpose", "unsqueeze", ".unsqueeze", "squeeze", ".squeeze", ".expand", "narrow",
             "select", ".chunk", "chunk", ".split", "split", ".split_with_sizes", "unbind",
             ".unbind", "flatten", ".flatten", ".unflatten", ".t", ".contiguous", ".to", ".float",
             ".type_as", ".detach", "detach", ".view_as", ".reshape_as", ".movedim", "movedim",
             ".swapaxes", ".expand_as", "as_strided", ".as_strided"}


# Dead calls that may stay outside a branch (besides _VIEW_OPS): Dynamo's lazy loading of
# decompositions, and asserts on symbolic sizes that do not read the region (they hold whether or
# not it runs).
_NO_EFFECT = {"lazy_load_decompositions"} | _fx.SIZE_CHECKS


def _is_view(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False
    if n.target is operator.getitem:  # a view only when taken from a tuple of views
        src = n.args[0]
        return isinstance(src, fx.Node) and (
            isinstance(_fx.fake_value(src), torch.Tensor) or _is_view(src))
    return _fx.target_name(n) in _VIEW_OPS


def _operands(region, m_nodes, extra, order, fresh=frozenset()):
    """Branch operands (non-view tensors read by M) and the view nodes replayed inside the branches.

    ``fresh``: nodes that another cond will produce (its outputs alias nothing), never replayed."""
    pulled: set[fx.Node] = set()
    while True:
        inputs: list[fx.Node] = []
        for n in sorted(pulled, key=order.__getitem__) + region:
            for a in n.all_input_nodes:
                if a not in m_nodes and a not in pulled and a not in inputs:
                    inputs.append(a)
        for e in extra:
            if e not in pulled and e not in inputs:
                inputs.append(e)
        views = [a for a in inputs if a not in fresh and _is_view(a)]
        if not views:
            return inputs + _symbol_operands(inputs, order), sorted(pulled, key=order.__getitem__)
        pulled.update(views)


def _non_operand(inputs: list[fx.Node]) -> str | None:
    """The first input a cond cannot take, described; torch.cond takes tensors and SymInts (an
    unbacked size under ``capture_scalar_outputs``). A float Dynamo made symbolic but knows the
    value of is taken too: :func:`specialize_floats` makes it a guarded constant."""
    for a in inputs:
        v = _fx.fake_value(a)
        if isinstance(v, torch.SymFloat) and not _specializable(v):
            if not v.node.has_hint():
                return (f"{a.name}, a float computed from tensor data (SymFloat, e.g. x.item() under "
                        f"capture_scalar_outputs), which a cond cannot take and which has no value at "
                        f"compile time to specialize on")
            return (f"{a.name}, a float computed from symbolic sizes ({v.node.expr}), which a cond "
                    f"cannot take; specializing it would fix those sizes: compile with dynamic=False")
        if not isinstance(v, (torch.Tensor, torch.SymInt, torch.SymFloat)):
            return f"{a.name}, which is neither a tensor nor a SymInt ({type(v).__name__})"
    return None


def _specializable(v) -> bool:
    """A symbolic float of float inputs only (no size symbol, no data-dependent read): its value is
    known at compile time and guarding on it fixes no size."""
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    return (isinstance(v, torch.SymFloat) and v.node.has_hint()
            and all(symbol_is_type(x, SymT.FLOAT) for x in v.node.expr.free_symbols))


def specialize_floats(inputs: list[fx.Node]) -> tuple[list[fx.Node], dict[str, float]]:
    """Replace each symbolic float among the branch operands by its value, with a Dynamo guard.

    Dynamo makes a float input symbolic once its value changes between calls (2.13 leaves floats
    unspecialized: a LoRA ``scale`` in ``joint_attention_kwargs``, a module float under
    ``dynamic=True``), and a cond takes no float. Specializing it here adds the guard ``value ==
    v`` to the ShapeEnv, which Dynamo turns into guards of this graph once the backend returns, so
    a new value compiles a new graph (with its cache) instead of reusing this one. Returns the
    remaining operands and {operand name: value}."""
    kept, done = [], {}
    for a in inputs:
        v = _fx.fake_value(a)
        if not _specializable(v):
            kept.append(a)
            continue
        value = v.node.guard_float(__file__, 0)
        for user in list(a.users):
            user.args = fx.node.map_arg(user.args, lambda n: value if n is a else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is a else n)
        done[a.name] = value
        if not a.users and a.op != "placeholder":
            a.graph.erase_node(a)
    return kept, done


def _symbol_operands(inputs: list[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    """SymInt nodes for the unbacked symbols in the operands' shapes that no operand holds, added
    right after the node that binds each (``aten.sym_size`` / ``sym_storage_offset`` of it).

    Under ``capture_dynamic_output_shape_ops`` a stream read by the branch may have a size Dynamo
    could not know (HunyuanVideo 1.5 reorders its text tokens with a boolean mask): a subgraph
    must receive every such symbol as an input, as Dynamo's own ``torch.cond`` lifts them, or
    Inductor cannot generate it."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    have = {v.node.expr for a in inputs if isinstance(v := _fx.fake_value(a), torch.SymInt)}
    need = set().union(*(free_unbacked_symbols(_fx.fake_value(a)) for a in inputs)) - have
    out: list[fx.Node] = []
    for n in order:  # graph order
        for sym, path in (n.meta.get("unbacked_bindings") or {}).items():
            if sym not in need:
                continue
            made = _bind_symbol(n, path)
            if made is not None:
                need.discard(sym)
                out.append(made)
    return out


def _bind_symbol(n: fx.Node, path) -> fx.Node | None:
    """A node computing the value at ``path`` (an unbacked-binding key path) of ``n``'s result."""
    from torch.fx.experimental.symbolic_shapes import CallMethodKey

    value = _fx.fake_value(n)
    for u in n.users:  # made by an earlier attempt (or by Dynamo)
        if u.meta.get("cdcompile_symbol") == path:
            return u
    with n.graph.inserting_after(n):
        if len(path) == 2 and isinstance(path[0], CallMethodKey) and path[0].name == "size":
            made = n.graph.call_function(torch.ops.aten.sym_size.int, (n, path[1].idx))
            made.meta.update(example_value=value.size(path[1].idx), cdcompile_symbol=path)
            return made
        if len(path) == 1 and isinstance(path[0], CallMethodKey) and path[0].name == "storage_offset":
            made = n.graph.call_function(torch.ops.aten.sym_storage_offset.default, (n,))
            made.meta.update(example_value=value.storage_offset(), cdcompile_symbol=path)
            return made
    return None


def _pair_exits(region: list[fx.Node], members: set[fx.Node], exit_label: dict[fx.Node, str], entry_of,
                what: str, consequence: str):
    """Pair each value ``region`` leaves with the entry of its stream (``entry_of(label)``).

    Returns ``(pairs, checked, exit_sizes)`` or why not: ``pairs`` = [(label, entry, exit)];
    ``checked`` = exit -> dims equal to the entry's only at run time (:func:`_data_dependent_dims`);
    ``exit_sizes`` = a size of an exit read after the region (a check Dynamo placed on a slice),
    read again from the cond's result: sym_size node -> (exit, dim). ``what`` names the region and
    ``consequence`` ends the message for a value read other than through the streams."""
    outputs = [n for n in region if any(u not in members for u in n.users)]
    exit_sizes = {n: (n.args[0], n.args[1]) for n in outputs
                  if n.target is torch.ops.aten.sym_size.int and n.args[0] in exit_label}
    pairs = []
    checked: dict[fx.Node, list[int]] = {}
    for out in (n for n in outputs if n not in exit_sizes):
        label = exit_label.get(out)
        if label is None:
            users = ", ".join(u.name for u in out.users if u not in members)
            return f"{out.name}, computed in {what}, is read by {users} other than through the streams; {consequence}"
        entry = entry_of(label)
        ev, xv = _fx.fake_value(entry) if entry is not None else None, _fx.fake_value(out)
        dims = _data_dependent_dims(ev, xv) if entry is not None and not _fx.same_meta(ev, xv) else []
        if entry is None or dims is None:
            return f"stream {label!r} leaves {what} as {_describe(xv)} but enters as {_describe(ev)}: no residual to reuse"
        if dims:
            checked[out] = dims
        pairs.append((label, entry, out))
    return pairs, checked, exit_sizes


def _data_dependent_dims(entry: Any, exit_: Any) -> list[int] | None:
    """The dims where the exit's size is an unbacked symbol Dynamo cannot prove equal to the entry's
    size (nor unequal), when those are the only differences; None when the shapes differ otherwise.

    A block that slices its joint sequence apart at a data-dependent length (HunyuanVideo Framepack
    under ``capture_scalar_outputs``: ``x[:, :-text_len]`` with ``text_len`` read from the text
    mask) returns its hidden stream with a fresh unbacked size: equal to the entry's whenever
    the slice is not empty, but Dynamo cannot know. The compute branch checks the equality at run
    time (``torch._check``, which also tells the tracer), so the residual has the entry's shape."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true

    if not (isinstance(entry, torch.Tensor) and isinstance(exit_, torch.Tensor) and entry.ndim == exit_.ndim
            and entry.dtype == exit_.dtype and entry.device == exit_.device):
        return None
    dims = []
    for d, (a, b) in enumerate(zip(entry.shape, exit_.shape)):
        if statically_known_true(a == b):
            continue
        if not (isinstance(b, torch.SymInt) and free_unbacked_symbols(b)) or statically_known_true(a != b):
            return None
        dims.append(d)
    return dims


def _checked_exit(g: fx.Graph, out: fx.Node, entry: fx.Node, dims: list[int], entry_value: torch.Tensor) -> fx.Node:
    """``out`` with the entry's shape, in graph ``g``: ``torch._check(out.size(d) == entry.size(d))``
    for each of ``dims`` (an error at run time, never a stale residual of another shape), then a
    contiguous copy viewed with the entry's sizes, so both branches return equal sizes and strides."""
    sizes = [g.call_function(torch.ops.aten.sym_size.int, (entry, d)) if isinstance(v, torch.SymInt) else v
             for d, v in enumerate(entry_value.shape)]
    for d in dims:
        got = g.call_function(torch.ops.aten.sym_size.int, (out, d))
        g.call_function(torch._check, (g.call_function(operator.eq, (got, sizes[d])),))
    copy = g.call_function(torch.clone, (out,), {"memory_format": torch.contiguous_format})
    return g.call_function(torch.ops.aten.view.default, (copy, sizes))


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)} {v.dtype}"
    return "nothing" if v is None else type(v).__name__


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


def _find_timestep(nodes: list[fx.Node], weights: set[fx.Node], stop: int) -> fx.Node | None:
    """The user input carrying the diffusion timestep, found structurally.

    Candidates are float inputs with at most one value per sample (ndim <= 1) from which a
    ``sin``/``cos`` (a sinusoidal embedding) is computed before the first block. When several
    qualify (FLUX-dev's guidance is embedded the same way), a name containing "timestep" wins,
    then the first by input order.
    """
    order = {n: k for k, n in enumerate(nodes)}
    found = []
    for p in nodes:
        if p.op != "placeholder" or p in weights:
            continue
        v = _fx.fake_value(p)
        if not isinstance(v, torch.Tensor) or v.ndim > 1 or not v.dtype.is_floating_point:
            continue
        seen, todo = set(), [p]
        while todo:
            n = todo.pop()
            if _fx.target_name(n) in ("sin", "cos", ".sin", ".cos"):
                found.append(p)
                break
            for u in n.users:
                if u not in seen and order.get(u, math.inf) < stop:
                    seen.add(u)
                    todo.append(u)
    if not found:
        return None
    named = [p for p in found if "timestep" in p.name]
    return (named or found)[0]


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

    # FoCa's state moves on cached steps too, by the residual the call used: both branches
    # return it after the streams (the computed residual | the forecast).
    used = plan.calibrator == "foca"

    def compute_outputs(g, env, res):
        outs = [_checked_exit(g, env[o], env[e], checked[o], _fx.fake_value(e)) if o in (checked or {})
                else env[o] for _, e, o in pairs]
        if used:
            outs += [g.call_function(torch.sub, (x, env[e])) for (_, e, _), x in zip(pairs, outs)]
        return outs

    def cache_outputs(g, env, res):
        fc = [g.call_function(calibrators.forecast, (res[k], res[-1])) for k in range(len(pairs))]
        outs = [g.call_function(torch.add, (env[e], f)) for (_, e, _), f in zip(pairs, fc)]
        return outs + fc if used else outs

    compute_gm = _branch(gm, inputs, pulled, len(pairs), region, compute_outputs, "ComputeMiddle")
    cache_gm = _branch(gm, inputs, pulled, len(pairs), [], cache_outputs, "ReuseMiddle")
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
    tick = call(guard.tick, (t, st["clock"], st["counters"], st["reset"]))
    step, slot, new_req = (call(_getitem, (tick, k)) for k in range(3))
    r = call(torch.sub, (env[hf], env[h0]))
    dec = call(guard.decide, (r, st["anchor"], st["slot_ctr"], step, slot, new_req, st.get("mask")), dict(
        threshold=cfg.residual_diff_threshold, warmup_steps=cfg.max_warmup_steps,
        warmup_interval=cfg.warmup_interval, max_cached=cfg.max_cached_steps,
        max_continuous=cfg.max_continuous_cached_steps, slots=plan.slots,
        static_mask=cfg.steps_computation_policy == "static",
        # Context parallel: r holds this rank's tokens; the guard all-reduces its diff so that
        # every rank takes the same branch (the compute branch holds collectives).
        group=ulysses.process_group(cfg.ulysses_degree)[0] if cfg.ulysses_degree > 1 else None))
    cache, diff, idx, a, ctr = (call(_getitem, (dec, k)) for k in range(5))
    res_slots = [call(_index_slot, (st[f"residual_{k}"], idx)) for k in range(len(pairs))]
    nodes = call(_index_slot, (st["cal_nodes"], idx))
    computed = call(_getitem, (ctr, 3))
    if plan.calibrator == "foca":
        coef = call(calibrators.foca_coefficients, (step, nodes, computed))
    else:
        coef = call(calibrators.coefficients, (step, nodes, computed, plan.order, plan.form))
    operands = tuple(env[n] for n in inputs) + tuple(res_slots) + (coef,)
    true_fn = g.get_attr("cdcompile_cache_branch")
    false_fn = g.get_attr("cdcompile_compute_branch")
    cond = call(torch.ops.higher_order.cond, (cache, true_fn, false_fn, operands))
    for k, (_, entry, out) in enumerate(pairs):
        env[out] = call(_getitem, (cond, k))
        used = call(_getitem, (cond, len(pairs) + k)) if plan.calibrator == "foca" else None
        call(guard.commit_residual, (cache, st[f"residual_{k}"], idx, res_slots[k], env[out], env[entry],
                                     step, nodes, ctr, used, plan.form))
    call(guard.commit_nodes, (cache, st["cal_nodes"], idx, nodes, step))
    call(guard.commit, (cache, diff, idx, r, a, ctr, st["anchor"], st["slot_ctr"], step, slot,
                        new_req, st["counters"], st["hist_flag"], st["hist_diff"], st["hist_meta"]))


def _getitem(x, k):
    return x[k]


def _index_slot(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(0, idx)[0]


def _branch(gm, inputs, pulled, n_res, body, outputs, class_name, coef=True) -> fx.GraphModule:
    """A branch subgraph: operands ``inputs`` + ``n_res`` residuals (+ the calibrator weights when
    ``coef``), the replayed views, ``body``."""
    g = fx.Graph()
    env = {a: g.placeholder(f"in_{k}") for k, a in enumerate(inputs)}
    res = [g.placeholder(f"res_{k}") for k in range(n_res)] + ([g.placeholder("coef")] if coef else [])
    for n in list(pulled) + list(body):
        env[n] = g.node_copy(n, env.__getitem__)
    outs = outputs(g, env, res)
    # Both branches return fresh contiguous tensors at offset 0: no aliasing, identical strides.
    # A view (FLUX's last single block slices the image tokens out) is copied; `contiguous` would
    # keep its storage offset.
    g.output(tuple(g.call_function(torch.clone, (o,), {"memory_format": torch.contiguous_format})
                   if _is_view(o) else g.call_method("contiguous", (o,)) for o in outs))
    g.eliminate_dead_code()
    return fx.GraphModule(gm, g, class_name=class_name)
