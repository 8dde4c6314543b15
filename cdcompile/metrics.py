"""Image-quality metrics for a cached generation against its uncached reference (algorithms.md §8).

    from cdcompile import metrics
    metrics.compare(reference, cached)        # {"psnr": .., "ssim": .., "mse": .., "max_abs_error": ..}

    cdcompile-metrics ref.png cached.png
    cdcompile-metrics ref_dir/ cached_dir/ --summary quality.json     # pairs files by name

Inputs are numpy arrays, torch tensors or PIL images, one image or a batch:

- numpy and PIL are channels-last: (H, W), (H, W, C) or (B, H, W, C);
- torch tensors are channels-first, as pipelines return them: (H, W), (C, H, W) or (B, C, H, W).

Everything is computed in float64. ``data_range`` (the peak of PSNR and SSIM's dynamic range) is
255 for uint8 input and 1.0 for float input (what ``output_type="pt"``/``"np"`` pipelines return)
unless given; for images in [-1, 1] pass 2.0.

- MSE and max abs error: in the input's units, over all pixels and channels.
- PSNR: ``10 log10(data_range**2 / MSE)`` per image, in float (cache-dit's default PSNR squares
  uint8 differences, which wrap modulo 256 and inflate the result); ``inf`` for identical images.
  A batch reports the mean of its images' PSNRs.
- SSIM: scikit-image's ``structural_similarity`` with the settings of Wang et al. (2004):
  Gaussian window, sigma 1.5 (11x11), population covariance, K1 = 0.01, K2 = 0.03. Colour images
  are scored **per channel** (RGB) and the channels averaged; there is no luminance conversion.
  A batch reports the mean over images. Images must be at least 11 pixels on each side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
TENSOR_SUFFIXES = {".pt", ".pth", ".npy"}
_SSIM_SIGMA = 1.5
_SSIM_MIN_SIDE = 11  # the Gaussian window scikit-image builds for sigma 1.5 (truncate 3.5)


def _as_batch(x: Any) -> np.ndarray:
    """An image or batch -> (B, H, W, C) ndarray in its own dtype (channels last)."""
    if hasattr(x, "detach"):  # torch tensor, channels first
        t = x.detach().cpu()
        if t.dtype.is_floating_point:  # numpy has no bfloat16; float64 is what we compute in anyway
            t = t.double()
        a = t.numpy()
        if a.ndim == 2:
            a = a[None, :, :, None]
        elif a.ndim == 3:
            a = np.moveaxis(a, 0, -1)[None]
        elif a.ndim == 4:
            a = np.moveaxis(a, 1, -1)
        else:
            raise ValueError("expected a tensor of 2-4 dims ((H, W), (C, H, W), (B, C, H, W)), "
                             f"got shape {tuple(a.shape)}")
        return a
    a = np.asarray(x)
    if a.ndim == 2:
        return a[None, :, :, None]
    if a.ndim == 3:
        return a[None]
    if a.ndim == 4:
        return a
    raise ValueError(f"expected an array of 2-4 dims ((H, W), (H, W, C), (B, H, W, C)), got shape {a.shape}")


def _pair(a: Any, b: Any, data_range: float | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Both inputs as float64 (B, H, W, C) and the data range (checked, or the dtype's default)."""
    x, y = _as_batch(a), _as_batch(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape} (as (B, H, W, C))")
    integer = np.issubdtype(x.dtype, np.integer)
    if integer != np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"one input is {x.dtype} and the other {y.dtype}: they are in different units "
                         "(0-255 against 0-1); convert one to the other's")
    if data_range is None:
        if integer and x.dtype != np.uint8:
            raise ValueError(f"no default data_range for {x.dtype} images; pass data_range")
        data_range = 255.0 if integer else 1.0
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return x.astype(np.float64), y.astype(np.float64), float(data_range)


def mse(a: Any, b: Any) -> float:
    """Mean squared error in float64, in the inputs' units."""
    x, y, _ = _pair(a, b, 1.0)  # no peak needed
    return float(np.mean((x - y) ** 2))


def max_abs_error(a: Any, b: Any) -> float:
    """Largest absolute difference of any pixel and channel, in the inputs' units."""
    x, y, _ = _pair(a, b, 1.0)  # no peak needed
    return float(np.max(np.abs(x - y)))


def _psnr(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    err = float(np.mean((x - y) ** 2))
    return math.inf if err == 0.0 else 10.0 * math.log10(data_range ** 2 / err)


def psnr(a: Any, b: Any, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, in float (mean over a batch); ``inf`` if identical."""
    x, y, r = _pair(a, b, data_range)
    return float(np.mean([_psnr(x[i], y[i], r) for i in range(len(x))]))


def _ssim_fn():
    try:
        from skimage.metrics import structural_similarity
    except ImportError as e:
        raise ImportError("cdcompile.metrics.ssim needs scikit-image: pip install 'cdcompile[metrics]' "
                          "(or pip install scikit-image)") from e
    return structural_similarity


def _ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    if min(x.shape[0], x.shape[1]) < _SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs images of at least {_SSIM_MIN_SIDE}x{_SSIM_MIN_SIDE} "
                         f"(its Gaussian window), got {x.shape[0]}x{x.shape[1]}")
    return float(_ssim_fn()(x, y, data_range=data_range, channel_axis=-1, gaussian_weights=True,
                            sigma=_SSIM_SIGMA, use_sample_covariance=False))


def ssim(a: Any, b: Any, *, data_range: float | None = None) -> float:
    """Structural similarity (per channel, averaged; mean over a batch); 1.0 if identical."""
    x, y, r = _pair(a, b, data_range)
    return float(np.mean([_ssim(x[i], y[i], r) for i in range(len(x))]))


def compare(a: Any, b: Any, *, data_range: float | None = None) -> dict[str, float]:
    """All four metrics of ``b`` against the reference ``a``."""
    x, y, r = _pair(a, b, data_range)
    return {"psnr": float(np.mean([_psnr(x[i], y[i], r) for i in range(len(x))])),
            "ssim": float(np.mean([_ssim(x[i], y[i], r) for i in range(len(x))])),
            "mse": float(np.mean((x - y) ** 2)),
            "max_abs_error": float(np.max(np.abs(x - y)))}


def load(path: str | Path) -> Any:
    """An image file (uint8, channels last), a ``.pt`` tensor (channels first) or a ``.npy`` array."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth"):
        import torch

        t = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{p}: expected a saved tensor, got {type(t).__name__}")
        return t
    if suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(p) as im:
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            return np.asarray(im)
    raise ValueError(f"{p}: unknown file type {suffix!r}; expected one of "
                     f"{sorted(IMAGE_SUFFIXES | TENSOR_SUFFIXES)}")


def _pairs(a: Path, b: Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    if a.is_dir() != b.is_dir():
        raise ValueError(f"compare a folder with a folder or a file with a file: {a}, {b}")
    if not a.is_dir():
        return [(a.name, a, b)], [], []
    ok = IMAGE_SUFFIXES | TENSOR_SUFFIXES
    fa = {p.name: p for p in a.iterdir() if p.suffix.lower() in ok}
    fb = {p.name: p for p in b.iterdir() if p.suffix.lower() in ok}
    common = sorted(fa.keys() & fb.keys())
    return [(n, fa[n], fb[n]) for n in common], sorted(fa.keys() - fb.keys()), sorted(fb.keys() - fa.keys())


def _json_float(v: float) -> float | str:
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def main(argv: Sequence[str] | None = None) -> int:
    """``cdcompile-metrics A B [--summary out.json] [--data-range R]``."""
    ap = argparse.ArgumentParser(
        prog="cdcompile-metrics",
        description="PSNR (float), SSIM (scikit-image, per channel), MSE and max abs error of B "
                    "against the reference A: two image/.pt/.npy files, or two folders paired by file name.")
    ap.add_argument("reference", type=Path)
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--data-range", type=float, default=None,
                    help="peak value (default: 255 for 8-bit images, 1.0 for float tensors)")
    ap.add_argument("--summary", type=Path, default=None,
                    help="write per-pair and mean metrics as JSON (an infinite PSNR is written \"inf\")")
    args = ap.parse_args(argv)
    for p in (args.reference, args.candidate):
        if not p.exists():
            ap.error(f"{p} does not exist")
    try:
        pairs, only_a, only_b = _pairs(args.reference, args.candidate)
        if not pairs:
            raise ValueError(f"no file names in common between {args.reference} and {args.candidate}")
        rows = [{"name": n, **compare(load(pa), load(pb), data_range=args.data_range)} for n, pa, pb in pairs]
    except ValueError as e:
        ap.error(str(e))
    keys = ("psnr", "ssim", "mse", "max_abs_error")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    width = max(len("mean"), *(len(r["name"]) for r in rows))
    print(f"{'name':<{width}}  {'PSNR dB':>8}  {'SSIM':>7}  {'MSE':>10}  {'max abs':>9}")
    for r in [*rows, {"name": "mean", **mean}] if len(rows) > 1 else rows:
        print(f"{r['name']:<{width}}  {r['psnr']:>8.3f}  {r['ssim']:>7.4f}  {r['mse']:>10.4g}  "
              f"{r['max_abs_error']:>9.4g}")
    for name in only_a:
        print(f"warning: {name} only in {args.reference}", file=sys.stderr)
    for name in only_b:
        print(f"warning: {name} only in {args.candidate}", file=sys.stderr)
    if args.summary is not None:
        import skimage

        doc = {"reference": str(args.reference), "candidate": str(args.candidate),
               "data_range": args.data_range if args.data_range is not None else "auto (255 uint8, 1.0 float)",
               "ssim": f"scikit-image {skimage.__version__} structural_similarity, per channel averaged, "
                       f"Gaussian sigma {_SSIM_SIGMA}",
               "pairs": [{k: _json_float(v) if isinstance(v, float) else v for k, v in r.items()}
                         for r in rows],
               "mean": {k: _json_float(v) for k, v in mean.items()},
               "only_in_reference": only_a, "only_in_candidate": only_b}
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
