"""Whether Inductor's CUDA graphs survive the block cache's ``torch.cond`` (README, "CUDA graphs").

    python bench/cudagraphs.py --json gpu_results/cudagraphs.json      # on a CUDA device

Tiny FLUX in bf16 on one GPU, 12 steps of one request, compiled twice with ``mode="reduce-overhead"``:
with the cache (its cond in the graph) and with ``enable_cache=False`` (the control). For each: the
CUDA-graph skips Inductor counted (``counters["inductor"]["cudagraph_skips"]``), the warnings the
backend gave, the cached steps, the median time per step, and the largest difference from eager.
The README says torch's Inductor skips CUDA graphs for the whole cached graph; this checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import cdcompile
from cdcompile.testing import flux_inputs, tiny_flux

STEPS = 12


def _steps(model, device):
    base = flux_inputs(model)  # in the model's dtype; the position ids float32
    for s in range(STEPS):
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in base.items()}
        kw["hidden_states"] = kw["hidden_states"] * (1 + 0.01 * s)
        kw["timestep"] = torch.full_like(kw["timestep"], 1 - s / STEPS)
        yield kw


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(enable_cache: bool, device: str) -> dict:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_flux(num_layers=2, num_single_layers=6).to(device, torch.bfloat16).eval()
    options = {"mode": "reduce-overhead", "enable_cache": enable_cache,
               "residual_diff_threshold": 0.3, "max_warmup_steps": 2}
    compiled = torch.compile(model, backend="cachedit", options=options)
    times, outs = [], []
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):  # the first request compiles (and records the graphs)
            cdcompile.new_request(compiled)
            times.clear()
            outs.clear()
            for kw in _steps(model, device):
                _sync(device)
                t0 = time.perf_counter()
                out = compiled(**kw)[0]
                _sync(device)
                times.append(time.perf_counter() - t0)
                outs.append(out.float())
    with torch.no_grad():
        eager = [model(**kw)[0].float() for kw in _steps(model, device)]
    cached = cdcompile.summary(compiled).as_dict()["requests"][-1]["slots"][0]["cached_steps"] if enable_cache else []
    computed = [s for s in range(STEPS) if s not in cached]
    return {
        "enable_cache": enable_cache,
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
        "warnings": [str(w.message) for w in caught if "CUDA graph" in str(w.message)],
        "cached_steps": cached,
        "median_step_ms": 1e3 * H.median(times),
        "max_abs_diff_computed_steps": max((outs[s] - eager[s]).abs().max().item() for s in computed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--device", default="cuda", help="cpu only checks that the script runs: no CUDA graphs there")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/cudagraphs.py needs a CUDA device (--device cpu only checks the script)")
    rows = [run(True, args.device), run(False, args.device)]
    note = {} if args.device == "cuda" else {"note": "no CUDA graphs on a CPU: this run checks the script"}
    result = {"meta": H.metadata(args.device, **note), "rows": rows}
    for r in rows:
        print(json.dumps(r))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
