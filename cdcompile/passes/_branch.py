"""What a ``torch.cond`` branch takes over from the graph, for DBCache and DBPrune alike.

1. Region (:func:`region`): a run of block nodes plus the nodes between them that depend on
   them, with the scopes they open and close (``torch.autocast``) moved in whole, and the
   ``sdpa_kernel`` settings they restore (:func:`_take_settings`); a
   ``torch.vmap`` that reads the streams is lowered to aten ops first (:func:`lower_stream_vmaps`),
   one that does not stays before the cond; a side-effecting call between the blocks refuses.
2. Operands (:func:`operands`): the non-view values the region reads, views replayed inside the
   branches (cond operands must not alias), and the unbacked SymInts their shapes hold. What a
   cond cannot take is refused (:func:`non_operand`); a symbolic float with a known value becomes
   a guarded constant (:func:`specialize_floats`).
3. Exits (:func:`pair_exits`): each value the region leaves is paired with the entry of its
   stream (the residual is ``exit - entry``); an exit of a fresh unbacked length is checked equal
   to its entry at run time (:func:`checked_exit`).
4. Subgraph (:func:`subgraph`): operands + residuals -> the region's nodes -> fresh contiguous
   outputs that alias nothing, with equal strides in both branches.

Each step returns a reason string instead of its result when the region cannot be skipped.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
import torch.fx as fx

from . import _fx
from .discover import BlockGroup


def block_nodes(nodes: list[fx.Node], blocks: list) -> set[fx.Node]:
    """The blocks' nodes, with the size checks Dynamo emitted inside their modules (discovery leaves
    those out of the op signatures): they check the blocks' sizes and run with them."""
    paths = [b.path for b in blocks]
    out = {n for b in blocks for n in b.nodes}
    for n in nodes:
        if _fx.is_shape_bookkeeping(n) and any(
                p == q or p.startswith(q + ".") for p, _ in _fx.module_stack(n) for q in paths):
            out.add(n)
    return out


def region(nodes: list[fx.Node], order: dict[fx.Node, int], core: set[fx.Node], what: str,
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
    # ``with sdpa_kernel(...)`` (diffusers' _native_flash, _native_cudnn, _native_math backends)
    # sets a global state at its enter and exit: when the region leaves it as it found it, those
    # calls move into the branch with the attention they choose the kernel for.
    settings = _take_settings(nodes, lo, hi, order, m_nodes, region, what)
    if isinstance(settings, str):
        return settings
    balanced |= settings
    # A call whose result nobody reads may be there for its side effect: e.g. the functorch nesting
    # calls vmap leaves around a block. Moving such calls into a branch that may not run, or leaving
    # half of a pair outside it, would unbalance them. Dynamo keeps dead computations too (a
    # variable a block computes and then overwrites, ``ones = torch.ones_like(temb)``): a pure op
    # that makes tensors has nothing to unbalance and stays before the cond, as it would run in
    # eager. (An in-place op on a tensor the region computed is fine: it moves with the region; a
    # dead view or cast, or Dynamo's idempotent lazy_load_decompositions, has no effect either.)
    effects = [n for n in nodes[lo:hi + 1] if n.op in ("call_function", "call_method") and not n.users
               and n not in balanced
               and _fx.target_name(n) not in _NO_EFFECT and _fx.target_name(n) not in _VIEW_OPS
               and (n not in m_nodes or not any(a in m_nodes for a in n.all_input_nodes))
               and not _pure_tensor_op(n)]
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
        if n.target is operator.getitem and n.args[0] not in m_nodes and not is_view(n.args[0]):
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


def lower_stream_vmaps(gm: fx.GraphModule, groups: list[BlockGroup]) -> bool:
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
        except Exception as err:  # noqa: BLE001 - left as is; region names the vmap it refuses
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
    (:func:`lower_stream_vmaps`)."""
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


# Global settings Dynamo records as calls that set an absolute value: ``with sdpa_kernel(b)``
# becomes ``_sdpa_kernel([b...], prio)`` at its enter and ``_sdpa_kernel([previous...], prio)`` at
# its exit, each backend a ``_backend_from_string(name)`` node of its own.
_SETTERS = {"_sdpa_kernel"}


def _setting(n: fx.Node) -> frozenset[str] | None:
    """The SDPA backends a ``_sdpa_kernel`` call enables, or None when its arguments are not the
    backend nodes Dynamo emits. (With a priority it orders them too; an exit Dynamo records
    restores the order its enter found, so the enabled set pairs an exit with its enter.)"""
    backends = n.args[0] if n.args else n.kwargs.get("backends")
    if not isinstance(backends, (list, tuple)):
        return None
    names = set()
    for b in backends:
        if isinstance(b, fx.Node) and _fx.target_name(b) == "_backend_from_string" and b.args:
            names.add(str(b.args[0]))
        elif isinstance(b, torch.nn.attention.SDPBackend):
            names.add(b.name)
        else:
            return None
    return frozenset(names)


def _take_settings(nodes: list[fx.Node], lo: int, hi: int, order: dict[fx.Node, int], m_nodes: set[fx.Node],
                   region: list[fx.Node], what: str) -> set[fx.Node] | str:
    """The ``_sdpa_kernel`` calls between ``nodes[lo]`` and ``nodes[hi]``, paired into the scopes they
    open and close (an exit restores the setting its enter found). A scope that holds region nodes
    moves into the region whole, with the backend names its calls read: skipping the region then
    leaves the setting as running it does. A scope that holds none (a block of another group that
    runs between the middle blocks) stays where it is, balanced. The setting before the first call
    is the last such call earlier in the graph, or the process's own at compile time (Dynamo records
    an exit's value as the setting it found at trace time, in this same call). Returns the calls, or
    why they cannot move."""
    span = nodes[lo:hi + 1]
    calls = [n for n in span if n.op == "call_function" and _fx.target_name(n) in _SETTERS]
    if not calls:
        return set()
    settings = [_setting(n) for n in calls]
    if any(s is None for s in settings):
        return (f"{calls[settings.index(None)].name} sets the SDPA backends from values the pass cannot read, "
                f"between {what}")
    before = next((_setting(n) for n in reversed(nodes[:lo])
                   if n.op == "call_function" and _fx.target_name(n) in _SETTERS), None)
    if before is None:
        before = frozenset(b.name for b in torch.nn.attention._cur_sdpa_kernel_backends())
    stack: list[tuple[fx.Node | None, frozenset[str]]] = [(None, before)]
    outer = []
    for n, setting in zip(calls, settings):
        if len(stack) > 1 and setting == stack[-2][1]:
            enter, _ = stack.pop()
            if len(stack) == 1:
                outer.append((enter, n))
        else:
            stack.append((n, setting))
    if len(stack) > 1:
        n, setting = stack[-1]
        return (f"{n.name} sets the SDPA backends to {sorted(setting)} between {what} and nothing after it "
                f"restores {sorted(stack[-2][1])}: skipping them would change the attention kernel after")
    for enter, exit_ in outer:
        inside = nodes[order[enter]:order[exit_] + 1]
        if not any(n in m_nodes for n in inside):
            continue
        # An attention left outside the region inside the scope would run with another setting.
        stray = [n for n in inside if n not in m_nodes and n.op in ("call_function", "call_method")
                 and "attention" in str(_fx.target_name(n))]
        if stray:
            return (f"attention {stray[0].name} runs inside an sdpa_kernel scope between {what} but does not "
                    f"depend on them: it cannot move into the branch with the setting")
        setters = [n for n in inside if n in calls]
        for n in set(setters) | {b for c in setters for b in c.all_input_nodes}:
            if n not in m_nodes:
                m_nodes.add(n)
                region.append(n)
    region.sort(key=order.__getitem__)
    return set(calls)


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
# Number helpers Dynamo leaves behind, dead, on constants (``int(np.ceil(...))`` in FLUX's
# ControlNet loop gives ``torch.sym_int(2.0)``): they only convert or compare numbers.
_SYM_NUMBERS = {"sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum"}
_NO_EFFECT = {"lazy_load_decompositions"} | _fx.SIZE_CHECKS | _SYM_NUMBERS


def _pure_tensor_op(n: fx.Node) -> bool:
    """A call that only makes tensors from its arguments, or reads a number from a tensor: FX does
    not call it impure, it writes into none of them, and what Dynamo recorded for it is a tensor or
    a tuple of tensors, or a number read from tensor arguments (``int(np.ceil(n / k))`` in FLUX's
    ControlNet loop becomes ``wrapped_item(wrapped_ceil(...))``, dead once Dynamo has specialized
    the value). A state toggle such as ``_set_grad_enabled`` or ``_vmap_increment_nesting`` records
    None or an int read from no tensor."""
    if n.is_impure() or _fx.writes_in_place(n):
        return False
    value = _fx.fake_value(n)
    if isinstance(value, (int, float, bool)):
        inputs = n.all_input_nodes
        return bool(inputs) and all(isinstance(_fx.fake_value(a), torch.Tensor) for a in inputs)
    values = value if isinstance(value, (tuple, list)) else (value,)
    return len(values) > 0 and all(isinstance(v, torch.Tensor) for v in values)


def is_view(n: fx.Node) -> bool:
    if n.op not in ("call_function", "call_method"):
        return False
    if n.target is operator.getitem:  # a view only when taken from a tuple of views
        src = n.args[0]
        return isinstance(src, fx.Node) and (
            isinstance(_fx.fake_value(src), torch.Tensor) or is_view(src))
    return _fx.target_name(n) in _VIEW_OPS


def operands(region, m_nodes, extra, order, fresh=frozenset()):
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
        views = [a for a in inputs if a not in fresh and is_view(a)]
        if not views:
            return inputs + _symbol_operands(inputs, order), sorted(pulled, key=order.__getitem__)
        pulled.update(views)


def non_operand(inputs: list[fx.Node]) -> str | None:
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


def pair_exits(region: list[fx.Node], members: set[fx.Node], exit_label: dict[fx.Node, str], entry_of,
              what: str, consequence: str):
    """Pair each value ``region`` leaves with the entry of its stream (``entry_of(label, exit)``).

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
        entry = entry_of(label, out)
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


def checked_exit(g: fx.Graph, out: fx.Node, entry: fx.Node, dims: list[int], entry_value: torch.Tensor) -> fx.Node:
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


def subgraph(gm, inputs, pulled, n_res, body, outputs, class_name, coef=True) -> fx.GraphModule:
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
                   if is_view(o) else g.call_method("contiguous", (o,)) for o in outs))
    # FX counts a call that sets the SDPA backends as pure (it returns None): keep it.
    g.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or (
        n.op == "call_function" and _fx.target_name(n) in _SETTERS))
    return fx.GraphModule(gm, g, class_name=class_name)


def flatten_subclass_operands(gm: fx.GraphModule) -> dict[str, int]:
    """Pass every tensor-subclass operand of a ``torch.cond`` (torchao's quantized weights, ...) as
    its inner tensors, and rebuild it at the top of each branch; returns how many, per subclass.

    torch.cond dispatches on the subclasses of its operands and has no rule for these ("There was
    no rule registered for HOP cond and subclass ..."). A traceable wrapper subclass
    (``__tensor_flatten__`` / ``__tensor_unflatten__``, as AOTAutograd requires) splits into plain
    tensors outside the cond, and the branch builds it again from them, so its ops run inside the
    branch as they run outside it: AOTAutograd traces them into ops on the inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    count: dict[str, int] = {}
    for cond in list(gm.graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond)):
        pred, true_fn, false_fn, ops = cond.args
        values = [_fx.fake_value(op) if isinstance(op, fx.Node) else None for op in ops]
        if not any(is_traceable_wrapper_subclass(v) for v in values):
            continue
        new_ops, layout = [], []  # per operand: None (passed as is) or (rebuild, number of leaves)
        with gm.graph.inserting_before(cond):
            for op, v in zip(ops, values):
                if not is_traceable_wrapper_subclass(v):
                    new_ops.append(op)
                    layout.append(None)
                    continue
                spec, paths = _subclass_spec(v)
                for path in paths:
                    leaf, value = op, v
                    for attr in path:
                        value = getattr(value, attr)
                        leaf = gm.graph.call_function(getattr, (leaf, attr))
                        leaf.meta["example_value"] = leaf.meta["val"] = value
                    new_ops.append(leaf)
                layout.append((_rebuilder(spec), len(paths)))
                count[type(v).__name__] = count.get(type(v).__name__, 0) + 1
        for branch in (getattr(gm, true_fn.target), getattr(gm, false_fn.target)):
            _rebuild_in_branch(branch, layout)
        cond.args = (pred, true_fn, false_fn, tuple(new_ops))
    return count


def _subclass_spec(v: torch.Tensor) -> tuple[tuple, list[tuple[str, ...]]]:
    """``(spec, leaf paths)``: how to rebuild ``v`` from its plain inner tensors, found by attribute
    paths (nested subclasses are flattened all the way down)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    attrs, ctx = v.__tensor_flatten__()
    children, paths = [], []
    for a in attrs:
        inner = getattr(v, a)
        if is_traceable_wrapper_subclass(inner):
            spec, sub = _subclass_spec(inner)
            children.append((a, spec, len(sub)))
            paths += [(a, *p) for p in sub]
        else:
            children.append((a, None, 1))
            paths.append((a,))
    return (type(v), ctx, v.size(), v.stride(), children), paths


def _rebuilder(spec: tuple):
    def rebuild_subclass(*leaves):
        def build(spec, leaves):
            cls, ctx, size, stride, children = spec
            inner, k = {}, 0
            for a, sub, n in children:
                inner[a] = leaves[k] if sub is None else build(sub, leaves[k:k + n])
                k += n
            return cls.__tensor_unflatten__(inner, ctx, size, stride)
        return build(spec, leaves)
    rebuild_subclass.__name__ = rebuild_subclass.__qualname__ = f"rebuild_{spec[0].__name__}"
    return rebuild_subclass


def _rebuild_in_branch(branch: fx.GraphModule, layout: list) -> None:
    g = branch.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(layout), "a cond branch takes one placeholder per operand"
    body = next(n for n in g.nodes if n.op != "placeholder")
    for p, item in zip(placeholders, layout):
        if item is None:
            continue
        rebuild, n = item
        with g.inserting_before(p):
            leaves = [g.placeholder(f"{p.name}_leaf{k}") for k in range(n)]
        with g.inserting_before(body):
            whole = g.call_function(rebuild, tuple(leaves))
        whole.meta.update(p.meta)
        p.replace_all_uses_with(whole)
        g.erase_node(p)
    g.lint()
    branch.recompile()
