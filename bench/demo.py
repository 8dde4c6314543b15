"""``make demo``: a small FLUX pipeline, built locally, run eager, with torch.compile and with cachedit.

    python bench/demo.py

No downloads: a diffusers ``FluxPipeline`` around a toy FLUX transformer and a toy VAE with random
weights, fed random prompt embeddings (no text encoders). Each configuration gets a fresh
pipeline and a fresh Dynamo (``torch._dynamo.reset()``): instances of one model class can
share compiled code. Per configuration: one warm-up request (compiles), then the median
time of ``REPEATS`` requests, the steps the cache skipped (``cdcompile.summary``) and the largest
difference of the decoded image against eager.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".inductor-cache"))

import torch  # noqa: E402

import cdcompile  # noqa: E402
from cdcompile.testing import tiny_flux  # noqa: E402

SIZE = 96  # pixels: VAE scale 2 -> 48x48 latents, 2x2 patches -> 576 image tokens (~1 s eager per request idle)
TEXT_TOKENS = 32
STEPS = 28
REPEATS = 3
SEED = 0
# Random weights change F's residual by 0.3-0.55 from step to step (`cdcompile.summary`'s
# residual_diffs on this model), far above the 0.08 a trained FLUX uses; nothing would cache.
# 0.45 lets the cache skip some steps here (10 of 28 with 4 warmup steps), which is all this demo
# shows: the cache runs end to end inside a diffusers pipeline.
CACHE_OPTIONS = dict(residual_diff_threshold=0.45, max_warmup_steps=4, Fn_compute_blocks=1, Bn_compute_blocks=0)


def build_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux(num_layers=2, num_single_layers=4, heads=4, head_dim=32, seed=SEED)
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=transformer.config.in_channels // 4,  # FLUX packs 2x2 latent patches
        norm_num_groups=4, sample_size=SIZE, shift_factor=0.0609, scaling_factor=1.5035,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt(pipe) -> dict:
    g = torch.Generator().manual_seed(SEED)
    cfg = pipe.transformer.config
    return dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g))


def generate(pipe, embeds: dict) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**embeds, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(SEED), output_type="pt").images


def measure(name: str, setup) -> dict:
    torch._dynamo.reset()
    pipe = setup(build_pipeline())
    embeds = prompt(pipe)
    t0 = time.perf_counter()
    image = generate(pipe, embeds)
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        image = generate(pipe, embeds)
        times.append(time.perf_counter() - t0)
    requests = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    cached = requests[-1]["slots"][0]["cached_steps"] if requests else []
    print(f"  {name}: warm-up {warmup:.1f} s, requests {', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    return dict(name=name, seconds=statistics.median(times), cached=cached, image=image)


def main() -> int:
    torch.manual_seed(SEED)
    print(f"FLUX pipeline, random weights: 2 double + 4 single blocks (4 heads x 32), {SIZE}x{SIZE} image "
          f"({(SIZE // 4) ** 2} image + {TEXT_TOKENS} text tokens), {STEPS} steps, {torch.get_num_threads()} threads")
    rows = [
        measure("eager", lambda pipe: pipe),
        measure("torch.compile (inductor)", _compile_inductor),
        measure(f"cachedit (threshold {CACHE_OPTIONS['residual_diff_threshold']})",
                lambda pipe: cdcompile.enable(pipe, **CACHE_OPTIONS)),
    ]
    eager = rows[0]
    print()
    print(f"{'configuration':<28} {'s / request':>11} {'speedup':>8} {'cached':>7}  max|image - eager|")
    for r in rows:
        diff = (r["image"] - eager["image"]).abs().max().item()
        print(f"{r['name']:<28} {r['seconds']:>11.2f} {eager['seconds'] / r['seconds']:>7.2f}x "
              f"{len(r['cached']):>3}/{STEPS:<3}  {diff:.2e}")
    cached = rows[-1]["cached"]
    print(f"\ncachedit skipped the middle blocks at steps {cached}.")
    print("Random weights: the threshold is tuned to this model and the image difference only shows that "
          "steps were skipped; quality numbers need a trained model.")
    return 0


def _compile_inductor(pipe):
    pipe.transformer = torch.compile(pipe.transformer)
    return pipe


if __name__ == "__main__":
    sys.exit(main())
