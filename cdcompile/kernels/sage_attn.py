"""SageAttention-style attention: INT8 Q K^T, FP8 P V, fp32 accumulation, online softmax.

Shape legend: b batch, h heads, m query tokens, n key/value tokens, d head dim (32, 64 or 128);
tensors are SDPA-shaped, q_bhmd (b, h, m, d), k_bhnd / v_bhnd (b, h, n, d).

``sage_attention(q, k, v, scale=None, is_causal=False)`` computes what
``torch.nn.functional.scaled_dot_product_attention`` computes (same ``scale`` default 1/sqrt(d),
same top-left aligned causal mask when m != n), in five steps (algorithms.md section 7):

1. Smooth K: subtract its mean over tokens, per (b, h, channel). Every score of a query row moves
   by the same q . mean(k), which softmax cancels; what is left has no common offset, so the
   INT8 scales are spent on the part of K that differs between tokens.
2. Quantize Q and K to INT8, symmetric, one fp32 scale per token (scale = max_d |x| / 127, round
   half to even). Why INT8 and not FP8 here: INT8 keeps 7 bits of magnitude for every element,
   e4m3 only 3 mantissa bits, and errors in Q K^T pass through exp(); on Hopper both run at the
   same tensor-core rate. Why per token and not per block (SageAttention v1's default, kept as the
   ``qk_per_token=False`` variant: one scale per BLOCK_M query / BLOCK_N key tokens): measured on
   CPU with the reference, b=1, h=2, m=n=1000, d=128, bf16, against fp32 SDPA: outlier-channel
   inputs of the tests (4 of 128 channels of Q and K 5x larger, K with a per-channel mean):
   per-block 24.9 dB / cosine 0.9984, per-token 28.6 dB / 0.9993; the same with 10x channels:
   22.6 dB vs 27.8 dB; random N(0, 1) inputs: 28.3 dB vs 28.6 dB (there P V dominates the error).
   The cost is two multiplies per score (key and query scales) instead of one, cheap next to the
   exp2 (bench/kernels.py times both variants). The softmax scale and log2(e) are folded into the
   query scales, so the kernel uses exp2.
3. Quantize V per channel to FP8 e4m3 (scale = max over tokens of |v| / 448, per (b, h, channel)).
4. Per tile of BLOCK_N keys: s = (q8 . k8) * k_scale * q_scale (the INT8 dot is exact in int32),
   masked entries -inf (causal, the tail, and a bool ``attn_mask``'s False; an additive mask is
   added times log2(e)), running max m (a row with no unmasked key yet subtracts 0 instead),
   p = exp2(s - m) in fp32, then p8 = e4m3(p * 448) (p <= 1, so 448 uses e4m3's whole range),
   l = l * exp2(m_old - m) + sum(p8) and
   acc = acc * exp2(m_old - m) + p8 . v8, both in fp32. The FP8 product of each tile starts from
   zero and is added to acc outside the tensor core (two-level accumulation), because Hopper's FP8
   MMA accumulates with fewer bits than fp32.
5. out = acc * v_scale / l, rounded to the input dtype (0 where every key of the row is masked,
   as SDPA gives). The row sum is taken over the quantized p8, so the weights that multiply V are
   exactly the ones normalised: the output is a convex combination of the quantized V rows, and
   P's rounding cannot leak V's channel means into it
   (measured: +2-3 dB SNR when V has a per-channel mean, no change when it has none).

``sage_attention_ref`` is the executable spec: the same quantization and the same tile-by-tile
online softmax in plain torch (so the kernel can be checked tightly against it); it is also the
CPU fallback. Truth for accuracy is fp32 SDPA; the bar is cosine >= 0.999 and SNR >= 25 dB.

Dtypes: bf16 and fp16 in and out; fp32 is accepted too (same quantized math, fp32 out; meant for
CPU tests and references, bf16 and fp16 are the fast path). Inputs must be finite: a NaN or inf
in q, k or v is not detected (that would cost a device sync) and spreads to the outputs it
touches. Inference only (no autograd).

Under ``TRITON_INTERPRET=1`` the INT8 and FP8 ``tl.dot`` run as exact upcast matrix products
(checked: int8 with d = 128 and extreme values, fp8 against fp32 products), so one kernel body
serves the GPU and the interpreter. Rounding to e4m3 and bf16 is to nearest even on both: the
hardware casts on a GPU, fp32 arithmetic under the interpreter, whose casts are wrong (see ``_triton``).
"""

import math
from typing import Optional

import torch

from ._triton import BACKENDS, cast_out, fp32_rounding, tl, tl_dtype, to_e4m3, triton, use_triton

# Tile sizes: untuned; to be measured on H100 (bench/kernels.py --sweep). The reference takes the
# same numbers: they fix the online-softmax tiles (and the scale blocks when qk_per_token=False).
BLOCK_M = 128
BLOCK_N = 64
NUM_STAGES = 3  # software pipelining depth of the key loop; untuned, changes speed only
# Warps of the attention kernel, every head dim. With BLOCK_M = 128, 4 warps hold 128 query rows'
# scores and accumulator in 128 threads: compiled for sm_90a (bench/kernel_aot.py, no GPU needed),
# that took 255 registers and spilled at head dim 64 (odd lengths, causal) and at 128 under the GPU
# machine's Triton 3.6; 8 warps compile without spills everywhere (bench/results/kernels_aot*.md).
NUM_WARPS = 8
QUANT_BLOCK_S = 64  # tokens per program of the V quantization kernel; untuned

HEAD_DIMS = (32, 64, 128)  # the INT8 tensor-core dot takes K >= 32
IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT8_MAX = 127.0
E4M3_MAX = 448.0
SCALE_FLOOR = torch.finfo(torch.float32).tiny  # keeps x / scale finite for an all-zero block
LOG2E = math.log2(math.e)


def _k_mean_and_v_scale(k_bhnd: torch.Tensor, v_bhnd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean of K and per-channel FP8 scale of V, both (b, h, d) fp32; shared by reference and launcher."""
    k_mean = k_bhnd.mean(dim=2, dtype=torch.float32)
    v_min, v_max = torch.aminmax(v_bhnd, dim=2)
    v_amax = torch.maximum(v_max.float(), -v_min.float())
    return k_mean, torch.clamp_min(v_amax / E4M3_MAX, SCALE_FLOOR)


def _quantize_int8_ref(
    x_bhsd: torch.Tensor, block: int, per_token: bool, extra_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8, one scale per token or per block of ``block`` tokens: (int8 (b, h, s, d), fp32 (b, h, s)).

    Per-block scales are repeated for each token of the block; the returned scales carry ``extra_scale``.
    """
    b, h, s, d = x_bhsd.shape
    n_blocks = -(-s // block)
    padded = torch.nn.functional.pad(x_bhsd, (0, 0, 0, n_blocks * block - s))
    blocks = padded.reshape(b, h, n_blocks, block, d)
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # (b, h, n_blocks, block, 1)
    if not per_token:
        amax = amax.amax(dim=-2, keepdim=True).expand_as(amax)
    scale = torch.clamp_min(amax / INT8_MAX, SCALE_FLOOR)
    q8 = torch.round(blocks / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    scale = scale * torch.tensor(extra_scale, dtype=torch.float32)
    return q8.reshape(b, h, -1, d)[:, :, :s], scale.reshape(b, h, -1)[:, :, :s]


def sage_attention_ref(
    q_bhmd: torch.Tensor,
    k_bhnd: torch.Tensor,
    v_bhnd: torch.Tensor,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    qk_per_token: bool = True,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-torch emulation of the kernel's arithmetic (steps 1-5 of the module docstring)."""
    b, h, m, d = q_bhmd.shape
    n = k_bhnd.shape[2]
    mask = None if attn_mask is None else torch.broadcast_to(attn_mask, (b, h, m, n))
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale
    k_mean, v_scale = _k_mean_and_v_scale(k_bhnd, v_bhnd)
    q8, q_scale = _quantize_int8_ref(q_bhmd.float(), block_m, qk_per_token, sm_scale * LOG2E)
    k8, k_scale = _quantize_int8_ref(k_bhnd.float() - k_mean[:, :, None], block_n, qk_per_token, 1.0)
    v8 = (v_bhnd.float() / v_scale[:, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    q8f = q8.float()  # int8 dot products of d <= 128 terms are below 2**24: exact in fp32
    rows = torch.arange(m, device=q_bhmd.device)[:, None]
    m_i = torch.full((b, h, m), -math.inf, device=q_bhmd.device)
    l_i = torch.zeros((b, h, m), device=q_bhmd.device)
    acc = torch.zeros((b, h, m, d), device=q_bhmd.device)
    for start in range(0, n, block_n):
        cols = torch.arange(start, min(start + block_n, n), device=q_bhmd.device)
        s = (q8f @ k8[:, :, cols].float().transpose(-1, -2)) * k_scale[:, :, None, cols] * q_scale[..., None]
        if is_causal:
            s = s.masked_fill(cols[None, :] > rows, -math.inf)
        if mask is not None:
            s = _apply_mask(s, mask[..., cols])
        m_new = torch.maximum(m_i, s.amax(dim=-1))
        m_use = m_new
        if mask is not None:  # a row with no unmasked key yet: subtract 0, so p = 0 rather than NaN
            m_use = torch.where(m_new == -math.inf, 0.0, m_new)
        alpha = torch.exp2(m_i - m_use)
        p = torch.exp2(s - m_use[..., None])
        p8 = (p * E4M3_MAX).to(torch.float8_e4m3fn).float()
        l_i = l_i * alpha + p8.sum(dim=-1)
        acc = acc * alpha[..., None] + p8 @ v8[:, :, cols].float()
        m_i = m_new
    if mask is not None:  # a query row whose keys are all masked has acc = 0: zeros, as SDPA gives
        l_i = torch.where(l_i > 0, l_i, 1.0)
    out = acc * v_scale[:, :, None, :] / l_i[..., None]
    return out.to(q_bhmd.dtype)


def _apply_mask(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA's ``attn_mask`` on a tile of base-2 scores: a bool mask keeps True, an additive one is in
    natural-log units, so it is scaled by log2(e) in fp32 as the kernel does."""
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask, -math.inf)
    return s + mask.float() * torch.tensor(LOG2E, dtype=torch.float32)


@triton.jit
def _quantize_int8_kernel(
    x_ptr, mean_ptr, out_ptr, scale_ptr, extra_scale,
    stride_xb, stride_xh, stride_xs, stride_xd,
    H, S,
    HAS_MEAN: tl.constexpr, PER_TOKEN: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_D: tl.constexpr,
):
    # One program: one block of BLOCK_S tokens of one (b, h); writes contiguous int8 + a scale per token.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tokens = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_D)
    live = (tokens < S)[:, None]
    src = x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    x = tl.load(src + tokens.to(tl.int64)[:, None] * stride_xs + dims[None, :] * stride_xd, mask=live, other=0.0)
    x = x.to(tl.float32)
    if HAS_MEAN:
        x = tl.where(live, x - tl.load(mean_ptr + pid_bh.to(tl.int64) * HEAD_D + dims)[None, :], 0.0)
    amax = tl.max(tl.abs(x), axis=1)
    if not PER_TOKEN:
        amax = tl.zeros_like(amax) + tl.max(amax)
    scale = tl.maximum(tl.math.div_rn(amax, 127.0), 1.1754943508222875e-38)  # SCALE_FLOOR
    y = tl.math.div_rn(x, scale[:, None])
    y = (y + 12582912.0) - 12582912.0  # round half to even, |y| <= 127 (see _triton.round_to_e4m3)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    dst = out_ptr + pid_bh.to(tl.int64) * S * HEAD_D + tokens.to(tl.int64)[:, None] * HEAD_D + dims[None, :]
    tl.store(dst, y.to(tl.int8), mask=live)
    tl.store(scale_ptr + pid_bh.to(tl.int64) * S + tokens, scale * extra_scale, mask=tokens < S)


@triton.jit
def _quantize_v_kernel(
    v_ptr, scale_ptr, out_ptr,
    stride_vb, stride_vh, stride_vs, stride_vd,
    H, S, S_PAD,
    BLOCK_S: tl.constexpr, HEAD_D: tl.constexpr, FP32_ROUNDING: tl.constexpr,
):
    # One program: BLOCK_S tokens of one (b, h) to e4m3 with the per-channel scales, written
    # transposed, (b, h, d, S_PAD) with tokens contiguous: the layout Hopper's FP8 MMA wants for
    # the right-hand operand of P . V (as in Triton's fused-attention tutorial).
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tokens = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_D)
    live = (tokens < S)[:, None]
    src = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    v = tl.load(src + tokens.to(tl.int64)[:, None] * stride_vs + dims[None, :] * stride_vd, mask=live, other=0.0)
    scale = tl.load(scale_ptr + pid_bh.to(tl.int64) * HEAD_D + dims)
    y = tl.math.div_rn(v.to(tl.float32), scale[None, :])
    y = to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), FP32_ROUNDING)
    dst = out_ptr + pid_bh.to(tl.int64) * HEAD_D * S_PAD + dims[None, :] * S_PAD + tokens.to(tl.int64)[:, None]
    tl.store(dst, y, mask=live)


@triton.jit
def _sage_attention_kernel(
    q8_ptr, q_scale_ptr, k8_ptr, k_scale_ptr, v8_ptr, v_scale_ptr, out_ptr,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    M, N, N_PAD, H,
    IS_CAUSAL: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    EVEN_N: tl.constexpr, FP32_ROUNDING: tl.constexpr, MASK: tl.constexpr,
):
    # One program: BLOCK_M query rows of one (b, h). q8, k8: contiguous (b, h, s, d); v8: (b, h, d, N_PAD).
    # EVEN_N: N is a multiple of BLOCK_N, so no key tile needs a mask (the loads and the -inf select
    # are left out of the loop). FP32_ROUNDING (see _triton): on a GPU, P * 448 in [0, 448] takes the
    # hardware cast, keeping the softmax, this loop's bottleneck, a dozen instructions per score shorter.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_D)
    q_live = (rows < M)[:, None]
    q8 = tl.load(q8_ptr + pid_bh * M * HEAD_D + rows[:, None] * HEAD_D + dims[None, :], mask=q_live, other=0)
    q_scale = tl.load(q_scale_ptr + pid_bh * M + rows, mask=rows < M, other=0.0)  # has sm_scale * log2(e)
    k_base = k8_ptr + pid_bh * N * HEAD_D
    v_base = v8_ptr + pid_bh * HEAD_D * N_PAD
    # MASK: 0 none, 1 bool (uint8, nonzero attends), 2 additive (natural-log units); its strides are
    # those of the mask broadcast to (b, h, m, n), zero along broadcast dims
    mask_rows = (mask_ptr + (pid_bh // H) * stride_mb + (pid_bh % H) * stride_mh
                 + rows.to(tl.int64)[:, None] * stride_mm)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_D), dtype=tl.float32)
    if IS_CAUSAL:
        hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)  # keys past this block's last row are all masked
    else:
        hi = N
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        if EVEN_N:
            k8 = tl.load(k_base + cols[:, None] * HEAD_D + dims[None, :])
            k_scale = tl.load(k_scale_ptr + pid_bh * N + cols)
        else:
            k8 = tl.load(k_base + cols[:, None] * HEAD_D + dims[None, :], mask=(cols < N)[:, None], other=0)
            k_scale = tl.load(k_scale_ptr + pid_bh * N + cols, mask=cols < N, other=0.0)
        s = tl.dot(q8, tl.trans(k8)).to(tl.float32) * k_scale[None, :] * q_scale[:, None]  # exact int32 dot
        if IS_CAUSAL:
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols < N)[None, :], s, float("-inf"))
        elif not EVEN_N:
            s = tl.where((cols < N)[None, :], s, float("-inf"))
        if MASK != 0:
            mv = tl.load(mask_rows + cols.to(tl.int64)[None, :] * stride_mn, mask=q_live & (cols < N)[None, :],
                         other=0)
            if MASK == 1:
                s = tl.where(mv != 0, s, float("-inf"))
            else:
                s = s + mv.to(tl.float32) * 1.4426950408889634  # log2(e)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if MASK != 0:  # a row with no unmasked key yet: subtract 0, so p = 0 rather than NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        p8 = to_e4m3(p * 448.0, FP32_ROUNDING)
        l_i = l_i * alpha + tl.sum(p8.to(tl.float32), axis=1)
        if EVEN_N:
            v8 = tl.load(v_base + dims[None, :] * N_PAD + cols[:, None])
        else:
            v8 = tl.load(v_base + dims[None, :] * N_PAD + cols[:, None], mask=(cols < N)[:, None], other=0.0)
        # The tile's FP8 product starts from zero and is added in fp32: Hopper's FP8 MMA accumulates
        # with fewer than fp32's bits, so it must not carry acc across the whole key loop.
        acc = acc * alpha[:, None] + tl.dot(p8, v8)
        m_i = m_new

    v_scale = tl.load(v_scale_ptr + pid_bh * HEAD_D + dims)
    if MASK != 0:  # every key of the row masked: acc = 0, so zeros, as SDPA gives
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc * v_scale[None, :] / l_i[:, None]
    dst = out_ptr + pid_bh * M * HEAD_D + rows[:, None] * HEAD_D + dims[None, :]
    tl.store(dst, cast_out(out, OUT_DTYPE, FP32_ROUNDING), mask=q_live)


def _quantize_qkv(q_bhmd, k_bhnd, v_bhnd, scale, block_m, block_n, qk_per_token):
    """Steps 1-3 on the device: two torch reductions and three small Triton kernels."""
    b, h, m, d = q_bhmd.shape
    n = k_bhnd.shape[2]
    dev = q_bhmd.device
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale
    k_mean, v_scale = _k_mean_and_v_scale(k_bhnd, v_bhnd)
    q8 = torch.empty((b, h, m, d), dtype=torch.int8, device=dev)
    k8 = torch.empty((b, h, n, d), dtype=torch.int8, device=dev)
    n_pad = triton.cdiv(n, 16) * 16  # 16-byte aligned rows of the transposed FP8 V
    v8 = torch.empty((b, h, d, n_pad), dtype=torch.float8_e4m3fn, device=dev)
    q_scale = torch.empty((b, h, m), dtype=torch.float32, device=dev)
    k_scale = torch.empty((b, h, n), dtype=torch.float32, device=dev)
    # rounded to fp32 as the reference's torch.tensor(extra_scale) is: the kernel multiplies fp32 by fp32
    q_extra = float(torch.tensor(sm_scale * LOG2E, dtype=torch.float32))
    _quantize_int8_kernel[(triton.cdiv(m, block_m), b * h)](
        q_bhmd, q_bhmd, q8, q_scale, q_extra, *q_bhmd.stride(), h, m,
        HAS_MEAN=False, PER_TOKEN=qk_per_token, BLOCK_S=block_m, HEAD_D=d,
    )
    _quantize_int8_kernel[(triton.cdiv(n, block_n), b * h)](
        k_bhnd, k_mean, k8, k_scale, 1.0, *k_bhnd.stride(), h, n,
        HAS_MEAN=True, PER_TOKEN=qk_per_token, BLOCK_S=block_n, HEAD_D=d,
    )
    _quantize_v_kernel[(triton.cdiv(n, QUANT_BLOCK_S), b * h)](
        v_bhnd, v_scale, v8, *v_bhnd.stride(), h, n, n_pad,
        BLOCK_S=QUANT_BLOCK_S, HEAD_D=d, FP32_ROUNDING=fp32_rounding(),
    )
    return q8, q_scale, k8, k_scale, v8, v_scale


def _attend(
    quantized, out_dtype, is_causal, block_m, block_n, num_warps=NUM_WARPS, num_stages=NUM_STAGES, round_in_fp32=None,
    attn_mask=None,
):
    """Steps 4-5: the attention kernel over the outputs of ``_quantize_qkv``.

    ``num_warps`` (default ``NUM_WARPS``), ``num_stages`` and ``round_in_fp32`` (default:
    ``_triton.fp32_rounding()``) change speed, not results, on a GPU; bench/kernel_bench.py sweeps them.
    """
    q8, q_scale, k8, k_scale, v8, v_scale = quantized
    b, h, m, d = q8.shape
    n, n_pad = k8.shape[2], v8.shape[3]
    out = torch.empty((b, h, m, d), dtype=out_dtype, device=q8.device)
    if attn_mask is None:
        mask, mask_kind = q8, 0  # any pointer: MASK=0 never reads it
        strides = (0, 0, 0, 0)
    else:
        mask = torch.broadcast_to(attn_mask, (b, h, m, n))  # a view: broadcast dims get stride 0
        mask, mask_kind = (mask.view(torch.uint8), 1) if mask.dtype == torch.bool else (mask, 2)
        strides = mask.stride()
    _sage_attention_kernel[(triton.cdiv(m, block_m), b * h)](
        q8, q_scale, k8, k_scale, v8, v_scale, out, mask, *strides, m, n, n_pad, h,
        IS_CAUSAL=is_causal, OUT_DTYPE=tl_dtype(out_dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=d,
        EVEN_N=n % block_n == 0, FP32_ROUNDING=fp32_rounding() if round_in_fp32 is None else round_in_fp32,
        MASK=mask_kind,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def _sage_attention_triton(
    q_bhmd, k_bhnd, v_bhnd, scale, is_causal, block_m=BLOCK_M, block_n=BLOCK_N, qk_per_token=True, attn_mask=None
):
    """The Triton path: quantize, then attend (no validation; ``sage_attention`` validates)."""
    quantized = _quantize_qkv(q_bhmd, k_bhnd, v_bhnd, scale, block_m, block_n, qk_per_token)
    return _attend(quantized, q_bhmd.dtype, is_causal, block_m, block_n, attn_mask=attn_mask)


def _check_attention(q_bhmd, k_bhnd, v_bhnd, scale, is_causal, backend, attn_mask=None) -> None:
    named = (("q", q_bhmd), ("k", k_bhnd), ("v", v_bhnd))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d (batch, heads, seq, head_dim) tensor like SDPA's, got {got}")

    def shapes() -> str:  # built only when raising: Dynamo cannot format symbolic shapes
        return ", ".join(f"{name} {tuple(t.shape)}" for name, t in named)

    if not q_bhmd.dtype == k_bhnd.dtype == v_bhnd.dtype or q_bhmd.dtype not in IN_DTYPES:
        raise ValueError(f"q, k, v must share one dtype of {IN_DTYPES}, got {[str(t.dtype) for _, t in named]}")
    if not q_bhmd.device == k_bhnd.device == v_bhnd.device:
        raise ValueError(f"q, k, v must be on one device, got {[str(t.device) for _, t in named]}")
    if q_bhmd.shape[:2] != k_bhnd.shape[:2] or k_bhnd.shape[:3] != v_bhnd.shape[:3]:
        raise ValueError(f"q, k, v must share batch and heads, and k, v their length: {shapes()}")
    if not q_bhmd.shape[3] == k_bhnd.shape[3] == v_bhnd.shape[3] or q_bhmd.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS} and equal for q, k, v: {shapes()}")
    if q_bhmd.shape[2] < 1 or k_bhnd.shape[2] < 1:
        raise ValueError(f"q and k need at least one token each: {shapes()}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if not isinstance(is_causal, bool):
        raise ValueError(f"is_causal must be a bool, got {is_causal!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if attn_mask is not None:
        _check_mask(attn_mask, q_bhmd, k_bhnd, is_causal)


def _check_mask(mask, q_bhmd, k_bhnd, is_causal) -> None:
    """SDPA's rules: bool or floating, broadcastable to (b, h, m, n), not together with is_causal."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attn_mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool (True attends) or floating (added to the scores), got {mask.dtype}")
    if mask.device != q_bhmd.device:
        raise ValueError(f"attn_mask must be on q's device {q_bhmd.device}, got {mask.device}")
    full = (q_bhmd.shape[0], q_bhmd.shape[1], q_bhmd.shape[2], k_bhnd.shape[2])
    if mask.dim() > 4 or any(x != 1 and x != y for x, y in zip(reversed(mask.shape), reversed(full))):
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, "
                         f"q tokens, k tokens) = {tuple(full)}")
    if is_causal:
        raise ValueError("attn_mask and is_causal=True together: give one (as scaled_dot_product_attention requires)")


def sage_attention(
    q_bhmd: torch.Tensor,
    k_bhnd: torch.Tensor,
    v_bhnd: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Drop-in for ``F.scaled_dot_product_attention(q, k, v, attn_mask, scale=..., is_causal=...)`` with
    INT8/FP8 math.

    ``attn_mask`` as SDPA takes it: bool (True attends) or floating (added to the scores),
    broadcastable to (b, h, m, n); a query row with every key masked gives zeros, as SDPA does.
    ``backend``: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "torch"; see ``_triton``.
    Returns a contiguous (b, h, m, d) tensor of q's dtype. Raises ValueError on bad inputs.
    """
    _check_attention(q_bhmd, k_bhnd, v_bhnd, scale, is_causal, backend, attn_mask)
    return torch.ops.cdcompile.sage_attention(q_bhmd, k_bhnd, v_bhnd, scale, is_causal, backend, attn_mask)


@torch.library.custom_op("cdcompile::sage_attention", mutates_args=())
def _sage_attention_op(
    q_bhmd: torch.Tensor,
    k_bhnd: torch.Tensor,
    v_bhnd: torch.Tensor,
    scale: Optional[float],
    is_causal: bool,
    backend: str,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    _check_attention(q_bhmd, k_bhnd, v_bhnd, scale, is_causal, backend, attn_mask)
    if use_triton(q_bhmd.device, backend):
        return _sage_attention_triton(q_bhmd, k_bhnd, v_bhnd, scale, is_causal, attn_mask=attn_mask)
    out = sage_attention_ref(q_bhmd, k_bhnd, v_bhnd, scale=scale, is_causal=is_causal, attn_mask=attn_mask)
    return out.contiguous()


@_sage_attention_op.register_fake
def _(q_bhmd, k_bhnd, v_bhnd, scale, is_causal, backend, attn_mask=None):
    _check_attention(q_bhmd, k_bhnd, v_bhnd, scale, is_causal, backend, attn_mask)
    return torch.empty_like(q_bhmd, memory_format=torch.contiguous_format)
