"""GPU tier: the compiled Triton kernels on CUDA against the references (skipped without CUDA).

Run with ``TRITON_INTERPRET=0 pytest tests/kernels -m gpu``. Shape legend: b batch, s tokens,
h heads, d head dim; x is (b, s, h, d), q, k, v are (b, h, s, d).
Floors: quantization within one e4m3 ulp of the CPU reference (exact in practice: the kernel
rounds in fp32 arithmetic with correctly rounded division); attention kernel vs its emulating
reference >= 45 dB (the GPU's exp2 is approximate, so a few P values can round to the other fp8
neighbour); vs fp32 SDPA the section 7 bar, cosine >= 0.999 and SNR >= 25 dB.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_metrics import assert_bitwise_equal, assert_quality, assert_within_one_e4m3_ulp, e4m3_grid_input

from cdcompile.kernels import dequantize_fp8_a2a, quantize_fp8_a2a, sage_attention, sage_attention_ref
from cdcompile.kernels import sage_attn

pytestmark = pytest.mark.gpu


def _attention_inputs(b, h, m, n, d, dtype, outliers, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for length in (m, n, n))
    if outliers:
        channels = torch.randperm(d, generator=g)[:4]
        q[..., channels] *= 5.0
        k[..., channels] *= 5.0
        k = k + 2.0 * torch.randn(b, h, 1, d, generator=g)
    return tuple(t.to("cuda", dtype) for t in (q, k, v))


@pytest.mark.parametrize("split", ["heads", "seq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_quantize_matches_cpu_reference(split, dtype):
    b, s, h, d, w = 3, 4097, 5, 128, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, h, d, generator=g) * torch.exp2(torch.randint(-12, 12, (b, s, h, 1), generator=g).float())
    x = x.to(dtype)
    values, scales = quantize_fp8_a2a(x.cuda(), world_size=w, split=split, backend="triton")
    ref_values, ref_scales = quantize_fp8_a2a(x, world_size=w, split=split, backend="torch")
    torch.testing.assert_close(scales.cpu(), ref_scales, rtol=2.0**-23, atol=0.0)
    assert_within_one_e4m3_ulp(values.cpu(), ref_values, "values")
    kw = dict(batch=b, seq_len=s, num_heads=h, world_size=w, split=split, out_dtype=dtype)
    back = dequantize_fp8_a2a(values, scales, **kw, backend="triton")
    want = dequantize_fp8_a2a(values.cpu(), scales.cpu(), **kw, backend="torch")
    assert_bitwise_equal(back.cpu(), want, "dequantized")


@pytest.mark.parametrize("split", ["heads", "seq"])
def test_gpu_round_trip_is_exact_on_grid_inputs(split):
    x = e4m3_grid_input(3, 1001, 5, 64, torch.bfloat16, seed=1, device="cuda")
    values, scales = quantize_fp8_a2a(x, world_size=3, split=split, backend="auto")
    back = dequantize_fp8_a2a(values, scales, batch=3, seq_len=1001, num_heads=5, world_size=3, split=split)
    assert_bitwise_equal(back, x, "round trip")


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize(
    "b,h,m,n,d,is_causal,dtype",
    [
        (1, 24, 4096, 4096, 128, False, torch.bfloat16),
        (3, 5, 1000, 4097, 64, True, torch.float16),
        (1, 24, 4608, 4608, 128, True, torch.bfloat16),
        (1, 2, 77, 16384, 128, False, torch.bfloat16),
        (2, 4, 1000, 1000, 32, False, torch.bfloat16),
    ],
)
def test_gpu_kernel_matches_reference_and_fp32_sdpa(b, h, m, n, d, is_causal, dtype, outliers):
    q, k, v = _attention_inputs(b, h, m, n, d, dtype, outliers, seed=m + n)
    out = sage_attention(q, k, v, is_causal=is_causal)  # "auto" on CUDA runs the Triton kernel
    ref = sage_attention_ref(q, k, v, is_causal=is_causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert_quality(out, ref, min_cos=0.99995, min_snr_db=45.0, what="kernel vs reference")
    truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=is_causal)
    assert_quality(out, truth, min_cos=0.999, min_snr_db=25.0, what="kernel vs fp32 SDPA")


@pytest.mark.parametrize("additive", [False, True])
def test_gpu_masked_kernel_matches_reference_and_fp32_sdpa(additive):
    """Text padding as joint attention passes it: (b, 1, 1, n), each sample's last keys masked,
    bool or as an additive bias; one sample also has a query row with every key masked (zeros)."""
    b, h, m, n, d = 2, 8, 4608, 4608, 128
    q, k, v = _attention_inputs(b, h, m, n, d, torch.bfloat16, True, seed=3)
    valid = torch.tensor([n - 100, n - 999], device="cuda")
    mask = (torch.arange(n, device="cuda")[None, :] < valid[:, None])[:, None, None, :].expand(b, 1, m, n).clone()
    mask[1, :, 7] = False
    if additive:
        mask = torch.zeros(mask.shape, device="cuda", dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
    out = sage_attention(q, k, v, mask)
    ref = sage_attention_ref(q, k, v, attn_mask=mask)
    assert_quality(out, ref, min_cos=0.99995, min_snr_db=45.0, what="masked kernel vs reference")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the backend whose fully masked rows are zeros on every device
        truth = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                               attn_mask=mask if mask.dtype == torch.bool else mask.float())
    assert_quality(out, truth, min_cos=0.999, min_snr_db=25.0, what="masked kernel vs fp32 SDPA")
    assert torch.equal(out[1, :, 7], torch.zeros_like(out[1, :, 7]))


@pytest.mark.parametrize("n", [4096, 4097])
def test_gpu_hardware_fp8_cast_of_p_gives_the_bits_of_fp32_rounding(n):
    # On a GPU the kernel casts P * 448 to e4m3 and the output to bf16 with the hardware; the
    # interpreter's path rounds in fp32 arithmetic. Same exp2 values in, so the same bits out.
    q, k, v = _attention_inputs(1, 4, 1000, n, 128, torch.bfloat16, True, seed=n)
    bm, bn = sage_attn.BLOCK_M, sage_attn.BLOCK_N
    quantized = sage_attn._quantize_qkv(q, k, v, None, bm, bn, True)
    hardware = sage_attn._attend(quantized, q.dtype, False, bm, bn, round_in_fp32=False)
    emulated = sage_attn._attend(quantized, q.dtype, False, bm, bn, round_in_fp32=True)
    assert_bitwise_equal(hardware, emulated, "hardware casts vs fp32-arithmetic rounding")


def test_gpu_auto_backend_runs_the_kernel_not_the_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran on CUDA with backend='auto'")

    monkeypatch.setattr(sage_attn, "sage_attention_ref", fail)
    q, k, v = _attention_inputs(1, 2, 300, 300, 64, torch.bfloat16, False, seed=0)
    assert sage_attention(q, k, v).shape == q.shape


def test_gpu_ops_compile_with_inductor_to_the_same_bits():
    def f(x, q, k, v):
        values, scales = quantize_fp8_a2a(x, world_size=2, split="seq")
        back = dequantize_fp8_a2a(values, scales, batch=1, seq_len=77, num_heads=3, world_size=2, split="seq")
        return back, sage_attention(q, k, v)

    x = torch.randn(1, 77, 3, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = _attention_inputs(1, 3, 77, 77, 128, torch.bfloat16, False, seed=2)
    torch._dynamo.reset()
    got = torch.compile(f, backend="inductor", fullgraph=True)(x, q, k, v)
    for a, b in zip(got, f(x, q, k, v)):
        assert torch.equal(a, b)


def test_gpu_fp8_attention_pass_runs_the_triton_kernel_in_the_compiled_graph(recwarn):
    from cdcompile.backend import collect_reports

    class Attention(torch.nn.Module):
        def __init__(self, dim=512, heads=4):
            super().__init__()
            self.heads, self.qkv, self.out = heads, torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x, attend=F.scaled_dot_product_attention):
            b, s, _ = x.shape
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            return x + self.out(attend(q, k, v).transpose(1, 2).reshape(b, s, -1))

    torch.manual_seed(0)
    model = Attention().to("cuda", torch.bfloat16).eval()
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="cachedit", fullgraph=True,
                             options={"compiler": "aot_eager", "enable_cache": False, "fp8_attention": True})
    with torch.no_grad(), collect_reports() as reports:
        got = compiled(x)
        want = model(x, attend=lambda q, k, v: sage_attention(q, k, v, backend="triton"))
    record = reports[0].fp8_attention
    assert (record.replaced, record.runs) == (1, "the Triton kernel"), record
    assert not [w for w in recwarn if "fp8_attention" in str(w.message)]
    # aot_eager's decomposed projections may round differently from eager's in the last bf16 bit
    assert_quality(got, want, min_cos=0.9999, min_snr_db=40.0, what="compiled fp8_attention vs the kernel by hand")
