"""Parity with cache-dit (issue 5, part 4): on the trained tiny FLUX, with the same F/B, threshold and
warm-up and no step limits, cdcompile caches exactly the steps cache-dit caches in the first request,
and its residual diffs are cache-dit's. With TaylorSeer (the Taylor form of algorithms.md §2, which is
cache-dit's formula), FoCa and DMD the images agree too, and so do DBPrune's pruned blocks (with and without the
dynamic threshold, and with calibrators), the steps max_cached_steps and max_continuous_cached_steps
allow, and the images under force_refresh_step_hint and with the calibrator on some streams or over
M's output.

Only the first request: cache-dit's later requests drift (reference/algorithms.md §5). Needs the
``bench`` extra (cache-dit 1.5.3); skipped without it.
"""

import dataclasses

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


def _configs(threshold: float, order: int, warmup: int) -> dict:
    """cache-dit's config objects, which cdcompile.enable takes as cache_dit.enable_cache does."""
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
    return dict(cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold,
        max_warmup_steps=warmup, warmup_interval=1, max_cached_steps=-1, max_continuous_cached_steps=-1,
        num_inference_steps=STEPS), calibrator_config=calibrator)


def _cache_dit(threshold: float, digit: int, seed: int, order: int = 0, warmup: int = WARMUP):
    pipe = trained.load_trained_pipeline()
    cache_dit.enable_cache(pipe, **_configs(threshold, order, warmup))
    image = _request(pipe, digit, seed)
    stats = cache_dit.summary(pipe, logging=False)[0]
    diffs = {int(k): float(v) for k, v in stats.residual_diffs.items()}
    return image, sorted(int(s) for s in stats.cached_steps), diffs


def _cdcompile(threshold: float, digit: int, seed: int, order: int = 0, warmup: int = WARMUP):
    torch._dynamo.reset()
    pipe = trained.load_trained_pipeline()
    cdcompile.enable(pipe, compiler="eager", **_configs(threshold, order, warmup))
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


@pytest.mark.parametrize("max_continuous,max_cached", [(2, -1), (-1, 5), (1, 6)])
def test_step_limits_cache_the_steps_cache_dit_caches(max_continuous, max_cached):
    cfg = _configs(0.3, 0, WARMUP)
    cfg["cache_config"] = dataclasses.replace(cfg["cache_config"], max_continuous_cached_steps=max_continuous,
                                              max_cached_steps=max_cached)
    pipe = trained.load_trained_pipeline()
    cache_dit.enable_cache(pipe, **cfg)
    ref_image = _request(pipe, digit=3, seed=0)
    ref_cached = sorted(int(s) for s in cache_dit.summary(pipe, logging=False)[0].cached_steps)
    torch._dynamo.reset()
    pipe = trained.load_trained_pipeline()
    cdcompile.enable(pipe, compiler="eager", **cfg)
    image = _request(pipe, digit=3, seed=0)
    cached = cdcompile.summary(pipe.transformer).as_dict()["requests"][-1]["slots"][0]["cached_steps"]
    assert cached == ref_cached and len(cached) < 18, (cached, ref_cached)  # the limits bind (none: 18 cached)
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


# max_cached_steps=3 counts per context in cache-dit too: cached 4, 6, 7 and 18, 19, 21
@pytest.mark.parametrize("hint,policy,max_cached", [(14, "once", 3), (10, "repeat", -1)])
def test_force_refresh_step_hint_gives_cache_dits_image(hint, policy, max_cached):
    # cache-dit's summary keeps only the last context's cached steps, numbered from its start
    cfg = _configs(0.2, 0, WARMUP)
    # FluxPipeline runs no separate CFG calls (cache-dit's default for it): the hint counts steps in both
    cfg["cache_config"] = dataclasses.replace(cfg["cache_config"], force_refresh_step_hint=hint,
                                              force_refresh_step_policy=policy, max_cached_steps=max_cached,
                                              enable_separate_cfg=False)
    pipe = trained.load_trained_pipeline()
    cache_dit.enable_cache(pipe, **cfg)
    ref_image = _request(pipe, digit=3, seed=0)
    last = STEPS - 1 - (STEPS - 1) % hint if policy == "repeat" else hint  # the last context's first step
    ref_cached = [last + int(s) for s in cache_dit.summary(pipe, logging=False)[0].cached_steps]

    torch._dynamo.reset()
    pipe = trained.load_trained_pipeline()
    cdcompile.enable(pipe, compiler="eager", **cfg)
    image = _request(pipe, digit=3, seed=0)
    cached = cdcompile.summary(pipe.transformer).as_dict()["requests"][-1]["slots"][0]["cached_steps"]
    assert ref_cached and [s for s in cached if s >= last] == sorted(ref_cached), (cached, ref_cached)
    assert not set(cached) & set(range(last, last + WARMUP)), "the context warms up again"
    if max_cached > 0:
        assert cached == [4, 6, 7, 18, 19, 21]
    assert (image - ref_image).abs().max() < 1e-4


def test_foca_images_equal_cache_dit_s():
    # FoCa as algorithms.md writes it (foca_slope="gap", the default) is cache-dit's: the same cached
    # steps and image; the per-step slope departs from it once computed steps are more than one apart
    cfg = _configs(0.2, 0, WARMUP)
    calibrator = cache_dit.FoCaCalibratorConfig()
    pipe = trained.load_trained_pipeline()
    cache_dit.enable_cache(pipe, cache_config=cfg["cache_config"], calibrator_config=calibrator)
    ref_image = _request(pipe, digit=5, seed=1)
    ref_cached = sorted(int(s) for s in cache_dit.summary(pipe, logging=False)[0].cached_steps)
    images = {}
    for slope in ("gap", "step"):
        torch._dynamo.reset()
        pipe = trained.load_trained_pipeline()
        cdcompile.enable(pipe, compiler="eager", cache_config=cfg["cache_config"], calibrator_config=calibrator,
                         foca_slope=slope)
        images[slope] = _request(pipe, digit=5, seed=1)
        cached = cdcompile.summary(pipe.transformer).as_dict()["requests"][-1]["slots"][0]["cached_steps"]
        if slope == "gap":
            assert cached == ref_cached, (cached, ref_cached)
    assert (images["gap"] - ref_image).abs().max() < 1e-4
    assert (images["step"] - ref_image).abs().max() > 1e-2


# DMD (cdcompile.calibrators): warm-up 8 gives the fit 6 computed steps a step apart; after it the
# tail of evenly spaced steps breaks and the Taylor fallback (of order 1 or, through cache-dit's
# calibrator_kwargs, 2) forecasts until it holds 4 again. Threshold 0.08 from warm-up 4 computes every
# second step: the fit then forecasts half a spacing ahead. TaylorSeer-1 differs from all of them.
@pytest.mark.parametrize("threshold,warmup,kwargs", [(0.2, 8, {}), (0.2, 8, {"n_derivatives": 2}), (0.08, 4, {})],
                         ids=["warmup8", "fallback_order2", "every_second_step"])
def test_dmd_images_equal_cache_dit_s(threshold, warmup, kwargs):
    cfg = _configs(threshold, 0, warmup)
    calibrator = cache_dit.DMDCalibratorConfig(calibrator_kwargs=kwargs)
    pipe = trained.load_trained_pipeline()
    cache_dit.enable_cache(pipe, cache_config=cfg["cache_config"], calibrator_config=calibrator)
    ref_image = _request(pipe, digit=5, seed=1)
    ref_cached = sorted(int(s) for s in cache_dit.summary(pipe, logging=False)[0].cached_steps)
    torch._dynamo.reset()
    pipe = trained.load_trained_pipeline()
    cdcompile.enable(pipe, compiler="eager", cache_config=cfg["cache_config"], calibrator_config=calibrator)
    image = _request(pipe, digit=5, seed=1)
    cached = cdcompile.summary(pipe.transformer).as_dict()["requests"][-1]["slots"][0]["cached_steps"]
    assert len(ref_cached) >= 8 and cached == ref_cached, (cached, ref_cached)
    assert (image - ref_image).abs().max() < 1e-5
    if threshold == 0.08:
        assert ref_cached == list(range(6, 22, 2))
    torch._dynamo.reset()
    pipe = trained.load_trained_pipeline()
    cdcompile.enable(pipe, compiler="eager", cache_config=cfg["cache_config"],
                     calibrator_config=cache_dit.TaylorSeerCalibratorConfig())
    assert (_request(pipe, digit=5, seed=1) - image).abs().max() > 1e-3


def _prune_parity(cfg: dict) -> list[int]:
    """cache-dit and cdcompile given the same configs: the same blocks pruned at every step, the
    same prune ratio, the same image; returns the blocks pruned per step."""
    pipe = trained.load_trained_pipeline()
    cache_dit.enable_cache(pipe, **cfg)
    ref_image = _request(pipe, digit=3, seed=0)
    stats = cache_dit.summary(pipe, logging=False)[0]

    torch._dynamo.reset()
    pipe = trained.load_trained_pipeline()
    cdcompile.enable(pipe, compiler="eager", **cfg)
    image = _request(pipe, digit=3, seed=0)
    slot = cdcompile.summary(pipe.transformer).as_dict()["requests"][-1]["slots"][0]
    # both branches taken: a block pruned, and one computed after the warmup (5 blocks are prunable)
    assert any(stats.pruned_blocks) and min(stats.pruned_blocks[WARMUP:]) < 5
    assert slot["pruned_blocks"] == list(stats.pruned_blocks)
    assert slot["prune_ratio"] == pytest.approx(stats.pruned_ratio)
    assert (image - ref_image).abs().max() < 1e-4
    return slot["pruned_blocks"]


@pytest.mark.parametrize("dynamic", [False, True])
def test_dbprune_prunes_the_blocks_cache_dit_prunes(dynamic):
    _prune_parity(dict(cache_config=cache_dit.DBPruneConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.1, max_warmup_steps=WARMUP,
        enable_dynamic_prune_threshold=dynamic, num_inference_steps=STEPS)))


# A calibrator forecasts each pruned block's residual from the steps that block computed. Without
# one, threshold 0.2 prunes all 5 prunable blocks or none at each step (0 0 0 0 5 5 5 5 5 0 ...).
@pytest.mark.parametrize("calibrator,warmup,vram", [
    (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1), WARMUP, False),
    (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=2), 6, False),  # (see the TaylorSeer test's note)
    (cache_dit.FoCaCalibratorConfig(), WARMUP, False),
    (cache_dit.DMDCalibratorConfig(), 6, False),
    # M's output for the hidden stream alone, the anchors on every 4th channel
    (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1, enable_encoder_calibrator=False,
                                          calibrator_cache_type="hidden_states"), WARMUP, True),
], ids=["taylorseer1", "taylorseer2", "foca", "dmd", "taylorseer1_hidden_states_vram"])
def test_dbprune_with_a_calibrator_prunes_the_blocks_cache_dit_prunes(calibrator, warmup, vram):
    pruned = _prune_parity(dict(calibrator_config=calibrator, cache_config=cache_dit.DBPruneConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.2, max_warmup_steps=warmup,
        num_inference_steps=STEPS, force_reduce_calibrator_vram=vram)))
    assert set(pruned[warmup:]) - {0, 5}, pruned  # the forecasts change what later blocks see


# Bn=1: the text stream leaves M for the last single block, so what a cached step gives it matters
# (TaylorSeer over M's output: the DBPrune test above, and FoCa here)
CALIBRATED = [(cache_dit.TaylorSeerCalibratorConfig, dict(enable_encoder_calibrator=False)),
              (cache_dit.TaylorSeerCalibratorConfig, dict(enable_calibrator=False)),
              (cache_dit.FoCaCalibratorConfig, dict(calibrator_cache_type="hidden_states",
                                                    enable_encoder_calibrator=False))]


def test_calibrated_streams_and_calibrator_cache_type_give_cache_dits_images():
    def run(system, calibrator):
        cfg = _configs(0.2, 0, WARMUP)
        cfg["cache_config"] = dataclasses.replace(cfg["cache_config"], Bn_compute_blocks=1)
        cfg["calibrator_config"] = calibrator
        torch._dynamo.reset()
        pipe = trained.load_trained_pipeline()
        if system == "cache-dit":
            cache_dit.enable_cache(pipe, **cfg)
        else:
            cdcompile.enable(pipe, compiler="eager", **cfg)
        return _request(pipe, digit=3, seed=0)

    every_stream = {kind: run("cdcompile", kind()) for kind in dict.fromkeys(k for k, _ in CALIBRATED)}
    for kind, flags in CALIBRATED:
        image, ref_image = run("cdcompile", kind(**flags)), run("cache-dit", kind(**flags))
        err = (image - ref_image).abs().max().item()
        assert err < 1e-4, f"{kind.__name__}({flags}): images differ by up to {err:.2e}"
        # the option changes the image (by 5e-3 to 0.11 here): the comparison tells it apart
        assert (image - every_stream[kind]).abs().max() > 1e-3, (kind.__name__, flags)


def test_cache_dits_config_objects_convert_field_by_field():
    cfg = cdcompile.CacheConfig.from_cache_dit(
        cache_dit.DBCacheConfig(Fn_compute_blocks=2, Bn_compute_blocks=1, residual_diff_threshold=0.12,
                                max_accumulated_residual_diff_threshold=0.5, max_cached_steps=10,
                                enable_separate_cfg=True, cfg_compute_first=True, steps_computation_mask="fast",
                                num_inference_steps=28, force_refresh_step_hint=10,
                                cfg_diff_compute_separate=False),
        cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=2), compiler="eager")
    assert (cfg.Fn_compute_blocks, cfg.Bn_compute_blocks, cfg.residual_diff_threshold, cfg.max_cached_steps,
            cfg.max_accumulated_residual_diff_threshold, cfg.steps_computation_mask, cfg.num_inference_steps,
            cfg.calibrator.value, cfg.taylorseer_order, cfg.compiler.value, cfg.force_refresh_step_hint,
            cfg.cfg_diff_compute_separate) == (
        2, 1, 0.12, 10, 0.5, "fast", 28, "taylorseer", 2, "eager", 5, False)  # hint: 10 calls, 2 per step
    assert cdcompile.CacheConfig.from_cache_dit(cache_dit.DBCacheConfig()).Fn_compute_blocks == 8  # cache-dit's
    assert cdcompile.CacheConfig.from_cache_dit(cache_dit.DBCacheConfig(),
                                                cache_dit.FoCaCalibratorConfig()).calibrator.value == "foca"
    for flags, streams in (((True, True), "all"), ((True, False), "hidden"), ((False, True), "encoder"),
                           ((False, False), None)):
        cfg = cdcompile.CacheConfig.from_cache_dit(cache_dit.DBCacheConfig(), cache_dit.FoCaCalibratorConfig(
            enable_calibrator=flags[0], enable_encoder_calibrator=flags[1], calibrator_cache_type="hidden_states"))
        assert (cfg.calibrated_streams, cfg.calibrator_cache_type) == (
            (streams, "hidden_states") if streams else ("all", "residual")), flags
        assert (cfg.calibrator is None) == (streams is None), flags
    prune = cdcompile.CacheConfig.from_cache_dit(cache_dit.DBPruneConfig(
        non_prune_block_ids=[3], enable_dynamic_prune_threshold=True, dynamic_prune_threshold_relax_ratio=1.5,
        max_dynamic_prune_threshold=0.2))
    assert (prune.cache_type.value, prune.non_prune_block_ids, prune.dynamic_prune_threshold_relax_ratio,
            prune.max_dynamic_prune_threshold) == ("dbprune", (3,), 1.5, 0.2)
    dmd = cdcompile.CacheConfig.from_cache_dit(cache_dit.DBCacheConfig(), cache_dit.DMDCalibratorConfig(
        dmd_history=5, dmd_rank=3, dmd_ridge=1e-6, dmd_svd_precision="low", calibrator_kwargs={"n_derivatives": 2}))
    assert (dmd.calibrator.value, dmd.dmd_history, dmd.dmd_rank, dmd.dmd_ridge, dmd.dmd_fallback_order) == (
        "dmd", 5, 3, 1e-6, 2)
    vram = cache_dit.DBPruneConfig(force_reduce_calibrator_vram=True)
    assert cdcompile.CacheConfig.from_cache_dit(vram, cache_dit.FoCaCalibratorConfig()).downsample_factor == 4
    with pytest.warns(UserWarning, match="force_reduce_calibrator_vram=True does nothing without a calibrator_config"):
        assert cdcompile.CacheConfig.from_cache_dit(vram).downsample_factor == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(cache_config=cache_dit.DBCacheConfig(force_refresh_step_hint=9, enable_separate_cfg=True)),
     r"force_refresh_step_hint=9 has no counterpart here: with enable_separate_cfg=True cache-dit refreshes "
     r"between the two CFG calls of step 4; .* use 8 or 10 transformer calls"),
    (dict(cache_config=cache_dit.DBCacheConfig(),
          calibrator_config=cache_dit.TaylorSeerCalibratorConfig(calibrator_cache_type="hidden")),
     r"calibrator_cache_type='hidden' has no counterpart here: 'residual' or 'hidden_states'"),
    (dict(cache_config=cache_dit.DBCacheConfig(), calibrator_config=cache_dit.DMDCalibratorConfig(
        dmd_svd_precision="exact")), r"dmd_svd_precision='exact'.*\"low\", \"medium\" or \"high\""),
    (dict(cache_config=cache_dit.DBCacheConfig(), calibrator_config=cache_dit.TaylorSeerCalibratorConfig(
        calibrator_kwargs={"n_derivatives": 2})), r"calibrator_kwargs=.*overrides it with taylorseer_order"),
    (dict(cache_config=cache_dit.DBCacheConfig(), calibrator_config=cache_dit.DMDCalibratorConfig(
        calibrator_kwargs={"n_derivatives": 2, "window": 3})), r"calibrator_kwargs=\{'window': 3\}.*change nothing"),
])
def test_what_cache_dits_configs_hold_without_a_counterpart_is_a_value_error_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cdcompile.CacheConfig.from_cache_dit(**kwargs)


def test_a_refresh_hint_without_enable_separate_cfg_warns_that_it_counts_steps():
    with pytest.warns(UserWarning, match=r"force_refresh_step_hint=10 is taken as denoising steps.*"
                                         r"set enable_separate_cfg to say which"):
        cfg = cdcompile.CacheConfig.from_cache_dit(cache_dit.DBCacheConfig(force_refresh_step_hint=10))
    assert cfg.force_refresh_step_hint == 10


def test_enable_takes_cache_dits_config_keywords_and_needs_a_cache_config_for_a_calibrator():
    pipe = trained.load_trained_pipeline()
    with pytest.raises(ValueError, match="calibrator_config needs a cache_config"):
        cdcompile.enable(pipe, calibrator_config=cache_dit.TaylorSeerCalibratorConfig())
    with pytest.raises(TypeError, match="must be a cache-dit config instance"):
        cdcompile.enable(pipe, cache_config={"Fn_compute_blocks": 1})


def _wan22_cache_dit_keywords() -> dict:
    """cache-dit's Wan 2.2 recipe: a shared DBCacheConfig, and one ParamsModifier per transformer
    (cache-dit's ``reset`` leaves every other field None, so the shared value stands)."""
    return dict(cache_config=cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                     residual_diff_threshold=0.3, max_warmup_steps=2),
                params_modifiers=[
                    cache_dit.ParamsModifier(cache_config=cache_dit.DBCacheConfig().reset(
                        max_warmup_steps=1, residual_diff_threshold=0.5)),
                    cache_dit.ParamsModifier(cache_config=cache_dit.DBCacheConfig().reset(max_warmup_steps=3))])


def test_params_modifiers_set_each_transformer_of_a_two_expert_pipeline_apart_as_in_cache_dit():
    """Wan 2.2 (`transformer` on the high-noise steps, `transformer_2` on the rest) with cache-dit's
    params_modifiers: each transformer caches the steps cache-dit caches (both CFG slots), and the
    latents agree."""
    from cdcompile.testing import tiny_wan22_pipeline, wan22_latents

    pipe = tiny_wan22_pipeline()
    cache_dit.enable_cache(pipe, **_wan22_cache_dit_keywords())
    theirs = wan22_latents(pipe)
    stats = {s.cache_options["cache_config"].max_warmup_steps: s for s in cache_dit.summary(pipe, logging=False)}
    expected = {"transformer": stats[1], "transformer_2": stats[3]}  # the modifiers' warmups tell them apart

    pipe = tiny_wan22_pipeline()
    cdcompile.enable(pipe, compiler="eager", **_wan22_cache_dit_keywords())
    ours = wan22_latents(pipe)
    for name, their in expected.items():
        slots = cdcompile.summary(getattr(pipe, name)).as_dict()["requests"][-1]["slots"]
        assert [s["cached_steps"] for s in slots] == [sorted(their.cached_steps), sorted(their.cfg_cached_steps)], name
    assert expected["transformer"].cached_steps and expected["transformer_2"].cached_steps  # both cache something
    assert sorted(expected["transformer"].cached_steps) != sorted(expected["transformer_2"].cached_steps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_params_modifiers_become_transformer_options_under_the_callers_own():
    from cdcompile.pipeline import _cache_dit_keywords, _configs, transformer_names
    from cdcompile.testing import tiny_wan22_pipeline

    pipe = tiny_wan22_pipeline()
    names = transformer_names(pipe)
    shared, per = _cache_dit_keywords(pipe, names, {"compiler": "eager", **_wan22_cache_dit_keywords()},
                                      {"transformer_2": {"max_warmup_steps": 5}})
    configs = _configs(pipe, names, shared, per)
    got = {n: (c.max_warmup_steps, c.residual_diff_threshold, c.Fn_compute_blocks, c.compiler.value)
           for n, c in configs.items()}
    assert got == {"transformer": (1, 0.5, 1, "eager"), "transformer_2": (5, 0.3, 1, "eager")}
    # a modifier with a calibrator and no cache config: applied here, dropped by cache-dit 1.5.3 (warned)
    modifiers = [cache_dit.ParamsModifier(calibrator_config=cache_dit.FoCaCalibratorConfig())]
    with pytest.warns(UserWarning, match="cache-dit 1.5.3 ignores such a modifier"):
        shared, per = _cache_dit_keywords(pipe, names, {"cache_config": cache_dit.DBCacheConfig(),
                                                        "params_modifiers": modifiers}, None)
    configs = _configs(pipe, names, shared, per)
    assert (configs["transformer"].calibrator.value, configs["transformer_2"].calibrator) == ("foca", None)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(params_modifiers=[cache_dit.ParamsModifier(cache_config=cache_dit.DBCacheConfig())] * 3), ValueError,
     r"gives 3 ParamsModifiers, but the pipeline's transformers are \['transformer', 'transformer_2'\]"),
    (dict(params_modifiers=[[cache_dit.ParamsModifier(cache_config=cache_dit.DBCacheConfig())] * 2]), ValueError,
     r"gives 2 ParamsModifiers for one transformer; its block groups share one cache decision"),
    (dict(params_modifiers=[{"max_warmup_steps": 2}]), TypeError, r"takes cache-dit's ParamsModifier objects"),
    (dict(cache_config=cache_dit.DBCacheConfig(), quantize_config=object()), ValueError,
     r"quantize_config has no counterpart here: quantize the transformer with torchao before enable"),
    (dict(cache_config=cache_dit.DBCacheConfig(), attention_backend="flash"), ValueError,
     r"attention_backend='flash' has no counterpart here: .*set_attention_backend"),
    (dict(parallelism_config=cache_dit.ParallelismConfig(ring_size=2)), ValueError,
     r"parallelism_config.ring_size=2 has no counterpart here: ring attention is not implemented"),
    (dict(parallelism_config=cache_dit.ParallelismConfig(ulysses_size=2), residual_diff_threshold=0.1), ValueError,
     r"parallelism_config without a cache_config compiles without the cache.*\['residual_diff_threshold'\]"),
])
def test_cache_dits_other_enable_keywords_convert_or_say_what_to_do(kwargs, error, match):
    from cdcompile.testing import tiny_wan22_pipeline

    pipe = tiny_wan22_pipeline()
    with pytest.raises(error, match=match):
        cdcompile.enable(pipe, **kwargs)
    assert not getattr(pipe, "_cdcompile_enabled", False)


def test_enable_says_what_to_pass_instead_of_a_block_adapter_or_a_bare_transformer():
    from cdcompile.testing import tiny_wan22_pipeline

    pipe = tiny_wan22_pipeline()
    adapter = cache_dit.BlockAdapter(pipe=pipe, transformer=pipe.transformer, blocks=pipe.transformer.blocks,
                                     forward_pattern=cache_dit.ForwardPattern.Pattern_2)
    with pytest.raises(ValueError, match=r"BlockAdapter is not needed: pass its pipeline, "
                                         r"cdcompile.enable\(adapter.pipe, ...\)"):
        cdcompile.enable(adapter, cache_config=cache_dit.DBCacheConfig())
    with pytest.raises(ValueError, match=r"WanTransformer3DModel has no `transformer` module to compile: enable takes "
                                         r"a pipeline; compile a transformer with torch.compile\(model, "
                                         r"backend='cachedit'"):
        cdcompile.enable(pipe.transformer, cache_config=cache_dit.DBCacheConfig())
    assert pipe.transformer._compiled_call_impl is None


def test_enable_takes_what_cache_dits_load_configs_reads_and_its_native_attention_backend():
    from cdcompile.pipeline import _cache_dit_keywords, _configs, transformer_names
    from cdcompile.testing import tiny_wan22_pipeline

    pipe = tiny_wan22_pipeline()
    names = transformer_names(pipe)
    loaded = cache_dit.load_configs({"cache_config": dict(
        Fn_compute_blocks=1, residual_diff_threshold=0.12, max_warmup_steps=3, enable_taylorseer=True,
        taylorseer_order=2), "attention_backend": "native"})
    assert loaded["attention_backend"] == "native"
    configs = _configs(pipe, names, *_cache_dit_keywords(pipe, names, dict(loaded), None))
    for cfg in configs.values():
        assert (cfg.Fn_compute_blocks, cfg.residual_diff_threshold, cfg.max_warmup_steps, cfg.calibrator.value,
                cfg.taylorseer_order, cfg.calibrated_streams) == (1, 0.12, 3, "taylorseer", 2, "hidden")
    pipe.transformer_2.set_attention_backend("_native_math")
    with pytest.raises(ValueError, match=r"attention_backend='native' has no counterpart here \(the transformers "
                                         r"run \['_native_math', 'native'\]\)"):
        cdcompile.enable(pipe, **loaded)


def test_cache_dits_parallelism_config_converts_to_ulysses_options():
    convert = cdcompile.CacheConfig.from_cache_dit
    cfg = convert(cache_dit.DBCacheConfig(), parallelism_config=cache_dit.ParallelismConfig(
        ulysses_size=4, ulysses_float8=True, ulysses_async=True, ulysses_anything=True))
    assert (cfg.enable_cache, cfg.ulysses_degree, cfg.ulysses_fp8, cfg.ulysses_async) == (True, 4, True, True)
    alone = convert(None, parallelism_config=cache_dit.ParallelismConfig(ulysses_size=2), compiler="eager")
    assert (alone.enable_cache, alone.ulysses_degree, alone.ulysses_fp8) == (False, 2, False)  # as cache-dit: no cache
    assert convert(None, parallelism_config=cache_dit.ParallelismConfig(ulysses_size=2),
                   enable_cache=True, residual_diff_threshold=0.1).enable_cache
    for fields, bad, match in ((dict(tp_size=2), "tp_size=2", "tensor parallelism is not implemented here"),
                               (dict(ulysses_size=2, extra_parallel_modules=["vae"]),
                                r"extra_parallel_modules=\['vae'\]", "cdcompile shards the transformers alone"),
                               (dict(ulysses_size=2, attention_backend="sage"), "attention_backend='sage'",
                                "fp8_attention=True")):
        with pytest.raises(ValueError, match=rf"parallelism_config.{bad} has no counterpart here: .*{match}"):
            convert(None, parallelism_config=cache_dit.ParallelismConfig(**fields))
