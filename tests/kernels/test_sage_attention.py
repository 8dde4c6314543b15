"""Sage-style attention: kernel vs its emulating reference, both vs fp32 SDPA, masking, validation.

Shape legend: b batch, h heads, m query tokens, n key tokens, d head dim; tensors are (b, h, m|n, d).
Floors: kernel vs reference SNR >= 60 dB (the quantization itself costs 27-30 dB, so a kernel bug
cannot hide under it); anything vs fp32 SDPA cosine >= 0.999 and SNR >= 25 dB (algorithms.md section 7).
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_metrics import assert_quality

from cdcompile.kernels import _triton, sage_attention, sage_attention_ref
from cdcompile.kernels.sage_attn import _sage_attention_triton

KERNEL_VS_REF = dict(min_cos=0.99999, min_snr_db=60.0)
VS_SDPA = dict(min_cos=0.999, min_snr_db=25.0)


def _inputs(kind, b, h, m, n, d, dtype, seed):
    """``random``: N(0, 1). ``outliers``: token norms vary (x0.74..1.35 for one sigma), 4 channels of
    Q and K five times larger, and K carries a per-channel token mean (N(0, 2), N(0, 20) on the
    outlier channels), as attention inputs of trained DiTs do."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for length in (m, n, n))
    if kind == "outliers":
        q = q * torch.exp(0.3 * torch.randn(b, h, m, 1, generator=g))
        k = k * torch.exp(0.3 * torch.randn(b, h, n, 1, generator=g))
        channels = torch.randperm(d, generator=g)[:4]
        q[..., channels] *= 5.0
        k[..., channels] *= 5.0
        k = k + 2.0 * torch.randn(b, h, 1, d, generator=g)
        k[..., channels] += 20.0 * torch.randn(b, h, 1, 4, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sdpa_fp32(q, k, v, is_causal=False, scale=None):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal, scale=scale)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "b,h,m,n,d,is_causal,dtype,block_m,block_n,per_token",
    [
        (1, 2, 77, 77, 64, False, torch.float32, 16, 16, True),
        (3, 1, 77, 50, 128, True, torch.bfloat16, 16, 32, False),
        (3, 1, 50, 77, 64, True, torch.float16, 32, 16, True),
        (1, 1, 200, 1000, 128, False, torch.float16, 128, 64, True),
        (1, 1, 1000, 300, 64, True, torch.bfloat16, 128, 64, True),
        (1, 1, 130, 4097, 128, False, torch.bfloat16, 128, 64, True),
        (2, 1, 100, 256, 64, False, torch.bfloat16, 32, 64, True),  # whole key tiles: the unmasked loop
        (1, 3, 70, 90, 32, False, torch.bfloat16, 32, 32, True),
        (1, 2, 96, 128, 128, True, torch.float16, 32, 32, False),
    ],
)
def test_triton_kernel_matches_emulating_reference(b, h, m, n, d, is_causal, dtype, block_m, block_n, per_token):
    q, k, v = _inputs("outliers", b, h, m, n, d, dtype, seed=m + n)
    got = _sage_attention_triton(q, k, v, None, is_causal, block_m, block_n, per_token)
    ref = sage_attention_ref(q, k, v, is_causal=is_causal, block_m=block_m, block_n=block_n, qk_per_token=per_token)
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    assert_quality(got, ref, **KERNEL_VS_REF, what="kernel vs reference")
    assert_quality(got, _sdpa_fp32(q, k, v, is_causal), **VS_SDPA, what="kernel vs fp32 SDPA")


@pytest.mark.interpreter
def test_public_triton_backend_reads_strided_inputs_and_honours_scale():
    b, h, m, d = 3, 2, 77, 64
    q_bmhd, k_bmhd, v_bmhd = (torch.randn(b, m, h, d).bfloat16() for _ in range(3))
    q, k, v = (t.transpose(1, 2) for t in (q_bmhd, k_bmhd, v_bmhd))  # (b, h, m, d) views, not contiguous
    got = sage_attention(q, k, v, scale=0.3, backend="triton")
    ref = sage_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=0.3, backend="torch")
    assert_quality(got, ref, **KERNEL_VS_REF, what="triton vs torch backend")
    assert_quality(got, _sdpa_fp32(q, k, v, scale=0.3), **VS_SDPA, what="kernel vs fp32 SDPA")


@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize(
    "b,h,m,n,d,is_causal,dtype",
    [
        (1, 2, 1000, 1000, 128, False, torch.bfloat16),
        (3, 1, 77, 77, 64, True, torch.float16),
        (3, 2, 77, 1000, 128, False, torch.bfloat16),
        (1, 3, 1000, 77, 64, True, torch.bfloat16),
        (1, 1, 4097, 4097, 128, True, torch.bfloat16),
        (1, 1, 4097, 4097, 64, False, torch.float16),
    ],
)
def test_reference_meets_accuracy_bar_against_fp32_sdpa(kind, b, h, m, n, d, is_causal, dtype):
    q, k, v = _inputs(kind, b, h, m, n, d, dtype, seed=7 * m + n)
    out = sage_attention(q, k, v, is_causal=is_causal)  # "auto" on CPU runs the reference
    assert_quality(out, _sdpa_fp32(q, k, v, is_causal), **VS_SDPA, what=f"{kind} vs fp32 SDPA")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_k_token_mean_is_removed_before_quantization(backend):
    """A per-channel offset of 30 on every key leaves softmax unchanged; without smoothing, INT8 K
    would spend its range on the offset (measured: 14 dB against 65 dB with smoothing)."""
    q, k, v = _inputs("random", 1, 2, 77, 93, 64, torch.float32, seed=3)
    offset = 30.0 * torch.randn(1, 2, 1, 64)
    plain = sage_attention(q, k, v, backend=backend)
    shifted = sage_attention(q, k + offset, v, backend=backend)
    assert_quality(shifted, plain, min_cos=0.99999, min_snr_db=50.0, what="offset keys vs plain keys")


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v = _inputs("random", 3, 1, 33, 65, 128, torch.bfloat16, seed=11)
    out = sage_attention(q, k, v, is_causal=True)
    assert torch.equal(out, sage_attention_ref(q, k, v, is_causal=True))


def test_rejects_bad_inputs_naming_the_values():
    q = torch.randn(2, 3, 5, 64)
    with pytest.raises(ValueError, match=r"q must be a 4-d .* got \(3, 5, 64\)"):
        sage_attention(q[0], q, q)
    with pytest.raises(ValueError, match="torch.float32.*torch.bfloat16"):
        sage_attention(q, q.bfloat16(), q)
    with pytest.raises(ValueError, match="torch.int8"):
        sage_attention(*(q.to(torch.int8),) * 3)
    with pytest.raises(ValueError, match=r"head_dim must be one of \(32, 64, 128\).*q \(2, 3, 5, 96\)"):
        x = torch.randn(2, 3, 5, 96)
        sage_attention(x, x, x)
    with pytest.raises(ValueError, match=r"equal.*k \(2, 3, 5, 128\)"):
        sage_attention(q, torch.randn(2, 3, 5, 128), q)
    with pytest.raises(ValueError, match=r"share batch and heads.*k \(2, 4, 5, 64\)"):
        sage_attention(q, torch.randn(2, 4, 5, 64), torch.randn(2, 4, 5, 64))
    with pytest.raises(ValueError, match=r"k, v their length.*v \(2, 3, 6, 64\)"):
        sage_attention(q, q, torch.randn(2, 3, 6, 64))
    with pytest.raises(ValueError, match="one device.*meta"):
        sage_attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match=r"at least one token.*k \(2, 3, 0, 64\)"):
        empty = torch.randn(2, 3, 0, 64)
        sage_attention(q, empty, empty)
    with pytest.raises(ValueError, match="scale.*inf"):
        sage_attention(q, q, q, scale=float("inf"))
    with pytest.raises(ValueError, match="backend.*'cudnn'"):
        sage_attention(q, q, q, backend="cudnn")


def test_forcing_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRETING", False)
    q = torch.randn(1, 1, 8, 64)
    with pytest.raises(ValueError, match="backend='triton' cannot run here.*cpu"):
        sage_attention(q, q, q, backend="triton")


def _mask(kind, b, h, m, n, dtype, seed):
    """SDPA masks of the kinds DiTs pass. ``padding``: bool (b, 1, 1, n), each sample's last keys
    padding (text padding of joint attention). ``rows``: bool (1, h, m, n) at random, with query
    row 3 masked whole. ``additive``: (b, h, m, n) biases in the input dtype, -inf on some keys.
    ``square``: float (m, n), broadcast over batch and heads."""
    g = torch.Generator().manual_seed(seed)
    if kind == "padding":
        valid = torch.tensor([n - 7 * (i + 1) for i in range(b)])
        return (torch.arange(n)[None, :] < valid[:, None])[:, None, None, :]
    if kind == "rows":
        mask = torch.rand(1, h, m, n, generator=g) < 0.6
        mask[:, :, 3] = False
        return mask
    if kind == "additive":
        mask = 2.0 * torch.randn(b, h, m, n, generator=g)
        mask[..., : n // 5] = float("-inf")
        return mask.to(dtype)
    return torch.randn(m, n, generator=g).to(dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "kind,b,h,m,n,d,dtype,block_m,block_n",
    [
        ("padding", 2, 2, 77, 90, 64, torch.bfloat16, 32, 32),
        ("rows", 1, 2, 50, 77, 128, torch.float16, 16, 32),
        ("additive", 2, 1, 70, 64, 32, torch.float32, 32, 32),  # whole key tiles: the unmasked-tail loop
        ("square", 1, 3, 40, 100, 64, torch.bfloat16, 16, 64),
    ],
)
def test_triton_kernel_applies_sdpa_masks_like_the_reference(kind, b, h, m, n, d, dtype, block_m, block_n):
    q, k, v = _inputs("outliers", b, h, m, n, d, dtype, seed=m * n)
    mask = _mask(kind, b, h, m, n, dtype, seed=n)
    got = _sage_attention_triton(q, k, v, None, False, block_m, block_n, True, attn_mask=mask)
    ref = sage_attention_ref(q, k, v, block_m=block_m, block_n=block_n, attn_mask=mask)
    assert_quality(got, ref, **KERNEL_VS_REF, what=f"{kind} mask: kernel vs reference")
    truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                           attn_mask=mask if mask.dtype == torch.bool else mask.float())
    assert_quality(got, truth, **VS_SDPA, what=f"{kind} mask: kernel vs fp32 SDPA")
    if kind == "rows":  # a query row with no key: zeros, as SDPA gives (not NaN)
        assert torch.equal(got[:, :, 3], torch.zeros_like(got[:, :, 3]))
        assert torch.equal(truth[:, :, 3], got[:, :, 3].float())


@pytest.mark.parametrize("kind", ["padding", "rows", "additive", "square"])
def test_masked_reference_meets_accuracy_bar_against_fp32_sdpa(kind):
    b, h, m, n, d, dtype = 2, 2, 1000, 1000, 128, torch.bfloat16
    q, k, v = _inputs("outliers", b, h, m, n, d, dtype, seed=5)
    mask = _mask(kind, b, h, m, n, dtype, seed=6)
    out = sage_attention(q, k, v, mask)  # positional, as SDPA takes it
    truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                           attn_mask=mask if mask.dtype == torch.bool else mask.float())
    assert_quality(out, truth, **VS_SDPA, what=f"{kind} mask vs fp32 SDPA")
    plain = sage_attention(q, k, v)
    assert not torch.equal(out, plain), "the mask changed nothing"


def test_rejects_bad_masks_naming_the_values():
    q = torch.randn(2, 3, 5, 64)
    k = torch.randn(2, 3, 7, 64)
    with pytest.raises(ValueError, match="attn_mask must be bool .* got torch.int64"):
        sage_attention(q, k, k, torch.ones(5, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(5, 5\) does not broadcast .* \(2, 3, 5, 7\)"):
        sage_attention(q, k, k, torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask and is_causal=True"):
        sage_attention(q, k, k, torch.ones(5, 7, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="attn_mask must be on q's device"):
        sage_attention(q, k, k, torch.ones(5, 7, dtype=torch.bool, device="meta"))
