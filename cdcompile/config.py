"""Options of the ``cachedit`` backend: one frozen dataclass, validated once, defaults in one place.

``torch.compile(m, backend="cachedit", options={...})`` hands the dict to
:meth:`CacheConfig.from_options`. Every key must be a field of :class:`CacheConfig`; an unknown
key or a bad value raises ``ValueError`` naming the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from typing import Any, Mapping

from . import calibrators


class Compiler(str, enum.Enum):
    """Inner compiler the rewritten graph is handed to."""

    INDUCTOR = "inductor"
    AOT_EAGER = "aot_eager"
    EAGER = "eager"


class Calibrator(str, enum.Enum):
    """Forecast of the cached middle residual on cached steps (cdcompile.calibrators)."""

    TAYLORSEER = "taylorseer"
    FOCA = "foca"
    DMD = "dmd"


STREAMS = ("all", "hidden", "encoder")  # calibrated_streams
CACHE_TYPES = ("residual", "hidden_states")  # calibrator_cache_type


class CacheType(str, enum.Enum):
    """What is skipped: DBCache skips the middle blocks as one region with one decision per call;
    DBPrune decides per block (reference/algorithms.md §1, §4)."""

    DBCACHE = "dbcache"
    DBPRUNE = "dbprune"


# Names of the passes in ``cdcompile.passes.PASSES``; kept here so the config can validate
# ``disable_passes`` without importing the passes.
PASS_NAMES = ("matmul_attention", "discover_blocks", "context_parallel", "fp8_attention", "block_cache")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """All options of the ``cachedit`` backend.

    compiler: inner compiler for the rewritten graph ("inductor" | "aot_eager" | "eager").
    mode: Inductor's mode ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        as ``torch.compile(mode=...)``, which torch.compile takes only without ``options``; with
        ``cdcompile.export`` it sets AOTInductor's configs (CUDA graphs aside).
    disable_passes: debugging knob; names of passes to skip (for bisection).
    size_asserts: Inductor's size/stride assert on every graph input (``torch._inductor.config.
        size_asserts``; default: Inductor's setting). The cond's operands include every weight of
        the middle blocks, so on a cached step Inductor checks them all before the branch
        (about 1000 for FLUX.1-dev; 0.5 ms of a 1.2 ms cached step of bench/speed.py's overhead
        shape on a CPU core). False drops them for this graph: Dynamo's guards check the inputs
        already, unless a ``guard_filter_fn`` drops those guards.

    DBCache (reference/algorithms.md §1; the names are cache-dit's so that users can move over):
    enable_cache: insert the block cache at all (False compiles the graph unchanged).
    Fn_compute_blocks: blocks always computed at the front of the stack (F); >= 1.
    Bn_compute_blocks: blocks always computed at the back of the stack (B); >= 0.
    residual_diff_threshold: cache a step iff the relative L1 change of F's residual is below it;
        <= 0 never caches.
    max_warmup_steps, warmup_interval: steps in ``range(0, max_warmup_steps, warmup_interval)``
        are always computed.
    max_cached_steps: at most this many cached steps per request and slot (-1 = unlimited).
    max_continuous_cached_steps: at most this many cached steps in a row (-1 = unlimited).
    max_accumulated_residual_diff_threshold: None (off) or a budget > 0 (cache-dit's option): the
        sum of the residual diffs a slot compared with the threshold in this request (the positive
        ones) must stay below it for a step to cache; once it is reached, the slot computes every
        step to the end of the request. DBCache only.
    downsample_factor: the guard compares every k-th channel (the last dim) of F's residual
        (DBCache) or of each block's input (DBPrune) and keeps only those as anchors: k times less
        anchor memory, and a diff taken over a sample of the channels (cache-dit's option). >= 1.
    important_condition_threshold: 0 (every token) or > 0 (cache-dit's option): the diff's two
        means take only the tokens whose own relative L1 change (over the channels) exceeds it,
        or every token when none does.
    force_refresh_step_hint: None (off) or an int >= 1 (cache-dit's option): the cache starts afresh
        at this step of each request, as if a request began there: every slot forgets its anchor,
        residuals, calibrator history, counters and budget, and warmup and the steps computation
        mask count again from it. ``summary`` still shows one request, its steps numbered from its
        first. For a condition that changes at a known step (an edited image's preprocessing
        call). A step is every call sharing a timestep (cache-dit counts transformer calls, two
        per step with separate CFG; ``CacheConfig.from_cache_dit`` converts).
    force_refresh_step_policy: "once" (refresh at step ``force_refresh_step_hint`` only) or
        "repeat" (at every multiple of it: each run of that many steps is a context of its own).
    cfg_diff_compute_separate: True (default): every CFG slot compares its own residual with its
        own anchor. False (cache-dit's option): the later calls of a step take the first call's
        diff when it compared one (its limits allowed and it had an anchor), so the conditional
        and unconditional calls decide on one measure; each slot keeps its own limits and anchor.
        DBCache only.
    cache_slots: separate cache states for calls sharing a timestep (CFG: conditional and
        unconditional calls; Heun's two evaluations of a timestep); further calls in the same step
        always compute, and ``summary`` names them with the count that fits. >= 1.

    Calibrators (algorithms.md §2; cdcompile.calibrators) forecast the cached middle residual on
    cached steps; they never change which steps cache:
    calibrator: None (off unless taylorseer_order > 0), "taylorseer", "foca" or "dmd" (cache-dit's
        dynamic mode decomposition: an exponential fit of the stream's last computed residuals;
        see cdcompile.calibrators).
    taylorseer_order: 1 or 2, the TaylorSeer order. None (the default) means 1 with
        calibrator="taylorseer" and 0 (off) otherwise; given alone (calibrator=None), 1 or 2 turns
        TaylorSeer on, as before the calibrator option existed. An order with calibrator="foca",
        or 0 with calibrator="taylorseer", is a ValueError. After validation both fields are
        normalised: calibrator is None, TAYLORSEER or FOCA and taylorseer_order an int.
    taylorseer_form: "taylor" (default: algorithms.md §2 and cache-dit, sum d_i k^i / i! with every
        difference divided by the last gap) or "newton" (the interpolating polynomial through the
        last n + 1 computed steps: exact on residuals polynomial in the step for any spacing).
        The two agree at order 1; see cdcompile.calibrators.
    foca_slope: FoCa's anchor slope DF: "gap" (default: algorithms.md §2 and cache-dit, the
        difference of the last two computed residuals, however many steps apart) or "step" (that
        difference divided by the steps between them: exact on residuals linear in the step for
        any spacing, within the 3-step horizon). The same when computed steps are consecutive.
    dmd_history: computed residuals the DMD fit reads (default 6, cache-dit's dmd_history); it
        needs 4 of them evenly spaced, and falls back to a Taylor forecast before.
    dmd_rank: the fit's SVD rank; 0 (default) keeps the singular values above 1e-4 of the largest.
    dmd_ridge: added to the singular values the fit inverts (default 1e-8).
    dmd_fallback_order: the Taylor fallback's order, 0, 1 (default) or 2 (cache-dit's
        calibrator_kwargs={"n_derivatives": n}).
    dmd_fallback: "cache-dit" (default: cache-dit 1.5.3's fallback, which differences each computed
        residual against the one two computed steps back) or "taylorseer" (against the previous
        one: the TaylorSeer calibrator's forecast). See cdcompile.calibrators.
        The dmd_ options need calibrator="dmd".
    calibrated_streams: which middle residuals the calibrator forecasts: "all" (default), "hidden"
        (the image stream alone; the text stream and any other reuse their last computed residual,
        cache-dit's enable_encoder_calibrator=False) or "encoder" (every stream but the hidden one,
        cache-dit's enable_calibrator=False with enable_encoder_calibrator=True). A stream left out
        keeps one residual, not the calibrator's history.
    calibrator_cache_type: "residual" (default: the calibrator forecasts M's residual, added to F's
        output) or "hidden_states" (cache-dit's option of that name: it forecasts M's output itself,
        which a cached step then uses as it is, whatever F's output; DBPrune: a pruned block's
        residual or output). For the calibrated streams.

    DBPrune (algorithms.md §4):
    cache_type: "dbcache" (default: one decision per call skips the middle blocks) or "dbprune":
        every block outside F, B and non_prune_block_ids gets its own decision, comparing its input
        hidden state with its input at the step it was last computed (relative mean-abs L1 against
        residual_diff_threshold); a pruned block adds its cached residual (per stream) instead of
        running. Warmup, masks, CFG slots, requests and the step limits are DBCache's; a step
        counts as cached when any block was pruned. A calibrator forecasts each pruned block's
        residual from the steps that block computed.
    non_prune_block_ids: indices into the stack (0..N-1) of blocks never pruned, besides F and B;
        checked against N at compile time.
    enable_dynamic_prune_threshold: per block, use max(threshold, 1.25 * mean of the first 5
        positive diffs of earlier blocks in this call) while that stays below 2 * threshold.
    dynamic_prune_threshold_relax_ratio: the 1.25 above (cache-dit's name); > 0. Higher prunes more.
    max_dynamic_prune_threshold: the 2 * threshold above (None); a relaxed threshold at or above it
        is not used (the block compares with residual_diff_threshold). Must exceed
        residual_diff_threshold, else the relaxed threshold could never apply.

    Steps computation mask (algorithms.md §3):
    steps_computation_mask: None, a preset ("slow", "medium", "fast", "ultra"), an explicit 0/1
        list (1 = compute; steps past its end count as 0), or {"compute_bins": [...],
        "cache_bins": [...]}. Presets and bins scale to the request's step count.
    steps_computation_policy: "dynamic" (a 0 lets the guard decide) or "static" (a 0 caches).
    num_inference_steps: the request's step count, for presets and bins; ``cdcompile.enable``
        takes it from each pipeline call instead.

    Ulysses context parallelism (algorithms.md §6; cdcompile/passes/context_parallel.py):
    ulysses_degree: ranks the token sequence is sharded over; 1 = off. Must equal the world size
        of the default torch.distributed process group (checked at compile time).
    ulysses_fp8: send Q, V and the attention output as FP8 with per-(token, head) scales (K keeps
        the model dtype). Ignored when ulysses_degree == 1.
    ulysses_async: issue each all-to-all as soon as its operand exists, to overlap it with the
        remaining projections. Ignored when ulysses_degree == 1.

    FP8 attention (algorithms.md §7; cdcompile/passes/fp8_attention.py):
    fp8_attention: compute every SDPA call that the kernel can (no dropout, head dim 32, 64 or 128;
        its bool or additive ``attn_mask`` goes along) with ``cdcompile::sage_attention``: INT8
        Q K^T and FP8 P V, Triton on GPUs of compute capability 8.9+, a slow plain-torch
        emulation elsewhere. ``explain`` lists the
        calls kept as SDPA, with why.
    """

    compiler: Compiler = Compiler.INDUCTOR
    mode: str | None = None
    disable_passes: tuple[str, ...] = ()
    size_asserts: bool | None = None

    enable_cache: bool = True
    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    max_accumulated_residual_diff_threshold: float | None = None
    downsample_factor: int = 1
    important_condition_threshold: float = 0.0
    force_refresh_step_hint: int | None = None
    force_refresh_step_policy: str = "once"
    cfg_diff_compute_separate: bool = True
    cache_slots: int = 2
    calibrator: Calibrator | None = None
    taylorseer_order: int | None = None
    taylorseer_form: str = calibrators.TAYLOR
    foca_slope: str = calibrators.GAP
    dmd_history: int = calibrators.DMD_HISTORY
    dmd_rank: int = 0
    dmd_ridge: float = 1e-8
    dmd_fallback_order: int = 1
    dmd_fallback: str = calibrators.CACHE_DIT
    calibrated_streams: str = "all"
    calibrator_cache_type: str = "residual"
    cache_type: CacheType = CacheType.DBCACHE
    non_prune_block_ids: tuple[int, ...] = ()
    enable_dynamic_prune_threshold: bool = False
    dynamic_prune_threshold_relax_ratio: float = 1.25
    max_dynamic_prune_threshold: float | None = None
    steps_computation_mask: Any = None
    steps_computation_policy: str = "dynamic"
    num_inference_steps: int | None = None
    ulysses_degree: int = 1
    ulysses_fp8: bool = False
    ulysses_async: bool = False
    fp8_attention: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "compiler", Compiler(self.compiler))
        except ValueError:
            _bad("compiler", self.compiler, f"one of {[c.value for c in Compiler]}")
        if self.mode is not None:
            from torch._inductor import list_mode_options

            modes = list(list_mode_options(None))
            if self.mode not in modes:
                _bad("mode", self.mode, f"None or one of Inductor's modes {modes}")
        passes = self.disable_passes
        if isinstance(passes, str):
            passes = (passes,)
        passes = tuple(passes)
        for p in passes:
            if p not in PASS_NAMES:
                _bad("disable_passes", p, f"pass names from {list(PASS_NAMES)}")
        object.__setattr__(self, "disable_passes", passes)

        if self.size_asserts is not None:
            _check_type("size_asserts", self.size_asserts, bool)
        _check_type("enable_cache", self.enable_cache, bool)
        _check_type("fp8_attention", self.fp8_attention, bool)
        for name in ("Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps",
                     "warmup_interval", "max_cached_steps", "max_continuous_cached_steps", "cache_slots",
                     "downsample_factor"):
            _check_type(name, getattr(self, name), int)
        _check_type("residual_diff_threshold", self.residual_diff_threshold, (int, float))
        object.__setattr__(self, "residual_diff_threshold", float(self.residual_diff_threshold))
        if math.isnan(self.residual_diff_threshold):
            _bad("residual_diff_threshold", self.residual_diff_threshold,
                 "a number (<= 0 never caches, inf caches every step the limits allow)")
        if self.Fn_compute_blocks < 1:
            _bad("Fn_compute_blocks", self.Fn_compute_blocks,
                 "an int >= 1 (the first block's residual is the cache decision signal)")
        if self.Bn_compute_blocks < 0:
            _bad("Bn_compute_blocks", self.Bn_compute_blocks, "an int >= 0")
        if self.max_warmup_steps < 0:
            _bad("max_warmup_steps", self.max_warmup_steps, "an int >= 0")
        self._check_mask()
        self._check_ulysses()
        self._check_calibrator()
        self._check_prune()
        if self.cache_slots < 1:
            _bad("cache_slots", self.cache_slots, "an int >= 1")
        _check_type("important_condition_threshold", self.important_condition_threshold, (int, float))
        if not self.important_condition_threshold >= 0 or math.isinf(self.important_condition_threshold):
            _bad("important_condition_threshold", self.important_condition_threshold,
                 "a finite number >= 0 (0 weighs every token)")
        object.__setattr__(self, "important_condition_threshold", float(self.important_condition_threshold))
        if self.downsample_factor < 1:
            _bad("downsample_factor", self.downsample_factor, "an int >= 1 (1 compares every channel)")
        if self.warmup_interval < 1:
            _bad("warmup_interval", self.warmup_interval, "an int >= 1")
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            if getattr(self, name) < -1:
                _bad(name, getattr(self, name), "-1 (unlimited) or an int >= 0")
        budget = self.max_accumulated_residual_diff_threshold
        if budget is not None:
            _check_type("max_accumulated_residual_diff_threshold", budget, (int, float))
            if not budget > 0:
                _bad("max_accumulated_residual_diff_threshold", budget, "None (off) or a number > 0")
            if self.cache_type is CacheType.DBPRUNE:
                _bad("max_accumulated_residual_diff_threshold", budget,
                     'None with cache_type="dbprune" (the budget sums DBCache\'s one diff per step)')
            object.__setattr__(self, "max_accumulated_residual_diff_threshold", float(budget))
        self._check_refresh()
        _check_type("cfg_diff_compute_separate", self.cfg_diff_compute_separate, bool)
        if not self.cfg_diff_compute_separate and self.cache_type is CacheType.DBPRUNE:
            _bad("cfg_diff_compute_separate", False,
                 'True with cache_type="dbprune" (each block of each slot compares its own input)')

    def _check_refresh(self) -> None:
        hint, policy = self.force_refresh_step_hint, self.force_refresh_step_policy
        if hint is not None:
            _check_type("force_refresh_step_hint", hint, int)
            if hint < 1:
                _bad("force_refresh_step_hint", hint, "None (off) or an int >= 1 (the step that starts afresh)")
        if policy not in ("once", "repeat"):
            _bad("force_refresh_step_policy", policy, '"once" or "repeat"')
        if policy == "repeat" and hint is None:
            _bad("force_refresh_step_policy", policy,
                 '"repeat" only with force_refresh_step_hint (the period); set it, or leave the policy "once"')

    def _check_calibrator(self) -> None:
        cal, order = self.calibrator, self.taylorseer_order
        if cal is not None:
            try:
                cal = Calibrator(cal.lower() if isinstance(cal, str) else cal)
            except ValueError:
                _bad("calibrator", self.calibrator, f"None or one of {[c.value for c in Calibrator]}")
        if order is not None:
            _check_type("taylorseer_order", order, int)
            if order not in (0, 1, 2):
                _bad("taylorseer_order", order, "0 (off), 1 or 2")
        if cal is Calibrator.TAYLORSEER and order == 0:
            _bad("taylorseer_order", order, '1 or 2 with calibrator="taylorseer" (or leave it unset: 1)')
        if cal is Calibrator.FOCA and order:
            _bad("taylorseer_order", order, 'unset or 0 with calibrator="foca" (FoCa has no order)')
        if cal is None and order:
            cal = Calibrator.TAYLORSEER
        if cal is Calibrator.TAYLORSEER and order is None:
            order = 1
        object.__setattr__(self, "calibrator", cal)
        object.__setattr__(self, "taylorseer_order", order or 0)
        form = self.taylorseer_form
        _check_type("taylorseer_form", form, str)
        if form.lower() not in calibrators.FORMS:
            _bad("taylorseer_form", form, '"taylor" (algorithms.md §2) or "newton"')
        if form.lower() != calibrators.TAYLOR and cal is not Calibrator.TAYLORSEER:
            _bad("taylorseer_form", form, 'the default "taylor" unless TaylorSeer is on '
                 '(calibrator="taylorseer" or taylorseer_order 1 or 2); nothing else reads it')
        object.__setattr__(self, "taylorseer_form", form.lower())
        slope = self.foca_slope
        if slope not in calibrators.SLOPES:
            _bad("foca_slope", slope, f'"{calibrators.GAP}" (algorithms.md §2, cache-dit) or "{calibrators.STEP}"')
        if slope != calibrators.GAP and cal is not Calibrator.FOCA:
            _bad("foca_slope", slope, f'the default "{calibrators.GAP}" unless calibrator="foca"; nothing else reads it')
        self._check_dmd(cal)
        for name, values in (("calibrated_streams", STREAMS), ("calibrator_cache_type", CACHE_TYPES)):
            value = getattr(self, name)
            if value not in values:
                _bad(name, value, " or ".join(f'"{v}"' for v in values))
            if value != values[0] and cal is None:
                _bad(name, value, f'the default "{values[0]}" unless a calibrator is on (calibrator="taylorseer", '
                     '"foca" or "dmd"); nothing else reads it')

    def _check_dmd(self, cal) -> None:
        if cal is Calibrator.DMD and self.taylorseer_order:
            _bad("taylorseer_order", self.taylorseer_order, 'unset or 0 with calibrator="dmd" (its Taylor '
                 "fallback's order is dmd_fallback_order)")
        _check_type("dmd_history", self.dmd_history, int)
        if self.dmd_history < 1:
            _bad("dmd_history", self.dmd_history, "an int >= 1 (4 or more for the fit to engage; 5-6 in cache-dit)")
        _check_type("dmd_rank", self.dmd_rank, int)
        if self.dmd_rank < 0:
            _bad("dmd_rank", self.dmd_rank, "an int >= 0 (0: from the singular values)")
        ridge = self.dmd_ridge
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < math.inf:
            _bad("dmd_ridge", ridge, "a finite float >= 0")
        _check_type("dmd_fallback_order", self.dmd_fallback_order, int)
        if self.dmd_fallback_order not in (0, 1, 2):
            _bad("dmd_fallback_order", self.dmd_fallback_order, "0, 1 or 2")
        if self.dmd_fallback not in calibrators.FALLBACKS:
            _bad("dmd_fallback", self.dmd_fallback, " or ".join(f'"{v}"' for v in calibrators.FALLBACKS))
        if cal is not Calibrator.DMD:
            for f in ("dmd_history", "dmd_rank", "dmd_ridge", "dmd_fallback_order", "dmd_fallback"):
                if getattr(self, f) != _DEFAULTS[f]:
                    _bad(f, getattr(self, f), f'the default {_DEFAULTS[f]!r} unless calibrator="dmd"; '
                         "nothing else reads it")

    def _check_prune(self) -> None:
        kind = self.cache_type
        try:
            kind = CacheType(kind.lower() if isinstance(kind, str) else kind)
        except ValueError:
            _bad("cache_type", self.cache_type, f"one of {[c.value for c in CacheType]}")
        object.__setattr__(self, "cache_type", kind)
        ids = self.non_prune_block_ids
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = (ids,)
        if not isinstance(ids, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            _bad("non_prune_block_ids", self.non_prune_block_ids,
                 "a list of block indices >= 0 into the stack of N blocks")
        object.__setattr__(self, "non_prune_block_ids", tuple(sorted(set(ids))))
        _check_type("enable_dynamic_prune_threshold", self.enable_dynamic_prune_threshold, bool)
        ratio, cap = self.dynamic_prune_threshold_relax_ratio, self.max_dynamic_prune_threshold
        _check_type("dynamic_prune_threshold_relax_ratio", ratio, (int, float))
        if not ratio > 0 or math.isinf(ratio):
            _bad("dynamic_prune_threshold_relax_ratio", ratio, "a finite number > 0 (default 1.25)")
        object.__setattr__(self, "dynamic_prune_threshold_relax_ratio", float(ratio))
        if cap is not None:
            _check_type("max_dynamic_prune_threshold", cap, (int, float))
            if not cap > self.residual_diff_threshold:
                _bad("max_dynamic_prune_threshold", cap,
                     f"None (2 * residual_diff_threshold) or a number above residual_diff_threshold = "
                     f"{self.residual_diff_threshold:g} (a relaxed threshold is used only below it)")
            object.__setattr__(self, "max_dynamic_prune_threshold", float(cap))
        tuned = [n for n in ("dynamic_prune_threshold_relax_ratio", "max_dynamic_prune_threshold")
                 if getattr(self, n) != _DEFAULTS[n]]
        if kind is CacheType.DBPRUNE:
            for name in tuned if not self.enable_dynamic_prune_threshold else ():
                warnings.warn(f"cachedit: {name} is ignored without enable_dynamic_prune_threshold=True",
                              stacklevel=4)
            return
        for name in ("non_prune_block_ids", "enable_dynamic_prune_threshold", *tuned):
            if getattr(self, name) != _DEFAULTS[name]:
                warnings.warn(f'cachedit: {name} is ignored with cache_type="dbcache"', stacklevel=4)

    def _check_ulysses(self) -> None:
        _check_type("ulysses_degree", self.ulysses_degree, int)
        if self.ulysses_degree < 1:
            _bad("ulysses_degree", self.ulysses_degree, "an int >= 1 (1 = no context parallelism)")
        for name in ("ulysses_fp8", "ulysses_async"):
            _check_type(name, getattr(self, name), bool)
            if getattr(self, name) and self.ulysses_degree == 1:
                warnings.warn(f"cachedit: {name}=True is ignored with ulysses_degree=1", stacklevel=4)

    def _check_mask(self) -> None:
        from .masks import PRESETS, build_mask

        if self.steps_computation_policy not in ("dynamic", "static"):
            _bad("steps_computation_policy", self.steps_computation_policy, '"dynamic" or "static"')
        if self.num_inference_steps is not None:
            _check_type("num_inference_steps", self.num_inference_steps, int)
            if self.num_inference_steps < 1:
                _bad("num_inference_steps", self.num_inference_steps, "an int >= 1 or None")
        spec = self.steps_computation_mask
        if spec is None:
            return
        if isinstance(spec, str):
            if spec not in PRESETS:
                _bad("steps_computation_mask", spec, f"a preset from {list(PRESETS)}, a 0/1 list or bins")
        elif isinstance(spec, dict):
            if sorted(spec) != ["cache_bins", "compute_bins"]:
                _bad("steps_computation_mask", spec, 'a dict with keys "compute_bins" and "cache_bins"')
            object.__setattr__(self, "steps_computation_mask",
                               {k: tuple(int(b) for b in v) for k, v in spec.items()})
        elif isinstance(spec, (list, tuple)):
            if not spec or any(b not in (0, 1) or isinstance(b, bool) for b in spec):
                _bad("steps_computation_mask", spec, "a non-empty list of 0 and 1")
            object.__setattr__(self, "steps_computation_mask", tuple(int(b) for b in spec))
        else:
            _bad("steps_computation_mask", spec, "None, a preset name, a 0/1 list or bins")
        try:
            if not isinstance(spec, str) or self.num_inference_steps is not None:
                build_mask(self.steps_computation_mask, self.num_inference_steps)
        except ValueError as e:
            _bad("steps_computation_mask", spec, str(e))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "CacheConfig":
        """Build a config from ``torch.compile``'s ``options`` dict, rejecting unknown keys."""
        if options is None:
            return cls()
        if isinstance(options, CacheConfig):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(
                f"cachedit options must be a dict, got {type(options).__name__}: {options!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ValueError(f"cachedit: unknown option {key!r}{_unknown_hint(key, valid)}. "
                                 f"Valid options: {', '.join(valid)}")
        return cls(**options)

    @classmethod
    def from_cache_dit(cls, cache_config: Any, calibrator_config: Any = None, parallelism_config: Any = None,
                       **options: Any) -> "CacheConfig":
        """The config for cache-dit's ``DBCacheConfig`` / ``DBPruneConfig``, calibrator config
        (``TaylorSeerCalibratorConfig``, ``FoCaCalibratorConfig``, ``DMDCalibratorConfig``) and
        ``ParallelismConfig``, as ``cache_dit.enable_cache`` takes them; ``options``
        (``compiler=...``) are added on top.

        ``parallelism_config``: ``ulysses_size`` becomes ``ulysses_degree``, ``ulysses_float8``
        becomes ``ulysses_fp8``, ``ulysses_async`` stays; ``ulysses_anything`` is what Ulysses does
        here anyway (any sequence length and head count). Ring attention, tensor parallelism, Ray,
        CP plans, extra modules and an attention backend other than ``"native"`` are ValueErrors
        naming the field. Without a ``cache_config`` it compiles without the cache, as cache-dit
        does; cache options on top then need ``enable_cache=True``.

        Fields of the same name carry over as they are (cache-dit's default ``Fn_compute_blocks``
        is 8, not 1), but for ``force_refresh_step_hint`` with ``enable_separate_cfg=True``:
        cache-dit counts it in transformer calls, two per step there, so an even hint becomes
        half as many steps and an odd one (a refresh between a step's two calls) is refused; with
        ``enable_separate_cfg=None`` (cache-dit decides per pipeline) the hint is taken as steps,
        with a warning.
        Its CFG flags are not needed (CFG slots come from the timestep). ``DMDCalibratorConfig``
        becomes ``calibrator="dmd"`` with its ``dmd_`` fields; DMD's ``calibrator_kwargs``
        ``n_derivatives`` becomes ``dmd_fallback_order``. What has no counterpart raises ValueError
        naming it, such as other calibrator kwargs. ``force_reduce_calibrator_vram=True`` with a
        calibrator makes ``downsample_factor`` at least 4, as in cache-dit. ``enable_calibrator`` /
        ``enable_encoder_calibrator`` become ``calibrated_streams``.
        """
        if cache_config is None and parallelism_config is None:
            raise TypeError("CacheConfig.from_cache_dit: give cache-dit's cache_config (DBCacheConfig, DBPruneConfig) "
                            "or its parallelism_config")
        out = _cache_dit_options(cache_config, calibrator_config) if cache_config is not None else {}
        if cache_config is None:
            if calibrator_config is not None:
                raise ValueError("CacheConfig.from_cache_dit: calibrator_config needs a cache_config "
                                 "(cache-dit's DBCacheConfig)")
            cached = sorted(set(options) - _NOT_CACHE_OPTIONS)
            if cached and "enable_cache" not in options:
                raise ValueError(f"CacheConfig.from_cache_dit: parallelism_config without a cache_config compiles "
                                 f"without the cache, as cache_dit.enable_cache does, so {cached} would do nothing: "
                                 f"give cache_config=DBCacheConfig(...) or enable_cache=True")
            out["enable_cache"] = False
        if parallelism_config is not None:
            out |= _cache_dit_parallelism(parallelism_config)
        return cls.from_options({**out, **options})

    def guard_rule(self) -> str:
        """The decision in words, for ``explain``: the diff, its threshold, warmup and limits."""
        if self.cache_type is CacheType.DBPRUNE:
            parts = [f"prune a block when mean|H - H_anchor| / mean|H_anchor| of its input (H_anchor: its input "
                     f"when it last computed) < {self.residual_diff_threshold:g}"
                     + (" or the dynamic threshold" if self.enable_dynamic_prune_threshold else "")]
        else:
            parts = [f"cache when mean|R - R_anchor| / mean|R_anchor| of F's residual < {self.residual_diff_threshold:g}"]
        if self.downsample_factor > 1:
            parts.append(f"on one channel in {self.downsample_factor}")
        if self.important_condition_threshold > 0:
            parts.append(f"over the tokens that changed by more than {self.important_condition_threshold:g}")
        parts.append(f"after warmup steps range(0, {self.max_warmup_steps}, {self.warmup_interval})")
        for name, what in (("max_cached_steps", "cached steps"), ("max_continuous_cached_steps", "in a row")):
            if getattr(self, name) >= 0:
                parts.append(f"at most {getattr(self, name)} {what}")
        if self.max_accumulated_residual_diff_threshold is not None:
            parts.append(f"while the request's summed diffs stay below {self.max_accumulated_residual_diff_threshold:g}")
        hint = self.force_refresh_step_hint
        if hint is not None:
            parts.append(f"starting afresh at step {hint}" if self.force_refresh_step_policy == "once"
                         else f"starting afresh every {hint} steps")
        if not self.cfg_diff_compute_separate:
            parts.append("a step's later calls taking its first call's diff")
        if self.calibrator is not None:
            parts.append(f"forecast by {self.calibrator.value}"
                         + (f" (order {self.taylorseer_order})" if self.taylorseer_order else "")
                         + (" (slope per step)" if self.foca_slope == calibrators.STEP else "")
                         + (f" (history {self.dmd_history}, rank {self.dmd_rank or 'auto'}, "
                            + (f"cache-dit's Taylor fallback of order {self.dmd_fallback_order}"
                               if self.dmd_fallback == calibrators.CACHE_DIT
                               else f"TaylorSeer-{self.dmd_fallback_order} fallback")
                            + "; its fit on the host)" if self.calibrator is Calibrator.DMD else "")
                         + (" per block" if self.cache_type is CacheType.DBPRUNE else "")
                         + ((", of each block's output" if self.cache_type is CacheType.DBPRUNE else ", of M's output")
                            if self.calibrator_cache_type == "hidden_states" else "")
                         + {"all": "", "hidden": ", for the hidden stream alone",
                            "encoder": ", for the streams besides the hidden one"}[self.calibrated_streams])
        return "; ".join(parts)

    def replace(self, **changes: Any) -> "CacheConfig":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compiler"] = self.compiler.value
        d["calibrator"] = self.calibrator.value if self.calibrator is not None else None
        d["cache_type"] = self.cache_type.value
        d["non_prune_block_ids"] = list(self.non_prune_block_ids)
        d["disable_passes"] = list(self.disable_passes)
        if isinstance(self.steps_computation_mask, tuple):
            d["steps_computation_mask"] = list(self.steps_computation_mask)
        return d


def _check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    # bool is an int subclass; an int option given True/False is almost surely a mistake.
    if isinstance(value, bool) and types is not bool:
        _bad(name, value, f"{_type_names(types)}, not a bool")
    if not isinstance(value, types):
        _bad(name, value, _type_names(types))


def _type_names(types: type | tuple[type, ...]) -> str:
    """``an int or float``: the accepted types with their article."""
    types = types if isinstance(types, tuple) else (types,)
    names = " or ".join(t.__name__ for t in types)
    return ("an " if names[0] in "aeiou" else "a ") + names


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CacheConfig)}

# cache-dit's options (1.5's DBCacheConfig, DBPruneConfig and calibrator configs, and the keyword
# arguments of its earlier releases) without a field of the same name here, and what a user moving
# over does instead.
_SEPARATE_CFG = ("not needed: calls that share a timestep are told apart as CFG slots, each with its "
                 "own anchor, residuals and counters (batch-fused CFG needs nothing); remove it")
_CALIBRATOR = ('use calibrator="taylorseer" (taylorseer_order=1 or 2), "foca" or "dmd" (dmd_history, ...), with '
               'calibrated_streams="all", "hidden" (the text stream reuses its last residual) or "encoder"')
_CACHE_DIT = {
    "enable_separate_cfg": _SEPARATE_CFG, "enable_spearate_cfg": _SEPARATE_CFG,
    "cfg_compute_first": _SEPARATE_CFG,
    "enable_calibrator": _CALIBRATOR, "enable_encoder_calibrator": _CALIBRATOR,
    "calibrator_type": _CALIBRATOR, "calibrator_kwargs": _CALIBRATOR,
    "enable_taylorseer": _CALIBRATOR, "enable_encoder_taylorseer": _CALIBRATOR,
    "taylorseer_cache_type": _CALIBRATOR, "taylorseer_kwargs": _CALIBRATOR,
    "do_separate_classifier_free_guidance": _SEPARATE_CFG,
    "l1_hidden_states_diff_threshold": "not implemented: the cache keeps residuals; use residual_diff_threshold",
    "force_reduce_calibrator_vram": ("downsample_factor=4 (or more) keeps every 4th channel of each "
                                     "block's input as DBPrune's anchor, as cache-dit's option does with a calibrator"),
    "cache_config": ("cdcompile.enable(pipe, cache_config=..., calibrator_config=...) takes it; for "
                     "torch.compile, options=CacheConfig.from_cache_dit(cache_config, calibrator_config)"),
    "calibrator_config": ("cdcompile.enable(pipe, cache_config=..., calibrator_config=...) takes it; for "
                          "torch.compile, options=CacheConfig.from_cache_dit(cache_config, calibrator_config)"),
    "parallelism_config": ("cdcompile.enable(pipe, parallelism_config=...) takes it; for torch.compile, "
                           "options=CacheConfig.from_cache_dit(cache_config, parallelism_config=...)"),
    "params_modifiers": ("cdcompile.enable(pipe, params_modifiers=[...]) takes one per transformer; or give "
                         "transformer_options={'transformer_2': {...}} to enable"),
    "quantize_config": "quantize the transformer with torchao's quantize_ before compiling",
    "attention_backend": "call transformer.set_attention_backend(name) before compiling",
}


# cache-dit fields subsumed here: CFG slots come from the timestep, whatever these say
_CFG_FLAGS = ("enable_separate_cfg", "cfg_compute_first")


def _cache_dit_options(cache_config: Any, calibrator_config: Any) -> dict[str, Any]:
    """cdcompile options from cache-dit's config objects (see CacheConfig.from_cache_dit)."""
    for what, obj in (("cache_config", cache_config), ("calibrator_config", calibrator_config)):
        if obj is not None and (not dataclasses.is_dataclass(obj) or isinstance(obj, type)):
            raise TypeError(f"CacheConfig.from_cache_dit: {what} must be a cache-dit config instance "
                            f"(DBCacheConfig, DBPruneConfig, TaylorSeerCalibratorConfig, ...), got {obj!r}")

    def refuse(field: str, value: Any, why: str | None = None) -> None:
        raise ValueError(f"CacheConfig.from_cache_dit: {field}={value!r} has no counterpart here: "
                         f"{why or _CACHE_DIT.get(field, 'remove it')}")

    out: dict[str, Any] = {}
    for f in dataclasses.fields(cache_config):
        name, value = f.name, getattr(cache_config, f.name)
        if name == "cache_type":
            out[name] = str(getattr(value, "value", value)).lower()
        elif name in _DEFAULTS:
            out[name] = list(value) if isinstance(value, (list, tuple)) else value
        elif name in _CFG_FLAGS:
            continue
        elif name == "force_reduce_calibrator_vram":
            continue
        else:
            refuse(name, value)
    if getattr(cache_config, "force_reduce_calibrator_vram", False):
        # cache-dit's DBPrune then compares (and keeps as anchors) every 4th channel or fewer
        if calibrator_config is None:
            warnings.warn("CacheConfig.from_cache_dit: force_reduce_calibrator_vram=True does nothing without a "
                          "calibrator_config (as in cache-dit)", stacklevel=3)
        else:
            out["downsample_factor"] = max(4, out.get("downsample_factor", 1))
    hint = out.get("force_refresh_step_hint")
    separate = getattr(cache_config, "enable_separate_cfg", None)
    if hint is not None and separate:
        # cache-dit counts the hint in transformer calls; separate CFG makes two of them per step
        if hint % 2:
            refuse("force_refresh_step_hint", hint,
                   "with enable_separate_cfg=True cache-dit refreshes between the two CFG calls of step "
                   f"{hint // 2}; here a refresh starts a step: use {hint - 1} or {hint + 1} transformer calls")
        out["force_refresh_step_hint"] = hint // 2
    elif hint is not None and separate is None:
        warnings.warn(f"CacheConfig.from_cache_dit: force_refresh_step_hint={hint} is taken as denoising steps; "
                      "cache-dit counts transformer calls, two per step when it runs a pipeline's CFG as separate "
                      "calls (enable_separate_cfg=None lets it decide per pipeline): set enable_separate_cfg to "
                      "say which", stacklevel=3)
    hidden = calibrator_config is not None and getattr(calibrator_config, "enable_calibrator", True)
    encoder = calibrator_config is not None and getattr(calibrator_config, "enable_encoder_calibrator", True)
    if hidden or encoder:
        kind = str(getattr(calibrator_config, "calibrator_type", "")).lower()
        if kind not in ("taylorseer", "foca", "dmd"):
            raise ValueError(f"CacheConfig.from_cache_dit: calibrator_type={kind!r} is not implemented here: "
                             f'calibrator="taylorseer", "foca" or "dmd"')
        cache_type = str(getattr(calibrator_config, "calibrator_cache_type", "residual"))
        if cache_type not in CACHE_TYPES:
            refuse("calibrator_cache_type", cache_type, " or ".join(map(repr, CACHE_TYPES)))
        out |= _cache_dit_calibrator_kwargs(kind, dict(getattr(calibrator_config, "calibrator_kwargs", None) or {}),
                                            refuse)
        if kind == "dmd":
            out |= _cache_dit_dmd(calibrator_config)
        out["calibrator"] = kind
        out["calibrator_cache_type"] = cache_type
        # cache-dit's two flags: the hidden stream's calibrator, the encoder (text) stream's
        out["calibrated_streams"] = "all" if hidden and encoder else "hidden" if hidden else "encoder"
        if kind == "taylorseer":
            out["taylorseer_order"] = getattr(calibrator_config, "taylorseer_order", 1)
    return out


def _cache_dit_calibrator_kwargs(kind: str, kwargs: dict, refuse) -> dict:
    """cache-dit's ``calibrator_kwargs``, which it passes to the calibrator's constructor: the one
    that changes a forecast is DMD's ``n_derivatives`` (its Taylor fallback's order). TaylorSeer's
    constructor takes it too, but cache-dit then sets it from ``taylorseer_order``; its other
    parameters (``max_warmup_steps``, ``skip_interval_steps``) steer a schedule cache-dit's
    DBCache does not use, and FoCa's and DMD's constructors ignore whatever else they are given."""
    out = {}
    if kind == "dmd" and "n_derivatives" in kwargs:
        out["dmd_fallback_order"] = kwargs.pop("n_derivatives")
    if kwargs:
        rule = ({"n_derivatives": "taylorseer_order"} if kind == "taylorseer" else {}).get(next(iter(kwargs)))
        refuse("calibrator_kwargs", kwargs,
               f"cache-dit overrides it with {rule}: set that" if rule else
               "they change nothing in cache-dit's forecast" + (" (DMD reads n_derivatives alone, the Taylor "
                                                                "fallback's order)" if kind == "dmd" else "")
               + "; remove them")
    return out


def _cache_dit_dmd(config) -> dict:
    """DMDCalibratorConfig's fields. ``dmd_svd_precision`` picks cache-dit's SVD driver for the
    d x n snapshot matrix; the fit here works on the n x n Gram matrix in float64, which all three
    drivers agree with to well below the forecast's dtype, so any of the three is accepted as it is."""
    precision = getattr(config, "dmd_svd_precision", "medium")
    if precision not in ("low", "medium", "high"):
        raise ValueError(f"CacheConfig.from_cache_dit: dmd_svd_precision={precision!r}; cache-dit takes "
                         '"low", "medium" or "high"')
    return {"dmd_history": getattr(config, "dmd_history", calibrators.DMD_HISTORY),
            "dmd_rank": getattr(config, "dmd_rank", 0), "dmd_ridge": getattr(config, "dmd_ridge", 1e-8)}


# the options that mean something without the block cache
_NOT_CACHE_OPTIONS = {"compiler", "mode", "size_asserts", "enable_cache", "ulysses_degree", "ulysses_fp8",
                      "ulysses_async", "fp8_attention", "disable_passes"}

# cache-dit's ParallelismConfig fields with a counterpart here, and what the others would need
_PARALLELISM = {"ulysses_size": "ulysses_degree", "ulysses_float8": "ulysses_fp8", "ulysses_async": "ulysses_async"}
_NO_PARALLELISM = {
    "ring_size": "ring attention is not implemented here; Ulysses (ulysses_size) takes any sequence length and "
                 "head count",
    "tp_size": "tensor parallelism is not implemented here; use ulysses_size",
    "use_ray": "launch the ranks with torchrun (cdcompile compiles the same script on every rank)",
    "cp_plan": "not needed: the context parallel pass finds every attention in the graph",
    "extra_parallel_modules": "cdcompile shards the transformers alone",
    "extra_parallel_kwargs": "model-specific CP switches are not needed here",
    "parallel_kwargs": "give the fields themselves (ulysses_size, ulysses_float8, ulysses_async)",
    "attention_backend": ("choose diffusers' backend on the model before compiling: "
                          "pipe.transformer.set_attention_backend(name), or fp8_attention=True for INT8/FP8 "
                          "attention"),
}
# ... and those that only choose cache-dit's implementation or tune ring attention
_PARALLELISM_IMPLEMENTATION = {"backend", "ulysses_anything", "ring_rotate_method", "ring_convert_to_fp32"}


def _cache_dit_parallelism(config: Any) -> dict[str, Any]:
    """cdcompile's Ulysses options from cache-dit's ``ParallelismConfig``: each field is converted,
    only selects cache-dit's implementation, is still at its default, or is refused by name."""
    where = "CacheConfig.from_cache_dit"
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"{where}: parallelism_config must be cache-dit's ParallelismConfig instance, got {config!r}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        name, value = f.name, getattr(config, f.name)
        if name in _PARALLELISM:
            if name == "ulysses_size":
                value = 1 if value is None else value
            elif value is None:
                continue
            out[_PARALLELISM[name]] = value
        elif name.startswith("_") or name in _PARALLELISM_IMPLEMENTATION:
            continue
        elif _is_default(f, value):
            continue
        elif name == "attention_backend" and str(value).lower() == "native":
            continue  # torch's SDPA, diffusers' default backend
        elif name in ("ring_size", "tp_size") and value == 1:
            continue
        else:
            why = _NO_PARALLELISM.get(name, "cdcompile's context parallelism is Ulysses alone: "
                                            "ulysses_size, ulysses_float8, ulysses_async")
            raise ValueError(f"{where}: parallelism_config.{name}={value!r} has no counterpart here: {why}")
    backend = str(getattr(getattr(config, "backend", None), "value", "")).lower()
    if backend.startswith("native_pytorch") or backend.startswith("native_hybrid"):
        raise ValueError(f"{where}: parallelism_config.backend={backend!r} is cache-dit's tensor parallelism, "
                         f"which has no counterpart here: {_NO_PARALLELISM['tp_size']}")
    return out


def _is_default(field: dataclasses.Field, value: Any) -> bool:
    if field.default is not dataclasses.MISSING:
        return value == field.default
    if field.default_factory is not dataclasses.MISSING:
        return value == field.default_factory()
    return False


def _unknown_hint(key: str, valid: list[str]) -> str:
    """What to do instead of ``key``: a cache-dit option's counterpart, or the closest valid name."""
    import difflib

    if key in _CACHE_DIT:
        return f" (a cache-dit option: {_CACHE_DIT[key]})"
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.8)
    return f"; did you mean {close[0]!r}?" if close else ""


def _bad(name: str, value: Any, rule: str) -> None:
    valid = ", ".join(f.name for f in dataclasses.fields(CacheConfig))
    raise ValueError(
        f"cachedit: bad value for option {name!r}: {value!r}; expected {rule}. "
        f"Valid options: {valid}")
