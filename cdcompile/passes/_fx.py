"""Small helpers over Dynamo's FX graphs shared by the passes.

Dynamo writes ``node.meta["nn_module_stack"]``: an ordered dict, outermost module first, of
``key -> (path, module class)``. Paths look like
``L['self'].__dict__['_modules']['transformer_blocks'].0.norm1`` or ``L['fn'].1.l``;
:func:`normalize_path` turns them into ``transformer_blocks.0.norm1`` / ``1.l``.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import re
from typing import Iterable

import torch
import torch.fx as fx

_ROOT = re.compile(r"^L\['[^']*'\]")
_DICT_MODULES = re.compile(r"\.__dict__\['_modules'\]\['([^']*)'\]")
_MODULES = re.compile(r"\._modules\['([^']*)'\]")
_ITEM = re.compile(r"\[['\"]?([^'\"\]]*)['\"]?\]")
_GETATTR = re.compile(r"getattr\((.*), '([^']*)'\)")


def normalize_path(path: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].0.attn`` -> ``blocks.0.attn``."""
    while (m := _GETATTR.fullmatch(path)) is not None:
        path = f"{m.group(1)}.{m.group(2)}"
    path = _ROOT.sub("", path)
    path = _DICT_MODULES.sub(r".\1", path)
    path = _MODULES.sub(r".\1", path)
    path = _ITEM.sub(r".\1", path)
    return path.lstrip(".")


def module_stack(node: fx.Node) -> list[tuple[str, type | str]]:
    """The node's module stack as ``[(normalized path, class), ...]``, outermost first."""
    return [(path, cls) for _, path, cls in module_stack_entries(node)]


def module_stack_entries(node: fx.Node) -> list[tuple[str, str, type | str]]:
    """As :func:`module_stack`, with Dynamo's key of each entry: ``[(key, path, class), ...]``; the
    key of a module's k-th later call in the forward ends in ``@k``."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(str(key), normalize_path(value[0]), value[1]) for key, value in stack.items()]


def class_name(cls: type | str) -> str:
    return cls if isinstance(cls, str) else cls.__name__


def target_name(node: fx.Node) -> str:
    """A model-independent name for what a node computes (its op signature entry)."""
    if node.op == "call_function":
        t = node.target
        return getattr(t, "__name__", None) or str(t)
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op


def op_key(node: fx.Node) -> tuple:
    """``target_name`` plus the node's constant arguments (nodes replaced by a marker).

    Used to align a block with a few dead-code-eliminated ops against its siblings: two slices of
    the same tensor differ only in their constants.
    """
    def const(a):
        if isinstance(a, fx.Node):
            return "%"
        if isinstance(a, (list, tuple)):
            return tuple(const(x) for x in a)
        if isinstance(a, dict):
            return tuple((k, const(v)) for k, v in a.items())
        return repr(a)
    return (target_name(node), const(node.args), const(node.kwargs))


def is_weight_placeholder(node: fx.Node, example: object | None) -> bool:
    """Whether a placeholder carries a parameter or buffer rather than a user input."""
    if isinstance(example, torch.nn.Parameter):
        return True
    # Dynamo names lifted attributes ``..._parameters_<name>_`` / ``..._buffers_<name>_``.
    return "_parameters_" in node.name or "_buffers_" in node.name


def weight_placeholders(gm: fx.GraphModule, example_inputs: Iterable[object] | None) -> set[fx.Node]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    examples = list(example_inputs) if example_inputs is not None else []
    examples += [None] * (len(placeholders) - len(examples))
    return {n for n, ex in zip(placeholders, examples) if is_weight_placeholder(n, ex)}


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` depends on, transitively."""
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def source(node: fx.Node) -> str:
    """Where in the model's code ``node`` comes from: `` at file.py:123``, or nothing."""
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines() if ln.strip().startswith("File ")]
    if not lines:
        return ""
    try:  # 'File "/path/to/model.py", line 123, in forward'
        path, line = lines[-1].split('"')[1], lines[-1].split("line ")[1].split(",")[0]
    except IndexError:
        return ""
    return f" at {path.rsplit('/', 1)[-1]}:{line}"


def fake_value(node: fx.Node):
    """The FakeTensor (or other value) Dynamo recorded for a node, if any."""
    return node.meta.get("example_value", node.meta.get("val"))


def same_meta(a: object, b: object) -> bool:
    """Same shape (provably, without guarding on a symbolic or unbacked size), dtype and device."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.ndim == b.ndim
            and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))
            and a.dtype == b.dtype and a.device == b.device)


# F.scaled_dot_product_attention's parameters in positional order.
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_args(n: fx.Node) -> dict[str, object]:
    """An SDPA call's arguments by parameter name, whether passed by position or keyword."""
    return {**{name: n.args[i] for i, name in enumerate(SDPA_ARGS) if i < len(n.args)}, **n.kwargs}


# Runtime checks Dynamo and make_fx emit for symbolic sizes (capture_scalar_outputs, unbacked sizes).
_CHECKS = ("_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range", "_check_is_size", "_assert_async")
SIZE_CHECKS = frozenset(_CHECKS + tuple(f"{c}.default" for c in _CHECKS))  # as target_name spells them


def is_shape_bookkeeping(n: fx.Node) -> bool:
    """Whether ``n`` computes or checks a symbolic size rather than a tensor: SymInt arithmetic and
    the asserts on it. Dynamo emits them where an unbacked size is first needed, so sibling blocks
    hold different numbers of them (HunyuanVideo Framepack under ``capture_scalar_outputs``);
    they are not part of a block's op signature. A ``.item()`` method call giving a symbolic
    scalar counts too: under ``dynamic=True`` Dynamo reads a shared float default once, inside the
    first block, for every block."""
    if n.op not in ("call_function", "call_method"):
        return False
    return (target_name(n) in SIZE_CHECKS
            or isinstance(fake_value(n), (torch.SymInt, torch.SymFloat, torch.SymBool)))


_IN_PLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                 operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                 operator.ilshift, operator.irshift, operator.imatmul})


def writes_in_place(n: fx.Node) -> bool:
    """Whether ``n`` writes into its first argument (``x[i] = y``, ``copy_``, ``x.add_(...)``,
    ``torch.relu_(x)``, ``x += y``)."""
    name = target_name(n)
    if isinstance(n.target, torch._ops.OpOverload):  # aten ops, e.g. from lower_scope
        return n.target._schema.is_mutable
    return (name in ("setitem", "copy_") or n.target in _IN_PLACE_OPERATORS
            or (n.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")))


# What a node made by a pass keeps of the node it stands for: module path and source line (for
# discovery and messages).
PROVENANCE = ("nn_module_stack", "stack_trace", "source_fn_stack")


def set_fake(n: fx.Node) -> None:
    """Record the node's fake output (a function or method call), computed from its inputs' fake
    values in their fake mode."""
    args = fx.node.map_arg(n.args, fake_value)
    kwargs = fx.node.map_arg(n.kwargs, fake_value)
    leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch._subclasses.FakeTensor)]
    with leaves[0].fake_mode:
        out = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else n.target(*args, **kwargs)
    n.meta["example_value"] = out
    if "val" in n.meta:
        n.meta["val"] = out


def call_like(graph: fx.Graph, like: fx.Node, fn, args, kwargs: dict | None, pass_name: str) -> fx.Node:
    """A new ``fn(*args, **kwargs)`` node at the graph's insertion point, with ``like``'s provenance,
    tagged with ``pass_name`` (``meta["cdcompile_pass"]``), and its fake value."""
    node = graph.call_function(fn, args, kwargs or {})
    node.meta.update({k: like.meta[k] for k in PROVENANCE if k in like.meta})
    node.meta["cdcompile_pass"] = pass_name
    set_fake(node)
    return node


def lower_scope(gm: fx.GraphModule, span: list[fx.Node]) -> list[fx.Node]:
    """Replace the contiguous nodes ``span`` of ``gm`` by the aten ops they run, traced by
    ``make_fx`` on Dynamo's fake values, and return the new nodes.

    For a ``torch.vmap`` scope (``_vmap_increment_nesting .. _vmap_decrement_nesting``, which Dynamo
    inlines as raw functorch calls): the traced ops are the batched ops vmap dispatches to, with no
    functorch call left, so they may run inside a ``torch.cond`` branch. The new nodes take the
    first span node's module stack and source line (for discovery and messages); the span's values
    read after it are replaced by their traced counterparts. Raises what ``make_fx`` raises (then
    ``gm`` is unchanged).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    inside = set(span)
    inputs = list(dict.fromkeys(a for n in span for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in span if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {a: sub.placeholder(a.name) for a in inputs}
    for n in span:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    args = [fake_value(a) for a in inputs]
    mode = next((v.fake_mode for v in args if isinstance(v, torch._subclasses.FakeTensor)), None)
    level = torch._C._functorch.maybe_current_level()
    try:
        with mode if mode is not None else contextlib.nullcontext():
            traced = make_fx(fx.GraphModule(gm, sub))(*args)
    finally:  # a failed trace leaves its vmap levels open; close them
        while torch._C._functorch.maybe_current_level() not in (None, level):
            torch._C._functorch._vmap_decrement_nesting()
    traced.graph.eliminate_dead_code()

    result = traced.graph.output_node().args[0]
    if not all(isinstance(t, fx.Node) for t in result):
        raise NotImplementedError("a traced scope output is a constant")

    keep = {k: span[0].meta[k] for k in PROVENANCE if k in span[0].meta}
    new: list[fx.Node] = []
    values: dict[fx.Node, fx.Node] = {}
    with gm.graph.inserting_before(span[0]):
        for t in traced.graph.nodes:
            if t.op == "placeholder":
                values[t] = inputs[len(values)]
            elif t.op == "get_attr":  # a constant make_fx lifted: carried over under a fresh name
                name = next(f"_lowered_const_{k}" for k in itertools.count() if not hasattr(gm, f"_lowered_const_{k}"))
                setattr(gm, name, getattr(traced, t.target))
                values[t] = c = gm.graph.get_attr(name)
                c.meta.update(t.meta)
                new.append(c)
            elif t.op != "output":
                c = gm.graph.node_copy(t, values.__getitem__)
                c.meta.update(keep)
                if "val" in t.meta:
                    c.meta["example_value"] = t.meta["val"]
                values[t] = c
                new.append(c)
    for old, t in zip(outputs, result):
        old.replace_all_uses_with(values[t])
    for n in reversed(span):
        gm.graph.erase_node(n)
    return new
