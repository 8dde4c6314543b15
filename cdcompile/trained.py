"""A small trained FLUX-architecture DiT (coloured digits), loaded from the repository with no network.

Why it exists: block caching trades quality for speed, and that trade only shows on a model whose
denoising trajectory is realistic. Random weights change their first block's residual by 20-50 %
per step, so nothing caches at real thresholds; this model was trained (``bench/train_tiny.py``)
so that its residual diffs behave like a real DiT's.

What it is:

- transformer: ``diffusers.FluxTransformer2DModel`` (double- and single-stream blocks, joint
  attention, 3-axis rotary embeddings), trained with rectified flow on 32x32 RGB images of
  scikit-learn's bundled 8x8 digits, upscaled, shifted and coloured.
- latent space = pixel space. The "VAE" is :class:`PixelCodec`, a fixed, exact and parameter-free
  2x2 pixel (un)shuffle: a 3x32x32 image in [-1, 1] is a 12x16x16 latent, which ``FluxPipeline``
  packs 2x2 into 64 tokens of 48 channels. A learned VAE would only run once after the denoising
  loop, so it does nothing for the caching question; leaving it out keeps training inside the CPU
  budget, and makes pixel metrics measure the transformer alone.
- caption: three tokens ``[digit, colour, background]``, each field with its own vocabulary plus an
  "any" entry (trained by dropping fields), embedded by a learned table saved with the weights.
  ``pooled_prompt_embeds`` is the mean of the three token embeddings.

The weights file (``bench/assets/tiny_flux_digits.safetensors``) holds ``transformer.*`` (EMA
weights), ``caption.weight`` and, in its metadata under ``"cdcompile"``, a JSON document with the
transformer config, the codec config, the vocabulary, the sampling shift and the training record.

    pipe = load_trained_pipeline()
    image = pipe(**class_prompt(7, colour="red", cfg_scale=3.0), num_inference_steps=28,
                 generator=torch.Generator().manual_seed(0)).images[0]      # a 32x32 PIL image

Samples: ``bench/results/tiny_flux_samples.png`` (CFG 3). Without CFG (one transformer call per
step) colours and backgrounds follow the caption but the digit is right for some seeds only.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin

WEIGHTS = Path(__file__).resolve().parents[1] / "bench" / "assets" / "tiny_flux_digits.safetensors"

IMAGE_SIZE = 32
DIGITS = tuple(str(d) for d in range(10))
# name -> RGB in [0, 1]; foreground colours are bright, backgrounds dark, so every pair contrasts.
COLOURS = {"red": (1.0, 0.15, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (1.0, 0.9, 0.1),
           "green": (0.2, 0.85, 0.2), "cyan": (0.1, 0.85, 0.95), "blue": (0.25, 0.4, 1.0),
           "magenta": (0.9, 0.2, 0.9), "white": (0.95, 0.95, 0.95)}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "navy": (0.05, 0.08, 0.3),
               "forest": (0.05, 0.25, 0.1), "maroon": (0.3, 0.05, 0.08)}
FIELDS = (("digit", DIGITS), ("colour", tuple(COLOURS)), ("background", tuple(BACKGROUNDS)))


def vocabulary_size() -> int:
    """Rows of the caption table: each field's values plus its "any" entry."""
    return sum(len(values) + 1 for _, values in FIELDS)


def caption_tokens(digit: int | None = None, colour: str | None = None,
                   background: str | None = None) -> list[int]:
    """Row indices of a caption in the caption table; ``None`` is the field's "any" entry."""
    tokens, base = [], 0
    for (field, values), value in zip(FIELDS, (digit, colour, background)):
        if value is None:
            tokens.append(base + len(values))
        else:
            key = str(value)
            if key not in values:
                raise ValueError(f"caption: bad {field} {value!r}; expected one of {list(values)} or None")
            tokens.append(base + values.index(key))
        base += len(values) + 1
    return tokens


class PixelCodec(ModelMixin, ConfigMixin):
    """The pipeline's "VAE": an exact 2x2 pixel (un)shuffle between images and latents.

    ``decode`` is what ``FluxPipeline`` calls after its loop (it first maps latents with
    ``z / scaling_factor + shift_factor``); ``encode`` is the inverse, used for training data.
    ``FluxPipeline`` derives its ``vae_scale_factor`` as ``2 ** (len(block_out_channels) - 1)``, so
    the config carries a ``block_out_channels`` of the right length and nothing else uses it.
    """

    @register_to_config
    def __init__(self, factor: int = 2, image_channels: int = 3, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"PixelCodec: factor must be a power of two >= 1, got {factor}")
        self.register_to_config(block_out_channels=(image_channels,) * (int(math.log2(factor)) + 1),
                                latent_channels=image_channels * factor * factor)
        # The pipeline reads the codec's device from a parameter or buffer; this one holds no data.
        self.register_buffer("device_anchor", torch.zeros(0), persistent=False)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) in [-1, 1] -> latent (B, C*f*f, H/f, W/f) before scaling."""
        return F.pixel_unshuffle(image, self.config.factor)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Latent (after the pipeline undid the scaling) -> image in [-1, 1]."""
        image = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=image) if return_dict else (image,)


@functools.lru_cache(maxsize=4)
def _checkpoint(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"trained weights not found at {path}; they are committed at {WEIGHTS} "
            "(rebuild them with `python bench/train_tiny.py`)")
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["cdcompile"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def metadata(path: str | Path | None = None) -> dict[str, Any]:
    """The JSON document stored with the weights (configs, vocabulary, training record)."""
    return _checkpoint(str(path or WEIGHTS))[0]


def load_trained_transformer(path: str | Path | None = None, *,
                             dtype: torch.dtype = torch.float32) -> FluxTransformer2DModel:
    """The trained ``FluxTransformer2DModel`` (eval mode), from the committed weights."""
    meta, tensors = _checkpoint(str(path or WEIGHTS))
    model = FluxTransformer2DModel(**meta["transformer"])
    prefix = "transformer."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def load_trained_pipeline(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
                          transformer: torch.nn.Module | None = None) -> FluxPipeline:
    """A ``diffusers.FluxPipeline`` over the trained transformer and :class:`PixelCodec`.

    No text encoders: call it with :func:`class_prompt`'s embeddings. Its default size is the
    training size (32x32); other sizes run but were never trained.
    """
    meta = metadata(path)
    transformer = transformer if transformer is not None else load_trained_transformer(path, dtype=dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=meta["sampling"]["shift"], use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=PixelCodec(**meta["codec"]), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.default_sample_size = meta["image_size"] // pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    return pipe


def caption_embeddings(tokens: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, 3, D), pooled_prompt_embeds (B, D)) of token rows (B, 3)."""
    embeds = table[tokens]
    return embeds, embeds.mean(dim=1)


def class_prompt(digit: int | None, colour: str | None = None, background: str | None = None, *,
                 cfg_scale: float = 1.0, batch: int = 1, path: str | Path | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword arguments for the trained pipeline: the caption's embeddings.

    ``None`` leaves a field free (the model samples it). ``cfg_scale > 1`` adds the all-"any"
    caption as the negative prompt and sets ``true_cfg_scale``: FluxPipeline then calls the
    transformer twice per step (two CFG slots for the cache). 3.0 gives recognisable digits.
    """
    table = _checkpoint(str(path or WEIGHTS))[1]["caption.weight"]
    rows = torch.tensor([caption_tokens(digit, colour, background)] * batch)
    embeds, pooled = caption_embeddings(rows, table)
    kwargs: dict[str, Any] = {"prompt_embeds": embeds.to(dtype), "pooled_prompt_embeds": pooled.to(dtype)}
    if cfg_scale > 1.0:
        neg, neg_pooled = caption_embeddings(torch.tensor([caption_tokens()] * batch), table)
        kwargs.update(negative_prompt_embeds=neg.to(dtype), negative_pooled_prompt_embeds=neg_pooled.to(dtype),
                      true_cfg_scale=float(cfg_scale))
    return kwargs
