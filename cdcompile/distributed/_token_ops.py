"""Sharded values and how single graph ops map the token dim (the vocabulary of sharding.py).

- :class:`Sharded`: a tensor value whose ``dim`` is the token axis ``axis`` (layout.Axis).
- :class:`Refused` / :class:`Why`: a plan cannot shard the graph, and why.
- Op tables: ops that mix tokens (refused), reductions, view ops, splits.
- ``index_layout``: a getitem/setitem index on a sharded value, with token bounds made local.
- ``track_dim``: the output dim of a view op that is its input's token dim.
- ``size_args``: the size list of view/reshape/expand, to make its token entry local.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
import torch.fx as fx

from ..passes import _fx
from .layout import Axis


class Why(str, enum.Enum):
    """Why the graph cannot be sharded (the pass then compiles it unsharded)."""

    NO_TOKEN_STREAM = "no_token_stream"
    TOKEN_MIXING_OP = "token_mixing_op"
    TOKEN_DIM_RESHAPED = "token_dim_reshaped"
    TOKEN_INDEXED = "token_indexed"
    MIXED_AXES = "mixed_axes"
    ATTENTION_UNSUPPORTED = "attention_unsupported"
    DYNAMIC_SHAPES = "dynamic_shapes"


class Refused(Exception):
    def __init__(self, why: Why, node: fx.Node | None, detail: str):
        super().__init__(f"{why.value}: {detail}" + (f" (node {node.name}{_fx.source(node)})" if node is not None else ""))
        self.why, self.node, self.detail = why, node, detail


@dataclasses.dataclass(frozen=True)
class Sharded:
    dim: int
    axis: Axis


# Ops that mix tokens while keeping shapes; refused when a sharded value reaches them.
MIXING = {"roll", "flip", "fliplr", "flipud", "rot90", "fft", "ifft", "rfft", "irfft", "fft2", "fftn",
           "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
           "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "interpolate",
           "gather", "scatter", "index_select", "take_along_dim", "masked_select", "nonzero", "unique",
           "tril", "triu", "diag", "repeat", "tile", "baddbmm", "addmm", "addbmm", "einsum",
           "size", "dim", "numel", "item", "tolist", "group_norm", "instance_norm", "embedding", "cumsum",
           "cumprod", "sort", "argsort", "topk", "kthvalue", "median", "mode", "cummax", "cummin", "diff",
           "unfold", "fold", "pixel_shuffle", "pixel_unshuffle"}
REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "softmax", "log_softmax", "var", "std", "norm",
           "logsumexp", "prod", "all", "any", "argmax", "argmin", "var_mean", "std_mean", "count_nonzero",
           "normalize", "nansum", "nanmean"}
VIEW = {"permute", "transpose", "movedim", "moveaxis", "unsqueeze", "squeeze", "t", "swapaxes", "swapdims",
         "view", "reshape", "flatten", "unflatten", "expand", "view_as", "reshape_as", "expand_as"}
SIZED = {"view", "reshape", "expand"}  # take a size list whose token entry must become local
SPLIT = {"split", "split_with_sizes", "chunk", "unbind", "tensor_split"}
DTYPE_ONLY = {"type_as", "to"}  # only the first operand's values (and shape) reach the output
NEW = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}  # take only dtype/device: replicated


def name_of(n: fx.Node) -> str:
    return _fx.target_name(n).lstrip(".")


def shape_of(n: Any) -> tuple[int, ...] | None:
    v = _fx.fake_value(n) if isinstance(n, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return None
    if any(not isinstance(d, int) for d in v.shape):
        raise Refused(Why.DYNAMIC_SHAPES, n, "symbolic sizes; compile with dynamic=False")
    return tuple(v.shape)


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def arg(n: fx.Node, pos: int, name: str, default=None):
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[pos] if len(n.args) > pos else default


def index_layout(n: fx.Node, idx, ndim: int, lay: Sharded, rank: int):
    """A tensor getitem/setitem index on a sharded value: (index with local bounds, output layout,
    output ndim)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) or i is True or i is False for i in items):
        raise Refused(Why.TOKEN_INDEXED, n, "advanced indexing of a sharded value")
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    in_dim = out_dim = 0
    new_items, out, changed = [], None, False
    for it in items:
        if it is Ellipsis:
            k = ndim - consuming
            if in_dim <= lay.dim < in_dim + k:
                out = Sharded(out_dim + lay.dim - in_dim, lay.axis)
            in_dim, out_dim = in_dim + k, out_dim + k
        elif it is None:
            out_dim += 1
        elif isinstance(it, slice):
            if in_dim == lay.dim:
                if it.step not in (None, 1):
                    raise Refused(Why.TOKEN_INDEXED, n, "strided slice of the token dim")
                start, stop = it.start or 0, it.stop
                sliced = lay.axis.slice(start, stop)
                if sliced is None:
                    raise Refused(Why.TOKEN_INDEXED, n, "token slice that is not contiguous on a rank")
                axis, bounds = sliced
                if axis == lay.axis:
                    out = Sharded(out_dim, lay.axis)
                else:
                    lo, hi = bounds[rank]
                    it = slice(lo, hi, None)
                    changed = True
                    out = Sharded(out_dim, axis)
            in_dim, out_dim = in_dim + 1, out_dim + 1
        elif isinstance(it, int):
            if in_dim == lay.dim:
                raise Refused(Why.TOKEN_INDEXED, n, "integer index into the token dim")
            in_dim += 1
        else:
            raise Refused(Why.TOKEN_INDEXED, n, f"index {it!r} of a sharded value")
        new_items.append(it)
    out_ndim = out_dim + ndim - in_dim
    if out is None:
        out = Sharded(out_dim + lay.dim - in_dim, lay.axis)
    if not changed:
        return idx, out, out_ndim
    return (tuple(new_items) if isinstance(idx, tuple) else new_items[0]), out, out_ndim


def meta_view(n: fx.Node):
    """A view op's output when its input is a contiguous meta tensor of the input's shape (its
    strides say which input elements each output dim walks)."""
    def meta(a):
        if isinstance(a, fx.Node):
            shp = shape_of(a)
            return torch.empty(shp, device="meta") if shp is not None else _fx.fake_value(a)
        return a

    args = torch.fx.node.map_aggregate(n.args, meta)
    kwargs = torch.fx.node.map_aggregate(n.kwargs, meta)
    if n.op == "call_method":
        out = getattr(args[0], n.target)(*args[1:], **kwargs)
    else:
        out = n.target(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else None


def track_dim(n: fx.Node, src: fx.Node, lay: Sharded) -> int | None:
    """The output dim of a view op that is the input's token dim (run on contiguous meta tensors)."""
    x = torch.empty(shape_of(src), device="meta")
    stride, length = x.stride()[lay.dim], x.shape[lay.dim]
    out = meta_view(n)
    if out is None:
        return None
    hits = [d for d in range(out.dim()) if out.stride()[d] == stride and out.shape[d] == length]
    return hits[0] if len(hits) == 1 else None


def size_args(n: fx.Node):
    """The size list of a view/reshape/expand node and a function rebuilding (args, kwargs) from it."""
    args, kwargs = list(n.args), dict(n.kwargs)
    for key in ("size", "shape"):
        if key in kwargs:
            sizes = kwargs[key]
            if any(isinstance(s, fx.Node) for s in sizes):
                return None, None
            return list(sizes), lambda new: (tuple(args), {**kwargs, key: tuple(new)})
    if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)):
        sizes = list(args[1])
        rebuild = lambda new: ((args[0], tuple(new)), kwargs)  # noqa: E731
    else:
        sizes = args[1:]
        rebuild = lambda new: ((args[0], *new), kwargs)  # noqa: E731
    if any(not isinstance(s, int) for s in sizes):
        return None, None
    return sizes, rebuild
