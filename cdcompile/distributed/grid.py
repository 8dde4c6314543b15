"""Token grids: a sharded token axis reshaped into rows, for convolutions over the tokens.

Sana's Mix-FFN views its tokens as an image, ``(B, S, C) -> (B, H, W, C) -> (B, C, H, W)``, runs
a 3x3 depthwise convolution and flattens back; Sana-Video adds a temporal convolution over
frames; a 1-D convolution over the sequence is the same thing with rows of one token. A
convolution reads neighbouring rows, so a rank holding tokens ``[s, e)`` computes it on the
*rows* covering them plus ``k`` rows of *halo* on each side, fetched from the neighbouring ranks
by one all-to-all (:func:`cdcompile.distributed.ulysses.halo`); rows next to a rank's edge are
wrong after the convolution (zero padding where the image continues), the rows it keeps are
exact as long as ``k`` covers every convolution's reach. Flattening back gives the rows' tokens,
of which the rank keeps ``[s, e)`` again.

Which dims of a value hold which part of the grid is tracked with *atoms*: every dim is a list
of ``(id, size)`` factors, outer to inner, and a view op (unflatten, permute, view, flatten, ...)
only regroups and splits atoms (:func:`view_atoms` finds how from the op's strides on a
contiguous meta tensor). The token axis is a list of atoms ``tokens``; ``tokens[0]`` is split
over the ranks (the *rows*), every other atom is whole on every rank. So "which dim is the image
height", "are the tokens back in one dim, in order" and "what local size does this view need"
are all questions about atoms, with no assumption about the model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator

import torch
import torch.fx as fx

from ..passes import _fx
from ._token_ops import (DTYPE_ONLY, MIXING, REDUCE, SIZED, SPLIT, VIEW, Refused, Sharded, Why, arg, meta_view,
                         name_of, norm_dim, shape_of, size_args)
from .layout import Axis

Atom = tuple[int, int]  # (id, size)
_ids = itertools.count(1)


def fresh(size: int) -> tuple[Atom, ...]:
    """The atoms of a new dim of ``size`` (a dim of size 1 has none)."""
    return ((next(_ids), size),) if size != 1 else ()


@dataclasses.dataclass(frozen=True)
class Grid:
    """A value computed on each rank's rows of a token grid (see the module doc).

    ``rows[r]`` = rows ``[r0, r1)`` of ``tokens[0]`` held by rank r (its tokens plus halo);
    ``reach``: how many tokens the convolutions so far read across a row edge, i.e. how many
    tokens next to a rank's inner edges are not exact; ``origin``: the node before which the
    rows were exchanged (its halo is what ``reach`` must fit in).
    """

    dims: tuple[tuple[Atom, ...], ...]
    tokens: tuple[Atom, ...]
    axis: Axis
    rows: tuple[tuple[int, int], ...]
    reach: int
    origin: fx.Node

    @property
    def unit(self) -> int:
        """Tokens per row."""
        return math.prod(s for _, s in self.tokens[1:])

    @property
    def row(self) -> Atom:
        return self.tokens[0]

    def token_ids(self) -> set[int]:
        return {i for i, _ in self.tokens}

    def has_tokens(self, d: int) -> bool:
        ids = self.token_ids()
        return any(i in ids for i, _ in self.dims[d])

    def local_size(self, d: int, rank: int) -> int:
        r0, r1 = self.rows[rank]
        return math.prod(r1 - r0 if a == self.row else a[1] for a in self.dims[d])

    def with_dims(self, dims, reach: int | None = None) -> "Grid":
        return dataclasses.replace(self, dims=tuple(tuple(d) for d in dims),
                                   reach=self.reach if reach is None else reach)

    def token_run(self, d: int) -> tuple[int, int] | None:
        """``(i, j)`` when dim ``d`` holds exactly ``tokens[i:j]`` in order (and nothing else)."""
        atoms = self.dims[d]
        if not atoms or atoms[0] not in self.tokens:
            return None
        i = self.tokens.index(atoms[0])
        j = i + len(atoms)
        return (i, j) if self.tokens[i:j] == atoms else None


def rows_for(axis: Axis, unit: int, halo: int) -> tuple[tuple[int, int], ...]:
    """Per rank, the rows of ``unit`` tokens covering its tokens, plus ``halo`` rows each side."""
    n_rows = axis.length // unit
    out = []
    for pieces in axis.pieces:
        if not pieces:
            out.append((0, 0))
            continue
        (s, n), = pieces
        out.append((max(0, s // unit - halo), min(n_rows, -(-(s + n) // unit) + halo)))
    return tuple(out)


def exchange(axis: Axis, fetch: tuple[tuple[int, int], ...], rank: int):
    """The all-to-all that gives every rank the tokens ``fetch[r]`` (a logical range) from the
    ranks holding them: ``(send, recv)`` for ``rank``: local ``(lo, hi)`` sent to each rank, and
    token counts received from each rank. None when every rank fetches exactly its own tokens."""
    own = [p[0] if p else (0, 0) for p in axis.pieces]
    own = [(s, s + n) for s, n in own]
    if all(own[r] == fetch[r] or (own[r][0] == own[r][1] and fetch[r][0] == fetch[r][1])
           for r in range(axis.world)):
        return None
    s, e = own[rank]
    send = []
    for a, b in fetch:
        lo, hi = max(a, s), min(b, e)
        send.append((lo - s, hi - s) if hi > lo else (0, 0))
    a, b = fetch[rank]
    recv = tuple(max(0, min(b, e_j) - max(a, s_j)) for s_j, e_j in own)
    return tuple(send), recv


def view_atoms(in_dims, in_shape: tuple[int, ...], out: torch.Tensor):
    """The atoms of each dim of ``out``, a view of a contiguous tensor of ``in_shape`` whose dims
    hold ``in_dims``; and how input atoms were split (``{atom: (sub-atoms, outer to inner)}``).
    None when ``out`` is not a regrouping of the input's elements (dims that overlap, or elements
    left out). A broadcast (stride 0) dim gets a fresh atom."""
    # Every atom's stride in the contiguous input.
    flat = [a for d in in_dims for a in d]
    strides, acc = {}, 1
    for a in reversed(flat):
        strides[a] = acc
        acc *= a[1]
    if acc != math.prod(in_shape):
        return None
    cuts = set()
    for a in flat:
        cuts.update((strides[a], strides[a] * a[1]))
    for size, stride in zip(out.shape, out.stride()):
        if size > 1 and stride > 0:
            cuts.update((stride, stride * size))
    # Split atoms at every cut strictly inside them.
    parts: dict[Atom, tuple[Atom, ...]] = {}
    pieces = []  # (stride, atom) of the refined atoms
    for a in flat:
        lo, hi = strides[a], strides[a] * a[1]
        bounds = [lo, *sorted(c for c in cuts if lo < c < hi), hi]
        if any(bounds[i + 1] % bounds[i] for i in range(len(bounds) - 1)):
            return None
        subs = [(bounds[i], bounds[i + 1] // bounds[i]) for i in range(len(bounds) - 1)]
        if len(subs) == 1:
            pieces.append((lo, a))
        else:
            sub_atoms = [((next(_ids), size), st) for st, size in subs]
            parts[a] = tuple(x for x, _ in reversed(sub_atoms))
            pieces.extend((st, x) for x, st in sub_atoms)
    by_stride = dict(pieces)
    used: set[Atom] = set()
    dims = []
    for size, stride in zip(out.shape, out.stride()):
        if size == 1:
            dims.append(())
            continue
        if stride == 0:
            dims.append(fresh(size))
            continue
        atoms, st = [], stride
        while st < stride * size:
            a = by_stride.get(st)
            if a is None or a in used:
                return None
            atoms.append(a)
            used.add(a)
            st *= a[1]
        if st != stride * size:
            return None
        dims.append(tuple(reversed(atoms)))
    if len(used) != len(pieces):  # some input elements are not in the output
        return None
    return tuple(dims), parts


# -- the planner's rules for grids (mixed into sharding._Visitor) ---------------------------------

CONV = {"conv1d": 1, "conv2d": 2, "conv3d": 3}


class GridRules:
    """How ops map a :class:`Grid` (``self.p`` is the plan, ``self.lay`` the layout of a node,
    ``self.halo`` the halo rows granted per origin, ``self.need`` the halo rows found missing)."""

    p: "object"
    halo: dict
    need: dict

    # -- entering a grid -----------------------------------------------------------------------------
    def to_grid(self, n: fx.Node, src: fx.Node, lay: Sharded, out: torch.Tensor | None) -> Grid:
        """``src``'s token dim is regrouped by the view ``n`` (``out``: its meta output), or read by
        a convolution (``out`` None): exchange rows, and describe ``src`` as a grid from here."""
        axis = lay.axis
        if any(len(p) > 1 for p in axis.pieces) or not axis.is_natural_order():
            raise Refused(Why.TOKEN_DIM_RESHAPED, n, f"{name_of(n)} regroups a token dim that is not one "
                                                     "contiguous range per rank (a joint sequence)")
        shp = shape_of(src)
        tok = (next(_ids), axis.length)
        dims = [(tok,) if d == lay.dim else fresh(s) for d, s in enumerate(shp)]
        tokens: tuple[Atom, ...] = (tok,)
        if out is not None:
            res = view_atoms(dims, shp, out)
            if res is None:
                raise Refused(Why.TOKEN_DIM_RESHAPED, n, f"{name_of(n)} is not a regrouping of the tokens")
            dims, parts = res
            tokens = parts.get(tok, tokens)
        unit = axis.length // tokens[0][1]
        rows = rows_for(axis, unit, self.halo.get(n, 0))
        ex = exchange(axis, tuple((r0 * unit, r1 * unit) for r0, r1 in rows), self.p.rank)
        if ex is not None:
            self.p.halos.append((n, src, lay.dim, *ex))
        return Grid(tuple(dims), tokens, axis, rows, 0, n)

    # -- leaving it ----------------------------------------------------------------------------------
    def grid_done(self, n: fx.Node, g):
        """A dim holding all the tokens in order is a token dim again: keep this rank's tokens."""
        if not isinstance(g, Grid):
            return g
        for d, atoms in enumerate(g.dims):
            if atoms != g.tokens:
                continue
            unit, length = g.unit, g.axis.length
            for r, pieces in enumerate(g.axis.pieces):
                if not pieces:
                    continue
                (s, k), = pieces
                r0, r1 = g.rows[r]
                lo = 0 if r0 == 0 else r0 * unit + g.reach
                hi = length if r1 * unit == length else r1 * unit - g.reach
                if s < lo or s + k > hi:  # the halo is short: plan again with more (sharding.plan)
                    self.need[g.origin] = max(self.need.get(g.origin, 0), -(-g.reach // unit))
            pieces = g.axis.pieces[self.p.rank]
            s, k = pieces[0] if pieces else (0, 0)
            r0, r1 = g.rows[self.p.rank]
            if (s, k) != (r0 * unit, (r1 - r0) * unit):
                self.p.narrows.append((n, d, ((s - r0 * unit, k),)))
            return Sharded(d, g.axis)
        return g

    # -- ops on a grid -------------------------------------------------------------------------------
    def grid_op(self, n: fx.Node, sharded):
        name = name_of(n)
        if n.target is operator.getitem:
            lay = self.lay(n.args[0])
            if isinstance(lay, (tuple, list)):
                return lay[n.args[1]]
            raise Refused(Why.TOKEN_INDEXED, n, "indexing into a token grid")
        if any(not isinstance(s, Grid) for _, s in sharded):
            raise Refused(Why.MIXED_AXES, n, f"{name} combines a token grid with otherwise sharded values")
        g = sharded[0][1]
        for _, o in sharded[1:]:
            if (o.tokens, o.rows, o.origin) != (g.tokens, g.rows, g.origin):
                raise Refused(Why.MIXED_AXES, n, f"{name} combines two different token grids")
        g = dataclasses.replace(g, reach=max(o.reach for _, o in sharded))
        if name in VIEW:
            return self.grid_done(n, self.grid_view(n, g))
        if name in SPLIT:
            return self.grid_split(n, g)
        if name in ("layer_norm", "rms_norm"):
            k = len(arg(n, 1, "normalized_shape"))
            return self.grid_keep(n, g, range(len(g.dims) - k, len(g.dims)))
        if name == "linear":
            self.grid_keep(n, g, [len(g.dims) - 1])
            return g.with_dims(g.dims[:-1] + (fresh(shape_of(n)[-1]),))
        if name in REDUCE:
            return self.grid_reduce(n, g)
        if name == "scaled_dot_product_attention":
            return self.grid_sdpa(n, g)
        if name in MIXING or name in _NOT_PER_ELEMENT or name.startswith("fft_"):
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name} of a token grid")
        return self.grid_done(n, self.grid_pointwise(n, g, sharded))

    def grid_keep(self, n: fx.Node, g: Grid, dims) -> Grid:
        for d in dims:
            if g.has_tokens(d):
                raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} across the dims of a token grid")
        return g

    def grid_view(self, n: fx.Node, g: Grid) -> Grid:
        src = n.args[0]
        if any(self.lay(a) is not None for a in n.all_input_nodes[1:]):
            raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} of a token grid against another sharded value")
        out = meta_view(n)
        res = view_atoms(g.dims, shape_of(src), out) if out is not None else None
        if res is None:
            raise Refused(Why.TOKEN_DIM_RESHAPED, n, f"{name_of(n)} is not a regrouping of the token grid")
        dims, parts = res
        if g.row in parts:
            raise Refused(Why.TOKEN_DIM_RESHAPED, n, f"{name_of(n)} splits the sharded rows of a token grid")
        tokens = tuple(x for a in g.tokens for x in parts.get(a, (a,)))
        g = dataclasses.replace(g, dims=dims, tokens=tokens)
        self.grid_sizes(n, g)
        return g

    def grid_sizes(self, n: fx.Node, g: Grid) -> None:
        """A view's size arguments, made this rank's (the rows' dim holds ``r1 - r0`` rows)."""
        name = name_of(n)
        if name == "unflatten":
            dim = norm_dim(arg(n, 1, "dim"), len(shape_of(n.args[0])))
            sizes = arg(n, 2, "sizes")
            local = tuple(g.local_size(d, self.p.rank) for d in range(dim, dim + len(sizes)))
            if tuple(sizes) != local:
                args = list(n.args) + [None] * (3 - len(n.args))
                kwargs = {k: v for k, v in n.kwargs.items() if k not in ("dim", "sizes")}
                args[1], args[2] = dim, local
                self.p.new_args[n] = (n.target, tuple(args), kwargs)
        elif name in SIZED:
            sizes, rebuild = size_args(n)
            if sizes is None:
                raise Refused(Why.DYNAMIC_SHAPES, n, f"{name} with computed sizes")
            local = [g.local_size(d, self.p.rank) for d in range(len(g.dims))]
            if len(sizes) != len(local):
                raise Refused(Why.TOKEN_DIM_RESHAPED, n, f"{name} adding dims to a token grid")
            local = [s if s == -1 and name == "expand" else v for s, v in zip(sizes, local)]
            if list(sizes) != local:
                self.p.new_args[n] = (n.target, *rebuild(local))
        elif name in ("view_as", "reshape_as", "expand_as"):
            raise Refused(Why.TOKEN_DIM_RESHAPED, n, f"{name} of a token grid")

    def grid_split(self, n: fx.Node, g: Grid):
        name = name_of(n)
        dim = norm_dim(arg(n, {"unbind": 1}.get(name, 2), "dim", 0), len(g.dims))
        self.grid_keep(n, g, [dim])
        outs = _fx.fake_value(n)
        if name == "unbind":
            return tuple(g.with_dims(g.dims[:dim] + g.dims[dim + 1:]) for _ in outs)
        return tuple(g.with_dims(g.dims[:dim] + (fresh(o.shape[dim]),) + g.dims[dim + 1:]) for o in outs)

    def grid_reduce(self, n: fx.Node, g: Grid):
        ndim = len(g.dims)
        d = arg(n, 1, "dim")
        if isinstance(d, fx.Node) or isinstance(arg(n, 1, "other"), fx.Node):
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} of a token grid and another value")
        dims = set(range(ndim)) if d is None else {norm_dim(x, ndim) for x in (d if isinstance(d, (tuple, list))
                                                                                   else (d,))}
        self.grid_keep(n, g, dims)
        out = _fx.fake_value(n)
        first = out[0] if isinstance(out, (tuple, list)) else out
        if first.dim() == ndim:
            kept = tuple(() if i in dims and first.shape[i] == 1 else a for i, a in enumerate(g.dims))
        else:
            kept = tuple(a for i, a in enumerate(g.dims) if i not in dims)
        res = g.with_dims(kept)
        return tuple(res for _ in out) if isinstance(out, (tuple, list)) else res

    def grid_pointwise(self, n: fx.Node, g: Grid, sharded) -> Grid:
        """Elementwise and broadcasting ops (``g``: the operands' grid, with their largest reach)."""
        out = shape_of(n)
        if out is None:
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} of a token grid is not a tensor")
        r = len(out)
        if name_of(n) in DTYPE_ONLY:
            if n.args[0] is not sharded[0][0]:
                return None
            return g
        ids = g.token_ids()
        dims = []
        for d in range(r):
            atoms = None
            for a, s in sharded:
                q = d - r + len(s.dims)
                if q < 0 or not s.dims[q]:
                    continue
                if atoms is not None and [x for x in atoms if x[0] in ids] != [x for x in s.dims[q] if x[0] in ids]:
                    raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} combines different dims of a token grid")
                atoms = s.dims[q] if atoms is None or len(s.dims[q]) > len(atoms) else atoms
            dims.append(atoms if atoms is not None else fresh(out[d]))
        res = g.with_dims(dims)
        for a in n.all_input_nodes:
            shp = shape_of(a)
            if self.lay(a) is not None or shp is None:
                continue
            for q in range(len(shp)):
                d = q - len(shp) + r
                if shp[q] == 1 or d < 0 or g.row not in res.dims[d]:
                    continue
                self.p.aligns.append((n, a, q, self.row_ranges(n, res.dims[d], g)))
        return res

    def row_ranges(self, n: fx.Node, atoms: tuple[Atom, ...], g: Grid) -> tuple[tuple[int, int], ...]:
        """The ``(start, length)`` ranges of a dim made of ``atoms`` that this rank's rows cover
        (one per combination of the atoms outside the rows: Latte's ``batch * tokens``)."""
        i = atoms.index(g.row)
        outer = math.prod(x[1] for x in atoms[:i])
        inner = math.prod(x[1] for x in atoms[i + 1:])
        if outer > 64:
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} of a replicated value along a dim merging a "
                                                  "token grid's rows with large other dims")
        r0, r1 = g.rows[self.p.rank]
        rows = g.row[1]
        return tuple(((o * rows + r0) * inner, (r1 - r0) * inner) for o in range(outer))

    def grid_sdpa(self, n: fx.Node, g: Grid) -> Grid:
        """Attention whose rows are in the batch (or head) dims: one attention per row, over tokens
        each rank holds whole. Latte's temporal attention over frames (a row per token) and
        Wan-Animate's per-frame cross-attention to face tokens (a row per frame) are local.
        Replicated key/value/mask with a batch entry per row are aligned to this rank's rows."""
        names = ("query", "key", "value", "attn_mask")
        q, k, v, mask = (arg(n, i, name) for i, name in enumerate(names))
        lq = self.lay(q)
        nd = len(lq.dims) if isinstance(lq, Grid) else 0
        if not isinstance(lq, Grid) or any(g.row in lq.dims[d] for d in (nd - 2, nd - 1)):
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "attention across the rows of a token grid")
        ids = g.token_ids()

        def batch_tokens(lay):
            return tuple(tuple(a for a in d if a[0] in ids) for d in lay.dims[:-2])

        lk, lv = self.lay(k), self.lay(v)
        if (lk is None) != (lv is None):
            raise Refused(Why.ATTENTION_UNSUPPORTED, n, "key and value of a token grid sharded differently")
        for lay in (lk, lv):
            if lay is not None and (not isinstance(lay, Grid) or batch_tokens(lay) != batch_tokens(lq)
                                    or any(g.row in lay.dims[d] for d in (nd - 2, nd - 1))):
                raise Refused(Why.ATTENTION_UNSUPPORTED, n, "attention across the rows of a token grid")
        for other in (k, v, mask) if lk is None else (mask,):
            shp = shape_of(other)
            for q_ in range(len(shp) if shp is not None else 0):
                d = q_ - len(shp) + nd
                if d < 0 or shp[q_] == 1 or g.row not in lq.dims[d]:
                    continue
                if d >= nd - 2:
                    raise Refused(Why.ATTENTION_UNSUPPORTED, n, "an attention mask across the rows of a token grid")
                self.p.aligns.append((n, other, q_, self.row_ranges(n, lq.dims[d], g)))
        return g.with_dims(lq.dims[:-1] + (fresh(shape_of(n)[-1]),))

    def conv(self, n: fx.Node):
        """``F.conv{1,2,3}d`` reading a sharded value: along the tokens it needs a halo (a grid of
        rows of one token); tokens as the batch are per token; tokens as channels mix."""
        x = n.args[0] if n.args else n.kwargs["input"]
        lay = self.lay(x)
        if any(self.lay(a) is not None for a in n.all_input_nodes if a is not x):
            raise Refused(Why.MIXED_AXES, n, f"{name_of(n)} with sharded weights")
        if isinstance(lay, Grid):
            return self.grid_done(n, self.conv_on(n, lay))
        if not isinstance(lay, Sharded) or lay.dim == 1 or len(shape_of(x)) != CONV[name_of(n)] + 2:
            raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} over sharded channels or unbatched")
        if lay.dim == 0:
            return lay
        return self.grid_done(n, self.conv_on(n, self.to_grid(n, x, lay, None)))

    def conv_on(self, n: fx.Node, g: Grid) -> Grid:
        nd = CONV[name_of(n)]
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        a = {k: arg(n, i, k) for i, k in enumerate(names)}
        shp, out, wshape = shape_of(a["input"]), shape_of(n), shape_of(a["weight"])
        if len(shp) != nd + 2:
            raise Refused(Why.TOKEN_MIXING_OP, n, f"unbatched {name_of(n)} of a token grid")
        self.grid_keep(n, g, [1])

        def per_dim(v, default):
            v = default if v is None else v
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd

        stride, dilation = per_dim(a["stride"], 1), per_dim(a["dilation"], 1)
        dims, reach = list(g.dims), g.reach
        dims[1] = fresh(out[1])
        for i in range(nd):
            d = 2 + i
            if not g.has_tokens(d):
                if out[d] != shp[d]:
                    dims[d] = fresh(out[d])
                continue
            run = g.token_run(d)
            k = wshape[2 + i]
            if run is None or out[d] != shp[d] or stride[i] != 1 or k % 2 == 0:
                raise Refused(Why.TOKEN_MIXING_OP, n, f"{name_of(n)} along a token grid dim that mixes other "
                                                      "dims, is strided or changes its size")
            if run[0] == 0:  # along the rows: reads dilation * (k - 1) / 2 rows beyond each edge
                reach += dilation[i] * (k - 1) // 2 * math.prod(s for _, s in g.tokens[run[1]:])
        return g.with_dims(dims, reach)


# Ops whose output elements are not each a function of the same element of the inputs.
_NOT_PER_ELEMENT = {"scaled_dot_product_attention", "multi_head_attention_forward", "pad", "repeat_interleave",
                    "cat", "concat", "concatenate", "stack", "matmul", "bmm", "mm", "view_as_complex",
                    "view_as_real", "setitem"}
