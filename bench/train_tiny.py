"""Train the small FLUX-architecture DiT of ``cdcompile.trained`` on coloured digits (CPU, minutes).

    python bench/train_tiny.py                 # the committed run: seed 0, 1 thread, <= 18 minutes
    python bench/train_tiny.py --steps 200 --out /tmp/t.safetensors --json /tmp/t.json   # a smoke run

Data: scikit-learn's bundled 8x8 digits (1797 images, no download), upscaled bicubically to 24x24,
placed on a 32x32 canvas with a random shift of up to 2 pixels, and coloured with a random
foreground colour and background; the caption names the digit, colour and background, and each
field is dropped to "any" at random (so the model samples free fields, and true CFG works).

Objective: rectified flow as FLUX trains it. ``x_t = (1 - t) x0 + t eps``; the transformer,
given ``x_t`` and ``t`` (FluxPipeline's ``timestep / 1000`` convention, so t in [0, 1]), predicts
``eps - x0``; MSE loss. ``t`` is logit-normal (``sigmoid(N(0, 1))``), mixed with 10 % uniform so the
ends of the schedule are trained too, then shifted like the sampler's sigmas (``3t / (1 + 2t)``).
Modulation and output layers start at zero (DiT's adaLN-Zero). AdamW with linear warm-up and
cosine decay, gradient clipping and an EMA of the weights (the EMA weights are saved).

The run stops after ``--steps`` steps or ``--minutes`` of wall time, whichever comes first (the
JSON says which). Given the seed and thread count a run is reproducible; one the clock stopped is
replayed with ``--stop-after <its steps> --minutes 60``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdcompile import trained  # noqa: E402

MODEL = dict(patch_size=1, in_channels=48, out_channels=None, num_layers=2, num_single_layers=4,
             attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
             pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
# in_channels = 3 colours * codec_factor**2 (the codec's latent channels) * 4 (FluxPipeline packs 2x2)
SAMPLING_SHIFT = 3.0  # FlowMatchEulerDiscreteScheduler(shift=...) the pipeline samples with


class Digits:
    """Coloured, shifted 32x32 digits with their caption tokens, drawn from one generator."""

    def __init__(self, generator: torch.Generator, size: int):
        from sklearn.datasets import load_digits

        d = load_digits()
        glyphs = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        inner, margin = size * 3 // 4, size // 8
        glyphs = F.interpolate(glyphs, size=(inner, inner), mode="bicubic", align_corners=False).clamp(0, 1)
        self.glyphs = F.pad(glyphs, (margin,) * 4)  # size x size
        self.max_shift = size // 16
        self.labels = torch.tensor(d.target, dtype=torch.int64)
        self.colours = torch.tensor(list(trained.COLOURS.values()))
        self.backgrounds = torch.tensor(list(trained.BACKGROUNDS.values()))
        self.g = generator

    def sample(self, batch: int, drop_field: float = 0.1, drop_all: float = 0.1):
        """Images (B, 3, 32, 32) in [-1, 1] and caption token rows (B, 3)."""
        g = self.g
        idx = torch.randint(len(self.labels), (batch,), generator=g)
        col = torch.randint(len(self.colours), (batch,), generator=g)
        bg = torch.randint(len(self.backgrounds), (batch,), generator=g)
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (batch, 2), generator=g)
        alpha = torch.stack([torch.roll(self.glyphs[i], (int(dy), int(dx)), dims=(1, 2))
                             for i, (dy, dx) in zip(idx.tolist(), shifts)])
        fg_rgb = self.colours[col][:, :, None, None]
        bg_rgb = self.backgrounds[bg][:, :, None, None]
        images = (bg_rgb + (fg_rgb - bg_rgb) * alpha) * 2 - 1

        tokens = torch.tensor([trained.caption_tokens(int(self.labels[i]), list(trained.COLOURS)[c],
                                                      list(trained.BACKGROUNDS)[b])
                               for i, c, b in zip(idx.tolist(), col.tolist(), bg.tolist())])
        any_row = torch.tensor(trained.caption_tokens())
        drop = (torch.rand(batch, 3, generator=g) < drop_field) | (torch.rand(batch, 1, generator=g) < drop_all)
        return images, torch.where(drop, any_row, tokens)


def pack(z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, H, W) -> FluxPipeline's token layout (B, H/2 * W/2, 4C)."""
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def image_ids(latent_side: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, latent_side // 2, latent_side // 2, "cpu", torch.float32)


def adaln_zero_(model) -> None:
    """DiT's adaLN-Zero: zero the modulation and output layers, so every block starts as the
    identity (its gates are 0) and the model predicts 0; it trains markedly faster than
    diffusers' default init."""
    modulation = ("norm1.linear", "norm1_context.linear", "norm.linear")  # double / single blocks
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.endswith(modulation)
                                                    or name in ("norm_out.linear", "proj_out")):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def sample_t(batch: int, g: torch.Generator, shift: float) -> torch.Tensor:
    """Shifted logit-normal (SD3/FLUX), 10 % uniform: the shift moves training to the noise levels
    where the sampler (same shift) spends its steps and where the digit's shape is decided."""
    t = torch.sigmoid(torch.randn(batch, generator=g))
    t = torch.where(torch.rand(batch, generator=g) < 0.1, torch.rand(batch, generator=g), t)
    return shift * t / (1 + (shift - 1) * t)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def flow_loss(model, caption, codec, shift, scale, images, tokens, t, noise, ids, txt_ids):
    x0 = pack((codec.encode(images) - shift) * scale)
    xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
    embeds, pooled = trained.caption_embeddings(tokens, caption)
    pred = model(hidden_states=xt, encoder_hidden_states=embeds, pooled_projections=pooled,
                 timestep=t, img_ids=ids, txt_ids=txt_ids, return_dict=False)[0]
    return F.mse_loss(pred, noise - x0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=18.0, help="wall-clock cap on the training loop")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after this many steps, keeping the --steps schedule (replays a time-capped run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=trained.IMAGE_SIZE)
    ap.add_argument("--codec-factor", type=int, default=2)
    ap.add_argument("--heads", type=int, default=MODEL["num_attention_heads"], help="width = 32 * heads")
    # 1 thread: on the shared 2-core machine, 2 threads beside another job ran ~4x slower per step.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/assets/tiny_flux_digits.safetensors")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/train_tiny.json")
    args = ap.parse_args()

    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    import diffusers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model_cfg = {**MODEL, "in_channels": 3 * args.codec_factor ** 2 * 4, "num_attention_heads": args.heads}
    data = Digits(g, args.image_size)

    # Latent normalisation (scalar, like a VAE's shift_factor/scaling_factor): zero mean, unit std.
    codec = trained.PixelCodec(factor=args.codec_factor)
    probe = codec.encode(data.sample(2048, 0, 0)[0])
    shift, scale = probe.mean().item(), 1.0 / probe.std().item()
    codec_cfg = {"factor": args.codec_factor, "image_channels": 3, "scaling_factor": scale,
                 "shift_factor": shift}
    codec = trained.PixelCodec(**codec_cfg)

    model = FluxTransformer2DModel(**model_cfg).train()
    adaln_zero_(model)
    caption = torch.nn.Parameter(torch.randn(trained.vocabulary_size(), model_cfg["joint_attention_dim"]))
    params = [*model.parameters(), caption]
    ema_model, ema_caption = copy.deepcopy(model).eval(), caption.detach().clone()
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ids = image_ids(args.image_size // args.codec_factor)
    txt_ids = torch.zeros(3, 3)
    n_params = sum(p.numel() for p in params)
    print(f"{n_params / 1e6:.2f}M parameters, latent shift {shift:.4f} scale {scale:.4f}", flush=True)

    losses, curve = [], []
    start = time.perf_counter()
    stopped_by, step = "steps", 0
    for step in range(args.steps):
        if time.perf_counter() - start > args.minutes * 60:
            stopped_by = "time"
            break
        if args.stop_after is not None and step >= args.stop_after:
            stopped_by = "stop_after"
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        images, tokens = data.sample(args.batch)
        t = sample_t(args.batch, g, SAMPLING_SHIFT)
        noise = torch.randn(args.batch, ids.shape[0], model_cfg["in_channels"], generator=g)
        loss = flow_loss(model, caption, codec, shift, scale, images, tokens, t, noise, ids, txt_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_model.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
            ema_caption.lerp_(caption.detach(), 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            recent = sum(losses[-50:]) / 50
            curve.append({"step": step + 1, "loss": round(recent, 5),
                          "seconds": round(time.perf_counter() - start, 1)})
            print(f"step {step + 1:5d}  loss {recent:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.perf_counter() - start:6.0f} s", flush=True)
    else:
        step = args.steps
    train_seconds = time.perf_counter() - start

    # A fixed held-out batch (its own generator): the EMA model's loss on it is reproducible.
    eg = torch.Generator().manual_seed(12345)
    edata = Digits(eg, args.image_size)
    with torch.no_grad():
        images, tokens = edata.sample(512, 0, 0)
        t = (torch.arange(512) + 0.5) / 512
        noise = torch.randn(512, ids.shape[0], model_cfg["in_channels"], generator=eg)
        eval_loss = flow_loss(ema_model, ema_caption, codec, shift, scale, images, tokens, t, noise,
                              ids, txt_ids).item()

    final = sum(losses[-200:]) / max(1, len(losses[-200:]))
    record = {
        "steps": step, "planned_steps": args.steps, "stopped_by": stopped_by,
        "train_seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / max(1, step), 3),
        "final_loss_last200_mean": round(final, 5), "eval_loss_ema_fixed_batch": round(eval_loss, 5),
        "seed": args.seed, "threads": args.threads, "batch": args.batch, "lr": args.lr,
        "warmup": args.warmup, "ema": args.ema, "parameters": n_params,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    meta = {"transformer": {k: list(v) if isinstance(v, tuple) else v for k, v in model_cfg.items()},
            "codec": codec_cfg, "image_size": args.image_size, "sampling": {"shift": SAMPLING_SHIFT},
            "vocabulary": {name: list(values) for name, values in trained.FIELDS},
            "training": record}
    tensors = {f"transformer.{k}": v.contiguous() for k, v in ema_model.state_dict().items()}
    tensors["caption.weight"] = ema_caption.contiguous()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata={"cdcompile": json.dumps(meta)})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**meta, "loss_curve": curve}, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {args.json}")


if __name__ == "__main__":
    main()
