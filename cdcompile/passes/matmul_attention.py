"""Attention written out as matmuls, ``softmax(q @ k^T * c [+ mask]) @ v``, as one SDPA call.

Context parallelism and FP8 attention act on ``scaled_dot_product_attention`` nodes. A model that
writes its attention by hand (research DiTs; timm's ``Attention`` with ``fused_attn`` off) would
otherwise refuse context parallelism ("matmul of two sharded values") and keep bf16 attention. Both
passes come after this one, which runs when either is on; with both off the graph is left as written.
Inductor's ``fuse_attention`` does the same rewrite on the aten graph; this one runs on Dynamo's
graph, before the passes that need it.

Matched, in this order and nothing else, each value read only by the next:

1. ``S = a @ b`` (``@``, ``torch.matmul``, ``.matmul``), ``a`` of shape (batch, heads, m, d) and
   ``b`` of shape (batch, heads, d, n): ``b`` is K transposed, however it was made;
2. any number of multiplications or divisions of S by a Python number (the scale, their product);
3. at most one mask: ``S + mask`` (a tensor that broadcasts to S, added after the scale, as SDPA
   adds it), or ``S.masked_fill(mask, -inf)`` (before or after the scale);
4. ``softmax`` over the last dim, with no dtype argument;
5. an optional dropout with ``p == 0`` or ``training=False``;
6. ``P @ v`` with ``v`` of shape (batch, heads, n, e).

It becomes ``F.scaled_dot_product_attention(a, b.transpose(-2, -1), v, attn_mask=..., scale=c)``
(a ``masked_fill`` mask is negated: SDPA's boolean mask marks the keys that attend). A cast, a
softmax in another dtype or anything else in the chain leaves the pattern as it is. The result
equals the written-out chain up to floating-point rounding (SDPA's kernels order the sums
differently); a query row whose ``masked_fill`` drops every key gives zeros (SDPA's rule for a
boolean mask) instead of NaN.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import _fx

PASS = "matmul_attention"
_MATMUL = {"matmul", ".matmul"}  # target_name of torch.matmul / operator.matmul and Tensor.matmul
_MUL = {"mul", ".mul"}
_DIV = {"truediv", "div", ".div"}
_ADD = {"add", ".add"}
_SOFTMAX = {"softmax", ".softmax"}
_DROPOUT = {"dropout", ".dropout"}
_MASKED_FILL = {"masked_fill", ".masked_fill"}


def run(gm: fx.GraphModule, ctx) -> None:
    """The pass: on when a later pass acts on SDPA calls (``ulysses_degree > 1``, ``fp8_attention``)."""
    if ctx.cfg.ulysses_degree > 1 or ctx.cfg.fp8_attention:
        ctx.report.matmul_attention = to_sdpa(gm)


def to_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite every matched chain of ``gm`` (see the module doc); returns how many."""
    done = 0
    for n in list(gm.graph.nodes):
        if n.op in ("call_function", "call_method") and _fx.target_name(n) in _SOFTMAX:
            match = _match(n)
            if match is not None:
                _rewrite(gm, *match)
                done += 1
    if done:
        gm.recompile()
    return done


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x != 0


def _shape(n) -> tuple | None:
    v = _fx.fake_value(n) if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _softmax_dim(n: fx.Node):
    """The dim of a softmax with no dtype argument (``F.softmax(x, dim, _stacklevel, dtype)``,
    ``torch.softmax(x, dim, dtype)``, ``x.softmax(dim, dtype)``), else None."""
    dtype_at = 3 if n.target is F.softmax else 2
    if n.kwargs.get("dtype") is not None or (len(n.args) > dtype_at and n.args[dtype_at] is not None):
        return None
    return n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")


def _match(softmax: fx.Node):
    """(a, b, v, mask, whether the mask marks the keys to drop, scale, last matmul, the chain from
    the last matmul's input back to the first matmul) or None."""
    shape = _shape(softmax)
    if shape is None or len(shape) != 4 or _softmax_dim(softmax) not in (-1, 3):
        return None
    # Backwards from the softmax: the mask (at most one), the scale, then the first matmul.
    scale, mask, negate, chain = 1.0, None, False, [softmax]
    x = softmax.args[0]
    while isinstance(x, fx.Node) and _only_user(x) is chain[-1] and x.op in ("call_function", "call_method"):
        name, args = _fx.target_name(x), x.args
        if name in _MATMUL:
            break
        if name in _MUL and len(args) == 2 and not x.kwargs:
            c = args[1] if isinstance(args[0], fx.Node) else args[0]
            src = args[0] if isinstance(args[0], fx.Node) else args[1]
            if not _number(c) or not isinstance(src, fx.Node):
                return None
            scale *= c
        elif name in _DIV and len(args) == 2 and isinstance(args[0], fx.Node) and _number(args[1]) and not x.kwargs:
            src, scale = args[0], scale / args[1]
        elif name in _ADD and len(args) == 2 and not x.kwargs and mask is None and scale == 1.0:
            # (a scale met before, walking back, is applied after the sum: not SDPA's order)
            a, b = args
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return None
            # the scores: the operand of the sum's shape that only the sum reads (a wrong pick
            # reaches no matmul below, and the chain is left as written)
            src, mask = (a, b) if _shape(a) == _shape(x) and _only_user(a) is x else (b, a)
            if _shape(src) != _shape(x) or _depends_on(mask, src):
                return None
        elif name in _MASKED_FILL and len(args) == 3 and not x.kwargs and mask is None:
            src, m, value = args
            if not (isinstance(m, fx.Node) and value == float("-inf")) or _depends_on(m, src):
                return None
            mask, negate = m, True
        else:
            return None
        chain.append(x)
        x = src
    if not (isinstance(x, fx.Node) and _fx.target_name(x) in _MATMUL and _only_user(x) is chain[-1]):
        return None
    first = x
    a, b = first.args[:2] if len(first.args) >= 2 else (None, None)
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None or len(sa) != 4 or len(sb) != 4 or sa[:2] != sb[:2] or sa[3] != sb[2]:
        return None
    if mask is not None:
        sm = _shape(mask)
        v = _fx.fake_value(mask)
        if sm is None or len(sm) > 4 or (negate and v.dtype != torch.bool) or (not negate and v.dtype == torch.bool):
            return None
        try:
            torch.broadcast_shapes(sm, _shape(first))
        except RuntimeError:
            return None
    # Forwards from the softmax: an inactive dropout, then P @ v.
    y = _only_user(softmax)
    while y is not None and _fx.target_name(y) in _DROPOUT and y.args and y.args[0] is chain[0]:
        p = y.args[1] if len(y.args) > 1 else y.kwargs.get("p", 0.5)
        training = y.args[2] if len(y.args) > 2 else y.kwargs.get("training", True)
        inplace = y.args[3] if len(y.args) > 3 else y.kwargs.get("inplace", False)
        if not (p == 0 or training is False) or inplace:
            return None
        chain.insert(0, y)
        y = _only_user(y)
    if y is None or _fx.target_name(y) not in _MATMUL or len(y.args) < 2 or y.args[0] is not chain[0]:
        return None
    v = y.args[1]
    sv = _shape(v)
    if sv is None or len(sv) != 4 or sv[:2] != sa[:2] or sv[2] != sb[3] or _depends_on(v, first):
        return None
    return a, b, v, mask, negate, scale, y, chain + [first]


def _depends_on(x: fx.Node, on: fx.Node) -> bool:
    return on is x or on in _fx.ancestors(x)


def _rewrite(gm, a, b, v, mask, negate, scale, last, chain) -> None:
    g = gm.graph
    with g.inserting_before(last):
        k = _fx.call_like(g, last, torch.transpose, (b, -2, -1), None, PASS)
        if mask is not None and negate:
            mask = _fx.call_like(g, last, torch.logical_not, (mask,), None, PASS)
        out = _fx.call_like(g, last, F.scaled_dot_product_attention, (a, k, v),
                            {"attn_mask": mask, "dropout_p": 0.0, "is_causal": False, "scale": float(scale)}, PASS)
    last.replace_all_uses_with(out)
    for n in [last, *chain]:  # each read only by the one before it: none is read any more
        g.erase_node(n)
