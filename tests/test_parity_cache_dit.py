"""Parity with cache-dit (issue 5, part 4): on the trained tiny FLUX, with the same F/B, threshold and
warm-up and no step limits, cdcompile caches exactly the steps cache-dit caches in the first request,
and its residual diffs are cache-dit's. With TaylorSeer (the Taylor form of algorithms.md §2, which is
cache-dit's formula) the images agree too.

Only the first request: cache-dit's later requests drift (reference/algorithms.md §5). Needs the
``bench`` extra (cache-dit 1.5.3); skipped without it.
"""

import pytest
import torch

cache_dit = pytest.importorskip("cache_dit")

import cdcompile  # noqa: E402
from cdcompile import trained  # noqa: E402

STEPS = 28
WARMUP = 4


def _request(pipe, digit: int, seed: int):
    return pipe(**trained.class_prompt(digit), num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images[0]


def _cache_dit(threshold: float, digit: int, seed: int, order: int = 0, warmup: int = WARMUP):
    pipe = trained.load_trained_pipeline()
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
        max_warmup_steps=warmup, warmup_interval=1, max_cached_steps=-1, max_continuous_cached_steps=-1,
        num_inference_steps=STEPS), calibrator_config=calibrator)
    image = _request(pipe, digit, seed)
    stats = cache_dit.summary(pipe, logging=False)[0]
    diffs = {int(k): float(v) for k, v in stats.residual_diffs.items()}
    return image, sorted(int(s) for s in stats.cached_steps), diffs


def _cdcompile(threshold: float, digit: int, seed: int, order: int = 0, warmup: int = WARMUP):
    torch._dynamo.reset()
    pipe = trained.load_trained_pipeline()
    cdcompile.enable(pipe, compiler="eager", Fn_compute_blocks=1, Bn_compute_blocks=0,
                     residual_diff_threshold=threshold, max_warmup_steps=warmup, warmup_interval=1,
                     max_cached_steps=-1, max_continuous_cached_steps=-1, taylorseer_order=order)
    image = _request(pipe, digit, seed)
    slot = cdcompile.summary(pipe.transformer).as_dict()["requests"][-1]["slots"][0]
    return image, slot["cached_steps"], slot["residual_diffs"]


@pytest.mark.parametrize("threshold", [0.08, 0.2])  # 7 and 16 of 28 steps cached
def test_first_request_caches_the_steps_cache_dit_caches(threshold):
    ref_image, ref_cached, ref_diffs = _cache_dit(threshold, digit=3, seed=0)
    image, cached, diffs = _cdcompile(threshold, digit=3, seed=0)
    assert 0 < len(ref_cached) < STEPS - WARMUP, ref_cached  # a comparison with something in it
    assert cached == ref_cached, (
        f"threshold {threshold}: cdcompile cached {cached}, cache-dit {ref_cached}; diffs "
        f"cdcompile {[(s, round(d, 4)) for s, d in diffs.items()]} "
        f"cache-dit {[(s, round(d, 4)) for s, d in ref_diffs.items()]}")
    common = sorted(diffs.keys() & ref_diffs.keys())
    assert len(common) >= STEPS - WARMUP - 1, (sorted(diffs), sorted(ref_diffs))
    worst = max(abs(diffs[s] - ref_diffs[s]) / ref_diffs[s] for s in common)
    assert worst < 1e-3, f"residual diffs differ by up to {worst:.2e} (relative)"
    assert (image - ref_image).abs().max() < 1e-4


# cache-dit's TaylorSeer counter lags the denoising step by one and takes no difference before its
# step 2, so at step s it holds d1 from step 3 and d2 from step 4 on: with 4 warm-up steps its first
# cached steps forecast with order 1 where algorithms.md (and cdcompile) already have d2 ("use the
# orders available"). From 6 warm-up steps on both hold d0..d2 at the first cached step.
@pytest.mark.parametrize("order,warmup", [(1, 4), (2, 6)])
def test_taylorseer_images_equal_cache_dit_s(order, warmup):
    ref_image, ref_cached, _ = _cache_dit(0.2, digit=5, seed=1, order=order, warmup=warmup)
    image, cached, _ = _cdcompile(0.2, digit=5, seed=1, order=order, warmup=warmup)
    assert 0 < len(ref_cached) and cached == ref_cached, (cached, ref_cached)
    err = (image - ref_image).abs().max().item()
    assert err < 1e-4, f"TaylorSeer-{order}: images differ by up to {err:.2e}"
