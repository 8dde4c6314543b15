"""Steps computation masks (SCM, reference/algorithms.md §3).

A mask is a 0/1 list over a request's steps: 1 = the step must compute, 0 = it may reuse the
cache ("dynamic" policy: if the guard agrees; "static": unconditionally). It is built from
alternating compute/cache *bins* ``c0 k0 c1 k1 ... c_last``. Presets are defined for 28 steps;
other step counts scale every bin by ``steps / 28`` (each bin at least 1 step), then trim or grow
the longest cache bin (else the longest compute bin) until the total is ``steps``; the last step
always computes.
"""

from __future__ import annotations

from typing import Sequence

# compute bins, cache bins at 28 steps
PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)),
    "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
    "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)),
    "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7)),
}
PRESET_STEPS = 28


def from_bins(compute_bins: Sequence[int], cache_bins: Sequence[int]) -> list[int]:
    """``c0 ones, k0 zeros, c1 ones, ...``; one more compute bin than cache bins."""
    if len(compute_bins) != len(cache_bins) + 1:
        raise ValueError(f"steps mask bins: need one more compute bin than cache bins, got "
                         f"{len(compute_bins)} compute and {len(cache_bins)} cache bins")
    if any(b < 1 for b in list(compute_bins) + list(cache_bins)):
        raise ValueError(f"steps mask bins must be >= 1, got compute {list(compute_bins)} "
                         f"cache {list(cache_bins)}")
    mask: list[int] = []
    for c, k in zip(compute_bins, list(cache_bins) + [0]):
        mask += [1] * c + [0] * k
    return mask


def scaled_bins(compute_bins: Sequence[int], cache_bins: Sequence[int], steps: int):
    """Scale 28-step bins to ``steps`` (see module docstring)."""
    total = sum(compute_bins) + sum(cache_bins)
    comp = [max(1, round(b * steps / total)) for b in compute_bins]
    cache = [max(1, round(b * steps / total)) for b in cache_bins]
    if len(comp) + len(cache) > steps:
        raise ValueError(f"steps mask: {len(comp) + len(cache)} bins do not fit in {steps} steps")
    while sum(comp) + sum(cache) != steps:
        grow = sum(comp) + sum(cache) < steps
        for bins in (cache, comp):
            candidates = [i for i, b in enumerate(bins) if grow or b > 1]
            if candidates:
                i = max(candidates, key=lambda j: bins[j])
                bins[i] += 1 if grow else -1
                break
    return comp, cache


def build_mask(spec, steps: int | None) -> list[int]:
    """The 0/1 mask of ``spec`` (preset name, explicit list, or {"compute_bins", "cache_bins"})."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"steps_computation_mask: unknown preset {spec!r}; presets: {list(PRESETS)}")
        if steps is None:
            raise ValueError(f"steps_computation_mask={spec!r} needs the request's step count: pass "
                             "num_inference_steps in the options or use cdcompile.enable(pipe, ...)")
        comp, cache = PRESETS[spec]
        if steps != PRESET_STEPS:
            comp, cache = scaled_bins(comp, cache, steps)
        mask = from_bins(comp, cache)
    elif isinstance(spec, dict):
        mask = from_bins(spec["compute_bins"], spec["cache_bins"])
        if steps is not None and len(mask) != steps:
            comp, cache = scaled_bins(spec["compute_bins"], spec["cache_bins"], steps)
            mask = from_bins(comp, cache)
    else:
        return [int(b) for b in spec]  # explicit: used as given; steps past its end count as 0
    mask[-1] = 1
    return mask
