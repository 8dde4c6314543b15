"""Small helpers over Dynamo's FX graphs shared by the passes.

Dynamo writes ``node.meta["nn_module_stack"]``: an ordered dict, outermost module first, of
``key -> (path, module class)``. Paths look like
``L['self'].__dict__['_modules']['transformer_blocks'].0.norm1`` or ``L['fn'].1.l``;
:func:`normalize_path` turns them into ``transformer_blocks.0.norm1`` / ``1.l``.
"""

from __future__ import annotations

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
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        path, cls = value[0], value[1]
        out.append((normalize_path(path), cls))
    return out


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


def fake_value(node: fx.Node):
    """The FakeTensor (or other value) Dynamo recorded for a node, if any."""
    return node.meta.get("example_value", node.meta.get("val"))


def writes_in_place(n: fx.Node) -> bool:
    """Whether ``n`` writes into its first argument (``x[i] = y``, ``copy_``, ``x.add_(...)``)."""
    name = target_name(n)
    return name in ("setitem", "copy_") or (n.op == "call_method" and name.endswith("_") and not name.endswith("__"))
