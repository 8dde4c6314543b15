"""Token-sharding propagation over a Dynamo graph (analysis only; the context_parallel pass rewrites).

Given the block groups and the streams to shard, :func:`plan` walks the nodes between the first and
the last group in graph order and decides, for every value computed from a sharded one, which of
its dims is a sharded token axis (:class:`Sharded`: dim + :class:`~.layout.Axis`) and what must
change so that the op computes this rank's part. Per op:

1. Per-token ops (the default: pointwise and broadcasting ops, linear, norms over channels,
   reductions over other dims): the output keeps the axis. A *replicated* operand whose aligned
   dim spans the whole axis (rotary tables, masks, positional tensors) is restricted to this
   rank's pieces (an ``align`` edit): ``take(x, dim, pieces[rank])``.
2. View ops (permute, transpose, unsqueeze, view/reshape, flatten, ...): the token dim is tracked
   through the op by running it on a contiguous meta tensor and finding the output dim with the
   token dim's stride; a size argument equal to the logical length becomes the local length.
3. Token-dim ``cat`` concatenates axes (layout.Axis.cat); a replicated operand gets its even
   shard. Token-dim slices and splits, read or written (``x[:, a:] = y``), become local bounds
   (layout.Axis.slice).
4. ``scaled_dot_product_attention``: Q and K/V sharded -> Ulysses (all-to-all, local attention,
   all-to-all); Q sharded and K/V replicated (cross-attention to text) -> local attention, no
   communication; Q replicated and K/V sharded -> K and V are gathered. An attention mask is
   reordered to the gathered token order. ``F.multi_head_attention_forward`` likewise.
   ``flex_attention`` is Ulysses too, its gathered tokens put in logical order for the block mask
   (positional) and back after; its mask and score functions must not read the head index.
5. Sums over the token dim: ``sum``/``mean`` over dims that include it, and a matmul contracting
   two sharded token dims (linear attention: Sana's ``V K^T``), give this rank's partial sum; an
   all-reduce after the node (``reductions``) makes the result whole and replicated (a mean is
   first scaled by local/global length, so uneven splits stay exact).
6. A view that splits or merges the token dim (tokens seen as an image, ``(B, S, C) -> (B, H, W,
   C)``) or a convolution along it makes a *token grid* (grid.py): each rank holds whole rows
   covering its tokens plus a halo of rows fetched from its neighbours, convolutions run on them,
   and where the tokens are one dim again each rank keeps its own. The halo is as deep as the
   convolutions reach (found by planning twice).
7. Anything else that mixes tokens (other reductions over the token dim, pooling or a group norm
   over a grid, a matmul contracting tokens against a replicated value, advanced indexing)
   refuses the plan with a reason: compiling without context parallelism is correct, a wrong
   plan is not.

Values used after the last group are gathered (``gathers``).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from ..passes import _fx
from ._token_ops import (DTYPE_ONLY, MIXING, NEW, REDUCE, SIZED, SPLIT, VIEW, Refused, Sharded, Why, arg,
                         index_layout, meta_view, name_of, norm_dim, shape_of, size_args, track_dim)
from .grid import CONV, Grid, GridRules
from .layout import Axis


@dataclasses.dataclass
class Attention:
    node: fx.Node
    kind: str  # "ulysses" | "local" | "gather_kv"
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_axis: Axis | None
    kv_axis: Axis | None
    heads: int
    head_dim: int
    batch: int
    mask: fx.Node | None = None
    kv_heads: int | None = None  # differs from heads under grouped-query attention
    mask_takes: tuple[tuple[int, tuple], ...] = ()  # (dim, ranges) applied to the mask in order
    mha: bool = False  # torch.nn.MultiheadAttention's functional form
    expand_kv: int = 1  # grouped-query K/V repeated to this many heads per head before the exchange
    flex: bool = False  # torch.nn.attention.flex_attention (its output is item 0 of a tuple)
    logical: bool = False  # put the gathered tokens in logical order (a flex block mask is positional)


@dataclasses.dataclass
class Plan:
    world: int
    rank: int
    region: list[fx.Node]
    layouts: dict[fx.Node, Any] = dataclasses.field(default_factory=dict)
    entries: list[tuple[fx.Node, fx.Node, Sharded]] = dataclasses.field(default_factory=list)  # (entry, before, how)
    # (user, replicated operand, dim, this rank's ranges)
    aligns: list[tuple[fx.Node, fx.Node, int, tuple]] = dataclasses.field(default_factory=list)
    new_args: dict[fx.Node, tuple] = dataclasses.field(default_factory=dict)  # node -> (target, args, kwargs)
    attentions: list[Attention] = dataclasses.field(default_factory=list)
    gathers: list[tuple[fx.Node, Sharded, list[fx.Node]]] = dataclasses.field(default_factory=list)
    # partial sums over the token axis, all-reduced after the node: (node, scale of the local value)
    reductions: list[tuple[fx.Node, float]] = dataclasses.field(default_factory=list)
    # token grids (grid.py): rows exchanged before a node, (node, sharded source, token dim,
    # local (lo, hi) sent to each rank, tokens received from each rank) ...
    halos: list[tuple[fx.Node, fx.Node, int, tuple, tuple]] = dataclasses.field(default_factory=list)
    # ... and a grid's tokens narrowed back to this rank's after a node: (node, dim, ranges)
    narrows: list[tuple[fx.Node, int, tuple]] = dataclasses.field(default_factory=list)
    sharded_streams: list[str] = dataclasses.field(default_factory=list)

    def local(self, axis: Axis) -> tuple:
        return axis.pieces[self.rank]


def plan(gm: fx.GraphModule, groups: list, *, world: int, rank: int, shard_streams: str = "all",
         token_dim: int = -2) -> Plan:
    """Decide how every value between the first and last group is sharded (see the module doc).

    ``shard_streams``: "all" shards every token stream of the groups (hidden and encoder);
    "hidden" shards only the hidden streams (an encoder stream then stays replicated until it
    meets a sharded value). ``token_dim``: the dim of a stream that holds its tokens, -2 for
    (batch, ..., tokens, channels), 0 for sequence-first (tokens, batch, channels) streams (ERNIE-Image).
    Raises :class:`Refused`.

    A token grid's halo (how many rows each rank fetches beyond its own) is found by planning:
    the walk reports the rows its convolutions reach beyond the halo granted, and the plan is
    made again with those (all ranks find the same numbers).
    """
    halo: dict[fx.Node, int] = {}
    for _ in range(4):
        p, need = _plan(gm, groups, world=world, rank=rank, shard_streams=shard_streams, token_dim=token_dim,
                        halo=halo)
        if all(halo.get(k, 0) >= v for k, v in need.items()):
            return p
        halo = {k: max(halo.get(k, 0), need.get(k, 0)) for k in {*halo, *need}}
    raise Refused(Why.TOKEN_MIXING_OP, None, f"convolutions over a token grid reach further than the halo "
                                             f"the plan grew to ({halo})")


def _plan(gm, groups, *, world, rank, shard_streams, token_dim, halo):
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    first = min(pos[g.blocks[0].nodes[0]] for g in groups)
    last = max(pos[g.blocks[-1].nodes[-1]] for g in groups)
    p = Plan(world=world, rank=rank, region=[n for n in nodes[first:last + 1]
                                             if n.op in ("call_function", "call_method", "call_module")])
    region = set(p.region)

    # Streams to shard, decided when the walk reaches their group (an entry computed from sharded
    # values, e.g. the second FLUX group's, is sharded already). Token dim = ``token_dim`` of a
    # value of 2 dims or more.
    at_group: dict[fx.Node, list] = {}
    for g in groups:
        at_group.setdefault(g.blocks[0].nodes[0], []).append(g)
    visitor = _Visitor(p, halo)
    for n in p.region:
        for g in at_group.get(n, []):
            for s in g.streams:
                shp = shape_of(s.entry)
                if (shard_streams == "hidden" and s.label != "hidden") or visitor.lay(s.entry) is not None \
                        or shp is None or len(shp) < 2 or shp[token_dim] < world:
                    continue
                tok = norm_dim(token_dim, len(shp))
                how = Sharded(tok, Axis.even(shp[tok], world))
                p.entries.append((s.entry, n, how))
                visitor.entry[s.entry] = how
                p.sharded_streams.append(f"{g.name}.{s.label}")
        if not p.entries:
            raise Refused(Why.NO_TOKEN_STREAM, None, "no stream of the first group has a "
                          + ("(batch, tokens, channels) or (tokens, channels)" if token_dim == -2
                             else "(tokens, batch, channels)")
                          + " shape")
        lay = visitor.visit(n)
        if lay is not None:
            p.layouts[n] = lay

    # Values leaving the region: gathered once, for every user after it.
    for n, lay in list(p.layouts.items()):
        if not isinstance(lay, Sharded):
            if isinstance(lay, (tuple, Grid)) and any(u not in region for u in n.users):
                raise Refused(Why.MIXED_AXES, n, "a tuple of sharded values or a token grid leaves the "
                                                 "block groups")
            continue
        outside = [u for u in n.users if u not in region]
        if outside:
            p.gathers.append((n, lay, outside))
    return p, visitor.need


class _Visitor(GridRules):
    def __init__(self, p: Plan, halo: dict[fx.Node, int]):
        self.p = p
        self.entry: dict[fx.Node, Sharded] = {}
        self.halo = halo  # token grids: halo rows granted per origin node
        self.need: dict[fx.Node, int] = {}  # ... and found needed

    # -- helpers ---------------------------------------------------------------------------------
    def lay(self, a: Any):
        if not isinstance(a, fx.Node):
            return None
        if a in self.p.layouts:
            return self.p.layouts[a]
        return self.entry.get(a)

    def align(self, user: fx.Node, full: fx.Node, dim: int, axis: Axis) -> None:
        self.p.aligns.append((user, full, dim, self.p.local(axis)))

    def visit(self, n: fx.Node):
        ins = [(a, self.lay(a)) for a in n.all_input_nodes]
        sharded = [(a, s) for a, s in ins if s is not None]
        if not sharded:
            return None
        if n.op == "call_module":
            raise Refused(Why.TOKEN_MIXING_OP, n, f"module call {n.target} reads a sharded value")
        name = name_of(n)
        if name in CONV:
            return self.conv(n)
        if any(isinstance(s, Grid) for _, s in sharded):
            return self.grid_op(n, sharded)
        if n.target is operator.getitem:
            return self.getitem(n)
        if any(not isinstance(s, Sharded) for _, s in sharded):
            raise Refused(Why.MIXED_AXES, n, f"{name} reads a tuple holding sharded values")
        if n.target is operator.setitem:
            return self.setitem(n)
        if name == "scaled_dot_product_attention":
            return self.sdpa(n)
        if name == "flex_attention":
            return self.flex(n)
        if name == "multi_head_attention_forward":
            return self.mha(n)
        if name == "pad":
            return self.pad(n)
        if name == "repeat_interleave":
            return self.along_other_dim(n, dim_pos=2)
        if name in ("repeat", "tile"):
            return self.repeat(n)
        if name in MIXING or name.startswith("fft_"):
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name} may mix tokens")
        if name in NEW:  # sizes are given, so the result is replicated (and aligned where used)
            return None
        if name in ("cat", "concat", "concatenate"):
            return self.cat(n)
        if name == "stack":
            return self.stack(n)
        if name in SPLIT:
            return self.split(n)
        if name in ("view_as_complex", "view_as_real"):
            return self.last_dim_view(n)
        if name in VIEW:
            return self.view(n)
        if name in REDUCE:
            return self.reduce(n)
        if name in ("layer_norm", "rms_norm"):
            return self.norm(n)
        if name == "linear":
            return self.linear(n)
        if name in ("matmul", "bmm", "mm"):
            return self.matmul(n)
        return self.pointwise(n, sharded)

    # -- rules -----------------------------------------------------------------------------------
    def pointwise(self, n: fx.Node, sharded):
        out = shape_of(n)
        if out is None:
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} of a sharded value is not a tensor")
        r = len(out)
        if name_of(n) in DTYPE_ONLY:
            sharded = [(a, s) for a, s in sharded if a is n.args[0]]
            if not sharded:
                return None
        places = {(s.dim - len(shape_of(a)) + r, s.axis) for a, s in sharded}
        if len(places) != 1:
            raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} combines differently sharded values")
        dim, axis = places.pop()
        if dim < 0 or out[dim] != axis.length:
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} changes the token dim ({axis.length} -> "
                                                  f"{out[dim] if dim >= 0 else 'gone'})")
        if name_of(n) not in DTYPE_ONLY:
            for a in n.all_input_nodes:
                shp = shape_of(a)
                if self.lay(a) is not None or shp is None:
                    continue
                q = dim - r + len(shp)
                if q >= 0 and shp[q] == axis.length and axis.length > 1:
                    self.align(n, a, q, axis)
        return Sharded(dim, axis)

    def getitem(self, n: fx.Node):
        src, idx = n.args
        lay = self.lay(src)
        if isinstance(lay, tuple):
            return lay[idx]
        if isinstance(lay, list):
            return lay[idx]
        new_idx, out, _ = index_layout(n, idx, len(shape_of(src)), lay, self.p.rank)
        if new_idx is not idx:
            self.p.new_args[n] = (n.target, (src, new_idx), dict(n.kwargs))
        return out

    def setitem(self, n: fx.Node):
        target, idx, value = n.args
        lay = self.lay(target)
        if lay is None:
            raise Refused(Why.MIXED_AXES, n, "a sharded value is written into a replicated tensor")
        new_idx, region, region_ndim = index_layout(n, idx, len(shape_of(target)), lay, self.p.rank)
        if new_idx is not idx:
            # A token range (CogView4 writes RoPE into the image part of the joint sequence): each
            # rank writes its part of the range, given in local bounds.
            self.p.new_args[n] = (n.target, (target, new_idx, value), dict(n.kwargs))
        if isinstance(value, fx.Node):
            vlay, vshp = self.lay(value), shape_of(value)
            if vlay is None and vshp is not None:
                # The value broadcasts into the indexed region, aligned on the right.
                q = region.dim - region_ndim + len(vshp)
                if q >= 0 and vshp[q] == region.axis.length:
                    self.align(n, value, q, region.axis)
            elif vlay is not None and vlay.axis != region.axis:
                raise Refused(Why.MIXED_AXES, n, "assignment between differently sharded values")
        return None

    def cat(self, n: fx.Node):
        tensors = list(arg(n, 0, "tensors"))
        out = shape_of(n)
        dim = norm_dim(arg(n, 1, "dim", 0), len(out))
        lays = [self.lay(t) for t in tensors]
        token_dims = {s.dim for s in lays if s is not None}
        if len(token_dims) != 1:
            raise Refused(Why.MIXED_AXES, n, "cat of values sharded on different dims")
        tok = token_dims.pop()
        if dim != tok:
            return self.pointwise(n, [(t, s) for t, s in zip(tensors, lays) if s is not None])
        axis = None
        for t, s in zip(tensors, lays):
            if s is None:  # a replicated operand joins the sharded sequence: take its even shard
                s = Sharded(tok, Axis.even(shape_of(t)[tok], self.p.world))
                self.align(n, t, tok, s.axis)
            axis = s.axis if axis is None else axis.cat(s.axis)
        return Sharded(tok, axis)

    def stack(self, n: fx.Node):
        tensors = list(arg(n, 0, "tensors"))
        out = shape_of(n)
        dim = norm_dim(arg(n, 1, "dim", 0), len(out))
        sharded = [(t, self.lay(t)) for t in tensors if self.lay(t) is not None]
        axes = {(s.dim, s.axis) for _, s in sharded}
        if len(axes) != 1:
            raise Refused(Why.MIXED_AXES, n, "stack of differently sharded values")
        tok, axis = axes.pop()
        for t in tensors:
            if self.lay(t) is None:
                self.align(n, t, tok, axis)
        return Sharded(tok + 1 if tok >= dim else tok, axis)

    def split(self, n: fx.Node):
        src = n.args[0]
        lay = self.lay(src)
        shp = shape_of(src)
        name = name_of(n)
        dim_pos = {"unbind": 1}.get(name, 2)
        dim = norm_dim(arg(n, dim_pos, "dim", 0), len(shp))
        outs = _fx.fake_value(n)
        if dim != lay.dim:
            if name == "unbind":
                return tuple(Sharded(lay.dim - (dim < lay.dim), lay.axis) for _ in outs)
            return tuple(Sharded(lay.dim, lay.axis) for _ in outs)
        if name in ("unbind", "tensor_split"):
            raise Refused(Why.TOKEN_INDEXED, n, f"{name} along the token dim")
        sizes = [int(o.shape[dim]) for o in outs]
        result, bounds, start = [], [], 0
        for size in sizes:
            sliced = lay.axis.slice(start, start + size)
            if sliced is None:
                raise Refused(Why.TOKEN_INDEXED, n, "token split whose parts are not contiguous on a rank")
            result.append(Sharded(dim, sliced[0]))
            bounds.append(sliced[1])
            start += size
        # On every rank (so that all ranks decide alike) the local parts must tile the local tokens
        # in order, for a local split to produce them.
        for r in range(self.p.world):
            pos = 0
            for part in bounds:
                lo, hi = part[r]
                if hi > lo and lo != pos:
                    raise Refused(Why.TOKEN_INDEXED, n, "token split whose parts are reordered on a rank")
                pos = hi if hi > lo else pos
        local = [part[self.p.rank][1] - part[self.p.rank][0] for part in bounds]
        self.p.new_args[n] = (torch.split, (src, local), {"dim": dim})
        return tuple(result)

    def last_dim_view(self, n: fx.Node):
        lay = self.lay(n.args[0])
        if lay.dim == len(shape_of(n.args[0])) - 1:
            raise Refused(Why.TOKEN_DIM_RESHAPED, n, f"{name_of(n)} on the token dim")
        return Sharded(lay.dim, lay.axis)

    def view(self, n: fx.Node):
        src = n.args[0]
        lay = self.lay(src)
        for a in n.all_input_nodes[1:]:
            if self.lay(a) != lay and shape_of(a) is not None:
                raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} against a differently sharded shape")
        if not isinstance(lay, Sharded):
            raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} of a value whose layout is unknown")
        dim = track_dim(n, src, lay)
        if dim is None:  # the token dim is split or merged: a token grid (grid.py)
            g = self.to_grid(n, src, lay, meta_view(n))
            self.grid_sizes(n, g)
            return self.grid_done(n, g)
        name = name_of(n)
        if name in SIZED:
            sizes, rebuild = size_args(n)
            if sizes is None:
                raise Refused(Why.DYNAMIC_SHAPES, n, f"{name} with computed sizes")
            if sizes[dim] not in (-1, lay.axis.local_len(self.p.rank)):
                if sizes[dim] != lay.axis.length:
                    raise Refused(Why.TOKEN_DIM_RESHAPED, n, f"{name} size {sizes[dim]} at the token dim")
                sizes = list(sizes)
                sizes[dim] = lay.axis.local_len(self.p.rank)
                self.p.new_args[n] = (n.target, *rebuild(sizes))
        return Sharded(dim, lay.axis)

    def pad(self, n: fx.Node):
        """``F.pad``: pairs of widths for the last dims, last dim first; tokens must not be padded."""
        lay = self.lay(n.args[0])
        widths = arg(n, 1, "pad")
        ndim = len(shape_of(n.args[0]))
        k = ndim - 1 - lay.dim  # position of the token dim counted from the last
        if len(widths) > 2 * k and (widths[2 * k] or widths[2 * k + 1]):
            raise Refused(Why.TOKEN_DIM_RESHAPED, n, "padding of the token dim")
        return lay

    def along_other_dim(self, n: fx.Node, dim_pos: int):
        """An op acting along one explicit dim (repeat_interleave: GQA head repetition)."""
        lay = self.lay(n.args[0])
        d = arg(n, dim_pos, "dim")
        if not isinstance(lay, Sharded) or d is None or norm_dim(d, len(shape_of(n.args[0]))) == lay.dim:
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} along the token dim (or flattened)")
        return lay

    def repeat(self, n: fx.Node):
        """``x.repeat(*sizes)`` / ``torch.tile``: per token when the token dim is repeated once
        (Lumina-Next repeats K heads: ``key.unsqueeze(3).repeat(1, 1, 1, n_rep, 1)``)."""
        lay = self.lay(n.args[0])
        if not isinstance(lay, Sharded) or any(self.lay(a) is not None for a in n.all_input_nodes[1:]):
            raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} of several sharded values")
        sizes = n.args[1:] if name_of(n) == "repeat" else (arg(n, 1, "dims"),)
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        ndim = len(shape_of(n.args[0]))
        if not sizes or not all(isinstance(x, int) for x in sizes):
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} with sizes {sizes!r} may mix tokens")
        lead = max(len(sizes) - ndim, 0)  # sizes longer than the rank add leading dims
        pad = max(ndim - len(sizes), 0)  # shorter (tile): ones on the left
        if ((1,) * pad + tuple(sizes))[lead + lay.dim] != 1:
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} repeats the token dim")
        return Sharded(lead + lay.dim, lay.axis)

    def reduce(self, n: fx.Node):
        src = n.args[0] if n.args else n.kwargs.get("input")
        if isinstance(arg(n, 1, "other"), fx.Node):  # torch.max(a, b) and friends are pointwise
            return self.pointwise(n, [(a, self.lay(a)) for a in n.all_input_nodes if self.lay(a) is not None])
        lay = self.lay(src)
        if not isinstance(lay, Sharded) or any(self.lay(a) is not None for a in n.all_input_nodes[1:]):
            raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} of several sharded values")
        ndim = len(shape_of(src))
        d = arg(n, 1, "dim")
        dims = set(range(ndim)) if d is None else {
            norm_dim(x, ndim) for x in (d if isinstance(d, (tuple, list)) else (d,))}
        if lay.dim in dims:
            if name_of(n) in ("sum", "mean") and isinstance(_fx.fake_value(n), torch.Tensor):
                # this rank's partial sum (a mean: scaled to its share of the tokens), all-reduced
                share = lay.axis.local_len(self.p.rank) / lay.axis.length if name_of(n) == "mean" else 1.0
                self.p.reductions.append((n, share))
                return None
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} over the token dim")
        out = _fx.fake_value(n)
        first = out[0] if isinstance(out, (tuple, list)) else out
        dim = lay.dim if first.dim() == ndim else lay.dim - sum(1 for x in dims if x < lay.dim)
        if isinstance(out, (tuple, list)):
            return tuple(Sharded(dim, lay.axis) for _ in out)
        return Sharded(dim, lay.axis)

    def norm(self, n: fx.Node):
        lay = self.lay(n.args[0])
        if not isinstance(lay, Sharded) or any(self.lay(a) is not None for a in n.all_input_nodes[1:]):
            raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} with sharded weights")
        ndim = len(shape_of(n.args[0]))
        if lay.dim >= ndim - len(arg(n, 1, "normalized_shape")):
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} over the token dim")
        return lay

    def linear(self, n: fx.Node):
        lay = self.lay(n.args[0])
        if not isinstance(lay, Sharded) or any(self.lay(a) is not None for a in n.all_input_nodes[1:]):
            raise Refused(Why.MIXED_AXES, n, "linear with sharded weights")
        if lay.dim == len(shape_of(n.args[0])) - 1:
            raise Refused(Why.TOKEN_MIXING_OP, n, "linear over the token dim")
        return lay

    def matmul(self, n: fx.Node):
        a, b = n.args[0], n.args[1]
        la, lb = self.lay(a), self.lay(b)
        sa, sb, out = shape_of(a), shape_of(b), shape_of(n)
        if la is not None and lb is not None:
            if (len(sa) >= 2 and len(sb) >= 2 and la.dim == len(sa) - 1 and lb.dim == len(sb) - 2
                    and la.axis == lb.axis):
                self.p.reductions.append((n, 1.0))  # contracting the token dim: a partial sum
                return None
            raise Refused(Why.TOKEN_MIXING_OP, n, "matmul of two sharded values (attention written as matmuls)")
        if la is not None:
            if la.dim == len(sa) - 1:
                raise Refused(Why.TOKEN_MIXING_OP, n, "matmul contracting the token dim")
            dim, axis, other, other_shape = la.dim - len(sa) + len(out), la.axis, b, sb
        else:
            if len(sb) >= 2 and lb.dim == len(sb) - 2:
                raise Refused(Why.TOKEN_MIXING_OP, n, "matmul contracting the token dim")
            dim, axis, other, other_shape = lb.dim - len(sb) + len(out), lb.axis, a, sa
        if dim < len(out) - 2:  # a batch dim: the other operand broadcasts like a pointwise op
            q = dim - len(out) + len(other_shape)
            if q >= 0 and q < len(other_shape) - 2 and other_shape[q] == axis.length:
                self.align(n, other, q, axis)
        return Sharded(dim, axis)

    def sdpa(self, n: fx.Node):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = {k: arg(n, i, k) for i, k in enumerate(names)}
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        lq, lk, lv = self.lay(q), self.lay(k), self.lay(v)
        if lk != lv:
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "key and value are sharded differently")
        if self.lay(mask) is not None:
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "a sharded attention mask")
        sq, sk = shape_of(q), shape_of(k)
        if lq is not None and lq.dim < len(sq) - 2 and lk in (None, lq):
            # The tokens index separate attentions (Latte's temporal attention: one sequence of
            # frames per token): each rank attends for its own tokens, with no exchange.
            for other in (k, v, mask):
                shp = shape_of(other)
                d = lq.dim - len(sq) + len(shp) if shp is not None else -1
                if self.lay(other) is None and d >= 0 and shp[d] == lq.axis.length > 1:
                    self.align(n, other, d, lq.axis)
            return lq
        for name, s, shp in (("query", lq, sq), ("key", lk, sk)):
            if s is not None and (len(shp) != 4 or s.dim != 2):
                raise Refused(Why.ATTENTION_UNSUPPORTED, n,
                              f"{name} is not (batch, heads, tokens, dim) sharded on tokens")
        expand = 1
        if sq[1] != sk[1] and (sq[1] % self.p.world or sk[1] % self.p.world):
            # Grouped-query attention: contiguous head ranges keep query groups with their key head
            # only when both head counts split evenly; otherwise K and V are repeated to one head
            # per query head first (plain multi-head attention, more bytes on the wire).
            if sk[1] == 0 or sq[1] % sk[1]:
                raise Refused(Why.ATTENTION_UNSUPPORTED, n, f"grouped-query attention with {sq[1]} query "
                                                             f"and {sk[1]} key heads")
            expand = sq[1] // sk[1]
        att = Attention(n, "", q, k, v, lq.axis if lq else None, lk.axis if lk else None,
                        heads=sq[1], head_dim=sq[3], batch=sq[0], mask=mask, kv_heads=sk[1] * expand,
                        expand_kv=expand)
        mshape = shape_of(mask)
        if lq is not None and lk is not None:
            if a["is_causal"] and not (lq.axis.is_natural_order() and lk.axis.is_natural_order()):
                raise Refused(Why.ATTENTION_UNSUPPORTED, n, "causal attention over a reordered joint sequence")
            att.kind = "ulysses"
            if mshape is not None:
                takes = [(len(mshape) - 1, lk.axis.gathered_order())] if mshape[-1] > 1 else []
                if len(mshape) >= 2 and mshape[-2] > 1:
                    takes.append((len(mshape) - 2, lq.axis.gathered_order()))
                if len(mshape) == 4 and mshape[1] > 1:
                    hc = -(-sq[1] // self.p.world)
                    if hc * self.p.world != sq[1]:
                        raise Refused(Why.ATTENTION_UNSUPPORTED, n, "a per-head mask with heads not divisible by ranks")
                    takes.append((1, ((self.p.rank * hc, hc),)))
                att.mask_takes = tuple(takes)
            out = Sharded(2, lq.axis)
        elif lq is not None:
            if a["is_causal"]:
                raise Refused(Why.ATTENTION_UNSUPPORTED, n, "causal attention with sharded queries only")
            att.kind = "local"
            if mshape is not None and len(mshape) >= 2 and mshape[-2] > 1:
                att.mask_takes = ((len(mshape) - 2, self.p.local(lq.axis)),)
            out = Sharded(2, lq.axis)
        else:
            att.kind = "gather_kv"
            out = None
        self.p.attentions.append(att)
        return out

    def flex(self, n: fx.Node):
        """``flex_attention`` (Dynamo's higher-order op) with sharded Q, K, V: Ulysses, like SDPA.

        After the exchange every rank attends over the whole sequence for its heads; the block
        mask, built for the whole sequence, applies once the gathered tokens are put in logical
        order (a joint sequence gathers rank by rank: ``Attention.logical``). The mask and score
        functions must not read the head index (a rank's heads are renumbered from 0)."""
        q, k, v, score_mod, block_mask = n.args[:5]
        lq, lk, lv = self.lay(q), self.lay(k), self.lay(v)
        sq, sk = shape_of(q), shape_of(k)
        if lq is None or lk is None or lk != lv or lq.dim != 2 or lk.dim != 2 or len(sq) != 4 or sq[1] != sk[1]:
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "flex_attention with Q, K, V not all sharded on tokens "
                                                        "(or grouped-query heads)")
        others = [a for a in n.all_input_nodes if a not in (q, k, v)]
        mask_nodes: list[fx.Node] = []
        fx.node.map_arg(block_mask, mask_nodes.append)
        if any(self.lay(a) is not None for a in others):
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "flex_attention with a sharded mask or buffer")
        for a in others:
            shp = shape_of(a)
            if a.op == "get_attr":
                fn = getattr(a.graph.owning_module, a.target)
                heads = [p for p in fn.graph.nodes if p.op == "placeholder"]
                head = heads[2] if a is score_mod else heads[1]  # (score, b, h, q, kv) / (b, h, q, kv)
                if head.users:
                    raise Refused(Why.ATTENTION_UNSUPPORTED, n, f"flex_attention whose {a.target} reads the head index")
            elif shp is not None and len(shp) >= 2 and shp[1] > 1 and a in mask_nodes:
                raise Refused(Why.ATTENTION_UNSUPPORTED, n, "flex_attention with a per-head block mask")
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in n.users) or len(n.users) != 1:
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "flex_attention whose log-sum-exp is used")
        self.p.attentions.append(Attention(n, "ulysses", q, k, v, lq.axis, lk.axis, heads=sq[1], head_dim=sq[3],
                                           batch=sq[0], flex=True, logical=not (lq.axis.is_natural_order()
                                                                                and lk.axis.is_natural_order())))
        return (Sharded(2, lq.axis), None, None)

    def mha(self, n: fx.Node):
        import inspect

        import torch.nn.functional as F

        bound = inspect.signature(F.multi_head_attention_forward).bind(*n.args, **n.kwargs)
        bound.apply_defaults()
        a = bound.arguments
        for opt in ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v"):
            if a[opt] is not None:
                raise Refused(Why.ATTENTION_UNSUPPORTED, n, f"multi_head_attention_forward with {opt}")
        if a["add_zero_attn"] or a["need_weights"] or a["is_causal"]:
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "multi_head_attention_forward returning weights, "
                                                         "causal or with zero attention")
        lq, lk, lv = self.lay(a["query"]), self.lay(a["key"]), self.lay(a["value"])
        if lk != lv or lq is None or lq.dim != 0 or (lk is not None and lk.dim != 0):
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "multi_head_attention_forward not sharded on its "
                                                         "sequence dim (dim 0) for query, key and value alike")
        sq = shape_of(a["query"])
        self.p.attentions.append(Attention(n, "ulysses" if lk is not None else "local", a["query"], a["key"],
                                           a["value"], lq.axis, lk.axis if lk else None,
                                           heads=a["num_heads"], head_dim=sq[2] // a["num_heads"], batch=sq[1],
                                           mha=True))
        return (Sharded(0, lq.axis), None)

