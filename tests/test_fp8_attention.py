"""fp8_attention: SDPA calls become cdcompile::sage_attention nodes in the compiled graph.

On CPU the op runs its reference, the executable spec of the kernel's INT8/FP8 arithmetic, so a
rewritten graph must give exactly what the model gives with each eligible SDPA call replaced by
``sage_attention_ref`` by hand, and the ineligible calls left alone.
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cdcompile
from cdcompile.backend import collect_reports
from cdcompile.kernels import sage_attention_ref
from cdcompile.testing import BlockStack, flux_inputs, tiny_flux


def _compile(model, **options):
    opts = {"compiler": "aot_eager", "fp8_attention": True, **options}
    return torch.compile(model, backend="cachedit", fullgraph=True, options=opts)


def _run_quietly(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="cachedit: fp8_attention runs the plain-torch reference")
        return fn(*args, **kwargs)


def _emulated(model, kwargs):
    """The model with every SDPA call computed by the kernel's reference (FLUX's are all eligible)."""
    def sage(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert attn_mask is None and dropout_p == 0.0 and not enable_gqa
        return sage_attention_ref(query, key, value, scale=scale, is_causal=is_causal)

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sage
    try:
        return model(**kwargs)[0]
    finally:
        F.scaled_dot_product_attention = original


def test_flux_attention_runs_the_fp8_kernels_arithmetic_in_the_graph():
    model = tiny_flux(head_dim=64)
    kw = flux_inputs(model, tokens=64)
    torch._dynamo.reset()
    with torch.no_grad(), collect_reports() as reports:
        plain = model(**kw)[0]
        want = _emulated(model, kw)
        got = _run_quietly(_compile(model, residual_diff_threshold=0.0), **kw)[0]
    (report,) = reports
    record = report.fp8_attention
    assert (record.replaced, record.kept) == (6, {}), record  # 2 double + 4 single blocks
    assert "fp8 attention: 6 of 6 SDPA calls -> cdcompile::sage_attention" in str(report)
    assert report.cache is not None, "the block cache still goes in, around the new attention"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    cos = F.cosine_similarity(got.flatten(), plain.flatten(), dim=0)
    assert cos > 0.999 and not torch.equal(got, plain), float(cos)


class _Attention(nn.Module):
    """One SDPA call of a given kind over (batch, heads, tokens, head_dim) projections."""

    def __init__(self, dim, heads, kv_heads=None, masked=False, causal=False, scale=None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)
        self.masked, self.causal, self.scale = masked, causal, scale
        self.emulate = False  # compute the expected output by hand instead of calling SDPA

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = None
        if self.masked == "bool":  # (s, s): broadcast over batch and heads
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        elif self.masked == "additive":  # (b, 1, 1, s) key padding with a bias: the last 3 keys are padding
            bias = torch.linspace(-2.0, 0.0, s, device=x.device)
            keys = torch.arange(s, device=x.device)
            mask = torch.where(keys < s - 3, bias, float("-inf")).expand(b, 1, 1, s)
        gqa = self.kv_heads != self.heads
        if self.emulate and self.head_dim in (32, 64, 128):
            if gqa:
                k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
            o = sage_attention_ref(q, k, v, scale=self.scale, is_causal=self.causal, attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale,
                                               enable_gqa=gqa)
        return x + self.out(o.transpose(1, 2).reshape(b, s, -1))


class _MixedAttentions(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([
            _Attention(256, 4, masked="bool"),          # a bool attn_mask, passed on
            _Attention(128, 8),                         # kept: head_dim 16
            _Attention(256, 4, kv_heads=2, masked="additive"),  # grouped-query (K, V heads repeated), additive mask
            _Attention(128, 2, causal=True, scale=0.3),  # is_causal and scale passed on
        ])

    def forward(self, x):
        x = self.layers[1](self.layers[0](x)[..., :128])
        x = self.layers[3](x)
        return self.layers[2](torch.cat([x, x], dim=-1))


def test_each_sdpa_call_is_replaced_or_kept_with_its_reason():
    model = _MixedAttentions().eval()
    x = torch.randn(2, 37, 256, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad(), collect_reports() as reports:
        got = _run_quietly(_compile(model, enable_cache=False), x)
        for layer in model.layers:
            layer.emulate = True
        want = model(x)
    (report,) = reports
    record = report.fp8_attention
    assert record.replaced == 3
    assert record.kept == {"head_dim 16 (the kernel takes 32, 64, 128)": 1}
    assert "3 of 4 SDPA calls" in str(record) and "1 kept: head_dim 16" in str(record)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_graph_without_an_eligible_call_says_so():
    model = _Attention(128, 8).eval()  # head_dim 16
    torch._dynamo.reset()
    with torch.no_grad(), pytest.warns(UserWarning, match=r"fp8_attention=True changed nothing.*head_dim 16"):
        _compile(model, enable_cache=False)(torch.randn(1, 5, 128))


def test_the_option_is_validated_and_the_pass_can_be_switched_off():
    with pytest.raises(ValueError, match="fp8_attention"):
        cdcompile.CacheConfig(fp8_attention="yes")
    model = tiny_flux(head_dim=64)
    kw = flux_inputs(model, tokens=16)
    torch._dynamo.reset()
    with torch.no_grad(), collect_reports() as reports:
        got = _compile(model, disable_passes=["fp8_attention"], enable_cache=False)(**kw)[0]
        torch.testing.assert_close(got, model(**kw)[0], rtol=0, atol=0)
    assert reports[0].fp8_attention is None


def test_a_graph_with_symbolic_token_counts_gets_the_fp8_attention_too():
    model = tiny_flux(head_dim=64)
    torch._dynamo.reset()
    c = torch.compile(model, backend="cachedit", dynamic=None,
                      options={"compiler": "aot_eager", "fp8_attention": True, "residual_diff_threshold": 0.0})
    with torch.no_grad(), collect_reports() as reports:
        for tokens in (16, 36, 64):  # the second size makes Dynamo compile one symbolic graph
            kw = flux_inputs(model, tokens=tokens)
            torch.testing.assert_close(_run_quietly(c, **kw)[0], _emulated(model, kw), rtol=1e-5, atol=1e-6)
    assert [r.fp8_attention.replaced for r in reports] == [6, 6]


@pytest.mark.slow
def test_inductor_compiles_the_fp8_attention_graph_to_the_same_outputs():
    model = tiny_flux(head_dim=64)
    kw = flux_inputs(model, tokens=64)
    torch._dynamo.reset()
    with torch.no_grad():
        want = _emulated(model, kw)
        got = _run_quietly(_compile(model, compiler="inductor", residual_diff_threshold=0.0), **kw)[0]
        plain = model(**kw)[0]
    # Inductor fuses the ops around the attention, so its fp32 results differ from eager's in the
    # last bits, and quantization turns some of those into another INT8/FP8 value: outputs differ
    # by up to ~1e-4 (measured 1.6e-4, mean 9e-6). That is noise well under the quantization's own
    # effect (mean 2.2e-4 against plain SDPA), and the distance to plain SDPA stays what it was.
    _assert_inductor_quantizes_alike(got, want, plain)


def _assert_inductor_quantizes_alike(got, want, plain):
    quantization = (want - plain).abs().mean()
    assert (got - want).abs().mean() < 0.1 * quantization
    assert (got - plain).abs().mean() < 1.2 * quantization
    assert F.cosine_similarity(got.flatten(), plain.flatten(), dim=0) > 0.999


@pytest.mark.slow
def test_an_exported_package_carries_the_fp8_attention(tmp_path):
    model = tiny_flux(num_layers=1, num_single_layers=2, head_dim=64)
    kw = flux_inputs(model, tokens=16)
    opts = {"fp8_attention": True, "residual_diff_threshold": 0.0}
    path = _run_quietly(cdcompile.export, model, (), kw, str(tmp_path / "flux_fp8.pt2"), options=opts)
    with torch.no_grad():
        got = cdcompile.load(path)(**kw)[0]
        plain = model(**kw)[0]
        want = _emulated(model, kw)
    # AOTInductor fuses like Inductor (previous test): torch 2.13 matches the eager emulation within
    # 1e-5 here; torch 2.11 differs in 9 of 256 elements, by up to 5e-5
    _assert_inductor_quantizes_alike(got, want, plain)
    assert not torch.allclose(got, plain, rtol=1e-5, atol=1e-5), "the artifact ran plain SDPA"


@pytest.mark.slow
def test_an_exported_package_carries_the_masked_fp8_attention(tmp_path):
    # three blocks whose attention takes an additive key-padding mask
    model = BlockStack(lambda: _Attention(256, 4, masked="additive"), depth=3, dim=256).eval()
    x, t = torch.randn(2, 37, 256), torch.tensor([0.5, 0.5])
    opts = {"fp8_attention": True, "residual_diff_threshold": 0.0}
    path = _run_quietly(cdcompile.export, model, (x, t), {}, str(tmp_path / "masked_fp8.pt2"), options=opts)
    with torch.no_grad():
        got = cdcompile.load(path)(x, t)[0]
        plain = model(x, t)
        for block in model.blocks:
            block.emulate = True  # the kernel's reference, given the same mask
        want = model(x, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, rtol=1e-5, atol=1e-5), "the artifact ran plain SDPA"
