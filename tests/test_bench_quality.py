"""bench/quality.py's row logic (the benchmark itself is too slow for the suite: run ``--quick``)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import quality  # noqa: E402
from cdcompile import CacheConfig  # noqa: E402


def test_row_filter_keeps_the_eager_reference_and_rejects_a_pattern_matching_nothing():
    rows = quality.default_rows()
    kept = quality.select_rows(rows, ["cache-dit dbcache f2b1"])
    assert [r.label for r in kept] == ["eager"] + [f"cache-dit DBCache F2B1 t={t:g}" for t in quality.THRESHOLDS]
    assert quality.select_rows(rows, []) == quality.select_rows(rows, [""]) == rows  # --rows "" keeps all
    with pytest.raises(ValueError, match="matches no row"):
        quality.select_rows(rows, ["cdcompile DBCache", "cachedit typo"])


def test_every_cdcompile_row_has_a_cache_dit_row_with_equal_settings():
    labels = {r.label for r in quality.default_rows()}
    # the FP8-attention rows measure cdcompile's own kernel arithmetic, and DMD with TaylorSeer's
    # fallback is an option cache-dit lacks: not caching methods to pair
    own = ("FP8", "DMD-TaylorSeer-fallback")
    cdc = [lb for lb in labels if lb.startswith("cdcompile ") and not any(o in lb for o in own)]
    assert cdc and all(lb.replace("cdcompile", "cache-dit", 1) in labels for lb in cdc)
    assert {lb for lb in labels if "FP8" in lb} == {"cdcompile FP8-attention no cache",
                                                    "cdcompile DBCache+FP8-attention F1B0 t=0.12"}
    assert {lb for lb in labels if "DMD-TaylorSeer" in lb} == {"cdcompile DMD-TaylorSeer-fallback F1B0 t=0.2",
                                                               "cdcompile DMD-TaylorSeer-fallback F1B0 t=0.3"}


def test_cdcompile_rows_translate_to_options_this_build_accepts():
    # FoCa and DBPrune rows report "not available" when an option is missing; this test says when
    # their names in the benchmark have gone stale against CacheConfig.
    for r in quality.default_rows():
        if r.system == "cdcompile":
            cfg = CacheConfig.from_options(quality.cdcompile_options(r.options, warmup=4))
            assert cfg.max_warmup_steps == 4 and cfg.residual_diff_threshold == r.options["threshold"]


def _row(label, system, fraction, psnr, ms=1.0, unit="steps", method="DBCache"):
    return {"label": label, "system": system, "fraction": fraction, "psnr_mean": psnr, "ms_per_image": ms,
            "unit": unit, "method": method}


def test_frontier_and_budget_keep_only_undominated_rows_within_the_budget():
    rows = [_row("a", "cdcompile", 0.4, 40.0), _row("b", "cache-dit", 0.5, 39.0),   # b: dominated by a
            _row("c", "cache-dit", 0.3, 35.0), _row("d", "diffusers", 0.6, 50.0),
            _row("e", "cache-dit", 0.2, 60.0, unit="blocks", method="DBPrune")]
    assert quality.pareto(rows[:4], "fraction") == ["a", "c", "d"]
    best = quality.best_within(rows, "fraction", 0.5)
    assert {s: r["label"] for s, r in best.items()} == {"cdcompile": "a", "cache-dit": "b"}  # e counts blocks
    assert quality.best_within(rows, "ms_per_image", 1.0)["cache-dit"]["label"] == "e"
