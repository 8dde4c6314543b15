"""Quality against the peers: PSNR/SSIM, computed steps and wall time of every caching system (issue 5).

    python bench/quality.py                  # full run: 10 prompts, 28 and 50 steps (~13 min, 2 cores)
    python bench/quality.py --quick          # smoke run: a few rows, 2 prompts (~2 min); writes to /tmp
    python bench/quality.py --list-rows      # the row labels
    python bench/quality.py --rows "cdcompile DBCache,cache-dit DBCache" --steps 28

Writes ``bench/results/quality.{md,json}`` and ``quality_frontier.png`` (``--out STEM`` elsewhere).

Model: the trained tiny FLUX of ``cdcompile.trained`` (2 double + 4 single blocks, 64 image tokens)
through its diffusers ``FluxPipeline``, float32, no CFG (one transformer call per step, so every
system's warm-up and step counters mean the same thing; cache-dit needs a per-model flag for true
CFG). One prompt per digit, each with its own colour and background, seed 0.

Method, all in one process:

1. Every row is a :class:`RowSpec` in :func:`default_rows`: a system, a method, settings in neutral
   names (F, B, threshold, calibrator, mask), translated by the system's builder. Every system gets
   ``max_warmup_steps`` = ``--warmup`` (4), warm-up interval 1, no step limits. A row whose options
   this build of cdcompile rejects (``CacheConfig`` raises ValueError) is reported as "not available
   in this build" with the error, so rows for options being added (FoCa, DBPrune) appear by
   themselves once the options exist.
2. Systems: eager and ``torch.compile`` (inductor) without cache; cdcompile (``cdcompile.enable``,
   inductor inside); cache-dit 1.5.3 (``cache_dit.enable_cache`` on the pipeline, then
   ``torch.compile`` of the transformer, inductor); diffusers' own ``FirstBlockCacheConfig`` and
   ``TaylorSeerCacheConfig`` (``pipe.transformer.enable_cache``, eager: their hooks count computed
   calls with module hooks, which compiled code would not run). Each row has its own pipeline and
   transformer instance; Dynamo's recompile limit is raised so that all compiled rows coexist, and a
   compiled row that compiles no graph of its own (reusing another row's code) is an error.
3. Steps computation masks: cdcompile scales its presets to the step count; cache-dit gets the same
   0/1 list explicitly (its own ``steps_mask`` scales 50-step presets differently), with a pipeline
   per step count since the list is fixed at ``enable_cache``.
4. Per step count: one untimed warm-up request per row (compiles), then ``--rounds`` rounds; a round
   runs every prompt through every row, the rows in a rotated order per request. Wall time per image
   = median over all timed requests of ``pipe(...)``. Quality: PSNR (float, data range 1) and SSIM
   (per channel) of round 0's image against the eager row's image of the same prompt and seed;
   later rounds must reproduce round 0 (the largest difference is recorded).
5. Computed steps per request: cdcompile's and cache-dit's summaries; diffusers FBC: calls of a
   middle block's attention ``to_q``; diffusers TaylorSeer: calls of block 0's attention ``to_q``
   (with its default identifiers it forecasts only the attention outputs; the MLPs always run).
   DBPrune rows count computed blocks instead of steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import _harness as H  # noqa: E402

# ---------------------------------------------------------------------------------------------
# rows

THRESHOLDS = (0.08, 0.12, 0.2, 0.3)
FB_SETTINGS = ((1, 0), (2, 1))            # N = 6 blocks: F2B1 leaves 3 middle blocks
CALIBRATOR_THRESHOLDS = (0.2, 0.3)        # calibrators pay off where many steps are cached
SCM_PRESETS = ("slow", "medium", "fast")
SCM_DYNAMIC_THRESHOLD = 0.2               # "dynamic": a 0 in the mask caches if diff < this
PRUNE_THRESHOLDS = (0.12, 0.2)
FP8_WITH_DBCACHE_THRESHOLD = 0.12
DIFFUSERS_TAYLORSEER = ((2, 1), (3, 1), (5, 1), (3, 2))   # (cache_interval, max_order)
# cdcompile options of features being added now; rows using them say "not available in this build"
# until CacheConfig accepts them. Update the names here once they are announced.
# FoCa with the per-step anchor slope (the committed results ran it; the default "gap" is cache-dit's)
CDCOMPILE_FOCA = {"calibrator": "foca", "foca_slope": "step"}
CDCOMPILE_DBPRUNE = {"cache_type": "dbprune"}

PROMPTS = ((0, "red", "black"), (1, "orange", "navy"), (2, "yellow", "forest"), (3, "green", "maroon"),
           (4, "cyan", "black"), (5, "blue", "forest"), (6, "magenta", "navy"), (7, "white", "maroon"),
           (8, "red", "navy"), (9, "green", "black"))
QUICK_ROWS = ("eager", "inductor", "cdcompile DBCache F1B0 t=0.12", "cdcompile TaylorSeer-1 F1B0 t=0.2",
              "cdcompile SCM-fast-static", "cdcompile FoCa", "cache-dit DBCache F1B0 t=0.12",
              "cache-dit SCM-fast-static", "diffusers FBC t=0.12", "diffusers TaylorSeer i3 o1")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One benchmark row: ``system`` builds it from the neutral ``options``.

    options: fn, bn, threshold (DBCache); taylorseer (order); foca, dmd, prune (bool); fallback (DMD's
    dmd_fallback); scm (preset),
    policy; interval, order (diffusers TaylorSeer). ``settings`` names the settings independently
    of the system, so rows of different systems with equal settings can be paired.
    """

    system: str
    method: str
    settings: str = ""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join(x for x in (self.system, self.method, self.settings) if x)


def _dbcache(fn: int, bn: int, t: float, **extra: Any) -> tuple[str, dict[str, Any]]:
    return f"F{fn}B{bn} t={t:g}", {"fn": fn, "bn": bn, "threshold": t, **extra}


def default_rows() -> list[RowSpec]:
    """Every row of the full benchmark, in table order."""
    rows = [RowSpec("eager", ""), RowSpec("inductor", "")]
    for system in ("cdcompile", "cache-dit"):
        for fn, bn in FB_SETTINGS:
            rows += [RowSpec(system, "DBCache", *_dbcache(fn, bn, t)) for t in THRESHOLDS]
        for order in (1, 2):
            rows += [RowSpec(system, f"TaylorSeer-{order}", *_dbcache(1, 0, t, taylorseer=order))
                     for t in CALIBRATOR_THRESHOLDS]
        for preset in SCM_PRESETS:
            rows.append(RowSpec(system, f"SCM-{preset}-static", "F1B0",
                                {"fn": 1, "bn": 0, "threshold": SCM_DYNAMIC_THRESHOLD, "scm": preset,
                                 "policy": "static"}))
            rows.append(RowSpec(system, f"SCM-{preset}-dynamic", *_dbcache(1, 0, SCM_DYNAMIC_THRESHOLD, scm=preset,
                                                                      policy="dynamic")))
        rows += [RowSpec(system, "FoCa", *_dbcache(1, 0, t, foca=True)) for t in CALIBRATOR_THRESHOLDS]
        rows += [RowSpec(system, "DMD", *_dbcache(1, 0, t, dmd=True)) for t in CALIBRATOR_THRESHOLDS]
        if system == "cdcompile":  # DMD with TaylorSeer's fallback in place of cache-dit's
            rows += [RowSpec(system, "DMD-TaylorSeer-fallback", *_dbcache(1, 0, t, dmd=True, fallback="taylorseer"))
                     for t in CALIBRATOR_THRESHOLDS]
        rows += [RowSpec(system, "DBPrune", *_dbcache(1, 0, t, prune=True)) for t in PRUNE_THRESHOLDS]
        rows += [RowSpec(system, "DBPrune+TaylorSeer-1", *_dbcache(1, 0, t, prune=True, taylorseer=1))
                 for t in PRUNE_THRESHOLDS]
    # FP8 attention (cdcompile's fp8_attention pass; on CPU its op emulates the kernel's arithmetic)
    rows += [RowSpec("cdcompile", "FP8-attention", "no cache", {"fn": 1, "bn": 0, "threshold": 0.0, "fp8": True}),
             RowSpec("cdcompile", "DBCache+FP8-attention", *_dbcache(1, 0, FP8_WITH_DBCACHE_THRESHOLD, fp8=True))]
    rows += [RowSpec("diffusers", "FBC", f"t={t:g}", {"threshold": t}) for t in THRESHOLDS]
    rows += [RowSpec("diffusers", "TaylorSeer", f"i{i} o{o}", {"interval": i, "order": o})
             for i, o in DIFFUSERS_TAYLORSEER]
    return rows


def select_rows(rows: Sequence[RowSpec], patterns: Sequence[str]) -> list[RowSpec]:
    """Rows whose label contains any pattern (case-insensitive); the eager reference always stays.

    A pattern that matches no row is an error (a typo would otherwise drop rows silently).
    """
    pats = [p.strip().lower() for p in patterns if p.strip()]
    if not pats:
        return list(rows)
    for p in pats:
        if not any(p in r.label.lower() for r in rows):
            raise ValueError(f"--rows: {p!r} matches no row; labels are: {[r.label for r in rows]}")
    return [r for r in rows if r.system == "eager" or any(p in r.label.lower() for p in pats)]


# ---------------------------------------------------------------------------------------------
# systems: build a pipeline for a row, read what it computed

class Unavailable(Exception):
    """This row cannot run in this build (an option or a peer version is missing)."""


class System:
    """A row's pipeline. ``computed`` reads one request's computed units after it ran."""

    unit = "steps"
    compiled = False
    holds_config = False  # its compiled graphs embed the row's settings: they must be its own
    per_steps = False     # True: a separate instance per step count

    def __init__(self, spec: RowSpec, warmup: int, steps: int):
        from cdcompile import trained

        self.spec, self.warmup = spec, warmup
        self.pipe = trained.load_trained_pipeline()
        self.setup(steps)

    def setup(self, steps: int) -> None:
        pass

    def start_request(self) -> None:
        pass

    def computed(self, steps: int) -> tuple[float, int]:
        """(computed units, total units) of the last request."""
        return steps, steps


class Eager(System):
    pass


class Inductor(System):
    compiled = True

    def setup(self, steps: int) -> None:
        self.pipe.transformer = torch.compile(self.pipe.transformer)


def cdcompile_options(o: Mapping[str, Any], warmup: int) -> dict[str, Any]:
    opts = dict(compiler="inductor", Fn_compute_blocks=o["fn"], Bn_compute_blocks=o["bn"],
                residual_diff_threshold=o["threshold"], max_warmup_steps=warmup, warmup_interval=1,
                max_cached_steps=-1, max_continuous_cached_steps=-1)
    if o.get("taylorseer"):
        opts["taylorseer_order"] = o["taylorseer"]
    if o.get("scm"):
        opts.update(steps_computation_mask=o["scm"], steps_computation_policy=o["policy"])
    if o.get("foca"):
        opts.update(CDCOMPILE_FOCA)
    if o.get("dmd"):
        opts["calibrator"] = "dmd"
        if o.get("fallback"):
            opts["dmd_fallback"] = o["fallback"]
    if o.get("prune"):
        opts.update(CDCOMPILE_DBPRUNE)
    if o.get("fp8"):
        opts["fp8_attention"] = True
    return opts


class CdCompile(System):
    compiled = True
    holds_config = True

    @staticmethod
    def check(spec: RowSpec, warmup: int) -> None:
        from cdcompile import CacheConfig

        try:
            CacheConfig.from_options(cdcompile_options(spec.options, warmup))
        except ValueError as e:
            raise Unavailable(f"not available in this build: {e}") from e

    def setup(self, steps: int) -> None:
        import cdcompile

        cdcompile.enable(self.pipe, **cdcompile_options(self.spec.options, self.warmup))

    def computed(self, steps: int) -> tuple[float, int]:
        import cdcompile

        summary = cdcompile.summary(self.pipe.transformer).as_dict()
        requests = summary["requests"]
        if not requests or requests[-1]["steps"] != steps:
            raise RuntimeError(f"{self.spec.label}: cdcompile's last request has "
                               f"{requests[-1]['steps'] if requests else 'no'} steps, expected {steps}")
        slot = requests[-1]["slots"][0]
        if "pruned_blocks" in slot:  # DBPrune: blocks computed of the blocks of every step
            self.unit = "blocks"
            total = steps * summary["graphs"][0]["num_blocks"]
            return total - sum(slot["pruned_blocks"]), total
        return steps - len(slot["cached_steps"]), steps


class CacheDit(System):
    compiled = True

    def __init__(self, spec: RowSpec, warmup: int, steps: int):
        self.per_steps = bool(spec.options.get("scm"))
        super().__init__(spec, warmup, steps)

    @staticmethod
    def check(spec: RowSpec, warmup: int) -> None:
        try:
            import cache_dit  # noqa: F401
        except ImportError as e:
            raise Unavailable(f"cache-dit is not installed ({e}); pip install 'cdcompile[bench]'") from e

    def setup(self, steps: int) -> None:
        import cache_dit

        o = self.spec.options
        kwargs = dict(Fn_compute_blocks=o["fn"], Bn_compute_blocks=o["bn"], residual_diff_threshold=o["threshold"],
                      max_warmup_steps=self.warmup, warmup_interval=1, max_cached_steps=-1,
                      max_continuous_cached_steps=-1)
        if o.get("scm"):
            from cdcompile.masks import build_mask

            kwargs.update(steps_computation_mask=build_mask(o["scm"], steps), steps_computation_policy=o["policy"],
                          num_inference_steps=steps)
        self.unit = "blocks" if o.get("prune") else "steps"
        config = (cache_dit.DBPruneConfig if o.get("prune") else cache_dit.DBCacheConfig)(**kwargs)
        calibrator = None
        if o.get("taylorseer"):
            calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=o["taylorseer"])
        elif o.get("foca"):
            calibrator = cache_dit.FoCaCalibratorConfig()
        elif o.get("dmd"):
            calibrator = cache_dit.DMDCalibratorConfig()
        cache_dit.enable_cache(self.pipe, cache_config=config, calibrator_config=calibrator)
        self.pipe.transformer = torch.compile(self.pipe.transformer)

    def computed(self, steps: int) -> tuple[float, int]:
        import cache_dit

        stats = cache_dit.summary(self.pipe, logging=False)
        if len(stats) != 1:
            raise RuntimeError(f"{self.spec.label}: expected one cache-dit stats entry, got {len(stats)}")
        s = stats[0]
        if self.unit == "blocks":
            total = sum(s.actual_blocks)
            return total - sum(s.pruned_blocks), total
        cached = {int(k) for k in s.cached_steps}
        if any(k >= steps for k in cached):
            raise RuntimeError(f"{self.spec.label}: cache-dit reports cached steps {sorted(cached)} "
                               f"beyond a {steps}-step request")
        return steps - len(cached), steps


class _CallCounter(System):
    """Counts forward calls of one submodule (run only when the hooked method computes)."""

    counted: str = ""

    def setup(self, steps: int) -> None:
        self.calls = 0
        self.enable()
        module = self.pipe.transformer.get_submodule(self.counted)
        module.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1

    def enable(self) -> None:
        raise NotImplementedError

    def start_request(self) -> None:
        self.calls = 0

    def computed(self, steps: int) -> tuple[float, int]:
        if not 1 <= self.calls <= steps:
            raise RuntimeError(f"{self.spec.label}: {self.calls} computed calls in a {steps}-step request")
        return self.calls, steps


class DiffusersFBC(_CallCounter):
    counted = "transformer_blocks.1.attn.to_q"   # block 0 always runs; block 1 only on computed steps

    def enable(self) -> None:
        from diffusers import FirstBlockCacheConfig

        self.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=self.spec.options["threshold"]))


class DiffusersTaylorSeer(_CallCounter):
    counted = "transformer_blocks.0.attn.to_q"   # every attention is forecast on cached steps

    @staticmethod
    def check(spec: RowSpec, warmup: int) -> None:
        import diffusers

        if not hasattr(diffusers, "TaylorSeerCacheConfig"):
            raise Unavailable(f"diffusers {diffusers.__version__} has no TaylorSeerCacheConfig")

    def enable(self) -> None:
        from diffusers import TaylorSeerCacheConfig

        o = self.spec.options
        self.pipe.transformer.enable_cache(TaylorSeerCacheConfig(
            cache_interval=o["interval"], disable_cache_before_step=self.warmup, max_order=o["order"],
            taylor_factors_dtype=torch.float32))


def system_class(spec: RowSpec) -> type[System]:
    if spec.system == "diffusers":
        return {"FBC": DiffusersFBC, "TaylorSeer": DiffusersTaylorSeer}[spec.method]
    return {"eager": Eager, "inductor": Inductor, "cdcompile": CdCompile, "cache-dit": CacheDit}[spec.system]


# ---------------------------------------------------------------------------------------------
# running

def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@dataclasses.dataclass
class Cell:
    """One row at one step count: what it computed, how long it took, what it produced."""

    computed: list[float] = dataclasses.field(default_factory=list)   # per image (round 0)
    total: int = 0
    times: list[float] = dataclasses.field(default_factory=list)      # every timed request, seconds
    paired: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)  # (round, image) -> s
    images: list[Any] = dataclasses.field(default_factory=list)       # round 0, (H, W, C) in [0, 1]
    round_diff: float = 0.0        # largest |image - round 0 image| over later rounds
    decisions_stable: bool = True  # same computed count in every round
    warmup_s: float = 0.0
    graphs_at_warmup: int = 0
    graphs_while_timed: int = 0


def run_request(system: System, prompt: tuple[int, str, str], seed: int, steps: int):
    from cdcompile import trained

    digit, colour, background = prompt
    kwargs = trained.class_prompt(digit, colour=colour, background=background)
    system.start_request()
    t0 = time.perf_counter()
    out = system.pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                      output_type="np")
    elapsed = time.perf_counter() - t0
    return out.images[0], elapsed, system.computed(steps)


def build(spec: RowSpec, warmup: int, steps: int) -> System:
    return system_class(spec)(spec, warmup, steps)


def run(args, specs: list[RowSpec]) -> dict[str, Any]:
    from tqdm import tqdm

    unavailable: dict[str, str] = {}
    runnable = []
    for spec in specs:
        check = getattr(system_class(spec), "check", None)
        try:
            if check is not None:
                check(spec, args.warmup)
            runnable.append(spec)
        except Unavailable as e:
            unavailable[spec.label] = str(e)
    images = [(p, s) for p in PROMPTS[:args.prompts] for s in range(args.seeds)]
    cells: dict[int, dict[str, Cell]] = {}
    shared: dict[str, System] = {}
    load = {"start": os.getloadavg()}
    total = len(args.steps) * len(runnable) * (1 + args.rounds * len(images))
    bar = tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)
    for steps in args.steps:
        systems: dict[str, System] = {}
        for spec in runnable:
            system = shared.get(spec.label)
            if system is None or system.per_steps:
                bar.set_postfix_str(f"building {spec.label}")
                system = build(spec, args.warmup, steps)
                if not system.per_steps:
                    shared[spec.label] = system
            systems[spec.label] = system
        row_cells = {label: Cell() for label in systems}
        cells[steps] = row_cells
        for label, system in systems.items():  # warm-up: compiles
            bar.set_postfix_str(f"{steps} steps, warm-up {label}")
            g = _graphs()
            _, elapsed, _ = run_request(system, images[0][0], images[0][1], steps)
            row_cells[label].warmup_s, row_cells[label].graphs_at_warmup = elapsed, _graphs() - g
            first_build = system.per_steps or steps == args.steps[0]
            if system.holds_config and first_build and row_cells[label].graphs_at_warmup == 0:
                raise RuntimeError(f"{label}: compiled no graph of its own at warm-up; Dynamo reused another "
                                   "row's compiled code, so its numbers would not be its own")
            bar.update()
        labels = list(systems)
        for r in range(args.rounds):
            for i, (prompt, seed) in enumerate(images):
                bar.set_postfix_str(f"{steps} steps, round {r + 1}/{args.rounds}")
                k = (r * len(images) + i) % len(labels)
                for label in labels[k:] + labels[:k]:
                    cell = row_cells[label]
                    g = _graphs()
                    image, elapsed, (computed, units) = run_request(systems[label], prompt, seed, steps)
                    cell.graphs_while_timed += _graphs() - g
                    cell.times.append(elapsed)
                    cell.paired[(r, i)] = elapsed
                    cell.total = units
                    if r == 0:
                        cell.images.append(image)
                        cell.computed.append(computed)
                    else:
                        cell.round_diff = max(cell.round_diff, float(abs(image - cell.images[i]).max()))
                        cell.decisions_stable &= computed == cell.computed[i]
                    bar.update()
    bar.close()
    load["end"] = os.getloadavg()
    return {"cells": cells, "unavailable": unavailable, "images": images, "load": load,
            "specs": {s.label: s for s in runnable}}


# ---------------------------------------------------------------------------------------------
# analysis

def _finite_mean(xs: Sequence[float]) -> float:
    return math.inf if any(math.isinf(x) for x in xs) else statistics.fmean(xs)


def analyse(args, raw: dict[str, Any]) -> dict[str, Any]:
    from cdcompile import metrics

    results: dict[str, list[dict[str, Any]]] = {}
    for steps, row_cells in raw["cells"].items():
        ref_cell, inductor = row_cells["eager"], row_cells.get("inductor")
        t_eager = H.median(ref_cell.times)
        t_inductor = H.median(inductor.times) if inductor else None
        rows = []
        for label, cell in row_cells.items():
            spec = raw["specs"][label]
            psnr = [metrics.psnr(ref, img) for ref, img in zip(ref_cell.images, cell.images)]
            ssim = [metrics.ssim(ref, img) for ref, img in zip(ref_cell.images, cell.images)]
            t = H.median(cell.times)
            expected = None
            if spec.options.get("policy") == "static":  # computes exactly warm-up + the mask's ones
                from cdcompile.masks import build_mask

                mask = build_mask(spec.options["scm"], steps)
                expected = sum(1 for k in range(steps) if k < args.warmup or (k < len(mask) and mask[k]))
            rows.append({
                "label": label, "system": spec.system, "method": spec.method or "no cache",
                "settings": spec.settings, "options": dict(spec.options), "unit": _unit(cell, steps),
                "computed_mean": statistics.fmean(cell.computed), "computed_per_image": cell.computed,
                "units_per_request": cell.total, "fraction": statistics.fmean(cell.computed) / cell.total,
                "ms_per_image": 1e3 * t, "ms_per_image_all": [1e3 * x for x in cell.times],
                "vs_eager": t_eager / t, "vs_inductor": t_inductor / t if t_inductor else None,
                "psnr_mean": _finite_mean(psnr), "psnr_min": min(psnr), "psnr_per_image": psnr,
                "expected_computed": expected,
                "ssim_mean": statistics.fmean(ssim), "ssim_min": min(ssim), "ssim_per_image": ssim,
                "max_diff_across_rounds": cell.round_diff, "decisions_stable": cell.decisions_stable,
                "warmup_request_s": cell.warmup_s, "graphs_at_warmup": cell.graphs_at_warmup,
                "graphs_while_timed": cell.graphs_while_timed, "_paired": cell.paired,
            })
        results[steps] = rows
    return results


def _unit(cell: Cell, steps: int) -> str:
    return "steps" if cell.total == steps else "blocks"


def paired_ratio(a: dict, b: dict) -> float:
    """Median over (round, image) of a's time / b's time: both ran the same request back to back."""
    return statistics.median(a[k] / b[k] for k in a.keys() & b.keys())


def pareto(rows: Sequence[dict[str, Any]], x: str) -> list[str]:
    """Labels on the frontier of lower ``x`` and higher mean PSNR (no other row is better in both)."""
    out = []
    for r in rows:
        dominated = any(o[x] <= r[x] and o["psnr_mean"] >= r["psnr_mean"]
                        and (o[x] < r[x] or o["psnr_mean"] > r["psnr_mean"]) for o in rows)
        if not dominated:
            out.append(r["label"])
    return out


def best_within(rows: Sequence[dict[str, Any]], x: str, budget: float) -> dict[str, dict[str, Any]]:
    """Per system, its row with the highest mean PSNR among cached rows with ``row[x] <= budget``.

    For ``x="fraction"`` only rows counting steps take part (DBPrune's block fraction is another unit).
    """
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if (x != "fraction" or r["unit"] == "steps") and r[x] <= budget + 1e-9 and r["method"] != "no cache":
            if r["system"] not in best or r["psnr_mean"] > best[r["system"]]["psnr_mean"]:
                best[r["system"]] = r
    return best


def findings(steps: int, rows: list[dict[str, Any]]) -> list[str]:
    by = {r["label"]: r for r in rows}
    lines = []
    eager, ind = by["eager"], by.get("inductor")
    cached = [r for r in rows if r["method"] != "no cache" and "FP8" not in r["method"]]
    if ind:
        lines.append(f"inductor without cache: {ind['ms_per_image']:.0f} ms per image against eager's "
                     f"{eager['ms_per_image']:.0f} ms ({ind['vs_eager']:.2f}x); PSNR against eager "
                     f"{_fmt_db(ind['psnr_mean'])} (float reassociation only).")
    budgets = [("fraction", b, f"at most {b:.0%} of the steps computed") for b in (0.5, 0.7)]
    if ind:
        budgets.append(("ms_per_image", ind["ms_per_image"], f"at most plain inductor's {ind['ms_per_image']:.0f} ms"))
    for x, budget, what in budgets:
        best = best_within(cached, x, budget)
        if best:
            parts = [f"{s} {_fmt_db(r['psnr_mean'])} ({r['label']}, {r['fraction']:.0%}, {r['ms_per_image']:.0f} ms)"
                     for s, r in sorted(best.items(), key=lambda kv: -kv[1]["psnr_mean"])]
            lines.append(f"best mean PSNR per system with {what}: " + "; ".join(parts) + ".")
    pairs = [(r, by[r["label"].replace("cdcompile", "cache-dit", 1)]) for r in cached
             if r["system"] == "cdcompile" and r["label"].replace("cdcompile", "cache-dit", 1) in by]
    if pairs:
        same = sum(a == b for r, p in pairs for a, b in zip(r["computed_per_image"], p["computed_per_image"]))
        n = sum(len(r["computed_per_image"]) for r, _ in pairs)
        differ = [f"{r['label'].split(' ', 1)[1]} ({r['computed_mean']:.1f} vs {p['computed_mean']:.1f} "
                  f"{r['unit']})" for r, p in pairs if r["computed_per_image"] != p["computed_per_image"]]
        ratios: dict[str, list[float]] = {}
        for r, p in pairs:
            ratios.setdefault(r["method"].split("-")[0], []).append(paired_ratio(p["_paired"], r["_paired"]))
        every = [x for xs in ratios.values() for x in xs]
        lines.append(
            f"cdcompile against cache-dit at equal settings ({len(pairs)} pairs): the same number of computed "
            f"steps (blocks for DBPrune) in {same}/{n} requests" + (f"; differ: {', '.join(differ)}" if differ else "")
            + f". Per-image time ratio cache-dit / cdcompile (paired wall clock; > 1: cdcompile faster): median "
            f"{statistics.median(every):.2f}, range {min(every):.2f}-{max(every):.2f}; by method: "
            + ", ".join(f"{m} {statistics.median(xs):.2f}" for m, xs in ratios.items()) + ".")
        far = [f"{r['label'].split(' ', 1)[1]} ({_fmt_db(r['psnr_mean'])} vs {_fmt_db(p['psnr_mean'])})"
               for r, p in pairs if not abs(r["psnr_mean"] - p["psnr_mean"]) <= 0.5]
        lines.append(f"mean PSNR of cdcompile vs cache-dit equal within 0.5 dB in {len(pairs) - len(far)}/{len(pairs)} "
                     f"pairs" + (f"; apart: {'; '.join(far)}." if far else "."))
        methods = {r["method"] for r, p in pairs if not abs(r["psnr_mean"] - p["psnr_mean"]) <= 0.5}
        lines += [why for m, why in CALIBRATOR_DIFFERENCES.items() if m in methods]
    fp8 = [r for r in rows if "FP8" in r["method"]]
    if fp8:
        base = by.get(f"cdcompile DBCache F1B0 t={FP8_WITH_DBCACHE_THRESHOLD:g}")
        parts = [f"{r['label']}: {_fmt_db(r['psnr_mean'])} (min {_fmt_db(r['psnr_min'])}), "
                 f"{r['computed_mean']:.1f} {r['unit']} computed" for r in fp8]
        if base:
            parts.append(f"without FP8, {base['label']}: {_fmt_db(base['psnr_mean'])}, "
                         f"{base['computed_mean']:.1f} {base['unit']} computed")
        lines.append("FP8 attention (INT8 Q K^T, FP8 P V, emulated on the CPU), mean PSNR against eager: "
                     + "; ".join(parts) + ".")
    gains = [f"{r['system']} {r['method']} {r['settings'].split()[-1]} {r['psnr_mean'] - base['psnr_mean']:+.1f}"
             for r in cached if r["method"].startswith(("TaylorSeer", "FoCa")) and r["system"] != "diffusers"
             for base in [by.get(f"{r['system']} DBCache {r['settings']}")] if base is not None]
    if gains:
        lines.append("calibrator gain over the same system's plain DBCache at the same F1B0 threshold (mean PSNR, "
                     "dB): " + ", ".join(gains) + ".")
    fbc = [(r, by.get(f"cdcompile DBCache F1B0 {r['settings']}")) for r in cached if r["method"] == "FBC"]
    fbc = [(r, c) for r, c in fbc if c is not None]
    if fbc:
        lines.append("diffusers FBC (no warm-up) against cdcompile F1B0 (warm-up) at the same threshold, computed "
                     "steps and mean PSNR: " + "; ".join(
                         f"{r['settings']}: {r['computed_mean']:.1f} / {_fmt_db(r['psnr_mean'])} vs "
                         f"{c['computed_mean']:.1f} / {_fmt_db(c['psnr_mean'])}" for r, c in fbc) + ".")
    fastest = min(cached, key=lambda r: r["ms_per_image"], default=None)
    if fastest:
        vs_ind = f", {fastest['vs_inductor']:.2f}x inductor" if ind else ""
        lines.append(f"fastest row: {fastest['label']}, {fastest['ms_per_image']:.0f} ms per image "
                     f"({fastest['vs_eager']:.2f}x eager{vs_ind}), {fastest['fraction']:.0%} of the "
                     f"{fastest['unit']} computed, PSNR {_fmt_db(fastest['psnr_mean'])}.")
    for x, name in (("fraction", "computed fraction"), ("ms_per_image", "wall time")):
        front = pareto(cached, x)
        lines.append(f"PSNR frontier over {name}: " + ", ".join(front) + ".")
    static = [r for r in rows if r["expected_computed"] is not None]
    if static:
        off = [f"{r['label']} ({r['computed_mean']:.1f} vs {r['expected_computed']})" for r in static
               if any(c != r["expected_computed"] for c in r["computed_per_image"])]
        lines.append(f"static masks: {len(static) - len(off)}/{len(static)} rows computed exactly the warm-up steps "
                     f"plus the mask's ones" + (f"; off: {', '.join(off)}." if off else "."))
    bad = [r["label"] for r in rows if not r["decisions_stable"] or r["max_diff_across_rounds"] > 0]
    if bad:
        lines.append("rounds did not reproduce round 0 (decisions or images changed) for: " + ", ".join(bad) + ".")
    compiled = [f"{r['label']} ({r['graphs_while_timed']})" for r in rows if r["graphs_while_timed"]]
    if compiled:
        lines.append("graphs compiled while timing (their times include compiles): " + ", ".join(compiled) + ".")
    return lines


def _fmt_db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f} dB"


# Why cdcompile's calibrators forecast differently from cache-dit's at equal decisions (see
# cdcompile/calibrators.py); printed under the findings only when the pair's PSNR differs.
CALIBRATOR_DIFFERENCES = {
    "TaylorSeer-2": "TaylorSeer order 2: both use algorithms.md's Taylor form, but cache-dit's calibrator step "
                    "counter lags the denoising step by one and takes no difference before its step 2, so with "
                    "4 warm-up steps its first cached steps forecast with order 1 while cdcompile already holds "
                    "d2 (algorithms.md: use the orders available). With 6 warm-up steps the images are equal "
                    "(tests/test_parity_cache_dit.py).",
    "FoCa": "cdcompile's FoCa row runs foca_slope=\"step\" (cdcompile/calibrators.py): the slope of the last "
            "two computed residuals divided by the steps between them; cache-dit (and the default "
            "foca_slope=\"gap\", algorithms.md) takes them as one step apart, so its forecast overshoots "
            "whenever computed steps are further apart.",
}


# ---------------------------------------------------------------------------------------------
# output

HEADER = ["row", "computed / request", "fraction", "ms / image", "vs eager", "vs inductor", "PSNR dB mean (min)",
          "SSIM mean (min)"]


def table_rows(rows: Sequence[dict[str, Any]], unavailable: Mapping[str, str]) -> list[list[Any]]:
    out = []
    for r in rows:
        unit = "" if r["unit"] == "steps" else f" {r['unit']}"
        psnr = "inf" if math.isinf(r["psnr_mean"]) else f"{r['psnr_mean']:.1f} ({r['psnr_min']:.1f})"
        out.append([r["label"], f"{r['computed_mean']:.1f}/{r['units_per_request']}{unit}", f"{r['fraction']:.0%}",
                    f"{r['ms_per_image']:.0f}", f"{r['vs_eager']:.2f}x",
                    None if r["vs_inductor"] is None else f"{r['vs_inductor']:.2f}x", psnr,
                    f"{r['ssim_mean']:.4f} ({r['ssim_min']:.4f})"])
    out += [[label, "n/a", None, None, None, None, None, None] for label in unavailable]
    return out


def markdown(meta: dict[str, Any], results: dict[int, list[dict[str, Any]]], unavailable: Mapping[str, str],
             notes: dict[int, list[str]], png: str | None) -> str:
    m = meta
    dirty = " + uncommitted changes in cdcompile/" if m["git_dirty"] else ""
    lines = [
        "# Quality against the peers (bench/quality.py)", "",
        f"{m['date']} on {m['cpu']} ({m['cpu_cores']} cores, torch threads: {m['torch_threads']}); torch "
        f"{m['torch']}, diffusers {m['diffusers']}, cache-dit {m['cache_dit']}; commit `{m['git_commit'][:12]}`"
        f"{dirty}{' (working tree dirty)' if m['git_dirty_tree'] else ''}; load average (1 min) "
        f"{m['load_average']['start'][0]:.2f} at start, {m['load_average']['end'][0]:.2f} at end; "
        f"wall time of the run {m['run_seconds'] / 60:.1f} min.", "",
        f"Trained tiny FLUX (`cdcompile.trained`: 2 double + 4 single blocks, 32x32 pixels = 64 tokens, float32) "
        f"through diffusers' `FluxPipeline`, no CFG; {len(m['images'])} requests per step count ({m['prompts']} "
        f"prompts x {m['seeds']} seed(s): one digit each, own colour and background). Every system: "
        f"`max_warmup_steps={m['warmup']}`, warm-up interval 1, no step limits. Wall time: median of "
        f"{m['rounds']} interleaved round(s) x {len(m['images'])} requests per row, after one untimed warm-up "
        f"request per row (compile time excluded), {m['torch_threads']} torch thread(s). PSNR (float, data range "
        f"1) and SSIM (per RGB channel, Wang et al.) of each image against the uncached eager image of the same "
        f"prompt and seed, mean (min) over the images. cdcompile and cache-dit run with inductor "
        f"(`cdcompile.enable`, `torch.compile` after `cache_dit.enable_cache`); the diffusers hooks run eager. "
        f"Method details: the module docstring of `bench/quality.py`.", "",
        "A 64-token model takes well under a millisecond of arithmetic per block; what is timed is mostly "
        "Python and framework overhead per call (the pipeline, hooks, guards, graph launch), not FLOPs. The "
        "ratios say how much each system's machinery costs at this size, not what a 4096-token FLUX.1 would "
        "gain. Speed-ups are wall-clock ratios of medians, never FLOP ratios.", "",
    ]
    if png:
        lines += [f"![PSNR frontier]({os.path.basename(png)})", ""]
    for steps, rows in results.items():
        lines += [f"## {steps} steps", "", H.markdown_table(HEADER, table_rows(rows, unavailable)), ""]
        lines += [f"- {x}" for x in notes[steps]] + [""]
    if unavailable:
        lines += ["## Rows not run", ""]
        lines += [f"- {label}: {why}" for label, why in unavailable.items()] + [""]
    lines += [
        "## Notes", "",
        "- diffusers' `FirstBlockCacheConfig` has no warm-up option: it computes step 0 only and may cache "
        "from step 1 on (its rows do not get the warm-up the others get). Its decision rule is DBCache F1B0's.",
        "- diffusers' `TaylorSeerCacheConfig` caches on a fixed schedule (`cache_interval`, "
        f"`disable_cache_before_step={m['warmup']}`, float32 factors) and, with its default identifiers, "
        "forecasts each attention's output only: on its cached steps the feed-forward layers still run, so its "
        "computed fraction buys more than the others' (compare it on wall time).",
        "- Steps computation masks: cdcompile scales the 28-step presets itself; cache-dit is given cdcompile's "
        "0/1 list so the settings are equal (cache-dit's own `steps_mask` gives other 50-step masks, e.g. "
        "`fast` computes 20 of 50 steps there against 21 here).",
        "- DBPrune rows count computed blocks (of 6 per step), not steps.",
        "- FP8-attention rows (`fp8_attention=True`): every attention of the model (head dim 32) runs as "
        "`cdcompile::sage_attention`. On the CPU that op runs its plain-torch reference, which emulates the "
        "kernel's arithmetic (INT8 Q K^T, FP8 P V). So their PSNR is the kernel's, but their wall time is the "
        "emulation's and is no speed figure (a GPU runs the Triton kernel). They are left out of the plot.",
    ]
    return "\n".join(lines)


def plot(results: dict[int, list[dict[str, Any]]], path: str, meta: Mapping[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"cdcompile": "tab:blue", "cache-dit": "tab:orange", "diffusers": "tab:green"}
    markers = {"DBCache": "o", "TaylorSeer": "^", "SCM": "s", "FoCa": "D", "DBPrune": "P", "DBPrune+TaylorSeer": "X",
               "FBC": "v"}
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.6 * len(results)), squeeze=False)
    for (steps, rows), (ax_f, ax_t) in zip(results.items(), axes):
        seen = set()
        for r in rows:
            if r["method"] == "no cache" or "FP8" in r["method"] or not math.isfinite(r["psnr_mean"]):
                continue  # FP8 rows: their time is the CPU emulation's; their PSNR is in the findings  # eager is the reference; inductor (~150 dB: float rounding) is a line instead
            family = r["method"].split("-")[0]
            key = f"{r['system']} {family}"
            colour = colours.get(r["system"], "k")
            # peers drawn larger underneath, so a cdcompile point on top of its equal-settings peer shows
            peer = r["system"] != "cdcompile"
            style = dict(marker=markers.get(family, "x"), color=colour, s=90 if peer else 38, linewidths=1.3,
                         facecolors="none" if "F2B1" in r["settings"] else colour, zorder=2 if peer else 3,
                         alpha=0.75 if peer else 1.0, label=None if key in seen else key)
            seen.add(key)
            ax_f.scatter(r["fraction"], r["psnr_mean"], **style)
            ax_t.scatter(r["ms_per_image"], r["psnr_mean"], **{**style, "label": None})
        by = {r["label"]: r for r in rows}
        for name, ls in (("eager", "--"), ("inductor", ":")):
            if name in by:
                ax_t.axvline(by[name]["ms_per_image"], color="0.3", ls=ls, lw=1, label=f"{name} (no cache)")
        ax_f.set_xlim(0, 1.02)
        ax_f.set(xlabel="computed fraction (steps; DBPrune: blocks)", ylabel="PSNR vs eager, dB (mean)",
                 title=f"{steps} steps: quality vs computed fraction")
        ax_t.set(xlabel="wall time per image, ms (median)", ylabel="PSNR vs eager, dB (mean)",
                 title=f"{steps} steps: quality vs wall time")
        for ax in (ax_f, ax_t):
            ax.grid(alpha=0.3)
        for ax, where in ((ax_f, "upper left"), (ax_t, "lower right")):
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=7, loc=where)
    run = (f"{meta.get('cpu')} ({meta.get('cpu_cores')} cores, {meta.get('torch_threads')} torch thread(s)); "
           f"torch {meta.get('torch')}, diffusers {meta.get('diffusers')}, cache-dit {meta.get('cache_dit')}; "
           f"commit {str(meta.get('git_commit'))[:12]}{' (dirty)' if meta.get('git_dirty') else ''}; "
           f"{meta.get('date')}")
    fig.suptitle("Trained tiny FLUX (64 tokens, CPU), PSNR against the uncached eager image; hollow = F2B1; "
                 f"large pale markers = peers (cdcompile on top)\n{run}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def to_json(meta: dict[str, Any], results: dict[int, list[dict[str, Any]]], unavailable: Mapping[str, str],
            notes: dict[int, list[str]]) -> dict[str, Any]:
    out_rows = {}
    for steps, rows in results.items():
        out_rows[str(steps)] = [{**{k: v for k, v in r.items() if k != "_paired"},
                                 "ms_by_round_image": [{"round": rd, "image": i, "ms": 1e3 * t}
                                                       for (rd, i), t in sorted(r["_paired"].items())]}
                                for r in rows]
    return _jsonable({"meta": meta, "rows": out_rows, "unavailable": dict(unavailable), "findings": notes})


def from_json(doc: dict[str, Any]) -> tuple[dict[str, Any], dict[int, list[dict[str, Any]]], dict[str, str]]:
    """(meta, results, unavailable) of a written ``quality.json``, as :func:`analyse` returns them."""
    def floats(v: Any) -> Any:
        if v in ("inf", "-inf", "nan"):
            return float(v)
        if isinstance(v, dict):
            return {k: floats(x) for k, x in v.items()}
        if isinstance(v, list):
            return [floats(x) for x in v]
        return v

    results = {}
    for steps, rows in doc["rows"].items():
        results[int(steps)] = [{**floats(r), "_paired": {(x["round"], x["image"]): x["ms"] / 1e3
                                                         for x in r["ms_by_round_image"]}} for r in rows]
    return doc["meta"], results, doc["unavailable"]


def write_outputs(stem: str, meta: dict[str, Any], results: dict[int, list[dict[str, Any]]],
                  unavailable: Mapping[str, str]) -> None:
    """Findings, tables (printed), STEM.json, STEM.md and STEM_frontier.png."""
    notes = {steps: findings(steps, rs) for steps, rs in results.items()}
    png = stem + "_frontier.png"
    plot(results, png, meta)
    for steps, rs in results.items():
        print(f"\n{steps} steps")
        print(H.text_table(HEADER, table_rows(rs, unavailable)))
        print("\n".join(f"- {x}" for x in notes[steps]))
    md = markdown(meta, results, unavailable, notes, png)
    for path in H.write_results(stem, to_json(meta, results, unavailable, notes), md) + [png]:
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="28,50", help="comma-separated step counts (default 28,50)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"prompts, 1-{len(PROMPTS)} (one per digit)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt (0, 1, ...)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds over all requests (round 0 gives quality)")
    p.add_argument("--warmup", type=int, default=4, help="max_warmup_steps for every system")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise on a shared machine)")
    p.add_argument("--rows", default="", help="comma-separated substrings of row labels to keep (eager always runs)")
    p.add_argument("--list-rows", action="store_true", help="print the row labels and exit")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a few rows, 2 prompts, 1 round (~2 min); writes to the temp dir")
    p.add_argument("--render", metavar="JSON", help="only re-render findings, STEM.md and the PNG from a "
                   "written quality.json (STEM: the JSON's path without .json, unless --out)")
    p.add_argument("--out", metavar="STEM", help="write STEM.json, STEM.md, STEM_frontier.png "
                   "(default bench/results/quality; with --quick <tmp>/cdcompile_quality_quick)")
    args = p.parse_args(argv)
    if args.render:
        import json

        with open(args.render) as f:
            meta, results, unavailable = from_json(json.load(f))
        write_outputs(args.out or args.render.removesuffix(".json"), meta, results, unavailable)
        return 0
    rows = default_rows()
    if args.list_rows:
        print("\n".join(r.label for r in rows))
        return 0
    if args.quick:
        args.prompts, args.rounds = min(args.prompts, 2), 1
        args.rows = args.rows or ",".join(QUICK_ROWS)
    try:
        args.steps = [int(s) for s in args.steps.split(",") if s.strip()]
        rows = select_rows(rows, args.rows.split(","))
    except ValueError as e:
        p.error(str(e))
    if not args.steps or min(args.steps) <= args.warmup:
        p.error(f"--steps {args.steps}: every step count must exceed --warmup {args.warmup}")
    if not 1 <= args.prompts <= len(PROMPTS) or args.seeds < 1 or args.rounds < 1 or args.threads < 1:
        p.error(f"--prompts must be 1-{len(PROMPTS)}; --seeds, --rounds and --threads >= 1")
    stem = args.out or (os.path.join(tempfile.gettempdir(), "cdcompile_quality_quick") if args.quick
                        else os.path.join(H.ROOT, "bench", "results", "quality"))

    torch.set_num_threads(args.threads)
    # Every compiled row is one more cache entry on FluxTransformer2DModel.forward's code object;
    # past the limit Dynamo would fall back to eager silently, so raise it and fail if it is still hit.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch._dynamo.config.fail_on_recompile_limit_hit = True

    start = time.perf_counter()
    raw = run(args, rows)
    results = analyse(args, raw)
    meta = H.metadata("cpu", benchmark="bench/quality.py", steps=args.steps, prompts=args.prompts,
                      seeds=args.seeds, rounds=args.rounds, warmup=args.warmup,
                      images=[{"digit": d, "colour": c, "background": b, "seed": s} for (d, c, b), s in raw["images"]],
                      load_average=raw["load"], git_dirty_tree=bool(H._git("status", "--porcelain")),
                      run_seconds=time.perf_counter() - start,
                      settings=dict(thresholds=THRESHOLDS, fb=FB_SETTINGS, calibrator_thresholds=CALIBRATOR_THRESHOLDS,
                                    scm_presets=SCM_PRESETS, scm_dynamic_threshold=SCM_DYNAMIC_THRESHOLD,
                                    prune_thresholds=PRUNE_THRESHOLDS, diffusers_taylorseer=DIFFUSERS_TAYLORSEER,
                                    cdcompile_foca=CDCOMPILE_FOCA, cdcompile_dbprune=CDCOMPILE_DBPRUNE))
    write_outputs(stem, meta, results, raw["unavailable"])
    print(f"{(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
