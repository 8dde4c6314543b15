"""Tiny models and inputs for tests, demos and benchmarks (no downloads; random weights).

These build diffusers transformers at toy sizes together with the keyword inputs their
``forward`` takes. They are fixtures, not adapters: the backend never sees this module.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def tiny_flux(*, num_layers: int = 2, num_single_layers: int = 4, heads: int = 2, head_dim: int = 16,
              seed: int = 0, dtype: torch.dtype = torch.float32):
    """FLUX architecture at toy size (the config of reference/environment.md by default)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    rope = _rope_axes(head_dim)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=rope).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    # three even axes summing to head_dim, e.g. 16 -> (4, 6, 6), 64 -> (16, 24, 24)
    a = (head_dim // 4) & ~1
    b = ((head_dim - a) // 2) & ~1
    return (a, b, head_dim - a - b)


def flux_inputs(model, *, batch: int = 1, tokens: int = 64, text_tokens: int = 8, timestep: float = 0.5,
                seed: int = 0, dtype: torch.dtype | None = None) -> dict:
    """Keyword inputs for ``FluxTransformer2DModel.forward``."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    dtype = dtype or next(model.parameters()).dtype
    side = int(tokens ** 0.5)
    img_ids = torch.zeros(tokens, 3)
    if side * side == tokens:
        img_ids[:, 1] = torch.arange(side).repeat_interleave(side).float()
        img_ids[:, 2] = torch.arange(side).repeat(side).float()
    else:
        img_ids[:, 1] = torch.arange(tokens).float()
    return dict(
        hidden_states=torch.randn(batch, tokens, cfg.in_channels, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.full((batch,), timestep, dtype=dtype),
        img_ids=img_ids, txt_ids=torch.zeros(text_tokens, 3), return_dict=False,
    )


class SeqBlock(nn.Module):
    """A pre-norm residual MLP/attention block of a hand-written DiT (one hidden stream)."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mod = nn.Linear(dim, 2 * dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(temb).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm(x))


class SequentialDiT(nn.Module):
    """A hand-written DiT whose blocks are an ``nn.Sequential``-like ModuleList with a timestep."""

    def __init__(self, dim: int = 32, depth: int = 6, in_dim: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj_in = nn.Linear(in_dim, dim)
        self.t_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(SeqBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, in_dim)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        half = self.proj_in.out_features // 2
        freqs = torch.exp(-9.21 * torch.arange(half, device=x.device) / half)
        angles = timestep.reshape(-1, 1).float() * 1000 * freqs
        temb = self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1).to(x.dtype))
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h)


class BlockStack(nn.Module):
    """The smallest model with a clock and a block group around blocks a test writes: ``x`` plus a
    linear embedding of ``sin(timestep)``, then ``depth`` blocks made by ``make_block()``, each
    called as ``block(h)``."""

    def __init__(self, make_block, depth: int, dim: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(make_block() for _ in range(depth))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = x + self.embed(torch.sin(timestep)[:, None])[:, None]
        for block in self.blocks:
            h = block(h)
        return h


class PairBlock(nn.Module):
    """A :class:`SeqBlock` that also reads a pair representation (batch, tokens, tokens, 4)."""

    def __init__(self, dim: int):
        super().__init__()
        self.inner = SeqBlock(dim)
        self.from_pairs = nn.Linear(4, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return self.inner(x, temb) + self.from_pairs(pairs).mean(2)


class PairUpdate(nn.Module):
    """Refreshes the pair representation from the hidden stream (an outer product)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        a = self.fc(x)
        return pairs + torch.tanh(a[:, :, None] * a[:, None, :])


class PairDiT(SequentialDiT):
    """RFD4 Proteina's trunk in small: every block reads the hidden stream and a pair
    representation that no block returns; an update module keyed by block index refreshes the
    pairs after every ``every``-th block (not after the last), and the output reads both."""

    def __init__(self, depth: int = 5, every: int = 2, seed: int = 0):
        super().__init__(depth=depth, seed=seed)
        dim = self.proj_in.out_features
        self.blocks = nn.ModuleList(PairBlock(dim) for _ in range(depth))
        self.updates = nn.ModuleDict({str(i): PairUpdate(dim) for i in range(0, depth - 1, every)})
        self.pairs_in = nn.Linear(self.proj_in.in_features, 4)
        self.pairs_out = nn.Linear(4, self.proj_in.in_features)

    def embed(self, x: torch.Tensor, timestep: torch.Tensor):
        """(temb, hidden, pairs) entering the blocks."""
        half = self.proj_in.out_features // 2
        freqs = torch.exp(-9.21 * torch.arange(half, device=x.device) / half)
        angles = timestep.reshape(-1, 1).float() * 1000 * freqs
        temb = self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1).to(x.dtype))
        return temb, self.proj_in(x), self.pairs_in(x[:, :, None] - x[:, None, :])

    def update(self, i: int, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """The pairs after block ``i``."""
        return self.updates[str(i)](h, pairs) if str(i) in self.updates else pairs

    def head(self, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return self.proj_out(h) + self.pairs_out(pairs).mean(2)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb, h, pairs = self.embed(x, timestep)
        for i, block in enumerate(self.blocks):
            h = block(h, temb, pairs)
            pairs = self.update(i, h, pairs)
        return self.head(h, pairs)


class SkipBlock(nn.Module):
    """A :class:`SeqBlock` that first merges a long skip into its input (U-ViT, HunyuanDiT)."""

    def __init__(self, dim: int):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim)
        self.inner = SeqBlock(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.inner(self.skip_linear(torch.cat([x, skip], dim=-1)), temb)


class SkipDiT(SequentialDiT):
    """HunyuanDiT's long skips in small: ``depth = 2k + 1`` blocks in one list; blocks 0..k-1 push
    their outputs on a stack, block k is the middle, and blocks k+1..2k (:class:`SkipBlock`) each pop
    one, so block ``2k - i`` reads block ``i``'s output. Discovery sees two groups in ``blocks``."""

    def __init__(self, depth: int = 7, seed: int = 0):
        if depth % 2 != 1 or depth < 5:
            raise ValueError(f"SkipDiT: depth must be odd and >= 5 (two blocks per half), got {depth}")
        super().__init__(depth=depth, seed=seed)
        dim, k = self.proj_in.out_features, depth // 2
        self.blocks = nn.ModuleList([SeqBlock(dim) for _ in range(k + 1)] + [SkipBlock(dim) for _ in range(k)])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        half = self.proj_in.out_features // 2
        freqs = torch.exp(-9.21 * torch.arange(half, device=x.device) / half)
        angles = timestep.reshape(-1, 1).float() * 1000 * freqs
        temb = self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1).to(x.dtype))
        h, skips, k = self.proj_in(x), [], len(self.blocks) // 2
        for i, block in enumerate(self.blocks):
            if i > k:
                h = block(h, temb, skips.pop())
            else:
                h = block(h, temb)
                if i < k:
                    skips.append(h)
        return self.proj_out(h)


def tiny_flux_pipeline(transformer=None, *, seed: int = 0):
    """A ``FluxPipeline`` over a tiny FLUX transformer and a tiny VAE; no text encoders.

    Call it with ``prompt_embeds=`` and ``pooled_prompt_embeds=`` (see :func:`flux_prompt`).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = transformer if transformer is not None else tiny_flux(seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=transformer.config.in_channels // 4,
                        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                        norm_num_groups=4, shift_factor=0.1, scaling_factor=0.5).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
                        vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def flux_prompt(transformer, *, text_tokens: int = 8, seed: int = 0) -> dict:
    """Random ``prompt_embeds`` / ``pooled_prompt_embeds`` for :func:`tiny_flux_pipeline`."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return dict(prompt_embeds=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g))


def tiny_wan(*, num_layers: int = 4, seed: int = 0):
    """Wan 2.x architecture at toy size (2 heads of 8, 4 latent channels, 16-wide text)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32).eval()


def tiny_wan22_pipeline(*, boundary_ratio: float = 0.7, seed: int = 0):
    """A Wan 2.2 style ``WanPipeline``: ``transformer`` on the high-noise steps (timestep >=
    ``boundary_ratio`` * 1000), ``transformer_2`` on the rest; no VAE or text encoder.

    Call it with ``prompt_embeds=`` and ``negative_prompt_embeds=`` of shape (1, tokens, 16) and
    ``output_type="latent"`` (:func:`wan22_latents` runs one such request).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=tiny_wan(seed=seed), transformer_2=tiny_wan(seed=seed + 1),
                       boundary_ratio=boundary_ratio)


def wan22_latents(pipe, steps: int = 10) -> torch.Tensor:
    """One seeded request of :func:`tiny_wan22_pipeline` with CFG (7 text tokens, 5 frames of
    32x32): its final latents."""
    g = torch.Generator().manual_seed(0)
    prompt = dict(prompt_embeds=torch.randn(1, 7, 16, generator=g),
                  negative_prompt_embeds=torch.randn(1, 7, 16, generator=g))
    with torch.no_grad():
        return pipe(**prompt, height=32, width=32, num_frames=5, num_inference_steps=steps, guidance_scale=3.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames
