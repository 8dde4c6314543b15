"""FP8 all-to-all quantization: rounding, scales, rank-major permutation, non-finite rows, validation.

Shape legend: b batch, s tokens, h heads, d head dim, w ranks, r packed rows.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_metrics import E4M3_FINITE, assert_bitwise_equal, assert_within_one_e4m3_ulp, e4m3_grid_input

from cdcompile.kernels import (
    a2a_split_rows,
    dequantize_fp8_a2a,
    quantize_fp8_a2a,
    seq_split_sizes,
)
from cdcompile.kernels import _triton

BOTH = [pytest.param("torch"), pytest.param("triton", marks=pytest.mark.interpreter)]
# (b, s, h, d, w): odd lengths, heads not divisible by ranks, fewer tokens than ranks, batch 1 and 3
SHAPES = [(1, 77, 5, 64, 3), (3, 10, 24, 128, 4), (3, 2, 3, 16, 4), (1, 7, 1, 128, 2)]


def _rows_by_loops(x_bshd, w, split):
    """The rank-major layout written out with loops: an independent statement of the permutation."""
    b_n, s_n, h_n, d = x_bshd.shape
    rows = []
    if split == "heads":
        hc = (h_n + w - 1) // w
        for j in range(w):
            for b in range(b_n):
                for s in range(s_n):
                    for h in range(j * hc, (j + 1) * hc):
                        rows.append(x_bshd[b, s, h] if h < h_n else torch.zeros(d, dtype=x_bshd.dtype))
    else:
        start = 0
        for j in range(w):
            n_j = s_n // w + (1 if j < s_n % w else 0)
            for b in range(b_n):
                for s in range(start, start + n_j):
                    for h in range(h_n):
                        rows.append(x_bshd[b, s, h])
            start += n_j
    return torch.stack(rows)


def test_seq_split_gives_first_ranks_the_extra_tokens():
    assert seq_split_sizes(10, 3) == [4, 3, 3]
    assert seq_split_sizes(2, 4) == [1, 1, 0, 0]
    assert seq_split_sizes(12, 4) == [3, 3, 3, 3]
    assert a2a_split_rows(3, 10, 5, 3, "seq") == [3 * 4 * 5, 3 * 3 * 5, 3 * 3 * 5]
    assert a2a_split_rows(3, 10, 5, 3, "heads") == [3 * 10 * 2] * 3  # 5 heads padded to 6


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("split", ["heads", "seq"])
@pytest.mark.parametrize("b,s,h,d,w", SHAPES)
def test_packed_rows_follow_rank_major_layout_exactly(b, s, h, d, w, split, backend):
    x = e4m3_grid_input(b, s, h, d, torch.bfloat16, seed=b * 1000 + s)
    values, scales = quantize_fp8_a2a(x, world_size=w, split=split, backend=backend)
    assert values.shape[0] == sum(a2a_split_rows(b, s, h, w, split))
    assert_bitwise_equal((values.float() * scales[:, None]).to(x.dtype), _rows_by_loops(x, w, split), "packed rows")


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("split", ["heads", "seq"])
@pytest.mark.parametrize("b,s,h,d,w", SHAPES)
def test_dequantize_inverts_quantize_exactly_on_grid_inputs(b, s, h, d, w, split, dtype, backend):
    x = e4m3_grid_input(b, s, h, d, dtype, seed=s * 7 + h)
    values, scales = quantize_fp8_a2a(x, world_size=w, split=split, backend=backend)
    back = dequantize_fp8_a2a(
        values, scales, batch=b, seq_len=s, num_heads=h, world_size=w, split=split, out_dtype=dtype, backend=backend
    )
    assert_bitwise_equal(back, x, "round trip")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("split", ["heads", "seq"])
@pytest.mark.parametrize("b,s,h,d,w", SHAPES)
def test_triton_quantize_matches_reference_within_one_e4m3_ulp(b, s, h, d, w, split, dtype):
    g = torch.Generator().manual_seed(s + 31 * h)
    row_scale = torch.exp2(torch.randint(-14, 12, (b, s, h, 1), generator=g).float())  # fp16 subnormals .. 2**14
    x = (torch.randn(b, s, h, d, generator=g) * row_scale).to(dtype)
    x_strided = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (b, h, s, d) memory order
    got_v, got_s = quantize_fp8_a2a(x_strided, world_size=w, split=split, backend="triton")
    ref_v, ref_s = quantize_fp8_a2a(x, world_size=w, split=split, backend="torch")
    torch.testing.assert_close(got_s, ref_s, rtol=2.0**-23, atol=0.0)  # one fp32 ulp
    assert_within_one_e4m3_ulp(got_v, ref_v, "values")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("split", ["heads", "seq"])
def test_triton_dequantize_matches_reference_bitwise(split, dtype):
    b, s, h, d, w = 3, 11, 5, 64, 4
    x = torch.randn(b, s, h, d) * 5
    values, scales = quantize_fp8_a2a(x, world_size=w, split=split, backend="torch")
    kw = dict(batch=b, seq_len=s, num_heads=h, world_size=w, split=split, out_dtype=dtype)
    got = dequantize_fp8_a2a(values, scales, **kw, backend="triton")
    assert_bitwise_equal(got, dequantize_fp8_a2a(values, scales, **kw, backend="torch"), "dequantized")


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("b", [1, 3])
def test_simulated_ulysses_exchange_delivers_each_rank_its_heads_and_back(b, backend):
    """Four quantized exchanges of W=3 ranks, S=10 tokens (4, 3, 3), H=5 heads (padded to 6), by hand."""
    w, s, h, d = 3, 10, 5, 64
    hc = 2
    x = e4m3_grid_input(b, s, h, d, torch.bfloat16, seed=5)
    sizes = seq_split_sizes(s, w)
    starts = [sum(sizes[:r]) for r in range(w)]
    local = [x[:, starts[r] : starts[r] + sizes[r]] for r in range(w)]

    # pre-attention: every rank packs its tokens by destination head chunk
    sent = []
    for r in range(w):
        values, scales = quantize_fp8_a2a(local[r], world_size=w, split="heads", backend=backend)
        splits = a2a_split_rows(b, sizes[r], h, w, "heads")
        sent.append((values.split(splits), scales.split(splits)))
    padded = torch.nn.functional.pad(x, (0, 0, 0, w * hc - h))
    mine = []
    for j in range(w):
        values = torch.cat([sent[r][0][j] for r in range(w)])
        scales = torch.cat([sent[r][1][j] for r in range(w)])
        assert [len(sent[r][0][j]) for r in range(w)] == a2a_split_rows(b, s, hc, w, "seq")
        got = dequantize_fp8_a2a(
            values, scales, batch=b, seq_len=s, num_heads=hc, world_size=w, split="seq", backend=backend
        )
        assert_bitwise_equal(got, padded[:, :, j * hc : (j + 1) * hc], f"rank {j} after pre-attention exchange")
        mine.append(got)

    # post-attention (identity attention, output read through a (b, h, s, d) -> (b, s, h, d) view):
    # every rank packs its heads by destination token chunk
    sent = []
    for j in range(w):
        o_bshd = mine[j].transpose(1, 2).contiguous().transpose(1, 2)
        values, scales = quantize_fp8_a2a(o_bshd, world_size=w, split="seq", backend=backend)
        splits = a2a_split_rows(b, s, hc, w, "seq")
        sent.append((values.split(splits), scales.split(splits)))
    for r in range(w):
        values = torch.cat([sent[j][0][r] for j in range(w)])
        scales = torch.cat([sent[j][1][r] for j in range(w)])
        got = dequantize_fp8_a2a(
            values, scales, batch=b, seq_len=sizes[r], num_heads=h, world_size=w, split="heads", backend=backend
        )
        assert_bitwise_equal(got, local[r], f"rank {r} after post-attention exchange")


@pytest.mark.parametrize("backend", BOTH)
def test_every_finite_e4m3_bit_pattern_survives_quantization(backend):
    patterns = torch.arange(256, dtype=torch.uint8)
    finite = patterns[torch.isfinite(patterns.view(torch.float8_e4m3fn).float())]
    x = finite.view(torch.float8_e4m3fn).float().reshape(1, 1, 1, -1)  # 254 values, amax 448 -> scale 1
    values, scales = quantize_fp8_a2a(x, world_size=1, split="seq", backend=backend)
    assert scales.tolist() == [1.0]
    assert_bitwise_equal(values.view(torch.uint8).flatten(), finite, "e4m3 patterns (incl. -0.0)")


@pytest.mark.parametrize("backend", BOTH)
def test_both_nan_bit_patterns_make_their_row_nan_and_spare_the_others(backend):
    clean = E4M3_FINITE[None, None, None, :].repeat(1, 3, 2, 1)  # (1, 3, 2, 254)
    x = clean.clone()
    for row, (s, h, bits) in enumerate([(0, 1, 0x7F), (2, 0, 0xFF)]):
        x[0, s, h, 5 + row] = torch.tensor([bits], dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values, scales = quantize_fp8_a2a(x, world_size=1, split="seq", backend=backend)
    back = dequantize_fp8_a2a(
        values, scales, batch=1, seq_len=3, num_heads=2, world_size=1, split="seq", out_dtype=torch.float32, backend=backend
    )
    bad = torch.zeros(3, 2, dtype=torch.bool)
    bad[0, 1] = bad[2, 0] = True
    assert back[0][bad].isnan().all() and not back[0][~bad].isnan().any()
    assert_bitwise_equal(back[0][~bad], clean[0][~bad], "rows without NaN")


@pytest.mark.parametrize("backend", BOTH)
@settings(derandomize=True, max_examples=12, deadline=None)
@given(
    exponent=st.integers(-100, 100),
    order=st.permutations(range(254)),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_e4m3_values_times_power_of_two_round_trip_exactly(backend, exponent, order, sign):
    row = E4M3_FINITE[list(order)] * sign * 2.0**exponent  # every row holds +-448 * 2**exponent
    x = torch.stack([row, -row.flip(0)]).reshape(1, 2, 1, 254)
    values, scales = quantize_fp8_a2a(x, world_size=2, split="seq", backend=backend)
    assert scales.tolist() == [2.0**exponent] * 2
    back = dequantize_fp8_a2a(
        values, scales, batch=1, seq_len=2, num_heads=1, world_size=2, split="seq", out_dtype=torch.float32, backend=backend
    )
    assert_bitwise_equal(back, x, "round trip")


@pytest.mark.parametrize("backend", BOTH)
def test_rounding_is_to_nearest_with_ties_to_even(backend):
    """Midpoints between neighbouring e4m3 values go to the even pattern; one fp32 step off, to the nearer."""
    pos = torch.cat([torch.zeros(1), E4M3_FINITE[E4M3_FINITE > 0].sort().values])
    lo, hi = pos[:-1], pos[1:]
    mid = (lo + hi) / 2
    lo_bits = lo.to(torch.float8_e4m3fn).view(torch.uint8)
    tie_winner = torch.where(lo_bits % 2 == 0, lo, hi)
    inputs = torch.cat([mid, torch.nextafter(mid, lo), torch.nextafter(mid, hi), torch.tensor([448.0])])
    expected = torch.cat([tie_winner, lo, hi, torch.tensor([448.0])])
    x = torch.cat([inputs, -inputs]).reshape(1, 1, 1, -1)
    values, scales = quantize_fp8_a2a(x, world_size=1, split="seq", backend=backend)
    assert scales.tolist() == [1.0]
    assert_bitwise_equal(values.float().flatten(), torch.cat([expected, -expected]), "rounded values")


@pytest.mark.parametrize("backend", BOTH)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_element_makes_its_row_nan_and_spares_the_others(bad_value, backend):
    x = torch.randn(1, 5, 3, 64).bfloat16()
    x[0, 2, 1, 7] = bad_value
    values, scales = quantize_fp8_a2a(x, world_size=2, split="seq", backend=backend)
    clean = x.nan_to_num(0.0, 0.0, 0.0)
    clean_values, clean_scales = quantize_fp8_a2a(clean, world_size=2, split="seq", backend=backend)
    row = 2 * 3 + 1  # seq split of 5 tokens over 2 ranks: (3, 2); token 2 is rank 0's, rows (b, s, h)
    assert scales[row].isnan() and (values[row].float() == 0).all()
    keep = torch.arange(len(scales)) != row
    assert_bitwise_equal(scales[keep], clean_scales[keep], "scales of clean rows")
    assert_bitwise_equal(values[keep], clean_values[keep], "values of clean rows")
    kw = dict(batch=1, seq_len=5, num_heads=3, world_size=2, split="seq")
    back = dequantize_fp8_a2a(values, scales, **kw, backend=backend)
    assert back[0, 2, 1].isnan().all() and not back[keep.reshape(1, 5, 3)].isnan().any()


@pytest.mark.parametrize("backend", BOTH)
def test_zero_row_gets_the_floor_scale_and_zero_values(backend):
    x = torch.zeros(1, 3, 2, 64, dtype=torch.float16)
    x[0, 1, 0, 0] = 1.0
    values, scales = quantize_fp8_a2a(x, world_size=1, split="seq", backend=backend)
    tiny, one_over_448 = torch.finfo(torch.float32).tiny, torch.tensor(1.0 / 448.0).item()
    assert scales.tolist() == [tiny, tiny, one_over_448, tiny, tiny, tiny]
    assert (values.float()[[0, 1, 3, 4, 5]] == 0).all()


def test_quantize_rejects_bad_inputs_naming_the_values():
    x = torch.randn(2, 5, 3, 64)
    with pytest.raises(ValueError, match=r"4-d.*\(2, 5, 3\)"):
        quantize_fp8_a2a(x[..., 0], world_size=2, split="seq")
    with pytest.raises(ValueError, match="torch.int32"):
        quantize_fp8_a2a(x.int(), world_size=2, split="seq")
    with pytest.raises(ValueError, match=r"head_dim.*\(2, 5, 3, 2048\)"):
        quantize_fp8_a2a(torch.randn(2, 5, 3, 2048), world_size=2, split="seq")
    with pytest.raises(ValueError, match="world_size.*0"):
        quantize_fp8_a2a(x, world_size=0, split="seq")
    with pytest.raises(ValueError, match="split.*'tokens'"):
        quantize_fp8_a2a(x, world_size=2, split="tokens")
    with pytest.raises(ValueError, match="backend.*'cuda'"):
        quantize_fp8_a2a(x, world_size=2, split="seq", backend="cuda")


def test_dequantize_rejects_bad_inputs_naming_the_values():
    values, scales = quantize_fp8_a2a(torch.randn(2, 5, 3, 64), world_size=2, split="seq")
    kw = dict(batch=2, seq_len=5, num_heads=3, world_size=2, split="seq")
    with pytest.raises(ValueError, match="30 rows but .*packs into 36"):
        dequantize_fp8_a2a(values, scales, **{**kw, "seq_len": 6})
    with pytest.raises(ValueError, match="float8_e4m3fn.*torch.float32"):
        dequantize_fp8_a2a(values.float(), scales, **kw)
    with pytest.raises(ValueError, match=r"scales_r.*\(29,\)"):
        dequantize_fp8_a2a(values, scales[:-1], **kw)
    with pytest.raises(ValueError, match="cpu but scales_r is on meta"):
        dequantize_fp8_a2a(values, scales.to("meta"), **kw)
    with pytest.raises(ValueError, match="out_dtype.*torch.int8"):
        dequantize_fp8_a2a(values, scales, **kw, out_dtype=torch.int8)


def test_forcing_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_triton, "INTERPRETING", False)
    with pytest.raises(ValueError, match="backend='triton' cannot run here.*cpu"):
        quantize_fp8_a2a(torch.randn(1, 3, 2, 64), world_size=2, split="seq", backend="triton")
