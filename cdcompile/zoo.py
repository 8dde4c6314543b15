"""Tiny random configurations of diffusers DiT transformers, with inputs, for tests and bench/zoo.py.

``ZOO[name]()`` returns ``(model, kwargs)``: a model with random weights at toy size (eval mode,
fp32) and the keyword arguments of one denoising call. Builders import diffusers lazily; a class
missing from the installed diffusers raises ``ImportError`` naming it.
"""

from __future__ import annotations

from typing import Callable

import torch

ZOO: dict[str, Callable[[], tuple[torch.nn.Module, dict]]] = {}


def register(name: str):
    def deco(fn):
        ZOO[name] = fn
        return fn
    return deco


def _cls(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ImportError(f"diffusers {diffusers.__version__} has no {name}")
    return cls


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@register("flux")
def flux():
    from .testing import flux_inputs, tiny_flux

    m = tiny_flux()
    return m, flux_inputs(m)


@register("sd3")
def sd3():
    torch.manual_seed(0)
    m = _cls("SD3Transformer2DModel")(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4).eval()
    g = _g()
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                   encoder_hidden_states=torch.randn(1, 7, 16, generator=g),
                   pooled_projections=torch.randn(1, 16, generator=g),
                   timestep=torch.tensor([500.0]), return_dict=False)


@register("wan")
def wan():
    torch.manual_seed(0)
    m = _cls("WanTransformer3DModel")(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32).eval()
    g = _g()
    return m, dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
                   encoder_hidden_states=torch.randn(1, 7, 16, generator=g),
                   timestep=torch.tensor([500.0]), return_dict=False)


@register("pixart")
def pixart():
    torch.manual_seed(0)
    m = _cls("PixArtTransformer2DModel")(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16,
        norm_type="ada_norm_single", use_additional_conditions=False).eval()
    g = _g()
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                   encoder_hidden_states=torch.randn(1, 7, 16, generator=g),
                   timestep=torch.tensor([500.0]), return_dict=False)
