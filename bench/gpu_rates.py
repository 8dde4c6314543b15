"""Measure the single-GPU rates bench/cp.py's FLUX.1-dev model takes as parameters.

    python bench/gpu_rates.py --json bench/results/gpu_rates.json

On one CUDA device, bf16, ``triton.testing.do_bench`` medians:

- GEMM: the FLUX.1-dev shapes a step runs (4608 tokens x 3072 wide: QKV 3x, out 1x, MLP in 4x,
  MLP out 4x); the achieved TFLOP/s over all four, weighted by their FLOPs, is ``--gemm-tflops``.
- attention: ``scaled_dot_product_attention`` at B=1, H=24, S=4608, D=128 with the flash and cuDNN
  backends; the faster one's TFLOP/s (4 B H S^2 D flops) is ``--attn-tflops``.

The all-to-all rate needs two or more GPUs and is not measured here. Prints the bench/cp.py flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

TOKENS, DIM, HEADS, HEAD_DIM = 4096 + 512, 3072, 24, 128
GEMMS = {"qkv": 3 * DIM, "out": DIM, "mlp_in": 4 * DIM, "mlp_out_from_4x": DIM}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3  # seconds


def gemm_rates(device: str) -> dict:
    rows, flops, seconds = {}, 0.0, 0.0
    for name, n in GEMMS.items():
        k = 4 * DIM if name == "mlp_out_from_4x" else DIM
        a = torch.randn(TOKENS, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        t = _bench(lambda: torch.nn.functional.linear(a, w))
        f = 2 * TOKENS * k * n
        rows[name] = dict(m=TOKENS, k=k, n=n, ms=t * 1e3, tflops=f / t / 1e12)
        flops, seconds = flops + f, seconds + t
    return dict(shapes=rows, tflops=flops / seconds / 1e12)


def attention_rates(device: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, HEADS, TOKENS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * HEADS * TOKENS * TOKENS * HEAD_DIM
    rows = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                t = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            rows[name] = dict(ms=t * 1e3, tflops=flops / t / 1e12)
        except RuntimeError as e:  # a backend this build or device lacks
            rows[name] = dict(error=str(e).splitlines()[0])
    best = max((r["tflops"] for r in rows.values() if "tflops" in r), default=None)
    return dict(backends=rows, tflops=best)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="write the rates and metadata here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_rates.py: no CUDA device; this measures a GPU (bench/cp.py keeps its assumed rates)")
    g, a = gemm_rates("cuda"), attention_rates("cuda")
    meta = H.metadata("cuda", model=f"FLUX.1-dev shapes: {TOKENS} tokens, {DIM} wide, {HEADS}x{HEAD_DIM} heads, bf16")
    out = dict(meta=meta, gemm=g, attention=a)
    print(json.dumps(out, indent=1, default=str))
    print(f"\nbench/cp.py --gemm-tflops {g['tflops']:.0f} --attn-tflops {a['tflops']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
