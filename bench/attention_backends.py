"""diffusers' attention backends inside the block cache's branch (README, "Attention backends").

    python bench/attention_backends.py --json gpu_results/attention_backends.json     # on a CUDA device
    python bench/attention_backends.py --device cpu --json /tmp/ab.json              # _native_math only

Tiny FLUX in bf16, for each backend that runs on the device: the output of the compiled graph with
the cache at threshold 0 (every step computes, through the cond's compute branch) against the same
graph without the cache, which must be equal bit for bit (aot_eager: the same kernels in both), and
against the default backend, which shows whether the backend's kernel differs at all. A backend the
device cannot run is listed with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

from cdcompile.testing import flux_inputs, tiny_flux

BACKENDS = {"cuda": ("native", "_native_math", "_native_flash", "_native_efficient", "_native_cudnn"),
            "cpu": ("native", "_native_math")}


def run(device: str) -> dict:
    model = tiny_flux(num_layers=2, num_single_layers=4, heads=2, head_dim=64).to(device, torch.bfloat16).eval()
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in flux_inputs(model).items()}

    def compiled(**options):
        torch._dynamo.reset()
        c = torch.compile(model, backend="cachedit", fullgraph=True, options={"compiler": "aot_eager", **options})
        with torch.no_grad():
            return c(**kwargs)[0].float()

    rows, default = {}, None
    for name in BACKENDS[device]:
        model.set_attention_backend(name)
        try:
            plain = compiled(enable_cache=False)
            cached = compiled(residual_diff_threshold=0.0)
        except Exception as e:  # a backend this device lacks
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        default = plain if default is None else default
        rows[name] = {"cached_vs_uncached": (cached - plain).abs().max().item(),
                      "uncached_vs_native": (plain - default).abs().max().item()}
        print(name, json.dumps(rows[name]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/attention_backends.py needs a CUDA device (--device cpu checks _native_math)")
    result = {"meta": H.metadata(args.device), "rows": run(args.device)}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
