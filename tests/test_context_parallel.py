"""Ulysses context parallelism (cdcompile/passes/context_parallel.py) on CPU with gloo.

Each world size (2 and 3) is one ``torch.multiprocessing.spawn`` running every scenario below in
the same processes (a process start costs seconds on 2 cores); the per-rank results are saved
and the tests assert on them. References are computed in the same processes, single-process
(the uncompiled model, or the backend with ``ulysses_degree=1``).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cdcompile import CacheConfig
from cdcompile.distributed.layout import Axis, even_sizes

# -- layout algebra (single process) -------------------------------------------------------------


@given(st.integers(0, 5000), st.integers(1, 8))
def test_even_split_gives_the_first_ranks_one_more_token(length, world):
    axis = Axis.even(length, world)
    lens = axis.local_lens()
    assert sum(lens) == length and max(lens) - min(lens) <= 1
    assert lens == sorted(lens, reverse=True) == even_sizes(length, world)


@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 6))
def test_cat_then_slice_gives_back_each_part_with_its_local_bounds(a, b, world):
    x, y = Axis.even(a, world), Axis.even(b, world)
    joint = x.cat(y)
    assert joint.local_lens() == [p + q for p, q in zip(x.local_lens(), y.local_lens())]
    left, lb = joint.slice(0, a)
    right, rb = joint.slice(a, a + b)
    assert left == x and right == y
    for r in range(world):  # on every rank the text part comes first, then the image part
        assert lb[r] in ((0, x.local_len(r)), (0, 0)) and rb[r][1] - rb[r][0] == y.local_len(r)


@given(st.integers(1, 200), st.integers(1, 200), st.integers(1, 5))
def test_gathered_order_and_gather_ranges_invert_the_sharding(a, b, world):
    joint = Axis.even(a, world).cat(Axis.even(b, world))
    logical = torch.arange(a + b)
    shards = [torch.cat([logical[s:s + n] for s, n in p]) if p else logical[:0] for p in joint.pieces]
    gathered = torch.cat(shards)  # what an all-to-all assembles
    assert torch.equal(gathered, torch.cat([logical[s:s + n] for s, n in joint.gathered_order()]))
    block = max(joint.local_lens())
    padded = torch.cat([torch.cat([s, s.new_full((block - len(s),), -1)]) for s in shards])
    assert torch.equal(torch.cat([padded[o:o + n] for o, n in joint.gather_ranges(block)]), logical)


def test_a_slice_that_is_not_one_local_range_is_refused():
    joint = Axis.even(4, 2).cat(Axis.even(4, 2))  # rank 0 holds logical [0, 2) then [4, 6)
    assert joint.slice(1, 5)[1] == [(1, 3), (0, 2)]
    odd = Axis(4, (((0, 1), (2, 1), (1, 1)), ((3, 1),)))  # rank 0 holds logical 0, 2, 1
    assert odd.slice(0, 2) is None


def test_ulysses_options_are_validated():
    with pytest.raises(ValueError, match="ulysses_degree.*>= 1"):
        CacheConfig(ulysses_degree=0)
    with pytest.raises(ValueError, match="ulysses_fp8"):
        CacheConfig(ulysses_degree=2, ulysses_fp8=1)
    with pytest.warns(UserWarning, match="ulysses_async=True is ignored"):
        CacheConfig(ulysses_async=True)


def test_ulysses_degree_without_a_process_group_says_how_to_launch():
    from cdcompile.testing import SequentialDiT

    gm, ex, _ = _capture(SequentialDiT().eval(), dict(x=torch.randn(1, 9, 8), timestep=torch.tensor([0.5])))
    from cdcompile.backend import build

    with pytest.raises(ValueError, match="ulysses_degree=2 needs torch.distributed initialised"):
        build(gm, ex, CacheConfig(compiler="eager", ulysses_degree=2))


# -- token grids (single process) ----------------------------------------------------------------

def test_rows_cover_each_rank_s_tokens_plus_the_halo_clipped_at_the_image_edges():
    from cdcompile.distributed.grid import rows_for

    axis = Axis.even(35, 3)  # 5 rows of 7 tokens; ranks hold [0, 12), [12, 24), [24, 35)
    assert rows_for(axis, 7, 0) == ((0, 2), (1, 4), (3, 5))
    assert rows_for(axis, 7, 1) == ((0, 3), (0, 5), (2, 5))


@given(st.integers(1, 300), st.integers(1, 6), st.integers(1, 20), st.integers(0, 3))
def test_the_halo_exchange_delivers_exactly_the_fetched_range_in_order(length, world, unit, halo):
    from cdcompile.distributed.grid import exchange, rows_for

    length = length * unit  # whole rows
    axis = Axis.even(length, world)
    rows = rows_for(axis, unit, halo)
    fetch = tuple((r0 * unit, r1 * unit) for r0, r1 in rows)
    plans = [exchange(axis, fetch, r) for r in range(world)]
    tokens = torch.arange(length)
    own = [tokens[s:s + n] if p else tokens[:0] for p in axis.pieces for s, n in (p or [(0, 0)])]
    if plans[0] is None:  # nothing to move: every rank already holds what it fetches
        assert all(torch.equal(own[r], tokens[a:b]) for r, (a, b) in enumerate(fetch))
        return
    for r in range(world):
        received = [own[j][slice(*plans[j][0][r])] for j in range(world)]
        assert [len(x) for x in received] == list(plans[r][1])
        assert torch.equal(torch.cat(received), tokens[fetch[r][0]:fetch[r][1]])


def test_view_atoms_follow_unflatten_permute_and_flatten_of_the_tokens():
    from cdcompile.distributed.grid import view_atoms

    t, c = (1, 35), (2, 8)
    x = torch.empty(1, 35, 8, device="meta")
    dims, parts = view_atoms(((), (t,), (c,)), (1, 35, 8), x.unflatten(1, (5, 7)))
    h, w = parts[t]
    assert (h[1], w[1]) == (5, 7) and dims == ((), (h,), (w,), (c,))
    chw = torch.empty(1, 5, 7, 8, device="meta").permute(0, 3, 1, 2)
    dims, parts = view_atoms(dims, (1, 5, 7, 8), chw)
    assert dims == ((), (c,), (h,), (w,)) and not parts
    dims, _ = view_atoms(dims, (1, 8, 5, 7), torch.empty(1, 8, 5, 7, device="meta").flatten(2, 3))
    assert dims == ((), (c,), (h, w))  # the tokens, whole and in order: a token dim again
    assert view_atoms(((t,),), (35,), torch.empty(35, device="meta").expand(2, 35)) is not None
    assert view_atoms(((t,),), (35,), torch.empty(35, device="meta").as_strided((34,), (1,))) is None


@given(st.data())
def test_view_atoms_say_which_token_every_element_holds_after_random_views(data):
    """Random unflatten / permute / flatten chains on a tensor holding its token index: decoding
    each element's coordinates through the atoms gives back that index."""
    from cdcompile.distributed.grid import view_atoms

    h, w, c = data.draw(st.sampled_from([(3, 4, 2), (2, 6, 3), (5, 1, 2), (4, 3, 1)]))
    x = torch.arange(h * w).view(1, h * w, 1).expand(2, h * w, c).contiguous()
    t = (101, h * w)
    dims = (((103, 2),), (t,), ((102, c),) if c > 1 else ())  # (batch, tokens, channels)
    tokens = (t,)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["unflatten", "permute", "flatten"]))
        d = data.draw(st.integers(0, x.dim() - 1))
        if kind == "unflatten":
            n = x.shape[d]
            k = data.draw(st.sampled_from([f for f in range(1, n + 1) if n % f == 0]))
            op = lambda y: y.unflatten(d, (k, n // k))  # noqa: E731
        elif kind == "permute":
            perm = data.draw(st.permutations(range(x.dim())))
            op = lambda y: y.permute(*perm)  # noqa: E731
        else:
            e = data.draw(st.integers(d, x.dim() - 1))
            op = lambda y: y.flatten(d, e)  # noqa: E731
        res = view_atoms(dims, tuple(x.shape), op(torch.empty(x.shape, device="meta")))
        assert res is not None
        dims, parts = res
        tokens = tuple(a for tok in tokens for a in parts.get(tok, (tok,)))
        x = op(x)
        assert tuple(math.prod(s for _, s in d) for d in dims) == tuple(x.shape)
    # decode: every element's token index from its coordinates
    index = torch.zeros(x.shape, dtype=torch.long)
    stride = {a: math.prod(s for _, s in tokens[i + 1:]) for i, a in enumerate(tokens)}
    for dim, atoms in enumerate(dims):
        coord = torch.arange(x.shape[dim])
        for j, a in enumerate(atoms):
            if a in stride:
                digit = coord // math.prod(s for _, s in atoms[j + 1:]) % a[1]
                shape = [1] * x.dim()
                shape[dim] = x.shape[dim]
                index = index + (digit * stride[a]).view(shape)
    assert torch.equal(index, x)


class _ConvGridBlock(torch.nn.Module):
    """Sana's Mix-FFN shape: tokens viewed as an ``hw`` image, 1x1 conv, depthwise 3x3 conv
    (``dilation`` rows of reach per conv, ``convs`` of them), gated, 1x1 conv, flattened back."""

    def __init__(self, hw=(5, 7), dim=4, convs=1, dilation=1):
        super().__init__()
        self.hw = hw
        self.inv = torch.nn.Conv2d(dim, 4 * dim, 1)
        self.depth = torch.nn.ModuleList(torch.nn.Conv2d(4 * dim, 4 * dim, 3, padding=dilation, dilation=dilation,
                                                         groups=4 * dim) for _ in range(convs))
        self.point = torch.nn.Conv2d(2 * dim, dim, 1)

    def forward(self, h):
        x = h.unflatten(1, self.hw).permute(0, 3, 1, 2)
        x = torch.nn.functional.silu(self.inv(x))
        for conv in self.depth:
            x = conv(x)
        x, gate = x.chunk(2, dim=1)
        x = self.point(x * torch.nn.functional.silu(gate))
        return h + x.flatten(2, 3).permute(0, 2, 1)


class _TokenConvBlock(torch.nn.Module):
    """A 1-D convolution along the token sequence (kernel 5, dilation 2: 4 tokens of reach)."""

    def __init__(self, dim=4):
        super().__init__()
        self.conv = torch.nn.Conv1d(dim, dim, 5, padding=4, dilation=2)

    def forward(self, h):
        return h + self.conv(h.transpose(1, 2)).transpose(1, 2)


def _grid_plan(block, tokens, world=3, rank=1):
    from cdcompile.distributed import sharding
    from cdcompile.passes.discover import find_block_groups

    kw = dict(x=torch.randn(1, tokens, 4), timestep=torch.tensor([0.4]))
    gm, ex, _ = _capture(_StackDiT(block), kw)
    return sharding.plan(gm, find_block_groups(gm, ex).groups, world=world, rank=rank)


@pytest.mark.parametrize("convs,dilation,rows", [(1, 1, (1, 6)), (2, 1, (0, 7)), (1, 2, (0, 7))])
def test_a_convolution_over_a_token_image_fetches_the_rows_it_reaches(convs, dilation, rows):
    # 35 tokens = 7 rows of 5 on 3 ranks; rank 1 holds tokens [12, 24): rows 2..4 (partly 2 and 4),
    # plus convs * dilation rows of halo each side, clipped at the image's edges
    p = _grid_plan(lambda: _ConvGridBlock((7, 5), convs=convs, dilation=dilation), 35)
    assert len(p.halos) == 3 and len(p.narrows) == 3
    _, _, dim, send, recv = p.halos[0]
    r0, r1 = rows
    assert sum(recv) == (r1 - r0) * 5 and recv[1] == 12
    assert p.narrows[0][2] == ((12 - r0 * 5, 12),)


def test_a_convolution_along_the_tokens_fetches_its_reach_in_tokens():
    p = _grid_plan(_TokenConvBlock, 37)  # rank 1 holds [13, 25); reach 4 tokens each side
    _, _, dim, send, recv = p.halos[0]
    assert dim == 2 and recv == (4, 12, 4) and send == ((0, 4), (0, 12), (8, 12))
    assert p.narrows[0][1:] == (2, ((4, 12),))


@pytest.mark.parametrize("op,why", [
    (lambda x: torch.nn.functional.avg_pool2d(x, 3, 1, 1), "avg_pool2d"),
    (lambda x: x.mean(dim=2, keepdim=True).expand_as(x), "mean"),
    (lambda x: torch.nn.functional.conv2d(x, torch.ones(4, 1, 3, 3), stride=(2, 1), padding=1, groups=4)
     .repeat_interleave(2, dim=2)[:, :, :5], "strided"),
    (lambda x: torch.nn.functional.group_norm(x, 2), "group_norm"),
])
def test_ops_that_mix_the_rows_of_a_token_image_otherwise_are_refused(op, why):
    from cdcompile.distributed.sharding import Refused

    class Block(torch.nn.Module):
        def forward(self, h):
            x = op(h.unflatten(1, (5, 7)).permute(0, 3, 1, 2))
            return h + x.flatten(2, 3).permute(0, 2, 1)

    with pytest.raises(Refused, match=why + r".* at test_context_parallel.py:\d+\)"):  # names the model's line
        _grid_plan(Block, 35)


# -- scenarios (run on every rank) ---------------------------------------------------------------

def _capture(model, kwargs):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(**kwargs)
    assert len(graphs) == 1
    return graphs[0][0], graphs[0][1], out


class _OpBlock(torch.nn.Module):
    """A block applying ``op`` to its (batch, tokens, channels) input, for single-process plans
    (stacked by _StackDiT)."""

    def __init__(self, op):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.op = op

    def forward(self, h):
        return h + self.op(self.fc(h))


def _plan(op, tokens=37, world=2, rank=0):
    """sharding.plan for a two-block model applying ``op`` (analysis only: no process group)."""
    from cdcompile.distributed import sharding
    from cdcompile.passes.discover import find_block_groups

    kw = dict(x=torch.randn(1, tokens, 4), timestep=torch.tensor([0.4]))
    gm, ex, _ = _capture(_StackDiT(lambda: _OpBlock(op)), kw)
    return sharding.plan(gm, find_block_groups(gm, ex).groups, world=world, rank=rank)


@pytest.mark.parametrize("op,share", [
    (lambda y: y.sum(dim=1, keepdim=True), 1.0),
    (lambda y: y.mean(dim=(1, 2), keepdim=True), 19 / 37),  # rank 0 holds 19 of 37 tokens
    (lambda y: y.mean(dim=1, keepdim=True), 19 / 37),
])
def test_token_sums_are_partial_sums_scaled_to_the_rank_s_share(op, share):
    p = _plan(op)
    assert [s for _, s in p.reductions] == [share] * 3


@pytest.mark.parametrize("op,ok", [
    (lambda y: y.unsqueeze(2).repeat(1, 1, 2, 1).mean(2), True),
    (lambda y: torch.tile(y, (2,))[..., :4], True),  # tile pads the sizes with ones on the left
    (lambda y: y.repeat(1, 2, 1)[:, :37], False),
    (lambda y: y.amax(dim=1, keepdim=True), False),
])
def test_repeats_keep_the_token_dim_once_and_other_token_reductions_are_refused(op, ok):
    from cdcompile.distributed.sharding import Refused

    if ok:
        assert _plan(op).entries
    else:
        with pytest.raises(Refused, match="token"):
            _plan(op)


def _first(x):
    while isinstance(x, (tuple, list)):  # graph outputs; per-sample lists (Cosmos 3 Omni)
        x = x[0]
    return x


def _build_and_run(model, kwargs, **opts):
    """The pass-test helper: rewritten graph, its record, its output, the reference output and the
    graph's example inputs."""
    from cdcompile.backend import build

    gm, ex, _ = _capture(model, kwargs)
    with torch.no_grad():
        ref = _first(model(**kwargs))
        gm2, ctx = build(gm, ex, CacheConfig(compiler="eager", enable_cache=False, **opts))
        out = _first(gm2(*ex))
    return gm2, ctx.context_parallel, out, ref, ex


def _fx_ops(gm) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            counts[name] = counts.get(name, 0) + 1
    return counts


def _scn_flux_joint(rank, world):
    """Joint attention (FLUX), heads not divisible by ranks, odd token counts; graph shape."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from cdcompile.testing import flux_inputs, tiny_flux

    m = tiny_flux(heads=3)
    kw = flux_inputs(m, tokens=37, text_tokens=5)
    gm2, rec, out, ref, _ = _build_and_run(m, kw, ulysses_degree=world)
    fake = [n.meta["example_value"] for n in gm2.graph.nodes if n.op == "placeholder"]
    aten = make_fx(gm2, tracing_mode="fake")(*fake)  # what aot_eager / inductor trace
    aten_ops = {}
    for n in aten.graph.nodes:
        if n.op == "call_function":
            aten_ops[str(n.target)] = aten_ops.get(str(n.target), 0) + 1
    # End to end through torch.compile, fullgraph (a graph break would raise), aot_eager.
    torch._dynamo.reset()
    c = torch.compile(m, backend="cachedit", fullgraph=True,
                      options=dict(compiler="aot_eager" if world == 2 else "eager", enable_cache=False,
                                   ulysses_degree=world))
    import cdcompile

    with torch.no_grad(), cdcompile.backend.collect_reports() as reports:
        out_compiled = _first(c(**kw))
    return dict(out=out, ref=ref, out_compiled=out_compiled, record=rec.as_dict(), fx_ops=_fx_ops(gm2),
                aten_ops=aten_ops, report=str(reports[0]), report_dict=reports[0].as_dict())


def _scn_single_stream(rank, world):
    """nn.MultiheadAttention (one hidden stream, sequence-first inside), 37 tokens, 2 heads."""
    from cdcompile.testing import SequentialDiT

    m = SequentialDiT().eval()
    kw = dict(x=torch.randn(1, 37, 8, generator=torch.Generator().manual_seed(1)), timestep=torch.tensor([0.4]))
    _, rec, out, ref, _ = _build_and_run(m, kw, ulysses_degree=world)
    return dict(out=out, ref=ref, record=rec.as_dict())


class _LinearAttnBlock(torch.nn.Module):
    """Sana-style ReLU linear attention (``(V, 1) K^T`` then ``Q``: token sums as a matmul) gated by
    the mean over tokens: both are sums over the sharded token dim."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.gate = torch.nn.Linear(dim, dim)

    def forward(self, h):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q = torch.relu(q.transpose(1, 2).unflatten(1, (self.heads, -1)))  # (B, H, d, N)
        k = torch.relu(k.transpose(1, 2).unflatten(1, (self.heads, -1)).transpose(2, 3))  # (B, H, N, d)
        v = torch.nn.functional.pad(v.transpose(1, 2).unflatten(1, (self.heads, -1)), (0, 0, 0, 1), value=1.0)
        o = torch.matmul(torch.matmul(v, k), q)  # (B, H, d + 1, N)
        o = (o[:, :, :-1] / (o[:, :, -1:] + 1e-6)).flatten(1, 2).transpose(1, 2)
        return h + self.out(o) * torch.sigmoid(self.gate(h.mean(dim=1, keepdim=True)))


class _StackDiT(torch.nn.Module):
    """Three hand-written blocks over a (batch, tokens, channels) input scaled by the timestep."""

    def __init__(self, block):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(block() for _ in range(3))

    def forward(self, x, timestep):
        h = x * torch.cos(timestep).reshape(-1, 1, 1)
        for b in self.blocks:
            h = b(h)
        return h


def _run_stack(block, channels, world, seed, tokens=37):
    """_StackDiT of ``block`` on 37 tokens (uneven on 2 and 3 ranks) against one process."""
    kw = dict(x=torch.randn(1, tokens, channels, generator=torch.Generator().manual_seed(seed)),
              timestep=torch.tensor([0.4]))
    gm2, rec, out, ref, _ = _build_and_run(_StackDiT(block).eval(), kw, ulysses_degree=world)
    return dict(out=out, ref=ref, record=rec.as_dict(), fx_ops=_fx_ops(gm2))


def _run_zoo(name, world):
    """A zoo model on ``world`` ranks against one process."""
    from cdcompile import zoo

    m, kw = zoo.ZOO[name]()
    _, rec, out, ref, _ = _build_and_run(m, kw, ulysses_degree=world)
    return dict(out=out, ref=ref, record=rec.as_dict())


def _scn_linear_attention(rank, world):
    """Token sums (linear attention's V K^T, a token mean) all-reduced."""
    return _run_stack(_LinearAttnBlock, 8, world, seed=2)


def _scn_conv_grid(rank, world):
    """Two stacked 3x3 convolutions over a 5 x 7 token image (35 tokens: shards cut rows)."""
    return _run_stack(lambda: _ConvGridBlock((5, 7), convs=2), 4, world, seed=6, tokens=35)


def _scn_token_conv(rank, world):
    """A dilated 1-D convolution along the 37 tokens."""
    return _run_stack(_TokenConvBlock, 4, world, seed=7)


def _scn_ernieimage(rank, world):
    """ERNIE-Image keeps its streams sequence-first, (tokens, batch, channels)."""
    return _run_zoo("ernieimage", world)


def _scn_latte(rank, world):
    """Latte, with a batch of 2: its temporal attention attends over frames once per token, so the
    tokens sit in the attention's batch dim, merged with the batch (``(batch * tokens, frames, C)``)."""
    from cdcompile import zoo

    m, kw = zoo.ZOO["latte"]()
    g = torch.Generator().manual_seed(8)
    kw.update(hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g), timestep=torch.tensor([500.0, 300.0]),
              encoder_hidden_states=torch.randn(2, 7, 16, generator=g))
    _, rec, out, ref, _ = _build_and_run(m.eval(), kw, ulysses_degree=world)
    return dict(out=out, ref=ref, record=rec.as_dict())


def _scn_wananimate(rank, world):
    """Wan-Animate's face adapter attends per frame, ``(batch * frames, tokens per frame, C)``, to
    that frame's face tokens: each rank fetches the frames its tokens cut and attends locally."""
    return _run_zoo("wananimate", world)


def _scn_cosmos3omni(rank, world):
    """Cosmos 3 Omni packs one sequence without a batch dim: (tokens, channels) streams."""
    return _run_zoo("cosmos3omni", world)


def _window(b, h, q, kv):
    return (q - kv).abs() <= 4


class _FlexBlock(torch.nn.Module):
    """flex_attention with a positional (sliding window) block mask over a rotated sequence: on
    ranks, the rotated tokens gather out of logical order, so the mask needs them put back."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, h):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        b, n, c = h.shape
        j = torch.cat([h[:, 30:], h[:, :30]], dim=1)
        q, k, v = self.qkv(j).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mask = create_block_mask(_window, None, None, n, n, device="cpu")
        o = flex_attention(q, k, v, block_mask=mask).transpose(1, 2).reshape(b, n, c)
        return h + self.out(torch.cat([o[:, n - 30:], o[:, :n - 30]], dim=1))


def _scn_flex(rank, world):
    return _run_stack(_FlexBlock, 8, world, seed=10)


def _scn_sana(rank, world):
    """Sana: linear attention and the Mix-FFN's depthwise convolution over the 8 x 8 latent."""
    return _run_zoo("sana", world)


def _scn_sanavideo(rank, world):
    """Sana-Video: frames x rows x columns, a spatial and a temporal (over frames) convolution."""
    return _run_zoo("sanavideo", world)


def _scn_krea2(rank, world):
    """Krea 2: its leading layer-wise text-fusion group cannot shard; the groups after it do."""
    return _run_zoo("krea2", world)


class _GQABlock(torch.nn.Module):
    """Grouped-query attention with 3 query heads and 1 key/value head: on 2 ranks neither count
    splits, so K and V are repeated to 3 heads before the exchange."""

    def __init__(self, heads=3, kv_heads=1, d=4):
        super().__init__()
        self.h, self.kvh, self.d = heads, kv_heads, d
        self.q = torch.nn.Linear(12, heads * d)
        self.kv = torch.nn.Linear(12, 2 * kv_heads * d)
        self.o = torch.nn.Linear(heads * d, 12)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2 * self.kvh, self.d).transpose(1, 2).chunk(2, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return x + self.o(o.transpose(1, 2).reshape(b, n, -1))


def _scn_gqa(rank, world):
    return _run_stack(_GQABlock, 12, world, seed=4)


def _scn_luminanext(rank, world):
    """Lumina-Next repeats its key heads with ``.repeat(1, 1, 1, n_rep, 1)``: per token."""
    return _run_zoo("luminanext", world)


def _scn_cogview4(rank, world):
    """CogView4 writes RoPE into the image part of Q and K (``q[:, :, text:] = ...``)."""
    return _run_zoo("cogview4", world)


def _scn_wan(rank, world):
    """Wan: self-attention sharded, cross-attention to replicated text runs locally."""
    return _run_zoo("wan", world)


def _scn_flux_4097(rank, world):
    """4097 image tokens (+ 7 text tokens) on a small FLUX, 2 heads."""
    from cdcompile.testing import flux_inputs, tiny_flux

    m = tiny_flux(num_layers=2, num_single_layers=2, heads=2)
    kw = flux_inputs(m, tokens=4097, text_tokens=7)
    _, rec, out, ref, _ = _build_and_run(m, kw, ulysses_degree=world)
    return dict(out=out, ref=ref, record=rec.as_dict())


def _scn_fp8_pipeline(rank, world):
    """cdcompile.enable(pipe) under CP with FP8 exchanges: a full 20-step generation. The options
    come as cache-dit's ParallelismConfig (without a cache_config: no cache, as in cache-dit)."""
    import cdcompile
    from cache_dit import ParallelismConfig
    from cdcompile.testing import flux_prompt, tiny_flux_pipeline

    def generate(pipe):
        with torch.no_grad():
            return pipe(**flux_prompt(pipe.transformer), num_inference_steps=20, height=32, width=32,
                        output_type="latent", generator=torch.Generator().manual_seed(0)).images

    pipe = tiny_flux_pipeline()
    ref = generate(pipe)
    torch._dynamo.reset()
    cdcompile.enable(pipe, compiler="eager", parallelism_config=ParallelismConfig(ulysses_size=world,
                                                                                  ulysses_float8=True))
    out = generate(pipe)
    return dict(out=out, ref=ref)


def _flux_trajectory(steps, seed=0):
    """Inputs of a request of ``steps`` steps whose hidden input drifts slowly, like a sampler's."""
    from cdcompile.testing import flux_inputs, tiny_flux

    base = flux_inputs(tiny_flux(), tokens=37, text_tokens=5, seed=seed)
    d = torch.randn(base["hidden_states"].shape, generator=torch.Generator().manual_seed(seed + 1))
    return [dict(base, hidden_states=base["hidden_states"] + 0.03 * s * d, timestep=torch.full((1,), 1.0 - s / steps))
            for s in range(steps)]


CACHE_OPTS = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.4, max_warmup_steps=2)


def _scn_cache(rank, world, layers=(2, 4), compiler=None, **extra):
    """DBCache + CP: the same cached steps on every rank as in one process (the compute branch of
    the cond holds the collectives; aot_eager on 2 ranks, eager on 3; one process compiles eager)."""
    import cdcompile
    from cdcompile.testing import tiny_flux

    steps = _flux_trajectory(10)
    runs = {}
    for degree in (1, world):
        m = tiny_flux(num_layers=layers[0], num_single_layers=layers[1])
        torch._dynamo.reset()
        cp_compiler = compiler or ("aot_eager" if world == 2 else "eager")
        c = torch.compile(m, backend="cachedit", fullgraph=True,
                          options=dict(compiler=cp_compiler if degree > 1 else "eager", ulysses_degree=degree,
                                       **{**CACHE_OPTS, **extra}))
        with torch.no_grad():
            outs = [_first(c(**kw)) for kw in steps]
        slot = cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]
        runs[degree] = dict(outs=torch.stack(outs), cached=slot["cached_steps"],
                            diffs=slot["residual_diffs"], pruned=slot.get("pruned_blocks"))
    return dict(single=runs[1], cp=runs[world])


# tests/fuzz_dit.py: attention written as matmuls, masks, rope, joint attention; 11: text and image
# tokens joined between the groups; 18: bfloat16 (its attention SDPA: sharded, it rounds as one
# process does; attention written as matmuls becomes SDPA under CP, which rounds bfloat16 otherwise)
FUZZ_SEEDS = {2: (0, 4), 3: (3, 10, 11, 18)}


def _scn_fuzz(rank, world):
    """Random DiTs (tests/fuzz_dit.py) under CP with the block cache: outputs and cached steps
    against the eager DBCache reference of one process, per seed."""
    import cdcompile
    from dbcache_reference import RefCache
    from fuzz_dit import RandomDiT, cache_options, draw_cache_config, draw_spec, reference_clock, run_reference, trajectory

    out = {}
    for seed in FUZZ_SEEDS[world]:
        spec = draw_spec(seed)
        m = RandomDiT(spec).eval()
        cfg = draw_cache_config(spec)
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True,
                          options={**cache_options(cfg, "eager"), "ulysses_degree": world})
        ref, worst, scale = RefCache(cfg), 0.0, 0.0
        calls = trajectory(spec, 6)
        clock = reference_clock(spec, len(calls))
        with torch.no_grad(), cdcompile.backend.collect_reports() as reports:
            for k, step in enumerate(calls):
                at, fresh = clock[k]
                if fresh:
                    ref.new_request()
                for slot, kw in enumerate(step):
                    want = run_reference(m, kw, ref, at, slot)
                    worst = max(worst, float((c(**kw) - want).abs().max()))
                    scale = max(scale, float(want.abs().max()))
        got = cdcompile.summary(m).as_dict()["requests"][-1]["slots"]
        out[seed] = dict(diff=worst, scale=scale, dtype=spec.dtype, cached=[s["cached_steps"] for s in got],
                         want=[[s for s, sl, hit in ref.decisions if hit and sl == j] for j in range(len(calls[0]))],
                         cp=reports[0].context_parallel.as_dict(), matmuls=reports[0].matmul_attention)
    return out


def _scn_cache_lone(rank, world):
    """As _scn_cache with one double block, a group of one that holds F, and DBPrune over M (eager:
    the cache and prune scenarios run aot_eager)."""
    return dict(cache=_scn_cache(rank, world, layers=(1, 3), compiler="eager"),
                prune=_scn_cache(rank, world, layers=(1, 3), compiler="eager", cache_type="dbprune",
                                 residual_diff_threshold=0.3))


def _scn_cache_guard_options(rank, world):
    """As _scn_cache with cache-dit's guard options: the important tokens' sums all-reduced, every
    second channel compared, and a budget on the summed diffs (eager)."""
    return _scn_cache(rank, world, compiler="eager", important_condition_threshold=0.5, downsample_factor=2,
                      max_accumulated_residual_diff_threshold=1.5)


def _scn_cache_dmd(rank, world):
    """As _scn_cache with the DMD calibrator (eager): each rank holds its tokens of the snapshots,
    and the fit reads their Gram matrix summed over the ranks, so every rank forecasts as one
    process does (a fit of a rank's own tokens would not)."""
    return _scn_cache(rank, world, compiler="eager", calibrator="dmd", max_warmup_steps=4)


def _scn_cache_dmd_rows(rank, world):
    """DMD under CP on ERNIE-Image's sequence-first (tokens, batch, channels) streams: dim 0, whose
    rows DMD fits one by one, is the token dim, so each rank fits its own rows and sums nothing but
    the fallback flags (eager)."""
    import cdcompile
    from cdcompile import zoo

    m, kw = zoo.ZOO["ernieimage"]()
    d = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    steps = [dict(kw, hidden_states=kw["hidden_states"] + 0.03 * s * d, timestep=kw["timestep"] * (1 - s / 20))
             for s in range(10)]
    runs = {}
    for degree in (1, world):
        torch._dynamo.reset()
        c = torch.compile(m.eval(), backend="cachedit", fullgraph=True, options=dict(
            compiler="eager", ulysses_degree=degree, **{**CACHE_OPTS, "max_warmup_steps": 4}, calibrator="dmd",
            dmd_history=4))
        with torch.no_grad(), cdcompile.backend.collect_reports() as reports:
            outs = [_first(c(**s)) for s in steps]
        slot = cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]
        cp = reports[0].context_parallel
        runs[degree] = dict(outs=torch.stack(outs), cached=slot["cached_steps"],
                            token_dim=cp.token_dim if cp is not None else None)
    return dict(single=runs[1], cp=runs[world])


def _scn_fp8_attention(rank, world):
    """fp8_attention under CP: the local attention between the exchanges is the FP8 kernel's op
    (its reference on CPU); compared with one process compiled the same way, and with plain SDPA."""
    import cdcompile
    from cdcompile.testing import flux_inputs, tiny_flux

    m = tiny_flux(heads=3, head_dim=64)
    kw = flux_inputs(m, tokens=37, text_tokens=5)
    outs, reports = {}, {}
    with torch.no_grad():
        plain = _first(m(**kw))
        for degree in (1, world):
            torch._dynamo.reset()
            c = torch.compile(m, backend="cachedit", fullgraph=True, options=dict(
                compiler="aot_eager", enable_cache=False, ulysses_degree=degree, fp8_attention=True))
            with cdcompile.backend.collect_reports() as rep:
                outs[degree] = _first(c(**kw))
            reports[degree] = rep[0].as_dict()
    return dict(out=outs[world], ref=outs[1], plain=plain, fp8=reports[world]["fp8_attention"],
                cp=reports[world]["context_parallel"])


def _scn_cache_sana(rank, world):
    """DBCache + CP on Sana: the halo exchanges of the Mix-FFN sit in the cond's compute branch."""
    import cdcompile
    from cdcompile import zoo

    m0, kw = zoo.ZOO["sana"]()
    d = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(9))
    steps = [dict(kw, hidden_states=kw["hidden_states"] + 0.03 * s * d, timestep=torch.tensor([900.0 - 100 * s]))
             for s in range(8)]
    runs = {}
    for degree in (1, world):
        m, _ = zoo.ZOO["sana"]()
        m.load_state_dict(m0.state_dict())
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True,
                          options=dict(compiler="eager", ulysses_degree=degree,
                                       **{**CACHE_OPTS, "residual_diff_threshold": 0.045}))
        with torch.no_grad():
            outs = [_first(c(**k)) for k in steps]
        slot = cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]
        runs[degree] = dict(outs=torch.stack(outs), cached=slot["cached_steps"], diffs=slot["residual_diffs"])
    return dict(single=runs[1], cp=runs[world])


def _scn_prune(rank, world):
    """DBPrune + CP: every prunable block's decision all-reduces its diff, so every rank prunes the
    same blocks (a divergent decision would hang the collectives in the block's compute branch);
    TaylorSeer forecasts each rank's tokens of the pruned blocks' residuals."""
    return _scn_cache(rank, world, cache_type="dbprune", residual_diff_threshold=0.3, calibrator="taylorseer")


def _scn_async(rank, world):
    """ulysses_async: exchanges issued before the remaining projections, waited at attention."""
    from cdcompile.testing import flux_inputs, tiny_flux

    m = tiny_flux()
    kw = flux_inputs(m, tokens=64)
    gm2, rec, out, ref, ex = _build_and_run(m, kw, ulysses_degree=world, ulysses_async=True)
    order = []  # graph order of the first block's attention: (kind, operand)
    for n in gm2.graph.nodes:
        name = getattr(n.target, "__name__", str(n.target))
        if name in ("to_heads_start", "to_heads_wait", "linear", "scaled_dot_product_attention"):
            order.append(name)
        if name == "scaled_dot_product_attention":
            break
    with torch.no_grad(), torch.profiler.profile() as prof:
        gm2(*ex)
    events = sorted(((e.time_range.start, e.name, e.thread) for e in prof.events()
                     if e.name in ("_c10d_functional::all_to_all_single", "_c10d_functional::wait_tensor",
                                   "aten::linear")))
    return dict(out=out, ref=ref, record=rec.as_dict(), order=order, events=[(n, t) for _, n, t in events])


def _scn_degree_mismatch(rank, world):
    from cdcompile.backend import build
    from cdcompile.testing import SequentialDiT

    gm, ex, _ = _capture(SequentialDiT().eval(), dict(x=torch.randn(1, 9, 8), timestep=torch.tensor([0.5])))
    try:
        build(gm, ex, CacheConfig(compiler="eager", ulysses_degree=world + 1))
    except ValueError as e:
        return dict(error=str(e))
    return dict(error=None)


def _scn_inductor(rank, world):
    """The single-stream model through inductor (collectives lowered by inductor)."""
    from cdcompile.testing import SequentialDiT

    m = SequentialDiT().eval()
    kw = dict(x=torch.randn(1, 37, 8, generator=torch.Generator().manual_seed(1)), timestep=torch.tensor([0.4]))
    with torch.no_grad():
        ref = m(**kw)
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True,
                          options=dict(compiler="inductor", enable_cache=False, ulysses_degree=world))
        out = c(**kw)
    return dict(out=out, ref=ref)


# One spawn per key: (world size, scenarios). Inductor has its own so that `-m "not slow"` skips it.
SCENARIOS = {
    "w2": (2, ["flux_joint", "single_stream", "wan", "fp8_pipeline", "fp8_attention", "cache", "prune", "async",
               "degree_mismatch", "cache_lone", "cache_guard_options", "cache_dmd", "cache_dmd_rows",
               "linear_attention", "krea2", "gqa", "luminanext", "sana", "ernieimage",
               "cosmos3omni", "flex", "fuzz"]),
    "w3": (3, ["flux_4097", "flux_joint", "single_stream", "cache", "linear_attention", "cogview4", "conv_grid",
               "token_conv", "sana", "sanavideo", "latte", "wananimate", "cache_sana", "flex", "fuzz"]),
    "w2-inductor": (2, ["inductor"]),
}


def _worker(rank, key, port, outdir):
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    world, names = SCENARIOS[key]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name in names:
            t0 = time.perf_counter()
            results[name] = globals()[f"_scn_{name}"](rank, world)
            results[name]["seconds"] = time.perf_counter() - t0
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RESULTS: dict[str, list[dict]] = {}


def _results(key: str) -> list[dict]:
    if key not in _RESULTS:
        world = SCENARIOS[key][0]
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as d:
            old = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"  # children inherit it; 2 shared cores
            try:
                mp.spawn(_worker, args=(key, _free_port(), d), nprocs=world, join=True)
            finally:
                if old is None:
                    os.environ.pop("OMP_NUM_THREADS")
                else:
                    os.environ["OMP_NUM_THREADS"] = old
            _RESULTS[key] = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return _RESULTS[key]


def _scenario(world, name, key=None):
    return [r[name] for r in _results(key or f"w{world}")]


def _assert_parity(per_rank, rtol=1e-5, atol=2e-6, key="out"):
    """fp32 parity with the single-process output on every rank, and identical outputs on all ranks."""
    # Every rank's view, in one message, for a failure that does not reproduce: whether the ranks'
    # own single-process references agree (eager nondeterminism) and how far each output is off.
    seen = "; ".join(f"rank {r}: max|{key} - ref| {(x[key] - x['ref']).abs().max().item():.3g}, "
                     f"ref equals rank 0's: {torch.equal(x['ref'], per_rank[0]['ref'])}, "
                     f"{key} equals rank 0's: {torch.equal(x[key], per_rank[0][key])}"
                     for r, x in enumerate(per_rank))
    for r, res in enumerate(per_rank):
        if "record" in res:
            assert res["record"]["applied"], f"rank {r}: context parallelism not applied: {res['record']}"
        torch.testing.assert_close(res[key], res["ref"], rtol=rtol, atol=atol,
                                   msg=lambda m: f"rank {r} vs single process: {m}\n({seen})")
        assert torch.equal(res[key], per_rank[0][key]), f"rank {r}'s output differs from rank 0's ({seen})"


# -- tests over the spawned ranks ------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_joint_attention_flux_matches_one_process_with_uneven_tokens_and_heads(world):
    res = _scenario(world, "flux_joint")
    _assert_parity(res)
    _assert_parity(res, key="out_compiled")
    rec = res[0]["record"]
    assert rec["applied"] and rec["attention"] == {"ulysses": 6}
    assert rec["sharded_streams"] == ["transformer_blocks.hidden", "transformer_blocks.encoder"]
    # explain()/reports say what the pass did, printable and JSON-able
    for r, res_r in enumerate(res):
        assert f"context parallel: rank {r}/{world}, sharded" in res_r["report"]
        assert "6 ulysses" in res_r["report"]
        assert res_r["report_dict"]["context_parallel"]["applied"] is True


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_are_in_the_compiled_graph(world):
    res = _scenario(world, "flux_joint")[0]
    # 6 attentions x (Q, K, V in + O out) all-to-alls, one gather of the hidden stream at the exit
    assert res["fx_ops"]["to_heads_start"] == 18 and res["fx_ops"]["to_seq_start"] == 6
    assert res["fx_ops"]["gather"] == 1
    assert res["aten_ops"]["_c10d_functional.all_to_all_single.default"] == 24
    assert res["aten_ops"]["_c10d_functional.all_gather_into_tensor.default"] == 1
    assert res["aten_ops"]["_c10d_functional.wait_tensor.default"] == 25


@pytest.mark.parametrize("world", [2, 3])
def test_single_stream_multihead_attention_matches_one_process(world):
    res = _scenario(world, "single_stream")
    _assert_parity(res)
    assert res[0]["record"]["attention"] == {"mha_ulysses": 6}


@pytest.mark.parametrize("world", [2, 3])
def test_token_sums_and_linear_attention_are_all_reduced(world):
    res = _scenario(world, "linear_attention")
    _assert_parity(res)
    assert res[0]["record"]["sharded_streams"] == ["blocks.hidden"]
    assert res[0]["fx_ops"]["all_reduce_sum"] == 6  # per block: V K^T and the token mean


def test_a_leading_group_that_cannot_shard_leaves_the_rest_to_shard():
    res = _scenario(2, "krea2")
    _assert_parity(res)
    rec = res[0]["record"]
    assert rec["unsharded_groups"] == ["text_fusion.layerwise_blocks"] and "token" in rec["reason"]
    assert rec["sharded_streams"] and not any(s.startswith("text_fusion.layerwise") for s in rec["sharded_streams"])


@pytest.mark.parametrize("world,name,halos", [(3, "conv_grid", 3), (3, "token_conv", 3), (2, "sana", 3),
                                               (3, "sana", 3), (3, "sanavideo", 3)])
def test_convolutions_over_the_tokens_exchange_halo_rows(world, name, halos):
    res = _scenario(world, name)
    _assert_parity(res)
    assert res[0]["record"]["halos"] == halos
    if "fx_ops" in res[0]:
        assert res[0]["fx_ops"]["halo"] == halos


def test_attention_over_frames_once_per_token_is_local_to_the_rank_holding_the_token():
    res = _scenario(3, "latte")
    _assert_parity(res)
    # the group is the (spatial, temporal) pairs 1 and 2 (pair 0 adds the temporal position
    # embedding); each pair's spatial self- and cross-attention are counted, the temporal ones are
    # per token and need no rewrite
    assert res[0]["record"]["attention"] == {"ulysses": 2, "local": 2}


def test_attention_per_frame_fetches_the_frames_a_rank_cuts_and_runs_locally():
    res = _scenario(3, "wananimate")
    _assert_parity(res)
    rec = res[0]["record"]
    assert rec["halos"] == 2 and rec["attention"]["ulysses"] == 4  # two face adapters; four DiT blocks
    assert rec["unsharded_groups"] == ["motion_encoder.res_blocks", "motion_encoder.motion_network"]


@pytest.mark.parametrize("world", [2, 3])
def test_flex_attention_with_a_positional_mask_sees_the_gathered_tokens_in_logical_order(world):
    res = _scenario(world, "flex")
    _assert_parity(res)
    assert res[0]["record"]["attention"] == {"ulysses": 3}
    assert res[0]["fx_ops"]["to_heads_start"] == 9


def test_sequence_first_streams_shard_their_first_dim():
    res = _scenario(2, "ernieimage")
    _assert_parity(res)
    rec = res[0]["record"]
    assert rec["sharded_streams"] == ["layers.hidden"] and rec["attention"] == {"ulysses": 3}


def test_streams_without_a_batch_dim_shard_their_tokens():
    res = _scenario(2, "cosmos3omni")
    _assert_parity(res)
    assert res[0]["record"]["attention"] == {"ulysses": 6}  # causal (text) and full, 3 layers


def test_writes_into_a_token_range_use_each_rank_s_local_bounds():
    res = _scenario(3, "cogview4")
    _assert_parity(res)
    assert res[0]["record"]["attention"] == {"ulysses": 3}


def test_fp8_attention_runs_between_the_exchanges():
    res = _scenario(2, "fp8_attention")
    # 42 tokens fit in one key tile of the kernel, so the gathered order (a permutation of the
    # logical one) changes only the order of fp32 sums: parity with one process as for SDPA. (Over
    # several tiles the online softmax would meet the tokens in other tiles, and P would round to
    # other FP8 values: close, not fp32-equal.)
    _assert_parity(res)
    for r in res:
        assert r["cp"]["applied"] and r["cp"]["attention"] == {"ulysses": 6}
        assert (r["fp8"]["replaced"], r["fp8"]["kept"]) == (6, {})
        assert not torch.allclose(r["out"], r["plain"], rtol=1e-5, atol=1e-5), "plain SDPA ran"
        cos = torch.nn.functional.cosine_similarity(r["out"].flatten(), r["plain"].flatten(), dim=0)
        assert cos > 0.999, float(cos)


def test_grouped_query_heads_that_do_not_split_are_repeated_before_the_exchange():
    res = _scenario(2, "gqa")
    _assert_parity(res)
    assert res[0]["record"]["attention"] == {"ulysses": 3}
    assert res[0]["fx_ops"]["repeat_interleave"] == 6  # K and V of each of the 3 attentions


def test_a_repeat_that_keeps_the_token_dim_is_per_token():
    res = _scenario(2, "luminanext")
    _assert_parity(res)


def test_cross_attention_to_replicated_text_needs_no_exchange():
    res = _scenario(2, "wan")
    _assert_parity(res)
    assert res[0]["record"]["attention"] == {"ulysses": 3, "local": 3}
    assert res[0]["record"]["sharded_streams"] == ["blocks.hidden"]


def test_4097_tokens_on_3_ranks_match_one_process():
    res = _scenario(3, "flux_4097")
    _assert_parity(res, rtol=1e-4, atol=1e-5)
    assert res[0]["record"]["attention"] == {"ulysses": 4}


def test_fp8_exchange_keeps_a_20_step_generation_above_30_db():
    res = _scenario(2, "fp8_pipeline")
    for r, x in enumerate(res):
        ref, out = x["ref"].double(), x["out"].double()
        peak = (ref.max() - ref.min()).item()
        psnr = 10 * math.log10(peak ** 2 / ((out - ref) ** 2).mean().item())
        assert psnr >= 30, f"rank {r}: PSNR {psnr:.1f} dB"
        assert not torch.equal(out, ref), "FP8 exchanges should perturb the result (parallelism_config ignored?)"
        assert torch.equal(out, res[0]["out"])


@pytest.mark.parametrize("world", [2, 3])
def test_cached_steps_are_identical_on_every_rank_and_to_one_process(world):
    res = _scenario(world, "cache")
    single = res[0]["single"]
    assert 0 < len(single["cached"]) < 8, f"degenerate trajectory: cached {single['cached']}"
    for r, x in enumerate(res):
        assert x["cp"]["cached"] == single["cached"], f"rank {r}: {x['cp']['cached']} != {single['cached']}"
        for s, d in single["diffs"].items():
            assert abs(x["cp"]["diffs"][s] - d) <= 1e-5 * max(1.0, abs(d)), (r, s, x["cp"]["diffs"][s], d)
        torch.testing.assert_close(x["cp"]["outs"], x["single"]["outs"], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_random_dits_shard_and_cache_like_the_one_process_reference(world):
    # tests/fuzz_dit.py's models: one or two streams, attention as SDPA or written as matmuls (the
    # matmul_attention pass makes it SDPA), key-padding masks, rotary tables over the joint tokens,
    # 2 heads (not divisible by 3 ranks), odd token counts, CFG slots
    ranks = _results(f"w{world}")
    matmuls = 0
    for seed in FUZZ_SEEDS[world]:
        for r in ranks:
            got = r["fuzz"][seed]
            assert got["cp"]["applied"] and not got["cp"]["unsharded_groups"], (seed, got["cp"])
            # bfloat16: within one unit in the last place at the output's largest magnitude (0 here)
            tol = 1e-4 if got["dtype"] == "float32" else 2 ** -7 * got["scale"]
            assert got["diff"] <= tol, (seed, got["dtype"], got["diff"], got["scale"])
            assert got["cached"] == got["want"] and any(got["want"]), (seed, got)
        matmuls += ranks[0]["fuzz"][seed]["matmuls"]
    assert matmuls > 0, "no seed wrote its attention as matmuls"


def test_a_lone_first_block_keeps_the_decisions_of_one_process_under_cp_with_cache_and_prune():
    for r, res in enumerate(_scenario(2, "cache_lone")):
        for kind in ("cache", "prune"):
            single, cp = res[kind]["single"], res[kind]["cp"]
            assert 0 < len(single["cached"]) < 8 or (single["pruned"] and sum(single["pruned"])), (r, kind, single)
            assert cp["cached"] == single["cached"] and cp["pruned"] == single["pruned"], (r, kind)
            torch.testing.assert_close(cp["outs"], single["outs"], rtol=1e-5, atol=2e-6)


def test_cache_dits_guard_options_keep_the_decisions_of_one_process_under_cp():
    # one process (eager, 2026-12-07): steps 3 and 5 cache; the same without the budget: 3, 5, 8, 9
    res = _scenario(2, "cache_guard_options")
    single = res[0]["single"]
    assert single["cached"] == [3, 5], single["cached"]
    for r, x in enumerate(res):
        assert x["cp"]["cached"] == single["cached"], (r, x["cp"]["cached"])
        for s, d in single["diffs"].items():
            assert abs(x["cp"]["diffs"][s] - d) <= 1e-5 * max(1.0, abs(d)), (r, s, x["cp"]["diffs"][s], d)
        torch.testing.assert_close(x["cp"]["outs"], x["single"]["outs"], rtol=1e-5, atol=2e-6)


def test_dmd_forecasts_of_sharded_snapshots_equal_one_process():
    res = _scenario(2, "cache_dmd")
    single = res[0]["single"]
    assert single["cached"][:2] == [4, 5], single["cached"]  # the fit engages at step 4 (4 computed steps)
    for r, x in enumerate(res):
        assert x["cp"]["cached"] == single["cached"], (r, x["cp"]["cached"])
        torch.testing.assert_close(x["cp"]["outs"], x["single"]["outs"], rtol=1e-5, atol=2e-6)


def test_dmd_fits_rows_of_sequence_first_streams_on_the_rank_holding_them():
    res = _scenario(2, "cache_dmd_rows")
    single = res[0]["single"]
    assert single["cached"][:1] == [4], single["cached"]  # the fit engages at step 4
    for r, x in enumerate(res):
        assert x["cp"]["token_dim"] == 0 and x["cp"]["cached"] == single["cached"], (r, x["cp"])
        torch.testing.assert_close(x["cp"]["outs"], x["single"]["outs"], rtol=1e-5, atol=2e-6)


def test_halo_exchanges_in_the_cached_branch_keep_the_decisions_of_one_process():
    for r, res in enumerate(_scenario(3, "cache_sana")):
        single, cp = res["single"], res["cp"]
        assert cp["cached"] == single["cached"] and 0 < len(single["cached"]) < 6, (r, cp["cached"], single["cached"])
        torch.testing.assert_close(cp["outs"], single["outs"], rtol=1e-5, atol=2e-6)


def test_pruned_blocks_are_identical_on_every_rank_and_to_one_process():
    res = _scenario(2, "prune")
    single = res[0]["single"]
    assert single["pruned"] is not None and 0 < sum(single["pruned"]), f"nothing pruned: {single['pruned']}"
    for r, x in enumerate(res):
        assert x["cp"]["pruned"] == single["pruned"], f"rank {r}: {x['cp']['pruned']} != {single['pruned']}"
        assert x["cp"]["cached"] == single["cached"]
        torch.testing.assert_close(x["cp"]["outs"], x["single"]["outs"], rtol=1e-5, atol=2e-6)


def test_async_exchanges_are_issued_before_the_remaining_projections():
    res = _scenario(2, "async")
    _assert_parity(res)
    order = res[0]["order"]
    starts = [i for i, n in enumerate(order) if n == "to_heads_start"]
    first_wait = order.index("to_heads_wait")
    assert len(starts) == 3 and starts[-1] < first_wait
    assert "linear" in order[starts[0]:first_wait], f"nothing overlaps the first exchange: {order}"
    # Host order in the profiler: an exchange is issued, projections run, then the first wait.
    names = [n for n, _ in res[0]["events"]]
    i = names.index("_c10d_functional::all_to_all_single")
    j = names.index("_c10d_functional::wait_tensor")
    assert "aten::linear" in names[i:j], names[:j + 1]


def test_degree_other_than_the_world_size_is_refused_naming_both():
    res = _scenario(2, "degree_mismatch")[0]
    assert res["error"] is not None and "ulysses_degree=3" in res["error"] and "which is 2" in res["error"]


@pytest.mark.slow
def test_inductor_compiles_the_collectives():
    _assert_parity(_scenario(2, "inductor", key="w2-inductor"), rtol=1e-4, atol=1e-5)

