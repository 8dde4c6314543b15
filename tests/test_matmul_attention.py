"""The matmul_attention pass: attention written as matmuls becomes one SDPA call, so that context
parallelism and FP8 attention act on it (cdcompile/passes/matmul_attention.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

import cdcompile
from cdcompile.passes import matmul_attention

B, H, S, D = 2, 3, 7, 8
g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
KEEP = torch.rand(B, 1, 1, S, generator=g) > 0.2
KEEP[..., 0] = True
BIAS = torch.randn(B, 1, S, S, generator=g)

REWRITTEN = {
    "scaled q (timm)": lambda q, k, v: ((q * D**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v,
    "divided scores": lambda q, k, v: torch.matmul(F.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D),
                                                             dim=-1), v),
    "masked_fill after scale": lambda q, k, v: (q @ k.transpose(-2, -1) * 0.3).masked_fill(
        ~KEEP, float("-inf")).softmax(-1) @ v,
    "masked_fill before scale": lambda q, k, v: ((q @ k.transpose(-2, -1)).masked_fill(
        ~KEEP, float("-inf")) * 0.3).softmax(-1) @ v,
    "additive mask after scale": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.3 + BIAS, dim=-1) @ v,
    "mask on the left of +": lambda q, k, v: torch.softmax(BIAS + q @ k.transpose(-2, -1), dim=-1) @ v,
    "inactive dropout": lambda q, k, v: F.dropout((q @ k.transpose(-2, -1)).softmax(-1), 0.1, False) @ v,
    "k permuted": lambda q, k, v: (q @ k.permute(0, 1, 3, 2)).softmax(-1) @ v,
}
KEPT = {
    "additive mask scaled with the scores": lambda q, k, v: ((q @ k.transpose(-2, -1) + BIAS) * 0.3).softmax(-1) @ v,
    "softmax in another dtype": lambda q, k, v: (q @ k.transpose(-2, -1)).double().softmax(-1).float() @ v,
    "scores read elsewhere": lambda q, k, v: ((s := q @ k.transpose(-2, -1)).softmax(-1) @ v) + s.mean(),
    "softmax over the queries": lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(2) @ v,
    "masked_fill with a finite value": lambda q, k, v: (q @ k.transpose(-2, -1)).masked_fill(
        ~KEEP, -1e9).softmax(-1) @ v,
    "active dropout": lambda q, k, v: F.dropout((q @ k.transpose(-2, -1)).softmax(-1), 0.1, True) @ v,
}


def _capture(fn):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(Q, K, V)
    gm = graphs[0]
    by_name = {"L_q_": Q, "L_k_": K, "L_v_": V, "G_KEEP_": KEEP, "G_BIAS_": BIAS}
    inputs = [by_name[n.target] for n in gm.graph.nodes if n.op == "placeholder"]
    return gm, inputs


def _sdpa_calls(gm):
    return sum(n.op == "call_function" and n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)


@pytest.mark.parametrize("name", list(REWRITTEN))
def test_written_out_attention_becomes_one_sdpa_call_with_equal_output(name):
    gm, inputs = _capture(REWRITTEN[name])
    assert matmul_attention.to_sdpa(gm) == 1 and _sdpa_calls(gm) == 1
    assert not any(n.op in ("call_function", "call_method") and "softmax" in str(n.target) for n in gm.graph.nodes)
    gm.graph.lint()
    torch.testing.assert_close(gm(*inputs)[0], REWRITTEN[name](Q, K, V), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", list(KEPT))
def test_other_chains_are_left_as_written(name):
    gm, inputs = _capture(KEPT[name])
    before = [(n.op, n.target) for n in gm.graph.nodes]
    assert matmul_attention.to_sdpa(gm) == 0
    assert [(n.op, n.target) for n in gm.graph.nodes] == before


class _ManualBlock(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, h):
        q, k, v = self.qkv(self.norm(h)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return h + self.out((attn @ v).transpose(1, 2).flatten(2))


def test_the_pass_runs_only_for_the_passes_that_need_sdpa_and_fp8_attention_then_takes_it():
    from cdcompile.testing import BlockStack

    m = BlockStack(lambda: _ManualBlock(64, 2), 3, 64).eval()  # head dim 32: one the kernel takes
    x, t = torch.randn(2, 9, 64), torch.rand(2)
    with torch.no_grad():
        plain = cdcompile.explain(m, x, t)
        fp8 = cdcompile.explain(m, x, t, options={"fp8_attention": True})
    assert plain.graph_reports[0].matmul_attention == 0
    assert "written as matmuls" not in str(plain)
    r = fp8.graph_reports[0]
    assert r.matmul_attention == 3 and r.fp8_attention.replaced == 3, str(fp8)
    assert "attention written as matmuls -> scaled_dot_product_attention: 3" in str(fp8)
    with torch.no_grad():
        c = torch.compile(m, backend="cachedit", options={"compiler": "eager", "fp8_attention": True,
                                                          "residual_diff_threshold": 0.0})
        out = c(x, t)
    # the FP8 op (its reference on the CPU) against the model: FP8's error, not a wrong rewrite
    ref = m(x, t)
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, float(cos)
