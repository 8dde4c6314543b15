"""Tiny random configurations of diffusers DiT transformers, with inputs, for tests and bench/zoo.py.

``ZOO[name]()`` returns ``(model, kwargs)``: a model with random weights at toy size (eval mode,
fp32) and the keyword arguments of one denoising call. Builders import diffusers lazily; a class
missing from the installed diffusers raises ``ImportError`` naming it.

There is one builder per DiT transformer class of diffusers 0.42 (image, video, audio and the
protein DiT), each with 2-6 blocks per repeated stack so that a group of at least two exists, and
with the inputs its forward needs (ids, masks, rotary tables, KV caches for a first step). Left out
are the classes that are not DiTs: ``Transformer2DModel``, ``TransformerTemporalModel``,
``DreamLiteTransformer2DModel`` (spatial transformers inside a U-Net), ``PriorTransformer``,
``T5FilmDecoder``, the ControlNets and ``MiniMaxMusic3RVQDepthDecoder``. Builders only build: no
model-specific logic for the backend lives here.
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


# ---------------------------------------------------------------------------------------------
# Every other DiT transformer class of diffusers, at toy size. Helpers shared by the builders:


def _make(cls_name: str, **config) -> torch.nn.Module:
    """``cls_name(**config)`` with seed-0 random weights, in eval mode.

    Parameters a model initialises to zero (adaLN-Zero gates, zeroed output projections) get small random
    values, so that every block changes the output and a wrong compiled graph cannot hide behind zeros.
    Parameters it leaves uninitialised (``torch.empty``: Lumina-Next's ``pad_token``) are built as NaN
    (deterministic mode fills uninitialised memory) and then drawn from their own generator. Before,
    such memory was all zero in some processes only; those processes randomised it too, which moved
    every later zero-initialised parameter's draw: two ranks of a context-parallel test could build
    different weights (the rare Lumina-Next parity failure).
    """
    torch.manual_seed(0)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # torch.empty -> NaN, the same in every process
    try:
        m = _cls(cls_name)(**config).eval()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    g, g_empty = _g(1), _g(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.is_floating_point() and p.isnan().all():
                p.copy_(0.05 * torch.randn(p.shape, generator=g_empty))
            elif p.numel() > 1 and not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _randn(seed: int = 0) -> Callable[..., torch.Tensor]:
    g = _g(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def _t(value: float = 500.0, batch: int = 1) -> torch.Tensor:
    return torch.full((batch,), value)


def _grid_ids(h: int, w: int, axes: int = 3, first: float = 0.0) -> torch.Tensor:
    """FLUX-style position ids of an ``h x w`` token grid: ``(h*w, axes)`` = (first, ..., row, col)."""
    ids = torch.zeros(h * w, axes)
    ids[:, 0] = first
    ids[:, -2] = torch.arange(h).repeat_interleave(w).float()
    ids[:, -1] = torch.arange(w).repeat(h).float()
    return ids


# -- FLUX family: packed latent tokens, text tokens, 2-D position ids --------------------------


def _flux_like(cls_name: str, *, timestep: float = 0.5, **config):
    """FLUX-shaped call: 4 x 4 packed latent tokens, 7 text tokens, ids with one column per rotary axis."""
    m = _make(cls_name, **config)
    r = _randn()
    axes = len(config["axes_dims_rope"])
    return m, dict(hidden_states=r(1, 16, config["in_channels"]),
                   encoder_hidden_states=r(1, 7, config["joint_attention_dim"]), timestep=_t(timestep),
                   img_ids=_grid_ids(4, 4, axes), txt_ids=torch.zeros(7, axes), return_dict=False)


@register("flux2")
def flux2():
    return _flux_like("Flux2Transformer2DModel", patch_size=1, in_channels=16,
                      num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                      joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                      guidance_embeds=False)


@register("chroma")
def chroma():
    return _flux_like("ChromaTransformer2DModel", patch_size=1, in_channels=16, num_layers=2,
                      num_single_layers=3, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                      axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=32,
                      approximator_layers=1)


@register("bria")
def bria():
    return _flux_like("BriaTransformer2DModel", timestep=500.0, patch_size=1, in_channels=16, num_layers=2,
                      num_single_layers=3, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                      axes_dims_rope=[4, 6, 6])


@register("briafibo")
def briafibo():
    m, kw = _flux_like("BriaFiboTransformer2DModel", timestep=500.0, patch_size=1, in_channels=16, num_layers=2,
                       num_single_layers=3, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                       axes_dims_rope=[4, 6, 6], text_encoder_dim=16)
    r = _randn(1)
    kw["text_encoder_layers"] = [r(1, 7, 16) for _ in range(2 + 3)]  # one text-encoder layer per block
    return m, kw


@register("longcatimage")
def longcatimage():
    return _flux_like("LongCatImageTransformer2DModel", patch_size=1, in_channels=16, num_layers=2,
                      num_single_layers=3, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                      pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])


@register("ovisimage")
def ovisimage():
    return _flux_like("OvisImageTransformer2DModel", patch_size=1, in_channels=16, out_channels=16, num_layers=2,
                      num_single_layers=3, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                      axes_dims_rope=(4, 6, 6))


@register("qwenimage")
def qwenimage():
    m = _make("QwenImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=3,
              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    r = _randn()
    return m, dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 7, 32),
                   encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long), timestep=_t(0.5),
                   img_shapes=[(1, 4, 4)], return_dict=False)


@register("auraflow")
def auraflow():
    m = _make("AuraFlowTransformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
              num_single_dit_layers=3, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
              caption_projection_dim=16, out_channels=4, pos_embed_max_size=64)
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                   return_dict=False)


# -- class / caption conditioned 2-D DiTs -------------------------------------------------------


@register("dit")
def dit():
    m = _make("DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
              norm_num_groups=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 8, 8), timestep=torch.tensor([500]), class_labels=torch.tensor([3]),
                   return_dict=False)


@register("hunyuandit")
def hunyuandit(num_layers: int = 6):
    m = _make("HunyuanDiT2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
              sample_size=8, hidden_size=16, num_layers=num_layers, cross_attention_dim=16, cross_attention_dim_t5=24,
              pooled_projection_dim=16, text_len=7, text_len_t5=5)
    r = _randn()
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))
    return m, dict(hidden_states=r(1, 4, 8, 8), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   text_embedding_mask=torch.ones(1, 7), encoder_hidden_states_t5=r(1, 5, 24),
                   text_embedding_mask_t5=torch.ones(1, 5), image_meta_size=torch.tensor([[64., 64, 64, 64, 0, 0]]),
                   style=torch.zeros(1, dtype=torch.long), image_rotary_emb=rope, return_dict=False)


@register("lumina2")
def lumina2():
    m = _make("Lumina2Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=32,
              num_layers=3, num_refiner_layers=2, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
              axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32), cap_feat_dim=16)
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 8, 8), timestep=_t(0.5), encoder_hidden_states=r(1, 7, 16),
                   encoder_attention_mask=torch.ones(1, 7, dtype=torch.bool), return_dict=False)


@register("luminanext")
def luminanext():
    m = _make("LuminaNextDiT2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=3,
              num_attention_heads=2, num_kv_heads=1, multiple_of=16, cross_attention_dim=16)
    r = _randn()
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    return m, dict(hidden_states=r(1, 4, 8, 8), timestep=_t(0.5), encoder_hidden_states=r(1, 7, 16),
                   encoder_mask=torch.ones(1, 7), image_rotary_emb=get_2d_rotary_pos_embed_lumina(16, 16, 16),
                   cross_attention_kwargs={}, return_dict=False)


@register("sana")
def sana():
    m = _make("SanaTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
              num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
              caption_channels=16, sample_size=8, patch_size=1)
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                   return_dict=False)


@register("cogview3plus")
def cogview3plus():
    m = _make("CogView3PlusTransformer2DModel", patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
              num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=16, condition_dim=8,
              pos_embed_max_size=8, sample_size=8)
    return m, _cogview_inputs()


def _cogview_inputs():
    r = _randn()
    return dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                original_size=torch.tensor([[64., 64]]), target_size=torch.tensor([[64., 64]]),
                crop_coords=torch.tensor([[0., 0]]), return_dict=False)


@register("cogview4")
def cogview4():
    m = _make("CogView4Transformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=3,
              attention_head_dim=8, num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8,
              pos_embed_max_size=8, sample_size=8, rope_axes_dim=(4, 4))
    return m, _cogview_inputs()


@register("stableaudio")
def stableaudio():
    m = _make("StableAudioDiTModel", sample_size=16, in_channels=4, num_layers=3, attention_head_dim=8,
              num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16,
              time_proj_dim=16, global_states_input_dim=16, cross_attention_input_dim=16)
    r = _randn()
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    rope = get_1d_rotary_pos_embed(4, 16 + 1, use_real=True, repeat_interleave_real=False)
    return m, dict(hidden_states=r(1, 4, 16), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   global_hidden_states=r(1, 1, 16), rotary_embedding=rope, return_dict=False)


# -- video DiTs ---------------------------------------------------------------------------------


def _video(channels=4, frames=2, size=8, seed=0, channels_first=True):
    r = _randn(seed)
    return r(1, channels, frames, size, size) if channels_first else r(1, frames, channels, size, size)


@register("cogvideox")
def cogvideox():
    m = _make("CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4,
              out_channels=4, time_embed_dim=16, text_embed_dim=16, num_layers=3, sample_width=8, sample_height=8,
              sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=7)
    r = _randn(1)
    return m, dict(hidden_states=_video(channels_first=False), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                   return_dict=False)


@register("consisid")
def consisid():
    m = _make("ConsisIDTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4,
              out_channels=4, time_embed_dim=16, text_embed_dim=16, num_layers=3, sample_width=8, sample_height=8,
              sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=7)
    r = _randn(1)
    return m, dict(hidden_states=_video(channels_first=False), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                   return_dict=False)


@register("latte")
def latte():
    m = _make("LatteTransformer3DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4,
              out_channels=8, num_layers=3, cross_attention_dim=16, sample_size=8, patch_size=2,
              norm_type="ada_norm_single", caption_channels=16, video_length=2)
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=r(1, 7, 16), return_dict=False)


@register("allegro")
def allegro():
    m = _make("AllegroTransformer3DModel", patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
              in_channels=4, out_channels=4, num_layers=3, cross_attention_dim=16, sample_height=8, sample_width=8,
              sample_frames=2, caption_channels=16)
    r = _randn(1)
    return m, dict(hidden_states=_video(), encoder_hidden_states=r(1, 7, 16), timestep=_t(), return_dict=False)


@register("ltx")
def ltx():
    m = _make("LTXVideoTransformer3DModel", in_channels=8, out_channels=8, num_attention_heads=2,
              attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=16)
    r = _randn()
    return m, dict(hidden_states=r(1, 2 * 4 * 4, 8), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                   encoder_attention_mask=torch.ones(1, 7), num_frames=2, height=4, width=4,
                   rope_interpolation_scale=(1.0, 1.0, 1.0), return_dict=False)


@register("mochi")
def mochi():
    m = _make("MochiTransformer3DModel", patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3,
              pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=8, max_sequence_length=7)
    r = _randn(1)
    return m, dict(hidden_states=_video(), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                   encoder_attention_mask=torch.ones(1, 7, dtype=torch.bool), return_dict=False)


@register("hunyuanvideo")
def hunyuanvideo():
    m = _make("HunyuanVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
              attention_head_dim=16, num_layers=2, num_single_layers=3, num_refiner_layers=1, patch_size=2,
              patch_size_t=1, guidance_embeds=False, text_embed_dim=16, pooled_projection_dim=8,
              rope_axes_dim=(4, 6, 6))
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   encoder_attention_mask=torch.ones(1, 7), pooled_projections=r(1, 8), return_dict=False)


@register("hunyuanvideo15")
def hunyuanvideo15():
    m = _make("HunyuanVideo15Transformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
              attention_head_dim=16, num_layers=3, num_refiner_layers=1, patch_size=1, patch_size_t=1,
              text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6))
    r = _randn(1)
    return m, dict(hidden_states=_video(size=4), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   encoder_attention_mask=torch.ones(1, 7), encoder_hidden_states_2=r(1, 5, 8),
                   encoder_attention_mask_2=torch.ones(1, 5), image_embeds=r(1, 3, 8), return_dict=False)


@register("hunyuanimage")
def hunyuanimage():
    m = _make("HunyuanImageTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2,
              attention_head_dim=16, num_layers=2, num_single_layers=3, num_refiner_layers=1, patch_size=(1, 1),
              text_embed_dim=16, rope_axes_dim=(8, 8))
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 4, 4), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   encoder_attention_mask=torch.ones(1, 7), return_dict=False)


def _wan_like(cls_name: str, **extra):
    m = _make(cls_name, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32, **extra)
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=r(1, 7, 16), return_dict=False)


@register("skyreelsv2")
def skyreelsv2():
    return _wan_like("SkyReelsV2Transformer3DModel")


@register("chronoedit")
def chronoedit():
    return _wan_like("ChronoEditTransformer3DModel")


@register("wanvace")
def wanvace():
    m, kw = _wan_like("WanVACETransformer3DModel", vace_layers=[0, 2], vace_in_channels=8)
    kw["control_hidden_states"] = _video(channels=8, seed=2)
    return m, kw


@register("easyanimate")
def easyanimate():
    m = _make("EasyAnimateTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4,
              out_channels=4, patch_size=2, sample_width=8, sample_height=8, num_layers=3, mmdit_layers=3,
              time_embed_dim=16, text_embed_dim=16)
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=r(1, 7, 16), return_dict=False)


@register("cosmos")
def cosmos():
    m = _make("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
              num_layers=3, text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2),
              concat_padding_mask=False)
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(0.5), encoder_hidden_states=r(1, 7, 16), return_dict=False)


@register("hidream")
def hidream():
    m = _make("HiDreamImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=2,
              num_single_layers=3, attention_head_dim=16, num_attention_heads=2, caption_channels=[16, 16],
              text_emb_dim=16, num_routed_experts=2, num_activated_experts=1, axes_dims_rope=(4, 6, 6),
              max_resolution=(16, 16), llama_layers=[0, 1, 2, 3, 4])
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 8, 8), timesteps=_t(), encoder_hidden_states_t5=r(1, 7, 16),
                   encoder_hidden_states_llama3=r(5, 1, 5, 16), pooled_embeds=r(1, 16), return_dict=False)


@register("flux3")
def flux3():
    m = _make("Flux3Transformer2DModel", in_channels=16, cond_in_channels=16, num_layers=2, num_single_layers=3,
              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, timestep_channels=32,
              axes_dims_rope=(4, 4, 4, 4))
    r = _randn()
    return m, dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 7, 32), timestep=_t(0.5),
                   img_ids=_grid_ids(4, 4, 4), txt_ids=torch.zeros(7, 4), return_dict=False)


@register("ernieimage")
def ernieimage():
    m = _make("ErnieImageTransformer2DModel", hidden_size=32, num_attention_heads=2, num_layers=3, ffn_hidden_size=64,
              in_channels=4, out_channels=4, patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6))
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 4, 4), timestep=_t(), text_bth=r(1, 7, 16), text_lens=torch.tensor([7]),
                   return_dict=False)


@register("krea2")
def krea2():
    m = _make("Krea2Transformer2DModel", in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
              num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=16,
              num_text_layers=3, text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
              num_layerwise_text_blocks=2, num_refiner_text_blocks=2, axes_dims_rope=(4, 6, 6))
    r = _randn()
    pos = torch.cat([torch.zeros(7, 3), _grid_ids(4, 4, 3, first=1.0)]).long()
    return m, dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 7, 3, 16), timestep=_t(0.5),
                   position_ids=pos, return_dict=False)


@register("ideogram4")
def ideogram4():
    m = _make("Ideogram4Transformer2DModel", in_channels=16, num_layers=3, attention_head_dim=16, num_attention_heads=2,
              intermediate_size=64, adaln_dim=16, llm_features_dim=24, mrope_section=(4, 2, 2))
    r = _randn()
    text, image = 7, 16  # one sequence: text tokens (indicator 3) then image tokens (indicator 2)
    pos = torch.cat([torch.arange(text)[:, None].expand(text, 3), 64 + _grid_ids(4, 4, 3).long()])
    return m, dict(hidden_states=r(1, text + image, 16), timestep=_t(0.5), encoder_hidden_states=r(1, text + image, 24),
                   position_ids=pos[None], segment_ids=torch.zeros(1, text + image, dtype=torch.long),
                   indicator=torch.tensor([[3] * text + [2] * image]), return_dict=False)


@register("glmimage")
def glmimage():
    m = _make("GlmImageTransformer2DModel", patch_size=2, in_channels=4, out_channels=4, num_layers=3,
              attention_head_dim=8, num_attention_heads=2, text_embed_dim=16, time_embed_dim=16, condition_dim=8,
              prior_vq_quantizer_codebook_size=32)
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 7, 16),
                   prior_token_id=torch.arange(16)[None] % 32, prior_token_drop=torch.tensor([False]), timestep=_t(),
                   target_size=torch.tensor([[64., 64]]), crop_coords=torch.tensor([[0., 0]]), return_dict=False)


@register("helios")
def helios():
    m = _make("HeliosTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
              in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_dim=(4, 2, 2))
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=r(1, 7, 16), return_dict=False)


@register("hunyuanvideoframepack")
def hunyuanvideoframepack():
    m = _make("HunyuanVideoFramepackTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
              attention_head_dim=16, num_layers=2, num_single_layers=3, num_refiner_layers=1, patch_size=2,
              patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
              rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=8, has_clean_x_embedder=True)
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   encoder_attention_mask=torch.ones(1, 7), pooled_projections=r(1, 8), image_embeds=r(1, 3, 8),
                   indices_latents=torch.tensor([8, 9]), guidance=_t(6.0),
                   # frame-packing history: clean frames (start + last), 2x and 4x compressed history
                   latents_clean=_video(seed=2), indices_latents_clean=torch.tensor([0, 7]),
                   latents_history_2x=_video(seed=3), indices_latents_history_2x=torch.tensor([5, 6]),
                   latents_history_4x=_video(frames=4, seed=4), indices_latents_history_4x=torch.arange(1, 5),
                   return_dict=False)


@register("joyimageedit")
def joyimageedit():
    m = _make("JoyImageEditTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=32,
              num_attention_heads=2, text_dim=16, num_layers=3, rope_dim_list=[4, 6, 6])
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=r(1, 7, 16), return_dict=False)


@register("joyimageeditplus")
def joyimageeditplus():
    m = _make("JoyImageEditPlusTransformer3DModel", patch_size=[1, 2, 2], in_channels=4, out_channels=4,
              hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=3, rope_dim_list=[4, 6, 6])
    r = _randn(1)
    # pre-patchified tokens (batch, patches, channels, pt, ph, pw) of one 1 x 4 x 4 item
    return m, dict(hidden_states=r(1, 16, 4, 1, 2, 2), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   shape_list=[[(1, 4, 4)]], return_dict=False)


@register("briafibo2")
def briafibo2():
    m = _make("BriaFibo2Transformer2DModel", in_channels=4, patch_size=2, dim=32, n_layers=4, n_refiner_layers=2,
              n_heads=2, cap_feat_dim=16, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4,
              max_num_gist_tokens=4, gist_step=4, gist_min_text_len=2, gist_max_text_len=8, axes_dims=(4, 6, 6),
              axes_lens=(16, 16, 16))
    r = _randn()
    # text features: (batch, 1 + len(injection_layer_ids) bundles, tokens, cap_feat_dim)
    return m, dict(hidden_states=r(1, 4, 8, 8), timestep=_t(0.5), encoder_hidden_states=r(1, 2, 7, 16),
                   return_dict=False)


@register("acestep")
def acestep():
    m = _make("AceStepTransformer1DModel", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, in_channels=16, audio_acoustic_hidden_dim=8,
              patch_size=2, sliding_window=4, encoder_hidden_size=16)
    r = _randn()
    return m, dict(hidden_states=r(1, 16, 8), timestep=_t(0.5), timestep_r=_t(0.25), encoder_hidden_states=r(1, 7, 16),
                   context_latents=r(1, 16, 8), return_dict=False)


@register("kandinsky5")
def kandinsky5():
    m = _make("Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16,
              out_visual_dim=4, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=2,
              num_visual_blocks=3, axes_dims=(4, 6, 6), visual_cond=False)
    r = _randn()
    # channels-last latents (batch, frames, height, width, channels)
    return m, dict(hidden_states=r(1, 2, 8, 8, 4), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                   pooled_projections=r(1, 8), visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
                   text_rope_pos=torch.arange(7), return_dict=False)


@register("kandinsky6")
def kandinsky6():
    m = _make("Kandinsky6Transformer3DModel", in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8,
              time_dim=16, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=2, num_visual_blocks=3,
              axes_dims=(4, 6, 6), visual_cond=False, in_audio_dim=4, out_audio_dim=4)
    r = _randn()
    return m, dict(hidden_states=r(1, 2, 8, 8, 4), encoder_hidden_states=r(1, 7, 16), pooled_projections=r(1, 8),
                   timestep=_t(), audio_hidden_states=r(1, 6, 4), return_dict=False)


@register("kandinsky6sr")
def kandinsky6sr():
    m = _make("Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1),
              model_dim=32, ff_dim=64, num_visual_blocks=3, axes_dims=(4, 6, 6), nabla_window=(1, 3, 3))
    r = _randn()
    # input: noisy latent, upsampled low-res latent and anchor mask (2 * 4 + 1 channels, channels last); the NABLA
    # attention groups 8 x 8 token tiles: a 1 x 16 x 8 token grid is two tiles
    return m, dict(hidden_states=r(1, 1, 16, 8, 9), timestep=_t(), return_dict=False)


@register("ltx2")
def ltx2():
    m = _make("LTX2VideoTransformer3DModel", in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
              cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
              audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=3, caption_channels=16)
    r = _randn()
    return m, dict(hidden_states=r(1, 2 * 4 * 4, 8), audio_hidden_states=r(1, 5, 8), encoder_hidden_states=r(1, 7, 16),
                   audio_encoder_hidden_states=r(1, 7, 16), timestep=_t(), encoder_attention_mask=torch.ones(1, 7),
                   audio_encoder_attention_mask=torch.ones(1, 7), num_frames=2, height=4, width=4,
                   audio_num_frames=5, return_dict=False)


@register("longcataudio")
def longcataudio():
    m = _make("LongCatAudioDiTTransformer", dit_dim=32, dit_depth=3, dit_heads=2, dit_text_dim=16, latent_dim=8)
    r = _randn()
    return m, dict(hidden_states=r(1, 16, 8), encoder_hidden_states=r(1, 7, 16),
                   encoder_attention_mask=torch.ones(1, 7, dtype=torch.bool), timestep=_t(0.5), return_dict=False)


@register("minimaxmusic3")
def minimaxmusic3():
    m = _make("MiniMaxMusic3Transformer1DModel", in_channels=4, condition_dim=8, num_layers=3, num_attention_heads=2,
              attention_head_dim=8, ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=16)
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 16), timestep=_t(0.5), encoder_hidden_states=r(1, 16, 8), return_dict=False)


@register("minimaxh3")
def minimaxh3():
    m = _make("MiniMaxH3Transformer3DModel", num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=3,
              num_refiner_layers=1, ffn_dim=64, in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=16,
              freq_dim=16, time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2)
    r = _randn()
    # one packed sequence: 7 text tokens, 16 video patches (1 x 4 x 4), 5 audio frames; modality tags 0 / 1 / 2
    text, video, audio = 7, 16, 5
    pos = torch.cat([torch.zeros(text, 3), _grid_ids(4, 4, 3), torch.arange(audio)[:, None].expand(audio, 3)]).long()
    return m, dict(hidden_states=r(1, video, 16), audio_hidden_states=r(1, audio, 8),
                   encoder_hidden_states=r(1, text, 16), timestep=_t(),
                   timestep_indices=torch.zeros(text + video + audio, dtype=torch.long),
                   token_tags=torch.tensor([0] * text + [1] * video + [2] * audio), position_ids=pos,
                   text_indices=torch.arange(text), video_indices=torch.arange(text, text + video),
                   audio_indices=torch.arange(text + video, text + video + audio), return_dict=False)


@register("motifvideo")
def motifvideo():
    m = _make("MotifVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2,
              attention_head_dim=16, num_layers=2, num_single_layers=3, patch_size=2, patch_size_t=1, text_embed_dim=16,
              rope_axes_dim=(4, 6, 6))
    r = _randn(1)
    return m, dict(hidden_states=_video(), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   encoder_attention_mask=torch.ones(1, 7), return_dict=False)


@register("nucleusmoe")
def nucleusmoe():
    m = _make("NucleusMoEImageTransformer2DModel", patch_size=2, in_channels=16, out_channels=4, num_layers=6,
              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
              mlp_ratio=6.0, num_experts=4, moe_intermediate_dim=32, capacity_factors=2.0)
    g = _g(2)
    with torch.no_grad():  # the expert weights are torch.empty (left to a checkpoint): give them values
        for name, p in m.named_parameters():
            if ".experts." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    r = _randn()
    return m, dict(hidden_states=r(1, 16, 16), img_shapes=[(1, 4, 4)], encoder_hidden_states=r(1, 7, 32),
                   encoder_hidden_states_mask=torch.ones(1, 7, dtype=torch.long), timestep=_t(0.5), return_dict=False)


@register("omnigen")
def omnigen():
    m = _make("OmniGenTransformer2DModel", in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2,
              num_key_value_heads=2, intermediate_size=64, num_layers=3, pad_token_id=0, vocab_size=64,
              max_position_embeddings=256, original_max_position_embeddings=128,
              rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}, pos_embed_max_size=16,
              time_step_dim=16)
    r = _randn()
    seq = 5 + 1 + 16  # prompt tokens, the time token, 4 x 4 latent patches
    return m, dict(hidden_states=r(1, 4, 8, 8), timestep=_t(0.5), input_ids=torch.tensor([[1, 5, 9, 13, 17]]),
                   input_img_latents=[], input_image_sizes={}, attention_mask=torch.ones(1, seq, seq),
                   position_ids=torch.arange(seq)[None], return_dict=False)


@register("prx")
def prx():
    m = _make("PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, num_heads=2,
              depth=3, axes_dim=[8, 8])
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 8, 8), timestep=_t(0.5), encoder_hidden_states=r(1, 7, 16), return_dict=False)


@register("qwenimage21")
def qwenimage21():
    m = _make("QwenImage21Transformer2DModel", patch_size=1, in_channels=16, out_channels=16, num_layers=3,
              attention_head_dim=16, num_attention_heads=2, context_in_dim=32, mlp_ratio=2, axes_dims_rope=(4, 6, 6))
    r = _randn()
    # 7 text tokens, then 4 image slots standing for the 4 x 4 target latent (2 x 2 tokens per slot)
    return m, dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 7, 32), timestep=_t(0.5),
                   img_shapes=[[(1, 4, 4)]], img_mask=torch.tensor([[False] * 7 + [True] * 4]), return_dict=False)


@register("stableaudio3")
def stableaudio3():
    m = _make("StableAudio3DiTModel", io_channels=4, patch_size=1, embed_dim=32, depth=3, num_heads=2,
              cond_token_dim=16, global_cond_dim=16, local_add_cond_dim=5, timestep_features_dim=16,
              num_memory_tokens=4)
    r = _randn()
    return m, dict(hidden_states=r(1, 4, 16), timestep=_t(0.5), encoder_hidden_states=r(1, 7, 16),
                   global_hidden_states=r(1, 16), return_dict=False)


@register("sanavideo")
def sanavideo():
    m = _make("SanaVideoTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
              num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
              caption_channels=16, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32)
    r = _randn(1)
    return m, dict(hidden_states=_video(), encoder_hidden_states=r(1, 7, 16), timestep=_t(), return_dict=False)


@register("zimage")
def zimage():
    m = _make("ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=3,
              n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
    r = _randn()
    # per-sample lists: latents (channels, frames, height, width) and caption features (tokens, dim)
    return m, dict(x=[r(4, 1, 8, 8)], t=_t(0.5), cap_feats=[r(7, 16)], return_dict=False)


@register("anyflow")
def anyflow():
    m = _make("AnyFlowTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
              in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32)
    r = _randn(1)
    # frames-first latents (batch, frames, channels, height, width); one timestep per frame
    return m, dict(hidden_states=_video(channels_first=False), timestep=torch.full((1, 2), 500.0),
                   r_timestep=torch.full((1, 2), 250.0), encoder_hidden_states=r(1, 7, 16), return_dict=False)


@register("anyflowfar")
def anyflowfar():
    heads, head_dim, layers = 2, 8, 3
    m = _make("AnyFlowFARTransformer3DModel", patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=2,
              num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, text_dim=16,
              freq_dim=16, ffn_dim=32, num_layers=layers, rope_max_seq_len=32, chunk_partition=(1, 1, 1))
    r = _randn(1)
    # first chunk of frame-autoregressive inference: one frame, an empty KV cache to fill
    cache = {i: {"full_cache": torch.zeros(2, 1, heads, 2 * 16, head_dim),
                 "compressed_cache": torch.zeros(2, 1, heads, 2 * 4, head_dim)} for i in range(layers)}
    return m, dict(hidden_states=_video(frames=1, channels_first=False), timestep=torch.full((1, 1), 500.0),
                   r_timestep=torch.full((1, 1), 500.0), encoder_hidden_states=r(1, 7, 16), chunk_partition=[1],
                   kv_cache=cache, kv_cache_flag={"num_cached_chunks": 0, "is_cache_step": False}, return_dict=False)


@register("wananimate")
def wananimate():
    m = _make("WanAnimateTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
              in_channels=12, latent_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4,
              image_dim=16, rope_max_seq_len=32, motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8},
              motion_encoder_size=16, motion_style_dim=16, motion_dim=4, motion_encoder_dim=16,
              face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=2,
              motion_encoder_batch_size=4)
    r = _randn(1)
    return m, dict(hidden_states=_video(channels=12), timestep=_t(), encoder_hidden_states=r(1, 7, 16),
                   encoder_hidden_states_image=r(1, 5, 16), pose_hidden_states=_video(channels=4, frames=1, seed=2),
                   face_pixel_values=r(1, 3, 1, 16, 16), return_dict=False)


@register("wananimate2")
def wananimate2():
    m = _make("WanAnimate2Transformer3DModel", patch_size=(1, 2, 2), text_len=8, in_dim=8, dim=32, ffn_dim=64,
              freq_dim=16, text_dim=16, out_dim=4, num_heads=2, num_layers=3, use_img_emb=False)
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    r = _randn(1)
    # the reference pass ("extract"): fills the per-layer KV cache the generation pass attends to
    return m, dict(hidden_states=[r(4, 2, 8, 8)], timestep=_t(), encoder_hidden_states=[r(7, 16)],
                   condition_latents=[r(4, 2, 8, 8)], kv_cache=WanAnimate2KVCache(3), kv_cache_mode="extract",
                   seq_len=32, offset_grid_sizes=torch.tensor([[2, 4, 4]]), return_dict=False)


@register("sanawm")
def sanawm():
    # the released period: three gated-delta (linear attention) blocks, then a softmax one (blocks 0-2 | 3 | 4)
    m = _make("SanaWMTransformer3DModel", in_channels=4, num_layers=5, hidden_size=32, num_attention_heads=2,
              patch_size=(1, 1, 1), softmax_every_n=4, linear_head_dim=16, chunk_plucker_channels=8,
              chunk_plucker_post_attn_blocks=5, image_size=64, caption_channels=16, mlp_ratio=2.0,
              mixed_precision="fp32")
    r = _randn(1)
    # one timestep per latent frame: (batch, 1, frames)
    return m, dict(hidden_states=_video(), timestep=torch.full((1, 1, 2), 500.0), encoder_hidden_states=r(1, 1, 7, 16),
                   encoder_attention_mask=torch.ones(1, 7), return_dict=False)


@register("sanawmrefiner")
def sanawmrefiner():
    m = _make("SanaWMLTX2RefinerTransformer3DModel", in_channels=8, out_channels=8, num_attention_heads=2,
              attention_head_dim=8, cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8,
              audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=3,
              caption_channels=16)
    r = _randn()
    rope = m.build_rotary_emb_for_absolute_positions(batch_size=1, frame_positions=[0, 1], height=4, width=4,
                                                     device=torch.device("cpu"), fps=24.0)
    return m, dict(hidden_states=r(1, 2 * 4 * 4, 8), encoder_hidden_states=r(1, 7, 16), timestep=_t(),
                   video_rotary_emb=rope, encoder_attention_mask=torch.ones(1, 7), return_dict=False)


def _module_cls(module: str, name: str):
    """A class diffusers does not export at top level, from ``diffusers.models.transformers.<module>``."""
    import importlib

    return getattr(importlib.import_module(f"diffusers.models.transformers.{module}"), name)


@register("cosmos3omni")
def cosmos3omni():
    torch.manual_seed(0)
    m = _module_cls("transformer_cosmos3", "Cosmos3OmniTransformer")(
        dtype="float32", head_dim=16, hidden_size=32, intermediate_size=64, latent_channel=4, latent_patch_size=2,
        num_attention_heads=2, num_hidden_layers=3, num_key_value_heads=1, patch_latent_dim=16, vocab_size=64,
        rope_axes_dim=(4, 2, 2)).eval()
    r = _randn()
    # one packed sequence: 5 prompt tokens ("understanding"), then the 1 x 4 x 4 patches of one noisy latent
    text, image = 5, 16
    pos = torch.cat([torch.arange(text)[None].expand(3, text), text + _grid_ids(4, 4, 3).long().T], dim=1)
    vision = torch.arange(text, text + image)
    return m, dict(input_ids=torch.tensor([1, 7, 12, 30, 2]), text_indexes=torch.arange(text), position_ids=pos,
                   und_len=text, sequence_length=text + image, vision_tokens=[r(1, 4, 1, 8, 8)],
                   vision_token_shapes=[(1, 4, 4)], vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
                   vision_timesteps=torch.full((image,), 500.0), vision_noisy_frame_indexes=[torch.tensor([0])],
                   return_dict=False)


@register("rfd4proteina")
def rfd4proteina(update_pair_repr_every_n: int = 2):
    torch.manual_seed(0)
    m = _module_cls("transformer_rfd4_proteina", "RFD4ProteinaTransformer")(
        nlayers=4, token_dim=32, nheads=2, dim_cond=16, pair_repr_dim=16, latent_dim=8, t_emb_dim=16, seq_sep_dim=8,
        xt_pair_dist_dim=8, feats_seq=("xt_bb_ca", "xt_local_latents"),
        feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"), feats_pair_repr=("xt_bb_ca_pair_dists",),
        feats_pair_cond=("time_emb_bb_ca",), update_pair_repr_every_n=update_pair_repr_every_n, tri_mult_c=16).eval()
    r = _randn()
    return m, dict(bb_ca=r(1, 12, 3), local_latents=r(1, 12, 8), bb_ca_time=_t(0.5), local_latents_time=_t(0.5),
                   padding_mask=torch.ones(1, 12, dtype=torch.bool), token_type=torch.zeros(1, 12, dtype=torch.long),
                   conditioning={"is_in_context_conditioning": torch.zeros(1, 12, dtype=torch.bool),
                                 "supports_local_latent": torch.ones(1, 12, dtype=torch.bool)},
                   return_dict=False)
