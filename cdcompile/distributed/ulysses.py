"""Ulysses context parallelism: the functions the context_parallel pass calls from the graph.

The pass inserts ``call_function`` nodes to these functions (as cdcompile.guard's are inserted by
block_cache); inner compilers trace through them. Every size argument is a static Python int
computed at compile time from the sequence length and the world size (cdcompile.distributed.layout),
so every rank knows every split size without communicating.

Communication is torch.distributed's traceable functional collectives
(``torch.ops._c10d_functional``: ``all_to_all_single``, ``all_gather_into_tensor``,
``all_reduce``, each followed by ``wait_tensor``). Issuing and waiting are separate functions so
that the pass can issue an all-to-all early and wait late (``ulysses_async``).

Shape legend: b batch, h heads, hc heads per rank = ceil(h / w) (heads are zero-padded to w * hc),
s this rank's tokens, S all tokens (sum over ranks), d head dim, w ranks.

Ulysses attention on one rank (reference/algorithms.md §6)::

    q, k, v (b, h, s, d) --to_heads--> (b, hc, S, d) --SDPA--> o (b, hc, S, d) --to_seq--> (b, h, s, d)

``to_heads`` sends heads [j*hc, (j+1)*hc) of its s tokens to rank j and receives its own heads for
every rank's tokens; rank j's tokens arrive as rows j of the buffer, so S is ordered rank by rank
(layout.Axis.gathered_order). Buffers are laid out token-major, ``(tokens, b, heads, d)``, so the
uneven token counts of the ranks are plain uneven split sizes of dim 0 (no padding of tokens).

FP8 (``fp8=True``, for Q, V and O; K never): values travel as float8_e4m3fn (sent as uint8) with one
fp32 scale per (token, head) row, through the cdcompile::quantize_fp8_a2a / dequantize_fp8_a2a
ops. Those ops see the token-major buffer as (batch=tokens, seq=b): the heads-split side uses
their rank-major ``split="heads"`` packing with the same zero-padded heads; the sequence side uses
``world_size=1`` packing, which is exactly the rank-ordered token rows (the ops' own ``split="seq"``
assumes the even token split, which a joint text + image sequence does not follow).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

_c10d = torch.ops._c10d_functional


def process_group(degree: int) -> tuple[str, int, int]:
    """(group name, rank, world size) of the default process group, checked against ``degree``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"cachedit: ulysses_degree={degree} needs torch.distributed initialised with {degree} "
            f"processes (torchrun --nproc-per-node {degree} ...; dist.init_process_group()), but no "
            f"process group exists; set ulysses_degree=1 for one process")
    world = dist.get_world_size()
    if world != degree:
        raise ValueError(
            f"cachedit: ulysses_degree={degree} must equal the world size of the process group, "
            f"which is {world}; launch {degree} processes or set ulysses_degree={world}")
    return dist.group.WORLD.group_name, dist.get_rank(), world


def _fp8():
    """The cdcompile kernel ops (imported on first use: they register on import)."""
    from .. import kernels  # noqa: F401

    return torch.ops.cdcompile


# -- token dimension -----------------------------------------------------------------------------

def take(x: torch.Tensor, dim: int, ranges: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """``x`` restricted along ``dim`` to the ``(start, length)`` ranges, concatenated in order."""
    if not ranges:
        return x.narrow(dim, 0, 0)
    if len(ranges) == 1:
        return x.narrow(dim, ranges[0][0], ranges[0][1])
    return torch.cat([x.narrow(dim, s, n) for s, n in ranges], dim=dim)


def gather(x: torch.Tensor, *, dim: int, block: int, ranges: tuple[tuple[int, int], ...], group: str,
           world: int) -> torch.Tensor:
    """Every rank's tokens of ``x`` along ``dim``, in logical order (the inverse of sharding).

    Local lengths differ by rank, so each rank pads to ``block`` tokens; ``ranges`` (static, from
    layout.Axis.gather_ranges) picks the real tokens out of the gathered blocks in logical order.
    """
    xm = x.movedim(dim, 0)
    if xm.shape[0] < block:
        xm = torch.cat([xm, xm.new_zeros((block - xm.shape[0], *xm.shape[1:]))])
    full = _c10d.wait_tensor(_c10d.all_gather_into_tensor(xm.contiguous(), world, group))
    return take(full, 0, ranges).movedim(0, dim)


def halo(x: torch.Tensor, *, dim: int, send: tuple[tuple[int, int], ...], recv: tuple[int, ...],
         group: str) -> torch.Tensor:
    """This rank's rows of a token grid: its tokens along ``dim`` plus the neighbours' halo
    (cdcompile.distributed.grid), by one all-to-all. ``send[j]``: the local ``(lo, hi)`` rank j
    needs from this rank; ``recv[j]``: how many tokens arrive from rank j. Ranks hold consecutive
    token ranges, so the received pieces, in rank order, are the fetched range in order."""
    xm = x.movedim(dim, 0)
    rows = torch.cat([xm[lo:hi] for lo, hi in send])
    flat = rows.reshape(rows.shape[0], -1).contiguous()
    out = _c10d.wait_tensor(_c10d.all_to_all_single(flat, list(recv), [hi - lo for lo, hi in send], group))
    return out.view(sum(recv), *xm.shape[1:]).movedim(0, dim)


def all_reduce_sum(t: torch.Tensor, group: str) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(t, "sum", group))


# -- the two all-to-alls around attention ---------------------------------------------------------

def to_heads_start(x_bhsd: torch.Tensor, *, lens: tuple[int, ...], rank: int, group: str, fp8: bool):
    """Issue the all-to-all that scatters heads and gathers tokens; returns the unwaited buffer(s)."""
    w = len(lens)
    b, h, s, d = x_bhsd.shape
    assert s == lens[rank], (s, lens, rank)
    hc = -(-h // w)
    x_sbhd = x_bhsd.permute(2, 0, 1, 3)
    if fp8:
        values, scales = _fp8().quantize_fp8_a2a(x_sbhd, w, "heads", "auto")
        send = [s * b * hc] * w
        recv = [n * b * hc for n in lens]
        return (_c10d.all_to_all_single(values.view(torch.uint8), recv, send, group),
                _c10d.all_to_all_single(scales, recv, send, group))
    if w * hc != h:
        x_sbhd = F.pad(x_sbhd, (0, 0, 0, w * hc - h))
    rows = x_sbhd.reshape(s, b, w, hc, d).permute(2, 0, 1, 3, 4).reshape(w * s, b * hc * d).contiguous()
    return _c10d.all_to_all_single(rows, list(lens), [s] * w, group)


def to_heads_wait(buf, *, batch: int, heads: int, head_dim: int, lens: tuple[int, ...], fp8: bool,
                  dtype: torch.dtype) -> torch.Tensor:
    """Wait for :func:`to_heads_start`; returns this rank's heads for all tokens, (b, hc, S, d)."""
    hc, total = -(-heads // len(lens)), sum(lens)
    if fp8:
        values = _c10d.wait_tensor(buf[0]).view(torch.float8_e4m3fn)
        scales = _c10d.wait_tensor(buf[1])
        x_sbhd = _fp8().dequantize_fp8_a2a(values, scales, total, batch, hc, 1, "seq", dtype, "auto")
    else:
        x_sbhd = _c10d.wait_tensor(buf).view(total, batch, hc, head_dim)
    return x_sbhd.permute(1, 2, 0, 3)


def to_seq_start(o_bhsd: torch.Tensor, *, lens: tuple[int, ...], rank: int, group: str, fp8: bool):
    """Issue the all-to-all that sends the attention output's tokens back to their ranks."""
    w = len(lens)
    b, hc, total, d = o_bhsd.shape
    o_sbhd = o_bhsd.permute(2, 0, 1, 3)
    send = [n * b * hc for n in lens] if fp8 else list(lens)
    recv = [lens[rank] * b * hc] * w if fp8 else [lens[rank]] * w
    if fp8:
        values, scales = _fp8().quantize_fp8_a2a(o_sbhd, 1, "seq", "auto")
        return (_c10d.all_to_all_single(values.view(torch.uint8), recv, send, group),
                _c10d.all_to_all_single(scales, recv, send, group))
    return _c10d.all_to_all_single(o_sbhd.reshape(total, b * hc * d).contiguous(), recv, send, group)


def to_seq_wait(buf, *, batch: int, heads: int, head_dim: int, lens: tuple[int, ...], rank: int, fp8: bool,
                dtype: torch.dtype) -> torch.Tensor:
    """Wait for :func:`to_seq_start`; returns this rank's tokens with all heads, (b, h, s, d)."""
    w, s = len(lens), lens[rank]
    hc = -(-heads // w)
    if fp8:
        values = _c10d.wait_tensor(buf[0]).view(torch.float8_e4m3fn)
        scales = _c10d.wait_tensor(buf[1])
        o_sbhd = _fp8().dequantize_fp8_a2a(values, scales, s, batch, heads, w, "heads", dtype, "auto")
        return o_sbhd.permute(1, 2, 0, 3)
    rows = _c10d.wait_tensor(buf).view(w, s, batch, hc, head_dim)
    return rows.permute(2, 0, 3, 1, 4).reshape(batch, w * hc, s, head_dim)[:, :heads]


def sdpa_ulysses(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *, q_lens, kv_lens,
                 rank: int, group: str, fp8: bool):
    """Both all-to-alls and the local attention in one call (used where no overlap is scheduled)."""
    b, h, _, d = q.shape
    dt = q.dtype
    common = dict(batch=b, heads=h, head_dim=d, dtype=dt)
    qf = to_heads_wait(to_heads_start(q, lens=q_lens, rank=rank, group=group, fp8=fp8), lens=q_lens, fp8=fp8, **common)
    kf = to_heads_wait(to_heads_start(k, lens=kv_lens, rank=rank, group=group, fp8=False), lens=kv_lens, fp8=False,
                       **common)
    vf = to_heads_wait(to_heads_start(v, lens=kv_lens, rank=rank, group=group, fp8=fp8), lens=kv_lens, fp8=fp8,
                       **common)
    o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=attn_mask, dropout_p=dropout_p,
                                       is_causal=is_causal, scale=scale)
    return to_seq_wait(to_seq_start(o, lens=q_lens, rank=rank, group=group, fp8=fp8), lens=q_lens, rank=rank,
                       fp8=fp8, **common)


# -- torch.nn.MultiheadAttention ------------------------------------------------------------------

def mha_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
                need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
                k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                average_attn_weights=True, is_causal=False, *, q_lens, kv_lens, rank: int, group: str,
                fp8: bool):
    """``F.multi_head_attention_forward`` (sequence-first inputs) with Ulysses attention inside.

    The pass only routes calls here that have no masks, no bias_k/bias_v, no zero attention and
    ``need_weights=False``; ``kv_lens=None`` means key and value are replicated (not sharded).
    """
    e = query.shape[-1]
    hd = e // num_heads
    if use_separate_proj_weight:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)

    def heads(x, w_, b_):  # (L, N, E) -> (N, H, L, hd)
        y = F.linear(x, w_, b_)
        return y.view(y.shape[0], y.shape[1], num_heads, hd).permute(1, 2, 0, 3)

    q, k, v = heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv)
    p = dropout_p if training else 0.0
    if kv_lens is None:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal)
    else:
        o = sdpa_ulysses(q, k, v, None, p, is_causal, q_lens=q_lens, kv_lens=kv_lens, rank=rank, group=group,
                         fp8=fp8)
    o = o.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], e)
    return F.linear(o, out_proj_weight, out_proj_bias), None


def bytes_per_row(dtype: torch.dtype, head_dim: int, fp8: bool) -> int:
    """Bytes one (token, head) row of ``head_dim`` values costs on the wire."""
    if fp8:
        return head_dim + 4  # e4m3 values + one fp32 scale
    return head_dim * torch.empty((), dtype=dtype).element_size()


def heads_per_rank(heads: int, world: int) -> int:
    return math.ceil(heads / world)
