"""The committed trained tiny FLUX (cdcompile.trained): loads offline, follows its caption, and its
DBCache signal behaves like a real DiT's, so real thresholds cache some steps but not all."""

import socket
import statistics

import pytest
import torch

import cdcompile
from cdcompile import trained


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return trained.load_trained_pipeline()


def _generate(pipe, digit, colour=None, background=None, *, steps, seed=0):
    out = pipe(**trained.class_prompt(digit, colour, background), num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images[0]  # (3, H, W) in [0, 1]


def test_weights_load_with_no_network_and_fit_the_size_budget(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading the trained model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained._checkpoint.cache_clear()
    model = trained.load_trained_transformer()
    pipe = trained.load_trained_pipeline()
    assert trained.WEIGHTS.stat().st_size <= 20_000_000
    assert type(model).__name__ == "FluxTransformer2DModel" and not model.training
    assert len(model.transformer_blocks) >= 1 and len(model.single_transformer_blocks) >= 1
    meta = trained.metadata()
    assert meta["training"]["seed"] == 0 and meta["training"]["final_loss_last200_mean"] > 0
    assert pipe.vae_scale_factor == meta["codec"]["factor"]
    assert pipe.default_sample_size * pipe.vae_scale_factor == meta["image_size"]


def test_pixel_codec_round_trips_exactly():
    codec = trained.PixelCodec(factor=2)
    x = torch.rand(2, 3, 8, 12)
    z = codec.encode(x)
    assert z.shape == (2, 12, 4, 6)
    assert torch.equal(codec.decode(z, return_dict=False)[0], x)
    assert torch.equal(codec.decode(z).sample, x)


def test_bad_caption_raises_value_error_naming_choices():
    with pytest.raises(ValueError, match="bad colour 'teal'"):
        trained.class_prompt(3, colour="teal")


@pytest.mark.parametrize("digit,colour,background", [(4, "red", "navy"), (0, "green", "maroon")])
def test_generation_is_deterministic_and_follows_colour_and_background(pipe, digit, colour, background):
    a = _generate(pipe, digit, colour, background, steps=12)
    b = _generate(pipe, digit, colour, background, steps=12)
    assert torch.equal(a, b)
    rgb = a.reshape(3, -1)
    ink = rgb[:, rgb.sum(0) >= rgb.sum(0).quantile(0.9)].mean(1)  # brightest 10 % of pixels
    border = torch.cat([a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]], dim=1).mean(1)
    want_ink, want_bg = torch.tensor(trained.COLOURS[colour]), torch.tensor(trained.BACKGROUNDS[background])
    # measured: ink within 0.19 (edges blend into the background), border within 0.01
    assert (ink - want_ink).abs().max() < 0.25, f"ink {ink.tolist()} vs {colour} {want_ink.tolist()}"
    assert (border - want_bg).abs().max() < 0.05, f"border {border.tolist()} vs {background} {want_bg.tolist()}"


def _run_cached(pipe, threshold, warmup, steps=28):
    torch._dynamo.reset()
    p = trained.load_trained_pipeline(transformer=pipe.transformer)
    cdcompile.enable(p, compiler="eager", Fn_compute_blocks=1, Bn_compute_blocks=0,
                     residual_diff_threshold=threshold, max_warmup_steps=warmup)
    image = _generate(p, 7, steps=steps, seed=1)
    request = cdcompile.summary(p.transformer).as_dict()["requests"][-1]
    assert request["steps"] == steps
    return image, request["slots"][0]


def test_residual_diffs_lie_in_the_range_real_dits_show(pipe):
    # threshold 0: every step computes, so each diff compares consecutive steps. Measured: median
    # 0.078, range 0.04-0.24 (cache-dit's FLUX logs: ~0.05-0.3); random weights: median 0.44.
    _, slot = _run_cached(pipe, 0.0, 0)
    diffs = list(slot["residual_diffs"].values())
    assert len(diffs) == 27 and slot["cached_steps"] == []
    median = statistics.median(diffs)
    assert 0.03 < median < 0.2, f"median residual diff {median:.3f}: {[round(d, 3) for d in diffs]}"
    assert max(diffs) < 0.5


def test_a_real_threshold_caches_some_steps_but_not_all(pipe):
    reference = _generate(pipe, 7, steps=28, seed=1)
    image, slot = _run_cached(pipe, 0.1, 4)
    cached = slot["cached_steps"]  # measured: 8 steps, 6, 8, ..., 20
    assert 0 < len(cached) < 24, cached
    assert min(cached) >= 4  # warm-up
    mse = float(((image - reference) ** 2).mean())
    assert 0 < mse < 1e-3, f"cached image MSE {mse} against the uncached one (PSNR >= 30 dB expected)"
