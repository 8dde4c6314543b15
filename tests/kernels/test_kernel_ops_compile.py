"""The kernel ops inside torch.compile graphs: opaque, fullgraph, same bits as calling them directly.

Shape legend: b batch, s tokens, h heads, d head dim (x is (b, s, h, d); q, k, v are (b, h, s, d)).
"""

import pytest
import torch

from cdcompile.kernels import dequantize_fp8_a2a, quantize_fp8_a2a, sage_attention

CDCOMPILE_OPS = {"quantize_fp8_a2a", "dequantize_fp8_a2a", "sage_attention"}


def _ulysses_like(x_bshd, q, k, v, backend):
    """Quantize + pack for 3 ranks, unpack, then attention: every op of this package once."""
    values, scales = quantize_fp8_a2a(x_bshd, world_size=3, split="heads", backend=backend)
    b, s, h, _ = x_bshd.shape
    x_back = dequantize_fp8_a2a(
        values, scales, batch=b, seq_len=s, num_heads=h, world_size=3, split="heads", out_dtype=x_bshd.dtype,
        backend=backend,
    )
    return values, scales, x_back, sage_attention(q, k, v, is_causal=True, backend=backend)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, 64, generator=g).bfloat16()
    q, k, v = (torch.randn(3, 2, 33, 64, generator=g).bfloat16() for _ in range(3))
    return x, q, k, v


@pytest.mark.parametrize("kernel_backend", ["auto", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager", "inductor"])
def test_ops_in_fullgraph_compile_give_the_same_bits_as_direct_calls(compile_backend, kernel_backend):
    torch._dynamo.reset()
    args = _inputs()
    compiled = torch.compile(_ulysses_like, backend=compile_backend, fullgraph=True)
    got = compiled(*args, kernel_backend)
    want = _ulysses_like(*args, kernel_backend)
    for name, a, b in zip(("values", "scales", "x_back", "attention"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.dtype == torch.float8_e4m3fn:  # no float8 equality kernel on CPU: compare bit patterns
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        assert torch.equal(a, b), f"{name} differs"


def test_dynamo_graph_keeps_each_op_as_one_opaque_node():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_ulysses_like, backend=capture, fullgraph=True)(*_inputs(), "auto")
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    ours = sorted(t.removeprefix("cdcompile.").removesuffix(".default") for t in targets if t.startswith("cdcompile."))
    assert ours == sorted(CDCOMPILE_OPS), f"expected the 3 cdcompile ops once each, graph calls {targets}"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_fake_impls_agree_with_real_impls_under_opcheck(backend):
    x, q, k, v = _inputs()
    torch.library.opcheck(torch.ops.cdcompile.sage_attention.default, (q, k, v, None, True, backend))
    torch.library.opcheck(torch.ops.cdcompile.quantize_fp8_a2a.default, (x, 3, "seq", backend))
    values, scales = quantize_fp8_a2a(x, world_size=3, split="seq")
    # test_schema compares inputs with allclose, which has no float8 kernel on CPU
    torch.library.opcheck(
        torch.ops.cdcompile.dequantize_fp8_a2a.default,
        (values, scales, 3, 7, 5, 3, "seq", torch.float16, backend),
        test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_fake_impls_accept_symbolic_lengths_under_dynamic_compile():
    def seq_exchange(x_bshd, q):
        values, scales = quantize_fp8_a2a(x_bshd, world_size=3, split="seq")
        b, s, h, _ = x_bshd.shape
        back = dequantize_fp8_a2a(values, scales, batch=b, seq_len=s, num_heads=h, world_size=3, split="seq")
        return back, sage_attention(q, q, q)

    torch._dynamo.reset()
    compiled = torch.compile(seq_exchange, backend="aot_eager", fullgraph=True, dynamic=True)
    for s in (7, 11):  # 7 = 3 + 2 + 2 and 11 = 4 + 4 + 3 tokens per rank
        x, q = torch.randn(3, s, 5, 64), torch.randn(1, 2, s, 64)
        for name, a, b in zip(("x_back", "attention"), compiled(x, q), seq_exchange(x, q)):
            assert torch.equal(a, b), f"{name} differs at s={s}"
