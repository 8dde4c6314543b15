"""Error measures for kernel tests; each assertion says where and how much on failure."""

import math

import torch

E4M3_FINITE = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3_FINITE = E4M3_FINITE[torch.isfinite(E4M3_FINITE)]


def e4m3_grid_input(b, s, h, d, dtype, seed, device="cpu"):
    """(b, s, h, d) rows whose amax is 448 * 2**k and whose entries are e4m3 values times 2**k, so
    per-row e4m3 quantization is exact (scale 2**k); k in [-8, 6] keeps fp16 in range."""
    g = torch.Generator().manual_seed(seed)
    x = E4M3_FINITE[torch.randint(len(E4M3_FINITE), (b, s, h, d), generator=g)]
    x[..., 0] = torch.where(torch.rand(b, s, h, generator=g) < 0.5, 448.0, -448.0)
    x = x[..., torch.randperm(d, generator=g)]
    k = torch.randint(-8, 7, (b, s, h, 1), generator=g).float()
    return (x * torch.exp2(k)).to(device=device, dtype=dtype)


def cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double().flatten(), ref.double().flatten()
    return float(o @ r / (o.norm() * r.norm()))


def snr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double().flatten(), ref.double().flatten()
    noise = float((o - r) @ (o - r))
    return math.inf if noise == 0 else 10 * math.log10(float(r @ r) / noise)


def assert_quality(out, ref, *, min_cos: float, min_snr_db: float, what: str) -> None:
    cos, snr = cosine(out, ref), snr_db(out, ref)
    diff = (out.double() - ref.double()).abs()
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    assert cos >= min_cos and snr >= min_snr_db, (
        f"{what}: cosine {cos:.7f} (floor {min_cos}), SNR {snr:.2f} dB (floor {min_snr_db}); "
        f"largest error {diff.max().item():.3g} at {where} in shape {tuple(out.shape)}"
    )


def e4m3_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of e4m3 values at |x|: 2**(e - 3) for exponent e, 2**-9 below the smallest normal."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-6)))
    return torch.exp2(exponent - 3)


def assert_within_one_e4m3_ulp(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    o, r = out.float(), ref.float()
    ulp = torch.maximum(e4m3_ulp(o), e4m3_ulp(r))
    bad = (o - r).abs() > ulp
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} values differ by more than one e4m3 ulp; first at "
        f"{tuple(int(i) for i in bad.nonzero()[0])}: {o[bad][0].item()} vs {r[bad][0].item()}"
    )


def assert_bitwise_equal(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Equal bit patterns (so -0.0 != 0.0 and NaN == NaN of the same payload)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, (
        f"{what}: {out.dtype}{tuple(out.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    )
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[out.element_size()]
    a, b = out.contiguous().view(ints), ref.contiguous().view(ints)
    bad = a != b
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at "
        f"{tuple(int(i) for i in bad.nonzero()[0])}: {out.float()[bad][0].item()} vs {ref.float()[bad][0].item()}"
    )
