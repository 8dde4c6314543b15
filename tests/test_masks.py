"""Steps computation masks: presets, scaling, static and dynamic policies inside the graph."""

import pytest
import torch

import cdcompile
from cdcompile.masks import build_mask
from cdcompile.testing import SequentialDiT, flux_prompt, tiny_flux_pipeline

PRESET_28 = {
    "slow": "1111111101110011100110010001",
    "medium": "1111110110001100011000110001",
    "fast": "1111110100010000100000100001",
    "ultra": "1111001000001000000100000001",
}


@pytest.mark.parametrize("name", list(PRESET_28))
def test_28_step_presets_are_the_reference_strings(name):
    assert "".join(map(str, build_mask(name, 28))) == PRESET_28[name]


@pytest.mark.parametrize("name", list(PRESET_28))
@pytest.mark.parametrize("steps", [12, 20, 50])
def test_presets_scale_keep_the_first_bin_computed_and_always_compute_the_last_step(name, steps):
    mask = build_mask(name, steps)
    assert len(mask) == steps and mask[0] == 1 and mask[-1] == 1
    # fewer computed steps for faster presets, at any step count
    order = ["slow", "medium", "fast", "ultra"]
    counts = [sum(build_mask(n, steps)) for n in order]
    assert counts == sorted(counts, reverse=True)


def test_explicit_bins_and_bad_masks():
    assert build_mask({"compute_bins": [2, 1], "cache_bins": [3]}, None) == [1, 1, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="one more compute bin"):
        build_mask({"compute_bins": [2], "cache_bins": [3]}, None)
    with pytest.raises(ValueError, match="needs the request's step count"):
        build_mask("fast", None)


def _run(mask, policy, steps=12, threshold=0.15, warmup=0, requests=1, **extra):
    m = SequentialDiT(depth=5)
    opts = {"compiler": "eager", "steps_computation_mask": mask, "steps_computation_policy": policy,
            "residual_diff_threshold": threshold, "max_warmup_steps": warmup, "num_inference_steps": steps, **extra}
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=opts)
    x = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0))
    d = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for _ in range(requests):
            for s in range(steps):
                c(x + 0.05 * s * d, torch.full((2,), 1.0 - s / steps))
    return cdcompile.summary(m).as_dict()["requests"]


def test_static_policy_caches_exactly_the_zeros():
    mask = [1, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 1]
    (req,) = _run(mask, "static", threshold=0.0)  # the threshold is not consulted
    assert req["slots"][0]["cached_steps"] == [s for s, b in enumerate(mask) if b == 0]


def test_dynamic_policy_caches_a_subset_of_the_zeros_decided_by_the_guard():
    mask = build_mask("fast", 12)
    (dyn,) = _run("fast", "dynamic", threshold=0.15)
    (stat,) = _run("fast", "static")
    (free,) = _run(None, "dynamic", threshold=0.15)
    zeros = {s for s, b in enumerate(mask) if b == 0}
    cached = set(dyn["slots"][0]["cached_steps"])
    assert cached <= zeros and cached < set(stat["slots"][0]["cached_steps"]) == zeros
    assert cached and set(free["slots"][0]["cached_steps"]) - zeros, "the mask must have forced computes"


def test_steps_past_an_explicit_mask_count_as_cacheable():
    (req,) = _run([1, 1, 1], "static", steps=6)
    assert req["slots"][0]["cached_steps"] == [3, 4, 5]


@pytest.mark.parametrize("policy,cached", [("once", [2, 3, 6, 7, 8, 9]), ("repeat", [2, 3, 6, 7])])
def test_the_mask_counts_again_from_a_refresh(policy, cached):
    # a context that begins at step 4 (and 8) computes its mask's first two steps, as a request would
    (req,) = _run([1, 1, 0, 0, 0], "static", steps=10, force_refresh_step_hint=4, force_refresh_step_policy=policy)
    assert req["steps"] == 10 and req["slots"][0]["cached_steps"] == cached


def test_preset_without_step_count_is_a_clear_error():
    m = SequentialDiT(depth=3)
    c = torch.compile(m, backend="cachedit", options={"compiler": "eager", "steps_computation_mask": "fast"})
    with pytest.raises(Exception) as info:
        c(torch.randn(1, 10, 8), torch.tensor([0.5]))
    assert "num_inference_steps" in str(info.value)


def test_enable_builds_the_preset_for_each_calls_step_count():
    pipe = tiny_flux_pipeline()
    prompt = flux_prompt(pipe.transformer)
    cdcompile.enable(pipe, compiler="eager", steps_computation_mask="fast",
                     steps_computation_policy="static", max_warmup_steps=0)
    with torch.no_grad():
        for steps in (12, 16):
            pipe(**prompt, height=32, width=32, num_inference_steps=steps, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    reqs = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    for req, steps in zip(reqs, (12, 16)):
        zeros = [s for s, b in enumerate(build_mask("fast", steps)) if b == 0]
        assert req["steps"] == steps and req["slots"][0]["cached_steps"] == zeros
