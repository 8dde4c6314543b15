"""What a cached step costs, and end to end against cache-dit + torch.compile (issue 3).

    python bench/speed.py                      # CPU: FLUX architecture at toy width (minutes)
    python bench/speed.py --device cuda        # FLUX.1-dev's shape, bf16, random weights
    python bench/speed.py --repeats 3 --out /tmp/speed_cpu
    python bench/speed.py --shape overhead     # CPU: FLUX.1-dev's 57 blocks at toy size (overheads)
    python bench/speed.py --device cuda --fp8-attention --skip-eager --skip-cache-dit
                                               # + cachedit with fp8_attention=True: FP8 attention's
                                               # end-to-end gain at equal decisions (a GPU figure)
    python bench/speed.py --calibrator dmd --skip-eager --skip-cache-dit
                                               # + cachedit with a calibrator: what it adds to a
                                               # cached step (DMD: the Gram matrices, the host fit)

On a CPU shared with other jobs, run with ``OMP_NUM_THREADS=1``: with 2 threads on 2 cores, a busy
neighbour stalls every OpenMP region, and steps took 10-60x their idle time in alternating runs
(one thread: under 2x).

Method, everything side by side in one process:

1. One FLUX-architecture transformer with random weights. Each configuration gets its own instance
   over the *same* weight tensors; the backends differ, so Dynamo keeps their compiled code apart
   (checked: no configuration compiles anything once timing starts, and the plain-inductor
   instance has no cache state).
2. Configurations: eager; ``torch.compile`` (inductor); ``cachedit`` (inductor inside); cache-dit
   1.5.3 DBCache + ``torch.compile`` (inductor); and, for the ideal bound, the model with zero
   blocks and the model with only the F + B blocks (both inductor). Inductor settings are the
   defaults for all of them (cache-dit's ``set_compile_configs`` is not applied).
3. Equal decisions: F1B0, ``max_warmup_steps`` = 4, no limits, threshold 1e6 in both systems, so
   every step after warmup is cached (cache-dit takes a threshold >= 1 as "always similar";
   cdcompile compares diff < 1e6). Both summaries are read back and the sets must match.
4. A request is ``steps`` transformer calls with decreasing timesteps: a larger timestep starts a
   new request in cdcompile; cache-dit gets ``refresh_context`` before each request, untimed (on
   a bare transformer it drifts one step per request otherwise).
5. Warm-up: 2 requests per configuration; Dynamo's counters over them give graphs, graph breaks
   and recompiles (a BACKEND_MATCH miss is a new configuration, not a recompile). Then
   ``repeats`` rounds; a round runs one request of every configuration, in a rotated order.
   Every call is timed (CUDA events on GPU).
6. Step times are medians over calls. Request times two ways: the median over rounds of the wall
   time, and "step-composed", the sum over step indices of the median over rounds of that step's
   time. On a shared machine a burst of load lands on a few steps, so the composed figure is the
   robust one; ratios are medians of per-round ratios (paired). The load average is recorded.

Ideal cached step (reference/algorithms.md §1: the non-block ops plus (Fn+Bn)/N of the stack): the
model with only the F + B blocks, measured. With a uniform block cost b and non-block cost c,
inductor step = c + N b and F+B-only = c + (Fn+Bn) b, so c and b follow by subtraction and the
formula c + (Fn+Bn)/N (inductor step - c) equals the F+B-only time. The zero-block model is not
used for c: with no block reading them, Inductor drops the rotary embedding and the text
embedder as dead code, which a real cached step must run; it is reported for information.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import cdcompile  # noqa: E402
from bench import _harness as H  # noqa: E402
from cdcompile.testing import flux_inputs  # noqa: E402

# Shapes. cpu: a computed inductor step of >= 50 ms on one idle core (the 2 heads x 16 toy of
# environment.md's CPU anchor takes 15 ms on 2 idle threads: too small to weigh a cached step).
# cuda: FLUX.1-dev at 1024x1024 (128x128 latents packed 2x2 = 4096 image tokens), 512 T5 tokens.
SHAPES: dict[str, dict[str, Any]] = {
    "cpu": dict(model=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=6,
                           attention_head_dim=32, num_attention_heads=4, joint_attention_dim=32,
                           pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12)),
                tokens=1024, text_tokens=64, dtype=torch.float32, init_std=None),
    "cuda": dict(model=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                 # N(0, 0.02) weights keep 57 random bf16 blocks' activations small (the residual diff
                 # must stay finite for equal decisions); not yet run on a GPU
                 tokens=4096, text_tokens=512, dtype=torch.bfloat16, init_std=0.02),
    # A few seconds of everything the run does (compiles, timing, profile, report), on any device:
    # to try the script where it will run (a new torch, the GPU machine) before the real shapes.
    "smoke": dict(model=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
                  tokens=64, text_tokens=16, dtype=torch.float32, init_std=None),
    # FLUX.1-dev's 19 + 38 blocks at toy width and length: a block is a few small kernels, so a step
    # is bound by per-op and per-call overheads (dispatch, Python hooks, graph breaks, guards), the
    # regime a GPU puts fast kernels in. CPU only; a measurement of overheads, not of FLUX.1-dev.
    "overhead": dict(model=dict(patch_size=1, in_channels=16, num_layers=19, num_single_layers=38,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
                     tokens=64, text_tokens=16, dtype=torch.float32, init_std=None),
}

OVERHEAD_NOTE = (
    "**Overhead shape** (`--shape overhead`): FLUX.1-dev's block count at toy width and length. A block is "
    "a handful of tiny kernels, so these times measure what each system spends per call and per block "
    "besides the math (dispatch, Python hooks, graph breaks, guard checks), the regime fast GPU kernels "
    "put a step in. It is not a FLUX.1-dev measurement and does not decide issue 3's GPU target.")

LEAN_NOTE = (
    "**Lean host** (`--lean-host`): every compiled configuration runs without Dynamo's guards on nn "
    "modules (`guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe`) and without "
    "Inductor's size/stride asserts on graph inputs (`torch._inductor.config.size_asserts = False`). "
    "Both checks cost per call in proportion to the weights a graph takes as inputs; safe only while "
    "the weights and modules do not change between calls. Each `torch.compile` call keeps its own "
    "compiled entries (`isolate_recompiles=True`): without module guards, the instances of the "
    "configurations would share them.")

FN, BN, WARMUP_STEPS = 1, 0, 4
# Caches every step after warmup in both systems (see the module docstring, point 3).
ALWAYS_CACHE = 1e6
WARMUP_REQUESTS = 2


# ---------------------------------------------------------------------------------------------
# models and inputs

def build_model(shape: dict[str, Any], device: str, seed: int = 0) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(shape["dtype"])
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**shape["model"])
    finally:
        torch.set_default_dtype(default)
    if shape["init_std"] is not None and device != "meta":
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, shape["init_std"])
    return model.eval().requires_grad_(False)


def stack_split(model) -> tuple[int, int, list[int], list[int]]:
    """(N, double blocks, kept double indices, kept single indices) of the F + B blocks."""
    nd, ns = len(model.transformer_blocks), len(model.single_transformer_blocks)
    n = nd + ns
    keep = list(range(FN)) + list(range(n - BN, n))
    return n, nd, [i for i in keep if i < nd], [i - nd for i in keep if i >= nd]


def sibling(model, double: list[int] | None = None, single: list[int] | None = None) -> torch.nn.Module:
    """A new instance over ``model``'s weight tensors, optionally keeping only some blocks."""
    double = list(range(len(model.transformer_blocks))) if double is None else double
    single = list(range(len(model.single_transformer_blocks))) if single is None else single
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    config.update(num_layers=len(double), num_single_layers=len(single))
    with torch.device("meta"):
        twin = type(model)(**config)
    keep = {"transformer_blocks": double, "single_transformer_blocks": single}
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] in keep:
            i = int(parts[1])
            if i not in keep[parts[0]]:
                continue
            parts[1] = str(keep[parts[0]].index(i))
        state[".".join(parts)] = value
    twin.load_state_dict(state, assign=True, strict=True)
    return twin.eval().requires_grad_(False)


def request_inputs(model, shape: dict[str, Any], device: str, steps: int) -> list[dict[str, Any]]:
    """One request: the same latents and prompt, timesteps 1 .. 1/steps (flow matching sigmas)."""
    base = flux_inputs(model, tokens=shape["tokens"], text_tokens=shape["text_tokens"], seed=0,
                       dtype=shape["dtype"])
    base = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in base.items()}
    if model.config.guidance_embeds:
        base["guidance"] = torch.full((1,), 3.5, device=device, dtype=torch.float32)
    ts = torch.linspace(1.0, 1.0 / steps, steps)
    return [dict(base, timestep=torch.full((1,), float(t), device=device, dtype=shape["dtype"])) for t in ts]


# ---------------------------------------------------------------------------------------------
# Dynamo bookkeeping

class RecompileLog(logging.Handler):
    """Counts Dynamo's "Recompiling function" records that are real recompiles."""

    def __init__(self):
        super().__init__()
        self.recompiles, self.new_backend = 0, 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Recompiling function" not in msg:
            return
        if "BACKEND_MATCH" in msg:  # a code object first compiled by another configuration
            self.new_backend += 1
        else:
            self.recompiles += 1

    @classmethod
    def install(cls) -> "RecompileLog":
        handler = cls()
        torch._logging.set_logs(recompiles=True)
        log = logging.getLogger("torch._dynamo.guards.__recompiles")
        log.addHandler(handler)
        log.propagate = False  # counted here, not printed
        return handler


def dynamo_snapshot(rec: RecompileLog) -> dict[str, int]:
    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": rec.recompiles}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


# ---------------------------------------------------------------------------------------------
# configurations

class Config:
    """One thing to time: a callable over one step's inputs, plus how to read its cached steps."""

    def __init__(self, name: str, label: str, module: Any, *, before_request: Callable[[], None] | None = None,
                 cached_steps: Callable[[], list[int]] | None = None, role: str = "system"):
        self.name, self.label, self.module, self.role = name, label, module, role
        self.before_request = before_request or (lambda: None)
        self.cached_steps = cached_steps or (lambda: [])
        self.requests: list[float] = []  # seconds per timed request
        self.steps: list[list[float]] = []  # per timed request, seconds per call
        self.cached: list[list[int]] = []  # per timed request, the cached step indices
        self.outputs: list[torch.Tensor] = []  # last timed request's outputs
        self.dynamo: dict[str, int] = {}
        self.warmup_s: float = 0.0
        self.fp8_attention: list[str] = []  # per compiled graph, what the fp8_attention pass did

    def request(self, timer: H.StepTimer, inputs: list[dict]) -> tuple[float, list[float], list[torch.Tensor]]:
        self.before_request()
        with torch.no_grad():
            total, steps, outs = timer.run(lambda x: self.module(**x)[0], inputs)
        return total, steps, outs


# torch.compile options and arguments every compiled configuration gets (--lean-host sets them).
COMPILE_OPTIONS: dict[str, Any] = {}
COMPILE_KW: dict[str, Any] = {}


def compile_(model):
    """``torch.compile`` (inductor) with COMPILE_OPTIONS and COMPILE_KW."""
    if COMPILE_OPTIONS:
        return torch.compile(model, options=dict(COMPILE_OPTIONS), **COMPILE_KW)
    return torch.compile(model, **COMPILE_KW)


def lean_host() -> None:
    """Drop per-call host checks in every compiled configuration alike: Dynamo's guards on nn
    modules and Inductor's size/stride asserts on graph inputs (safe only while the weights and
    modules do not change between calls). Without module guards, Dynamo cannot tell the
    configurations' instances of the same class apart: each compile call keeps its own entries."""
    COMPILE_OPTIONS["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    COMPILE_KW["isolate_recompiles"] = True
    torch._inductor.config.size_asserts = False


def cdcompile_config(model, name: str, options: dict[str, Any], label: str = "cachedit") -> Config:
    compiled = torch.compile(model, backend="cachedit", options={**options, **COMPILE_OPTIONS}, **COMPILE_KW)

    def cached() -> list[int]:
        reqs = cdcompile.summary(compiled).as_dict()["requests"]
        return list(reqs[-1]["slots"][0]["cached_steps"]) if reqs and reqs[-1]["slots"] else []

    return Config(name, label, compiled, cached_steps=cached)


def cache_dit_config(model, steps: int) -> Config:
    import cache_dit

    def cache_config():
        return cache_dit.DBCacheConfig(
            Fn_compute_blocks=FN, Bn_compute_blocks=BN, residual_diff_threshold=ALWAYS_CACHE,
            max_warmup_steps=WARMUP_STEPS, warmup_interval=1, max_cached_steps=-1,
            max_continuous_cached_steps=-1, num_inference_steps=steps)

    cache_dit.enable_cache(model, cache_config=cache_config())  # patches this instance's forward
    compiled = compile_(model)

    def cached() -> list[int]:
        stats = cache_dit.summary(model, logging=False)
        return sorted(int(s) for s in stats[0].cached_steps) if stats else []

    return Config("cache-dit + torch.compile", "cache-dit", compiled,
                  before_request=lambda: cache_dit.refresh_context(model, cache_config=cache_config()),
                  cached_steps=cached)


# ---------------------------------------------------------------------------------------------
# the run

def run(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    shape = SHAPES[args.shape]
    torch._dynamo.config.recompile_limit = 64  # all configurations share FLUX's forward code object
    rec = RecompileLog.install()
    timer = H.StepTimer(device)

    model = build_model(shape, device)
    n, nd, keep_double, keep_single = stack_split(model)
    inputs = request_inputs(model, shape, device, args.steps)
    options = dict(compiler="inductor", Fn_compute_blocks=FN, Bn_compute_blocks=BN,
                   residual_diff_threshold=ALWAYS_CACHE, max_warmup_steps=WARMUP_STEPS, warmup_interval=1,
                   max_cached_steps=-1, max_continuous_cached_steps=-1)

    configs: list[Config] = []
    if not args.skip_eager:
        configs.append(Config("eager", "eager", model))
    configs.append(Config("torch.compile (inductor)", "inductor", compile_(sibling(model))))
    configs.append(cdcompile_config(sibling(model), "cachedit (inductor)", options))
    if args.fp8_attention:  # the same cache, every eligible SDPA call on cdcompile::sage_attention
        configs.append(cdcompile_config(sibling(model), "cachedit + FP8 attention (inductor)",
                                        {**options, "fp8_attention": True}, label="cachedit-fp8"))
    if args.calibrator:  # the same cache; every cached step forecast by the calibrator
        configs.append(cdcompile_config(sibling(model), f"cachedit + {args.calibrator} (inductor)",
                                        {**options, "calibrator": args.calibrator}, label="cachedit-cal"))
    if not args.skip_cache_dit:
        try:
            configs.append(cache_dit_config(sibling(model), args.steps))
        except ImportError as e:
            print(f"cache-dit not available ({e}); pip install cache-dit==1.5.3", file=sys.stderr)
    configs.append(Config("ideal: zero blocks (inductor)", "zero-block",
                          compile_(sibling(model, [], [])), role="ideal"))
    configs.append(Config(f"ideal: F{FN}+B{BN} blocks only (inductor)", "F+B-only",
                          compile_(sibling(model, keep_double, keep_single)), role="ideal"))

    for cfg in configs:
        before = dynamo_snapshot(rec)
        with cdcompile.backend.collect_reports() as reports:
            for _ in range(WARMUP_REQUESTS):
                total, _, _ = cfg.request(timer, inputs)
                cfg.warmup_s += total
        cfg.fp8_attention = [str(r.fp8_attention) for r in reports if r.fp8_attention is not None]
        cfg.dynamo = delta(dynamo_snapshot(rec), before)
        print(f"warm-up {cfg.name}: {cfg.warmup_s:.1f} s, {cfg.dynamo}", flush=True)

    timing_start = dynamo_snapshot(rec)
    load = {"start": os.getloadavg()}
    for r in range(args.repeats):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for cfg in order:
            total, steps, outs = cfg.request(timer, inputs)
            cfg.requests.append(total)
            cfg.steps.append(steps)
            cfg.cached.append(cfg.cached_steps())
            cfg.outputs = outs
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{c.label} {c.requests[-1] * 1e3:.0f} ms" for c in configs), flush=True)
        if args.partial_stem and r + 1 < args.repeats:  # what a run cut short by a time limit leaves
            partial = analyse(args, shape, n, configs, delta(dynamo_snapshot(rec), timing_start), rec, options,
                              dict(load, end=os.getloadavg()))
            partial["partial"] = f"cut short: {r + 1} of {args.repeats} rounds"
            H.write_results(args.partial_stem, partial, f"**Partial: {r + 1} of {args.repeats} rounds.**\n\n"
                            + markdown(partial))
    compiled_during_timing = delta(dynamo_snapshot(rec), timing_start)
    load["end"] = os.getloadavg()

    result = analyse(args, shape, n, configs, compiled_during_timing, rec, options, load)
    if args.profile and not device.startswith("cuda"):
        result["profile_ms_per_step"] = {c.label: profile_steps(c, inputs) for c in configs
                                         if c.label in ("inductor", "cachedit", "cache-dit", "F+B-only")}
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _step_stats(cfg: Config) -> dict[str, Any]:
    computed, cached = [], []
    for steps, cached_set in zip(cfg.steps, cfg.cached):
        s = set(cached_set)
        for k, t in enumerate(steps):
            (cached if k in s else computed).append(t)
    composed = sum(H.median(steps[k] for steps in cfg.steps) for k in range(len(cfg.steps[0])))
    return {"request_ms": _ms(H.median(cfg.requests)), "request_composed_ms": _ms(composed),
            "request_ms_rounds": [t * 1e3 for t in cfg.requests],
            "computed_step_ms": _ms(H.median(computed)), "cached_step_ms": _ms(H.median(cached)),
            "all_steps_ms": _ms(H.median(t for steps in cfg.steps for t in steps))}


def _paired(rounds: int, fa: Callable[[int], float], fb: Callable[[int], float]) -> float:
    """Median over rounds of fa(round) / fb(round)."""
    return H.median(fa(r) / fb(r) for r in range(rounds))


def _computed_median(cfg: Config, r: int) -> float:
    cached = set(cfg.cached[r])
    return H.median(t for k, t in enumerate(cfg.steps[r]) if k not in cached)


def _max_abs(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    if not a or not b:
        return None
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def profile_steps(cfg: Config, inputs: list[dict]) -> dict[str, float]:
    """Self CPU ms per call of each profiler event over the steps after warmup (cached in cachedit)."""
    from torch.profiler import ProfilerActivity, profile

    cfg.before_request()
    with torch.no_grad():
        for x in inputs[:WARMUP_STEPS]:
            cfg.module(**x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in inputs[WARMUP_STEPS:]:
                cfg.module(**x)
    calls = len(inputs) - WARMUP_STEPS
    # "## Call CompiledFxGraph <hash> ##": Inductor's generated code; one name per graph
    name = lambda k: "Inductor generated code" if k.startswith("## Call CompiledFxGraph") else k  # noqa: E731
    out: dict[str, float] = {}
    for e in prof.key_averages():
        out[name(e.key)] = out.get(name(e.key), 0.0) + e.self_cpu_time_total / calls / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def analyse(args, shape, n, configs: list[Config], during: dict[str, int], rec: RecompileLog,
            options: dict[str, Any], load: dict[str, Any]) -> dict[str, Any]:
    by = {c.label: c for c in configs}
    eager, ind, cdc, cdt = by.get("eager"), by["inductor"], by["cachedit"], by.get("cache-dit")
    fb = by["F+B-only"]
    rounds = min(len(c.requests) for c in configs)  # fewer than args.repeats in a partial result

    rows = []
    for c in configs:
        rows.append({
            "config": c.name, "label": c.label, "role": c.role, **_step_stats(c),
            "cached_count": len(c.cached[-1]),
            "cached_steps": list(c.cached[-1]),
            "cached_steps_stable": len({tuple(x) for x in c.cached}) <= 1,
            "max_abs_diff_vs_eager": _max_abs(c.outputs, eager.outputs) if eager and c.role == "system" else None,
            "warmup_s": c.warmup_s, **c.dynamo,
        })
    row = {r["label"]: r for r in rows}
    rc = row["cachedit"]

    ind_step, fb_step = row["inductor"]["all_steps_ms"], row["F+B-only"]["all_steps_ms"]
    kept = FN + BN
    block = (ind_step - fb_step) / (n - kept)
    n_cached = rc["cached_count"]
    n_computed = args.steps - n_cached
    ideal = {
        "cached_step_ms": fb_step,
        "cached_step_how": f"model with only the F{FN}+B{BN} blocks, inductor (measured)",
        "inductor_step_ms": ind_step,
        "block_ms": block,
        "nonblock_ms": fb_step - kept * block,
        "zero_block_model_ms": row["zero-block"]["all_steps_ms"],
        "request_ms": n_computed * ind_step + n_cached * fb_step,
        "request_how": f"{n_computed} inductor steps + {n_cached} F+B-only steps",
    }

    checks = {
        "no_compiles_during_timing": during["graphs"] == 0 and during["recompiles"] == 0,
        "compiled_during_timing": during,
        "inductor_instance_has_no_cache_state": not cdcompile.summary(ind.module).requests,
        "cachedit_cached_sets_stable": rc["cached_steps_stable"],
        "new_backend_compiles": rec.new_backend,
    }
    computed = [k for k in range(args.steps) if k not in set(rc["cached_steps"])]
    checks["max_abs_diff_cachedit_vs_inductor_computed_steps"] = _max_abs(
        [cdc.outputs[k] for k in computed], [ind.outputs[k] for k in computed])
    fp8 = by.get("cachedit-fp8")
    if fp8 is not None:
        checks["fp8_equal_decisions"] = row["cachedit-fp8"]["cached_steps"] == rc["cached_steps"]
        checks["max_abs_diff_fp8_vs_cachedit"] = _max_abs(fp8.outputs, cdc.outputs)
        checks["fp8_attention_pass"] = fp8.fp8_attention
    cal = by.get("cachedit-cal")
    if cal is not None:
        checks["calibrator_equal_decisions"] = row["cachedit-cal"]["cached_steps"] == rc["cached_steps"]
        checks["max_abs_diff_calibrator_vs_cachedit"] = _max_abs(cal.outputs, cdc.outputs)
    if cdt is not None:
        rt = row["cache-dit"]
        checks["equal_decisions"] = (rt["cached_steps"] == rc["cached_steps"] and rt["cached_steps_stable"]
                                     and rc["cached_steps_stable"])
        checks["max_abs_diff_cachedit_vs_cache_dit"] = _max_abs(cdc.outputs, cdt.outputs)

    cached_vs_ideal = rc["cached_step_ms"] / ideal["cached_step_ms"]
    targets = {
        "cached_step_vs_ideal": cached_vs_ideal,
        "cached_step_vs_ideal_paired": _paired(
            rounds, lambda r: H.median(t for k, t in enumerate(cdc.steps[r]) if k in set(cdc.cached[r])),
            lambda r: H.median(fb.steps[r])),
        "cached_step_ok": cached_vs_ideal <= 1.2,
        "guard_overhead_ms": rc["computed_step_ms"] - ind_step,
        "guard_overhead_ratio_paired": _paired(rounds, lambda r: _computed_median(cdc, r),
                                               lambda r: H.median(ind.steps[r])),
        "cachedit_graph_breaks": rc["graph_breaks"],
        "zero_graph_breaks_ok": rc["graph_breaks"] == 0,
        "cachedit_vs_inductor_speedup": _paired(rounds, lambda r: ind.requests[r], lambda r: cdc.requests[r]),
        "cachedit_vs_ideal_request": rc["request_composed_ms"] / ideal["request_ms"],
    }
    if fp8 is not None:
        rf = row["cachedit-fp8"]
        targets.update({
            "fp8_vs_cachedit_speedup_paired": _paired(rounds, lambda r: cdc.requests[r], lambda r: fp8.requests[r]),
            "fp8_computed_step_speedup": rc["computed_step_ms"] / rf["computed_step_ms"],
            "fp8_cached_step_speedup": rc["cached_step_ms"] / rf["cached_step_ms"],
        })
    if cal is not None:
        rk = row["cachedit-cal"]
        targets.update({
            "calibrator_cached_step_ms": rk["cached_step_ms"] - rc["cached_step_ms"],
            "calibrator_cached_step_ratio_paired": _paired(
                rounds, lambda r: H.median(t for k, t in enumerate(cal.steps[r]) if k in set(cal.cached[r])),
                lambda r: H.median(t for k, t in enumerate(cdc.steps[r]) if k in set(cdc.cached[r]))),
            "calibrator_computed_step_ms": rk["computed_step_ms"] - rc["computed_step_ms"],
        })
    if eager is not None:
        targets["cachedit_vs_eager_speedup"] = _paired(rounds, lambda r: eager.requests[r], lambda r: cdc.requests[r])
    if cdt is not None:
        rt = row["cache-dit"]
        paired = _paired(rounds, lambda r: cdt.requests[r], lambda r: cdc.requests[r])
        composed = rt["request_composed_ms"] / rc["request_composed_ms"]
        targets.update({
            "cachedit_vs_cache_dit_speedup_paired": paired,
            "cachedit_vs_cache_dit_speedup_composed": composed,
            "end_to_end_ok": min(paired, composed) >= 1.15 and checks["equal_decisions"],
            # the most any cache can gain over cache-dit here: its request against the ideal one
            "ideal_vs_cache_dit_speedup": rt["request_composed_ms"] / ideal["request_ms"],
        })

    meta = H.metadata(args.device, benchmark="bench/speed.py", steps=args.steps, repeats=rounds,
                      warmup_requests=WARMUP_REQUESTS, load_average=load,
                      shape={**shape["model"], "tokens": shape["tokens"], "text_tokens": shape["text_tokens"],
                             "dtype": str(shape["dtype"]), "init_std": shape["init_std"], "N": n,
                             "name": args.shape},
                      lean_host=bool(args.lean_host), fp8_attention=bool(args.fp8_attention),
                      calibrator=args.calibrator,
                      # Dynamo's dict-tag shortcut over unchanged module trees (on in torch 2.11, off
                      # from 2.12): it sets what a guard check costs per call.
                      recursive_dict_tag_guards=bool(getattr(torch._dynamo.config,
                                                             "use_recursive_dict_tags_for_guards", False)),
                      cachedit_options=options,
                      cache_dit_config=dict(Fn_compute_blocks=FN, Bn_compute_blocks=BN,
                                            residual_diff_threshold=ALWAYS_CACHE, max_warmup_steps=WARMUP_STEPS,
                                            warmup_interval=1, max_cached_steps=-1,
                                            max_continuous_cached_steps=-1, num_inference_steps=args.steps))
    return {"meta": meta, "rows": rows, "ideal": ideal, "targets": targets, "checks": checks}


# ---------------------------------------------------------------------------------------------
# output

HEADER = ["configuration", "request ms (wall)", "request ms (composed)", "computed step ms", "cached step ms",
          "cached", "max|diff| vs eager", "graphs", "breaks", "recompiles", "warm-up s"]


def table_rows(result: dict[str, Any]) -> list[list[Any]]:
    out = []
    for r in result["rows"]:
        system = r["role"] == "system"
        diff = r["max_abs_diff_vs_eager"]
        out.append([r["config"], r["request_ms"] if system else None, r["request_composed_ms"] if system else None,
                    r["computed_step_ms"], r["cached_step_ms"],
                    f"{r['cached_count']}/{result['meta']['steps']}" if system else "-",
                    None if diff is None else f"{diff:.2e}",
                    *([r["graphs"], r["graph_breaks"], r["recompiles"]] if system else [None] * 3),
                    r["warmup_s"]])
    i = result["ideal"]
    out.append(["ideal (bound)", None, i["request_ms"], i["inductor_step_ms"], i["cached_step_ms"], "-", None,
                None, None, None, None])
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    t, c, i, m = result["targets"], result["checks"], result["ideal"], result["meta"]
    ok = lambda b: "yes" if b else "NO"  # noqa: E731
    load = m["load_average"]
    lines = [
        f"ideal cached step = {i['cached_step_how']} = {i['cached_step_ms']:.2f} ms; by subtraction a block costs "
        f"{i['block_ms']:.2f} ms and the non-block ops {i['nonblock_ms']:.2f} ms (the zero-block model, which "
        f"drops rope and the text embedder as dead code, {i['zero_block_model_ms']:.2f} ms)",
        f"cached step / ideal = {t['cached_step_vs_ideal']:.2f} (paired rounds {t['cached_step_vs_ideal_paired']:.2f}; "
        f"target <= 1.2: {ok(t['cached_step_ok'])})",
        f"guard overhead on a computed step: {t['guard_overhead_ms']:+.2f} ms vs the inductor step "
        f"(paired ratio {t['guard_overhead_ratio_paired']:.3f})",
        f"cachedit graph breaks: {t['cachedit_graph_breaks']} (target 0: {ok(t['zero_graph_breaks_ok'])})",
        f"cachedit vs inductor: {t['cachedit_vs_inductor_speedup']:.2f}x per request; cachedit request "
        f"(composed) = {t['cachedit_vs_ideal_request']:.2f}x the ideal request ({i['request_how']})",
    ]
    if "cachedit_vs_eager_speedup" in t:
        lines.append(f"cachedit vs eager: {t['cachedit_vs_eager_speedup']:.2f}x per request")
    if "end_to_end_ok" in t:
        lines.append(
            f"cachedit vs cache-dit + torch.compile at equal decisions: "
            f"{t['cachedit_vs_cache_dit_speedup_paired']:.2f}x (paired wall) / "
            f"{t['cachedit_vs_cache_dit_speedup_composed']:.2f}x (composed) per request "
            f"(target >= 1.15: {ok(t['end_to_end_ok'])}); equal cached step sets: {ok(c['equal_decisions'])}; "
            f"max|cachedit - cache-dit| over all steps: {c['max_abs_diff_cachedit_vs_cache_dit']:.2e}")
        lines.append(f"the ideal request is {t['ideal_vs_cache_dit_speedup']:.2f}x faster than cache-dit + "
                     f"torch.compile (composed): the most any cache could gain over it on this shape")
    if "fp8_vs_cachedit_speedup_paired" in t:
        lines.append(
            f"FP8 attention (cachedit + fp8_attention=True) vs cachedit: {t['fp8_vs_cachedit_speedup_paired']:.2f}x "
            f"per request (paired), {t['fp8_computed_step_speedup']:.2f}x per computed step, "
            f"{t['fp8_cached_step_speedup']:.2f}x per cached step; equal cached step sets: "
            f"{ok(c['fp8_equal_decisions'])}; max|FP8 - cachedit| over all steps: "
            f"{c['max_abs_diff_fp8_vs_cachedit']:.2e}; the pass: {'; '.join(c['fp8_attention_pass']) or 'no report'}"
            + ("" if m["device"].startswith("cuda") else
               " (on a CPU the op is its plain-torch emulation: slower by design, not a speed figure)"))
    if "calibrator_cached_step_ms" in t:
        lines.append(
            f"{m['calibrator']} calibrator: {t['calibrator_cached_step_ms']:+.2f} ms per cached step (paired ratio "
            f"{t['calibrator_cached_step_ratio_paired']:.2f}), {t['calibrator_computed_step_ms']:+.2f} ms per computed "
            f"step, against cachedit without it; equal cached step sets: {ok(c['calibrator_equal_decisions'])}; "
            f"max|calibrated - cachedit| over all steps: {c['max_abs_diff_calibrator_vs_cachedit']:.2e}")
    lines.append(f"max|cachedit - inductor| on computed steps: "
                 f"{c['max_abs_diff_cachedit_vs_inductor_computed_steps']:.2e}")
    lines.append(f"checks: nothing compiled while timing: {ok(c['no_compiles_during_timing'])}; "
                 f"plain inductor instance ran its own graph: {ok(c['inductor_instance_has_no_cache_state'])}; "
                 f"cachedit cached the same steps every request: {ok(c['cachedit_cached_sets_stable'])}")
    lines.append(f"load average (1 min) at start / end of timing: {load['start'][0]:.2f} / {load['end'][0]:.2f} "
                 f"on {m['cpu_cores']} cores")
    return lines


PROFILE_ROWS = 8


def profile_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]] | None:
    """The costliest profiler events of the steps after warmup, self CPU ms per step, per config."""
    prof = result.get("profile_ms_per_step")
    if not prof:
        return None
    labels = list(prof)
    top: list[str] = []
    for label in ("cachedit", "F+B-only"):
        for k in list(prof.get(label, {}))[:PROFILE_ROWS]:
            if k not in top:
                top.append(k)
    rows = [[k] + [f"{prof[lb].get(k, 0.0):.3f}" for lb in labels] for k in top]
    rows.append(["total (self CPU)"] + [f"{sum(prof[lb].values()):.3f}" for lb in labels])
    return ["profiler event, ms per step after warmup"] + labels, rows


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    s = m["shape"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_cores']} cores, torch threads: {m['torch_threads']})"
    lines = [
        "# Cached step cost and end to end against cache-dit (bench/speed.py)",
        "",
        f"{m['date']} on {where}; torch {m['torch']}, diffusers {m['diffusers']}, cache-dit {m['cache_dit']}; "
        f"commit `{m['git_commit'][:12]}`{' + uncommitted changes in cdcompile/' if m['git_dirty'] else ''}"
        + ("" if "recursive_dict_tag_guards" not in m else
           f"; Dynamo's recursive dict-tag guards {'on' if m['recursive_dict_tag_guards'] else 'off'}") + ".",
        "",
        f"FLUX architecture, random weights: {s['num_layers']} double + {s['num_single_layers']} single blocks "
        f"(N = {s['N']}), {s['num_attention_heads']} heads x {s['attention_head_dim']}, {s['tokens']} image + "
        f"{s['text_tokens']} text tokens, {s['dtype']}; {m['steps']} steps per request; "
        f"F{FN}B{BN}, {WARMUP_STEPS} warmup steps, threshold {ALWAYS_CACHE:g} in both systems (caches every "
        f"step after warmup). {m['repeats']} alternating rounds after {m['warmup_requests']} warm-up requests "
        f"per configuration. Request ms (wall): median over rounds; (composed): sum over steps of each step's "
        f"median, robust to bursts of load from other processes. graphs / breaks / recompiles: Dynamo counters "
        f"over the warm-up.",
        "",
        *([OVERHEAD_NOTE, ""] if s.get("name") == "overhead" else []),
        *([LEAN_NOTE, ""] if m.get("lean_host") else []),
        H.markdown_table(HEADER, table_rows(result)),
        "",
        *[f"- {x}" for x in summary_lines(result)],
        "",
        *_profile_markdown(result),
        "Random weights: the output differences only show that caching happened (and that cdcompile and "
        "cache-dit compute the same thing at equal decisions); quality numbers need a trained model.",
    ]
    return "\n".join(lines)


def _profile_markdown(result: dict[str, Any]) -> list[str]:
    table = profile_table(result)
    if table is None:
        return []
    return ["Where the time of a step after warmup goes (torch.profiler, one request per configuration after "
            "the timed rounds; for cachedit these are the cached steps):", "", H.markdown_table(*table), ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (toy FLUX) or cuda (FLUX.1-dev shape)")
    p.add_argument("--steps", type=int, default=28, help="transformer calls per request")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each: one request per configuration)")
    p.add_argument("--skip-eager", action="store_true", help="leave out the eager configuration")
    p.add_argument("--skip-cache-dit", action="store_true", help="leave out cache-dit + torch.compile")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the CPU profile of the steps after warmup (where a cached step's time goes)")
    p.add_argument("--lean-host", action="store_true",
                   help="every compiled configuration without Dynamo's nn-module guards "
                   "(guard_filter_fn=skip_guard_on_all_nn_modules_unsafe) and Inductor's input size asserts")
    p.add_argument("--calibrator", choices=("taylorseer", "foca", "dmd"),
                   help="add a configuration: cachedit with this calibrator (what it adds to a cached step)")
    p.add_argument("--fp8-attention", action="store_true",
                   help="add a configuration: cachedit with fp8_attention=True (the FP8 Triton attention "
                   "kernel in the graph on a GPU; its plain-torch emulation on a CPU, which only checks the run)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: cpu on the CPU, cuda on a "
                   "GPU); overhead: FLUX.1-dev's 57 blocks at toy size, where per-call overheads dominate")
    p.add_argument("--out", metavar="STEM", help="write STEM.json and STEM.md "
                   "(default bench/results/speed_<shape>)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.device not in ("cpu",) and not args.device.startswith("cuda"):
        p.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    if args.steps <= WARMUP_STEPS:
        p.error(f"--steps {args.steps}: need more than the {WARMUP_STEPS} warmup steps")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    args.shape = args.shape or kind
    if args.shape == "overhead" and kind != "cpu":
        p.error("--shape overhead is a CPU shape; on a GPU use the cuda shape")
    stem = args.out or os.path.join(H.ROOT, "bench", "results", f"speed_{args.shape}")

    if args.lean_host:
        lean_host()
    args.partial_stem = stem + ".partial"
    result = run(args)
    for ext in (".json", ".md"):  # the whole run supersedes the partial results
        if os.path.exists(args.partial_stem + ext):
            os.remove(args.partial_stem + ext)
    print()
    print(H.text_table(HEADER, table_rows(result)))
    print()
    print("\n".join(summary_lines(result)))
    table = profile_table(result)
    if table is not None:
        print()
        print(H.text_table(*table))
    for path in H.write_results(stem, result, markdown(result)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
