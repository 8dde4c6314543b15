"""FP8 per-(token, head) quantization fused with the Ulysses all-to-all permutation, and its inverse.

Shape legend: b batch, s tokens, h heads, d head dim, w ranks (world size), r rows of the packed
buffer (one row = one (token, head) pair of d values), hc heads per rank = ceil(h / w).

Quantization (algorithms.md section 6): each row x[b, s, h, :] gets one fp32 scale
``scale = max_d |x| / 448`` (raised to ``SCALE_FLOOR`` so an all-zero row divides safely) and
``values = e4m3(x / scale)`` rounded to nearest even; ``dequantize = values * scale``.
Non-finite input: a row that holds any NaN or +-inf is sent as zeros with a NaN scale, so the
whole row dequantizes to NaN. The damage stays in that (token, head) row and is never hidden.

The packed layout is rank-major: chunk j of the buffer goes to rank j, so it can be handed to
``all_to_all_single`` with the split sizes that ``a2a_split_rows`` returns. One logical tensor
x_bshd (b, s, h, d) and ``split`` fix the layout; the inverse takes the same description:

- ``split="heads"``: heads are padded with zero heads to w * hc and chunk j holds heads
  [j*hc, (j+1)*hc) of every token: rows ordered (w, b, s, hc). Even chunks (padding, not uneven
  head splits) keep every rank's head count equal, which the attention between the two exchanges
  needs; the cost is (w*hc - h) / h extra bytes, zero when w divides h. The last ranks may
  receive padding heads (zeros); attention over them gives zeros, which the inverse drops.
- ``split="seq"``: tokens are split unevenly, the first ``s % w`` ranks one token longer (see
  ``seq_split_sizes``), and chunk j holds rank j's tokens: rows ordered (w, b, s_j, h), no padding.

Ulysses attention on rank i of w, with S = sum of all local lengths, s_i = seq_split_sizes(S, w)[i]:

  pre-attention (scatter heads, gather sequence), x_local (b, s_i, h, d):
      vals, scales = quantize_fp8_a2a(x_local, world_size=w, split="heads")
      send = a2a_split_rows(b, s_i, h, w, "heads");  recv = a2a_split_rows(b, S, hc, w, "seq")
      exchange vals and scales with all_to_all_single(out, in, output_split_sizes=recv, input_split_sizes=send)
      x_mine = dequantize_fp8_a2a(vals, scales, batch=b, seq_len=S, num_heads=hc, world_size=w, split="seq")
  post-attention (scatter sequence, gather heads), o_mine (b, S, hc, d):
      vals, scales = quantize_fp8_a2a(o_mine, world_size=w, split="seq")
      send = a2a_split_rows(b, S, hc, w, "seq");  recv = a2a_split_rows(b, s_i, h, w, "heads")
      exchange, then o_local = dequantize_fp8_a2a(..., batch=b, seq_len=s_i, num_heads=h, world_size=w, split="heads")

Inputs may be any strided view (e.g. SDPA's (b, h, s, d) output transposed to (b, s, h, d)); outputs
are contiguous. Values are ``float8_e4m3fn`` (view them as uint8 if a collective refuses fp8), scales
fp32. Inference only: the ops register no autograd formula.

The kernels compute in fp32 with correctly rounded division (``div_rn``) and round to e4m3 (and to
bf16 on dequantization) to nearest even: with the hardware casts on a GPU, in fp32 arithmetic under
the interpreter (``_triton.fp32_rounding``). They match the reference bit for bit under the
interpreter; the tested contract is one e4m3 ulp for values and one fp32 ulp for scales.
"""

import torch

from ._triton import BACKENDS, cast_out, fp32_rounding, tl, tl_dtype, to_e4m3, triton, use_triton

E4M3_MAX = 448.0
SCALE_FLOOR = torch.finfo(torch.float32).tiny  # 2**-126: smallest normal fp32, keeps x / scale finite
SPLITS = ("heads", "seq")
IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_DIM = 1024  # one row is one Triton block; wider rows would need a loop over d


def seq_split_sizes(seq_len: int, world_size: int) -> list[int]:
    """Tokens per rank for ``seq_len`` tokens over ``world_size`` ranks; the first ``seq_len % w`` get one more."""
    q, rem = seq_len // world_size, seq_len % world_size
    return [q + 1 if r < rem else q for r in range(world_size)]


def a2a_split_rows(batch: int, seq_len: int, num_heads: int, world_size: int, split: str) -> list[int]:
    """Rows per rank of the packed buffer for the logical tensor (batch, seq_len, num_heads, d)."""
    if split == "heads":
        return [batch * seq_len * -(-num_heads // world_size)] * world_size
    return [batch * n * num_heads for n in seq_split_sizes(seq_len, world_size)]


def _packed_rows(batch: int, seq_len: int, num_heads: int, world_size: int, split: str) -> int:
    """Total rows of the packed buffer (sum of ``a2a_split_rows``), without building the list."""
    return batch * seq_len * (world_size * -(-num_heads // world_size) if split == "heads" else num_heads)


def _quantize_rows_ref(x_rd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of (r, d) values; the spec the kernel's per-row math follows."""
    xf = x_rd.float()
    finite = torch.isfinite(xf).all(dim=-1)
    scale = torch.clamp_min(xf.abs().amax(dim=-1) / E4M3_MAX, SCALE_FLOOR)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    y = torch.where(finite[:, None], xf / scale[:, None], torch.zeros_like(xf))
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_fp8_a2a_ref(x_bshd: torch.Tensor, world_size: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch quantize + pack: returns (values_rd float8_e4m3fn, scales_r fp32) in rank-major order."""
    b, s, h, d = x_bshd.shape
    if split == "heads":
        hc = -(-h // world_size)
        padded = torch.nn.functional.pad(x_bshd, (0, 0, 0, world_size * hc - h))
        rows = padded.reshape(b, s, world_size, hc, d).permute(2, 0, 1, 3, 4).reshape(-1, d)
    else:
        chunks = torch.split(x_bshd, seq_split_sizes(s, world_size), dim=1)
        rows = torch.cat([c.reshape(-1, d) for c in chunks])
    return _quantize_rows_ref(rows)


def dequantize_fp8_a2a_ref(
    values_rd: torch.Tensor,
    scales_r: torch.Tensor,
    batch: int,
    seq_len: int,
    num_heads: int,
    world_size: int,
    split: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Plain-torch dequantize + unpack of a buffer laid out as ``quantize_fp8_a2a_ref`` lays out (b, s, h, d)."""
    d = values_rd.shape[1]
    rows = (values_rd.float() * scales_r[:, None]).to(out_dtype)
    if split == "heads":
        hc = -(-num_heads // world_size)
        x = rows.reshape(world_size, batch, seq_len, hc, d).permute(1, 2, 0, 3, 4)
        return x.reshape(batch, seq_len, world_size * hc, d)[:, :, :num_heads].contiguous()
    chunks = torch.split(rows, a2a_split_rows(batch, seq_len, num_heads, world_size, split))
    sizes = seq_split_sizes(seq_len, world_size)
    return torch.cat([c.reshape(batch, n, num_heads, d) for c, n in zip(chunks, sizes)], dim=1)


@triton.jit
def _packed_row(b, s, h, B, S, H_PACKED, HC, W, SPLIT_SEQ: tl.constexpr):
    """Row of the packed buffer that holds logical row (b, s, h); H_PACKED = w*hc (heads) or h (seq)."""
    if SPLIT_SEQ:
        q = S // W
        rem = S % W
        long_tokens = rem * (q + 1)  # tokens owned by the ranks that got one extra
        rank = tl.where(s < long_tokens, s // (q + 1), rem + (s - long_tokens) // tl.maximum(q, 1))
        first = rank * q + tl.minimum(rank, rem)  # first token of that rank
        n_rank = q + (rank < rem).to(tl.int32)
        row = B * first * H_PACKED + (b * n_rank + (s - first)) * H_PACKED + h
    else:
        row = ((h // HC) * B * S + b * S + s) * HC + h % HC
    return row.to(tl.int64)


@triton.jit
def _quantize_pack_kernel(
    x_ptr, val_ptr, scale_ptr,
    stride_xb, stride_xs, stride_xh, stride_xd,
    B, S, H, H_PACKED, HC, W, D, n_rows,
    SPLIT_SEQ: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, FP32_ROUNDING: tl.constexpr,
):
    # One program quantizes BLOCK_R logical rows of the (b, s, H_PACKED) grid; padded heads
    # (h >= H) load as zeros, so they leave as zero values with the floor scale.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    h = rows % H_PACKED
    s = (rows // H_PACKED) % S
    b = rows // (H_PACKED * S)
    live = rows < n_rows
    src = b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs + h.to(tl.int64) * stride_xh
    load_mask = (live & (h < H))[:, None] & (cols < D)[None, :]
    x = tl.load(x_ptr + src[:, None] + cols[None, :] * stride_xd, mask=load_mask, other=0.0).to(tl.float32)

    bad = (x != x) | (tl.abs(x) == float("inf"))
    finite = tl.sum(bad.to(tl.int32), axis=1) == 0
    amax = tl.max(tl.where(bad, 0.0, tl.abs(x)), axis=1)
    scale = tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38)  # SCALE_FLOOR
    y = tl.math.div_rn(x, scale[:, None])
    y = tl.where(finite[:, None], tl.minimum(tl.maximum(y, -448.0), 448.0), 0.0)
    scale = tl.where(finite, scale, float("nan"))

    dst = _packed_row(b, s, h, B, S, H_PACKED, HC, W, SPLIT_SEQ)
    store_mask = live[:, None] & (cols < D)[None, :]
    tl.store(val_ptr + dst[:, None] * D + cols[None, :], to_e4m3(y, FP32_ROUNDING), mask=store_mask)
    tl.store(scale_ptr + dst, scale, mask=live)


@triton.jit
def _dequantize_unpack_kernel(
    val_ptr, scale_ptr, out_ptr,
    B, S, H, H_PACKED, HC, W, D, n_rows,
    SPLIT_SEQ: tl.constexpr, OUT_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    FP32_ROUNDING: tl.constexpr,
):
    # One program writes BLOCK_R rows of the contiguous (b, s, H, d) output; padded heads are skipped.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    h = rows % H
    s = (rows // H) % S
    b = rows // (H * S)
    live = rows < n_rows
    mask = live[:, None] & (cols < D)[None, :]
    src = _packed_row(b, s, h, B, S, H_PACKED, HC, W, SPLIT_SEQ)
    vals = tl.load(val_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + src, mask=live, other=1.0)
    out = cast_out(vals * scale[:, None], OUT_DTYPE, FP32_ROUNDING)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], out, mask=mask)


def _block_rows(d: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(d)
    return max(1, 4096 // block_d), block_d  # ~4K elements per program; untuned, to be measured on H100


def _quantize_triton(x_bshd: torch.Tensor, world_size: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, d = x_bshd.shape
    hc = -(-h // world_size)
    h_packed = world_size * hc if split == "heads" else h
    n_rows = b * s * h_packed
    values = torch.empty((n_rows, d), dtype=torch.float8_e4m3fn, device=x_bshd.device)
    scales = torch.empty((n_rows,), dtype=torch.float32, device=x_bshd.device)
    if n_rows == 0:
        return values, scales
    block_r, block_d = _block_rows(d)
    _quantize_pack_kernel[(triton.cdiv(n_rows, block_r),)](
        x_bshd, values, scales, *x_bshd.stride(),
        b, s, h, h_packed, hc, world_size, d, n_rows,
        SPLIT_SEQ=split == "seq", BLOCK_R=block_r, BLOCK_D=block_d, FP32_ROUNDING=fp32_rounding(),
    )
    return values, scales


def _dequantize_triton(values_rd, scales_r, batch, seq_len, num_heads, world_size, split, out_dtype):
    d = values_rd.shape[1]
    hc = -(-num_heads // world_size)
    h_packed = world_size * hc if split == "heads" else num_heads
    out = torch.empty((batch, seq_len, num_heads, d), dtype=out_dtype, device=values_rd.device)
    n_rows = batch * seq_len * num_heads
    if n_rows == 0:
        return out
    block_r, block_d = _block_rows(d)
    _dequantize_unpack_kernel[(triton.cdiv(n_rows, block_r),)](
        values_rd.contiguous(), scales_r.contiguous(), out,
        batch, seq_len, num_heads, h_packed, hc, world_size, d, n_rows,
        SPLIT_SEQ=split == "seq", OUT_DTYPE=tl_dtype(out_dtype), BLOCK_R=block_r, BLOCK_D=block_d,
        FP32_ROUNDING=fp32_rounding(),
    )
    return out


def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _check_common(world_size: int, split: str, backend: str) -> None:
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_quantize(x_bshd: torch.Tensor, world_size: int, split: str, backend: str) -> None:
    _check_common(world_size, split, backend)
    if not isinstance(x_bshd, torch.Tensor) or x_bshd.dim() != 4:
        got = tuple(x_bshd.shape) if isinstance(x_bshd, torch.Tensor) else type(x_bshd).__name__
        raise ValueError(f"x_bshd must be a 4-d (batch, seq, heads, head_dim) tensor, got shape {got}")
    if x_bshd.dtype not in IN_DTYPES:
        raise ValueError(f"x_bshd dtype must be one of {IN_DTYPES}, got {x_bshd.dtype}")
    if not 1 <= x_bshd.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got shape {tuple(x_bshd.shape)}")


def _check_dequantize(values_rd, scales_r, batch, seq_len, num_heads, world_size, split, out_dtype, backend):
    _check_common(world_size, split, backend)
    for name, v in (("batch", batch), ("seq_len", seq_len), ("num_heads", num_heads)):
        if not _is_int(v) or v < (1 if name == "num_heads" else 0):
            raise ValueError(f"{name} must be a non-negative int (num_heads >= 1), got {v!r}")
    if values_rd.dim() != 2 or values_rd.dtype != torch.float8_e4m3fn:
        raise ValueError(
            f"values_rd must be 2-d float8_e4m3fn (rows, head_dim), got shape {tuple(values_rd.shape)} "
            f"dtype {values_rd.dtype}"
        )
    if scales_r.dim() != 1 or scales_r.dtype != torch.float32 or scales_r.shape[0] != values_rd.shape[0]:
        raise ValueError(
            f"scales_r must be 1-d float32 with one scale per row of values_rd {tuple(values_rd.shape)}, "
            f"got shape {tuple(scales_r.shape)} dtype {scales_r.dtype}"
        )
    if values_rd.device != scales_r.device:
        raise ValueError(f"values_rd is on {values_rd.device} but scales_r is on {scales_r.device}")
    if not 1 <= values_rd.shape[1] <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got values_rd shape {tuple(values_rd.shape)}")
    expected = _packed_rows(batch, seq_len, num_heads, world_size, split)
    if values_rd.shape[0] != expected:
        raise ValueError(
            f"values_rd has {values_rd.shape[0]} rows but (batch={batch}, seq_len={seq_len}, "
            f"num_heads={num_heads}, world_size={world_size}, split={split!r}) packs into {expected}"
        )
    if out_dtype not in IN_DTYPES:
        raise ValueError(f"out_dtype must be one of {IN_DTYPES}, got {out_dtype}")


def quantize_fp8_a2a(
    x_bshd: torch.Tensor, *, world_size: int, split: str, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize (b, s, h, d) to e4m3 per (token, head) and pack rank-major; see the module docstring.

    Returns ``(values_rd, scales_r)``: float8_e4m3fn of shape (rows, d) and fp32 of shape (rows,),
    rows = ``sum(a2a_split_rows(b, s, h, world_size, split))``.
    """
    _check_quantize(x_bshd, world_size, split, backend)
    return torch.ops.cdcompile.quantize_fp8_a2a(x_bshd, world_size, split, backend)


def dequantize_fp8_a2a(
    values_rd: torch.Tensor,
    scales_r: torch.Tensor,
    *,
    batch: int,
    seq_len: int,
    num_heads: int,
    world_size: int,
    split: str,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """Dequantize + unpack a rank-major buffer back to a contiguous (batch, seq_len, num_heads, d) tensor."""
    _check_dequantize(values_rd, scales_r, batch, seq_len, num_heads, world_size, split, out_dtype, backend)
    return torch.ops.cdcompile.dequantize_fp8_a2a(
        values_rd, scales_r, batch, seq_len, num_heads, world_size, split, out_dtype, backend
    )


@torch.library.custom_op("cdcompile::quantize_fp8_a2a", mutates_args=())
def _quantize_op(x_bshd: torch.Tensor, world_size: int, split: str, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_quantize(x_bshd, world_size, split, backend)
    if use_triton(x_bshd.device, backend):
        return _quantize_triton(x_bshd, world_size, split)
    return quantize_fp8_a2a_ref(x_bshd, world_size, split)


@_quantize_op.register_fake
def _(x_bshd, world_size, split, backend):
    _check_quantize(x_bshd, world_size, split, backend)
    b, s, h, d = x_bshd.shape
    n_rows = _packed_rows(b, s, h, world_size, split)
    return (
        x_bshd.new_empty((n_rows, d), dtype=torch.float8_e4m3fn),
        x_bshd.new_empty((n_rows,), dtype=torch.float32),
    )


@torch.library.custom_op("cdcompile::dequantize_fp8_a2a", mutates_args=())
def _dequantize_op(
    values_rd: torch.Tensor,
    scales_r: torch.Tensor,
    batch: int,
    seq_len: int,
    num_heads: int,
    world_size: int,
    split: str,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    args = (values_rd, scales_r, batch, seq_len, num_heads, world_size, split, out_dtype)
    _check_dequantize(*args, backend)
    if use_triton(values_rd.device, backend):
        return _dequantize_triton(*args)
    return dequantize_fp8_a2a_ref(*args)


@_dequantize_op.register_fake
def _(values_rd, scales_r, batch, seq_len, num_heads, world_size, split, out_dtype, backend):
    return values_rd.new_empty((batch, seq_len, num_heads, values_rd.shape[1]), dtype=out_dtype)
