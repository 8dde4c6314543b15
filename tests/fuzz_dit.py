"""Random DiT-shaped models for the tests: one seed, one model, and its eager DBCache reference.

cdcompile has no per-model code, so the models a user brings are the ones its passes have never
seen. ``draw_spec(seed)`` draws the choices a DiT's author makes: one stream or two (image and text
tokens, joint attention), one or two block groups of different classes, adaLN modulation or an
added timestep or none, LayerNorm or RMSNorm (by hand or ``nn.RMSNorm``), SDPA or attention written
out, rotary embeddings, a key-padding mask, a GELU or SwiGLU MLP, an in-place residual add on a
fresh tensor, cross-attention to the text instead of joint attention (per group), a LayerNorm
between the groups or the text and image tokens joined there into one stream for the second group
(FLUX.2's single blocks), one block class for both groups, classifier-free guidance (two calls per
step at one timestep), float32 or bfloat16, blocks kept in a ModuleList, a ModuleDict or as
attributes, a calibrator (TaylorSeer of order 1 or 2 in either
form, FoCa, DMD) and how a block is called (by position or keyword) and what it returns (a tuple in
either order, the image stream alone, or a dict). ``run_reference`` runs the same model with the
DBCache of reference/algorithms.md §1 over the whole stack in Python (dbcache_reference.RefCache).
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dbcache_reference import RefCache, RefConfig


@dataclasses.dataclass
class GroupSpec:
    depth: int
    norm: str  # "layer", "rms" (by hand), "rms_module" (nn.RMSNorm)
    attn: str  # "sdpa", "manual", "sdpa_kernel" (SDPA inside ``with sdpa_kernel(MATH)``)
    mlp: str  # "gelu", "swiglu"
    modulation: str  # "adaln", "add", "none"
    inplace: bool  # the MLP's residual add is in place (on a fresh tensor)
    updates_encoder: bool  # two streams: the block returns the text stream updated
    returns: str  # "tuple_he", "tuple_eh", "dict" (two streams and updates_encoder), else "h"
    call: str  # "pos", "kw"
    # two streams: self-attention over the image tokens, then cross-attention to the text, which
    # the block reads and does not return (PixArt, Wan, Sana); else joint attention
    cross: bool = False
    # the second group's blocks run on one stream, the text and image tokens joined between the
    # groups (FLUX.2, Chroma, AuraFlow, BFL's FLUX); the image tokens are split off after the stack
    joined: bool = False


@dataclasses.dataclass
class DiTSpec:
    seed: int
    width: int
    heads: int
    two_streams: bool
    img_tokens: int
    txt_tokens: int
    batch: int
    rope: bool
    mask: bool
    groups: list[GroupSpec]
    glue: bool  # two groups: a LayerNorm on the image stream between them (not a block)
    same_class: bool  # two groups: both ModuleLists hold one block class
    cfg: bool  # each step calls the model twice at one timestep (conditional, unconditional)
    join: bool = False  # two streams, two groups: the glue joins them for the second (GroupSpec.joined)
    dtype: str = "float32"  # of the weights and the inputs: "float32" or "bfloat16"
    # where a group keeps its blocks: "list" (an nn.ModuleList), "dict" (an nn.ModuleDict whose
    # names do not sort in the order the blocks run), "attrs" (attributes of a plain module)
    storage: str = "list"
    passes: int = 1  # one group: the forward runs through its blocks this many times (shared weights)
    rising: bool = False  # time rises over a request (flow matching from 0 to 1), else falls from 1

    @property
    def num_blocks(self) -> int:
        return sum(g.depth for g in self.groups) * self.passes


def draw_spec(seed: int) -> DiTSpec:
    r = random.Random(seed)
    two = r.random() < 0.6
    groups = []
    for gi in range(r.choice((1, 1, 2))):
        updates = two and (gi == 0 or r.random() < 0.5)
        returns = r.choice(("tuple_he", "tuple_eh", "dict")) if updates else "h"
        groups.append(GroupSpec(
            depth=r.randint(2, 5), norm=r.choice(("layer", "rms", "rms_module")), attn=r.choice(("sdpa", "manual")),
            mlp=r.choice(("gelu", "swiglu")), modulation=r.choice(("adaln", "adaln", "add", "none")),
            inplace=r.random() < 0.3, updates_encoder=updates, returns=returns, call=r.choice(("pos", "kw"))))
    img = r.randint(6, 20)
    spec = DiTSpec(seed=seed, width=r.choice((16, 32)), heads=2, two_streams=two, img_tokens=img,
                   txt_tokens=r.randint(2, min(5, img - 1)), batch=r.randint(1, 2), rope=r.random() < 0.5,
                   mask=two and r.random() < 0.4, groups=groups, glue=len(groups) == 2 and r.random() < 0.4,
                   same_class=len(groups) == 2 and r.random() < 0.25, cfg=r.random() < 0.3)
    for g in groups:  # drawn last, so that the draws above stay what they were before this choice
        if two and r.random() < 0.35:
            g.cross, g.updates_encoder, g.returns = True, False, "h"
    if len(groups) == 2 and groups[0].updates_encoder and not groups[0].cross and r.random() < 0.4:  # drawn after
        spec.join, spec.glue = True, False
        groups[1].joined, groups[1].cross, groups[1].updates_encoder, groups[1].returns = True, False, False, "h"
    if r.random() < 0.2:  # drawn after
        spec.dtype = "bfloat16"
    spec.storage = r.choice(("list", "list", "dict", "attrs"))  # drawn after
    for g in groups:  # drawn after: SDPA run inside ``with sdpa_kernel(...)`` (diffusers' _native_math)
        if g.attn == "sdpa" and r.random() < 0.3:
            g.attn = "sdpa_kernel"
    if len(groups) == 1 and r.random() < 0.25:  # drawn after
        spec.passes = 2
    spec.rising = r.random() < 0.2  # drawn after
    return spec


class _Named(nn.Module):
    """Blocks kept as attributes (``layer_z``, ``layer_y``, ...), never called itself."""

    def __init__(self, blocks):
        super().__init__()
        for k, b in enumerate(blocks):
            setattr(self, _block_name(k), b)

    def __iter__(self):
        return iter(self.children())


def _block_name(k: int) -> str:
    return f"layer_{chr(ord('z') - k)}"  # runs z, y, x, ...: not sorted


def _store(blocks: list[nn.Module], storage: str) -> nn.Module:
    if storage == "dict":
        return nn.ModuleDict({_block_name(k): b for k, b in enumerate(blocks)})
    return _Named(blocks) if storage == "attrs" else nn.ModuleList(blocks)


def blocks_of(container: nn.Module) -> list[nn.Module]:
    """A group's blocks in the order they run, however ``DiTSpec.storage`` keeps them."""
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


class _RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(kind: str, d: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    return _RMSNorm(d) if kind == "rms" else nn.RMSNorm(d, eps=1e-6)


def _rotate(x, cos, sin):  # x (B, H, S, D); cos, sin (S, D): rotate pairs of channels
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rotated * sin


class _Block(nn.Module):
    def __init__(self, spec: DiTSpec, g: GroupSpec):
        super().__init__()
        d, self.spec, self.g = spec.width, spec, g
        self.norm1, self.norm2 = _norm(g.norm, d), _norm(g.norm, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        hidden = 2 * d
        self.mlp_in = nn.Linear(d, 2 * hidden if g.mlp == "swiglu" else hidden)
        self.mlp_out = nn.Linear(hidden, d)
        if g.modulation == "adaln":
            self.mod = nn.Linear(d, 6 * d)
        elif g.modulation == "add":
            self.mod = nn.Linear(d, d)
        if spec.two_streams and g.cross:
            self.norm_c = _norm(g.norm, d)
            self.q_c, self.kv_c, self.out_c = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        elif spec.two_streams and not g.joined:
            self.norm_e = _norm(g.norm, d)
            self.qkv_e = nn.Linear(d, 3 * d)
            if g.updates_encoder:
                self.out_e = nn.Linear(d, d)
                self.mlp_e = nn.Linear(d, d)

    def _mlp(self, x):
        y = self.mlp_in(x)
        if self.g.mlp == "swiglu":
            a, b = y.chunk(2, dim=-1)
            y = F.silu(a) * b
        else:
            y = F.gelu(y, approximate="tanh")
        return self.mlp_out(y)

    def _attend(self, q, k, v, mask):
        if self.g.attn == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.g.attn == "sdpa_kernel":
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ v

    def forward(self, hidden_states, encoder_hidden_states=None, temb=None, rotary=None, mask=None):
        h, enc, g, heads = hidden_states, encoder_hidden_states, self.g, self.spec.heads
        ones = torch.ones_like(temb)[:, None]
        shift1 = scale1 = shift2 = scale2 = torch.zeros_like(temb)[:, None]
        gate1 = gate2 = ones
        if g.modulation == "adaln":
            shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(F.silu(temb))[:, None].chunk(6, dim=-1)
        elif g.modulation == "add":
            h = h + self.mod(temb)[:, None]
        x = self.norm1(h) * (1 + scale1) + shift1
        q, k, v = self.qkv(x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)  # each (B, H, S, D)
        n_txt = 0
        if enc is not None and not g.cross:
            qe, ke, ve = self.qkv_e(self.norm_e(enc)).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
            n_txt = enc.shape[1]
            q, k, v = torch.cat([qe, q], dim=2), torch.cat([ke, k], dim=2), torch.cat([ve, v], dim=2)
        if rotary is not None:
            cos, sin = rotary
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = self._attend(q, k, v, None if g.cross else mask).transpose(1, 2).flatten(2)  # (B, S, width)
        h = h + gate1 * self.out(o[:, n_txt:])
        if g.cross:  # queries from the image, keys and values from the text, the text mask
            qc = self.q_c(self.norm_c(h)).unflatten(-1, (heads, -1)).transpose(1, 2)
            kc, vc = self.kv_c(enc).unflatten(-1, (2, heads, -1)).permute(2, 0, 3, 1, 4)
            h = h + self.out_c(self._attend(qc, kc, vc, mask).transpose(1, 2).flatten(2))
        y = self._mlp(self.norm2(h) * (1 + scale2) + shift2)
        if g.inplace:
            h = h + 0.0 * y  # a fresh tensor, then an in-place add on it
            h += gate2 * y
        else:
            h = h + gate2 * y
        if enc is None or not g.updates_encoder:
            return h
        enc = enc + self.out_e(o[:, :n_txt])
        enc = enc + self.mlp_e(F.gelu(self.norm_e(enc)))
        if g.returns == "tuple_eh":
            return enc, h
        if g.returns == "dict":
            return {"hidden_states": h, "encoder_hidden_states": enc}
        return h, enc


class RandomDiT(nn.Module):
    """Built from a ``DiTSpec``: one ModuleList per group, each of its own block class."""

    def __init__(self, spec: DiTSpec):
        super().__init__()
        torch.manual_seed(spec.seed)
        d = spec.width
        self.spec = spec
        self.x_in = nn.Linear(4, d)
        self.t_in = nn.Sequential(nn.Linear(16, d), nn.SiLU(), nn.Linear(d, d))
        if spec.two_streams:
            self.e_in = nn.Linear(6, d)
        classes = [type(f"FuzzBlock{chr(65 + gi)}", (_Block,), {}) for gi in range(len(spec.groups))]
        if spec.same_class:
            classes = [classes[0]] * len(classes)
        self.groups = nn.ModuleList(_store([cls(spec, g) for _ in range(g.depth)], spec.storage)
                                    for cls, g in zip(classes, spec.groups))
        if spec.glue and not spec.join:
            self.glue = nn.LayerNorm(d)
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mod_out = nn.Linear(d, 2 * d)
        self.x_out = nn.Linear(d, 4)
        self.to(getattr(torch, spec.dtype))

    def prologue(self, x, t, enc_in=None, enc_mask=None):
        h = self.x_in(x)
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, dtype=x.dtype) / 8)
        angles = t.reshape(-1, 1).to(x.dtype) * 1000 * freqs
        temb = self.t_in(torch.cat([angles.cos(), angles.sin()], dim=-1))
        enc = self.e_in(enc_in) if self.spec.two_streams else None
        tokens = h.shape[1] + (enc.shape[1] if enc is not None else 0)
        ctx = dict(temb=temb, rotary=None, mask=None, rotary_img=None, mask_txt=None,
                   n_txt=enc.shape[1] if enc is not None else 0)
        if self.spec.rope:  # over the joint tokens, and over the image tokens alone (cross groups)
            half = self.spec.width // self.spec.heads // 2
            pos = torch.arange(tokens, dtype=x.dtype)[:, None] * torch.exp(-torch.arange(half, dtype=x.dtype))
            ctx["rotary"] = (pos.cos().repeat_interleave(2, -1), pos.sin().repeat_interleave(2, -1))
            ctx["rotary_img"] = tuple(r[:h.shape[1]] for r in ctx["rotary"])
        if enc_mask is not None:
            ctx["mask"] = torch.cat([enc_mask, torch.ones(h.shape[:2], dtype=torch.bool)], dim=1)[:, None, None, :]
            ctx["mask_txt"] = enc_mask[:, None, None, :]
        return h, enc, ctx

    def call_block(self, gi, block, h, enc, ctx):
        """One block, called as its group's spec says; returns (h, enc) whatever the block returns."""
        g = self.spec.groups[gi]
        rotary, mask = (ctx["rotary_img"], ctx["mask_txt"]) if g.cross else (ctx["rotary"], ctx["mask"])
        if g.call == "pos":
            out = block(h, enc, ctx["temb"], rotary, mask)
        else:
            out = block(hidden_states=h, encoder_hidden_states=enc, temb=ctx["temb"], rotary=rotary, mask=mask)
        if isinstance(out, dict):
            return out["hidden_states"], out["encoder_hidden_states"]
        if isinstance(out, tuple):
            return (out[1], out[0]) if g.returns == "tuple_eh" else out
        return out, enc

    def epilogue(self, h, ctx):
        if self.spec.join:  # the image tokens of the joined stream
            h = h[:, ctx["n_txt"]:]
        shift, scale = self.mod_out(F.silu(ctx["temb"]))[:, None].chunk(2, dim=-1)
        return self.x_out(self.norm_out(h) * (1 + scale) + shift)

    def forward(self, x, t, enc_in=None, enc_mask=None):
        h, enc, ctx = self.prologue(x, t, enc_in, enc_mask)
        for item in self.stack():
            h, enc = self.run_item(item, h, enc, ctx)
        return self.epilogue(h, ctx)

    def stack(self) -> list[tuple[int, nn.Module | None]]:
        """The blocks in order as (group, block), with (-1, None) for the glue between groups."""
        out = []
        for gi, blocks in enumerate(self.groups):
            if gi > 0 and (self.spec.glue or self.spec.join):
                out.append((-1, None))
            out += [(gi, b) for b in blocks_of(blocks)]
        return out * self.spec.passes  # passes > 1: one group

    def run_item(self, item, h, enc, ctx):
        gi, block = item
        if block is not None:
            return self.call_block(gi, block, h, enc, ctx)
        return (torch.cat([enc, h], dim=1), None) if self.spec.join else (self.glue(h), enc)

    def joined(self, items, h, enc):
        """(h, enc) as the join among ``items`` (stack items) makes them: one stream, text first."""
        if self.spec.join and (-1, None) in items:
            return torch.cat([enc, h], dim=1), None
        return h, enc


def trajectory(spec: DiTSpec, steps: int) -> list[list[dict]]:
    """A request's inputs, per step the calls of that step (two with ``cfg``: conditional and
    unconditional text at one timestep): latents moving a little each step, the timestep falling
    from 1 (``rising``: rising to 1)."""
    g = torch.Generator().manual_seed(spec.seed)
    x0 = torch.randn(spec.batch, spec.img_tokens, 4, generator=g)
    dx = torch.randn(spec.batch, spec.img_tokens, 4, generator=g)
    texts = [{} for _ in range(2 if spec.cfg else 1)]
    for k, text in enumerate(texts):
        if spec.two_streams:
            text["enc_in"] = torch.randn(spec.batch, spec.txt_tokens, 6, generator=g)
        if spec.mask:
            m = torch.ones(spec.batch, spec.txt_tokens, dtype=torch.bool)
            m[-1, max(1, spec.txt_tokens - 1 - k):] = False  # padding: the last sample's last text token(s), not all
            text["enc_mask"] = m
    if spec.cfg and not spec.two_streams:  # no text: the second call's latents differ instead
        texts[1]["shift"] = 0.5
    dtype = getattr(torch, spec.dtype)
    calls = []
    for s in range(steps):
        t = torch.full((spec.batch,), (s + 1) / steps if spec.rising else 1.0 - s / steps, dtype=dtype)
        step = []
        for text in texts:
            text = dict(text)
            x = x0 + 0.03 * s * dx + text.pop("shift", 0.0)
            if "enc_in" in text:
                text["enc_in"] = text["enc_in"].to(dtype)
            step.append(dict(x=x.to(dtype), t=t, **text))
        calls.append(step)
    return calls


def reference_clock(spec: DiTSpec, steps: int, first: bool = True) -> list[tuple[int, bool]]:
    """Per step of a request: the step index the backend's clock gives it, and whether the
    reference starts a request there. Time falling: ``(s, False)``. Time rising, in the first
    request a cache state sees (cdcompile.guard.tick): step 1 looks like a request of its own (the
    slots reset: step 0 forgotten), and the call after it learns the direction and goes on at step
    2, step 1 renumbered as such (guard.fold_nodes)."""
    if not (spec.rising and first):
        return [(s, False) for s in range(steps)]
    return [(0, False), (1, True)][:steps] + [(s, False) for s in range(2, steps)]


def run_reference(model: RandomDiT, inputs: dict, cache: RefCache, step: int, slot: int = 0) -> torch.Tensor:
    """``model``'s forward with DBCache over its whole stack (every group), one residual per stream.

    F is the first ``Fn`` blocks and B the last ``Bn``; M is everything between them, glue
    included, except glue right after F's last block or right before B's first: that glue runs on
    every step (it reads F's output or feeds B's input, outside the skipped blocks)."""
    c = cache.cfg
    h, enc, ctx = model.prologue(**inputs)
    stack = model.stack()
    at = [k for k, (_, b) in enumerate(stack) if b is not None]  # positions of the blocks
    f_end = at[c.Fn - 1] + 1
    m_first, m_last = at[c.Fn], at[len(at) - c.Bn - 1]
    h0 = h
    for item in stack[:f_end]:
        h, enc = model.run_item(item, h, enc, ctx)
    hf_decide = h
    for item in stack[f_end:m_first]:  # glue between F and M
        h, enc = model.run_item(item, h, enc, ctx)
    # a join of the streams inside M: the residual is the joined stream's, against F's streams joined
    hf, ef = model.joined(stack[m_first:m_last + 1], h, enc)
    if cache.decide(step, slot, hf_decide - h0):
        res = cache.residuals(slot, {"hidden": hf, "encoder": ef})
        h = hf + res["hidden"]
        enc = ef + res["encoder"] if ef is not None else None
    else:
        for item in stack[m_first:m_last + 1]:
            h, enc = model.run_item(item, h, enc, ctx)
        cache.store(slot, {"hidden": h - hf, **({"encoder": enc - ef} if enc is not None else {})},
                    {"hidden": hf, "encoder": ef})
    for item in stack[m_last + 1:]:  # glue between M and B, then B
        h, enc = model.run_item(item, h, enc, ctx)
    return model.epilogue(h, ctx)


def draw_cache_config(spec: DiTSpec) -> RefConfig:
    """F, B, warmup and the limits for ``spec``'s stack, with a threshold that caches every step
    the limits allow (the outputs then test the cached residuals of every stream)."""
    r = random.Random(spec.seed + 1000)
    n = spec.num_blocks
    fn = r.randint(1, min(2, n - 1))
    bn = r.randint(0, min(1, n - fn - 1))
    cfg = RefConfig(Fn=fn, Bn=bn, threshold=1e6, warmup=r.randint(0, 3), max_cached=r.choice((-1, -1, 3)),
                    max_continuous=r.choice((-1, -1, 2)))
    calibrator = r.choice((None, None, "taylorseer", "foca"))  # drawn last: the draws above stay
    if calibrator == "taylorseer":
        cfg.calibrator, cfg.order, cfg.form = calibrator, r.choice((1, 2)), r.choice(("taylor", "newton"))
    elif calibrator == "foca":
        cfg.calibrator = calibrator
    cfg.max_accumulated = r.choice((None, None, None, 0.5))  # drawn after the calibrator: its draws stay
    cfg.downsample = r.choice((1, 1, 1, 2, 3))
    cfg.important = r.choice((0.0, 0.0, 0.0, 0.05))
    # force_refresh_step_hint, drawn last as well; past the warmup, so that a context can cache
    cfg.refresh = r.choice((None, None, None, cfg.warmup + 2, cfg.warmup + 3))
    cfg.repeat = cfg.refresh is not None and r.random() < 0.5
    cfg.share = r.random() < 0.3  # cfg_diff_compute_separate=False (a CFG model's later calls)
    if cfg.calibrator == "foca":
        cfg.foca_slope = r.choice(("gap", "step"))
    if cfg.calibrator is not None:  # drawn last: what to forecast (the text stream only where there is one)
        cfg.streams = r.choice(("all", "all", "hidden", "encoder") if spec.two_streams else ("all", "all", "hidden"))
        cfg.values = r.random() < 0.3
    if cfg.calibrator == "taylorseer" and r.random() < 0.4:  # drawn last: DMD in TaylorSeer's place
        cfg.calibrator, cfg.order, cfg.form = "dmd", 0, "taylor"
        cfg.dmd = (r.choice((4, 6)), 0, 1e-8, r.choice((0, 1, 2)), r.choice(("cache-dit", "taylorseer")))
    return cfg


def draw_prune_config(spec: DiTSpec):
    """DBPrune with the seed's DBCache draws (F, B, warmup, limits, guard options, calibrator) and
    some middle blocks never pruned, with a threshold that prunes every block the limits allow: the
    blocks computed between pruned ones then read the forecasts."""
    from dbprune_reference import PruneConfig

    c = draw_cache_config(spec)
    r = random.Random(spec.seed + 2000)
    middle = list(range(c.Fn, spec.num_blocks - c.Bn))
    non_prune = [i for i in middle if r.random() < 0.3][:len(middle) - 1]  # one block at least stays prunable
    return PruneConfig(Fn=c.Fn, Bn=c.Bn, threshold=1e6, warmup=c.warmup, max_cached=c.max_cached,
                       max_continuous=c.max_continuous, non_prune=tuple(non_prune), downsample=c.downsample,
                       important=c.important, refresh=c.refresh, repeat=c.repeat, order=c.order, form=c.form,
                       calibrator=c.calibrator, foca_slope=c.foca_slope, streams=c.streams, values=c.values,
                       dmd=c.dmd)


def cache_options(cfg: RefConfig, compiler: str) -> dict:
    """The backend's options for the reference's configuration."""
    opts = {"compiler": compiler, "Fn_compute_blocks": cfg.Fn, "Bn_compute_blocks": cfg.Bn,
            "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup,
            "max_cached_steps": cfg.max_cached, "max_continuous_cached_steps": cfg.max_continuous,
            "max_accumulated_residual_diff_threshold": cfg.max_accumulated, "downsample_factor": cfg.downsample,
            "important_condition_threshold": cfg.important, "force_refresh_step_hint": cfg.refresh,
            "force_refresh_step_policy": "repeat" if cfg.repeat else "once", "cfg_diff_compute_separate": not cfg.share}
    return {**opts, **cfg.calibrator_options()}


def features(spec: DiTSpec) -> set[str]:
    """What a seed's model exercises, to check that a set of seeds covers every choice."""
    cfg = draw_cache_config(spec)
    out = {k for k in ("two_streams", "glue", "same_class", "cfg", "mask", "rope", "join") if getattr(spec, k)}
    out |= {spec.dtype, f"storage={spec.storage}", f"passes={spec.passes}", f"rising={spec.rising}"}
    if cfg.calibrator == "taylorseer":  # the two forms are one polynomial at order 1
        out.add(f"calibrator=taylorseer{cfg.order}" + (f" {cfg.form}" if cfg.order > 1 else ""))
    else:
        out.add(f"calibrator={cfg.calibrator}" + (f" {cfg.foca_slope}" if cfg.calibrator == "foca" else ""))
    if cfg.calibrator is not None:
        out.add(f"calibrated_streams={cfg.streams}")
        if cfg.values:
            out.add("calibrator_cache_type=hidden_states")
    if cfg.max_accumulated is not None:
        out.add("accumulated_budget")
    if cfg.downsample > 1:
        out.add("downsample")
    if cfg.important > 0:
        out.add("important_tokens")
    if cfg.refresh is not None:
        out.add("refresh_" + ("repeat" if cfg.repeat else "once"))
    if cfg.share and spec.cfg:
        out.add("cfg_shared_diff")
    if len(spec.groups) == 2:
        out.add("two_groups")
        # the first group refines the text stream, the second only reads it, and a B block reads it
        if (spec.two_streams and not spec.groups[1].updates_encoder and cfg.Bn > 0
                and cfg.Fn < spec.groups[0].depth and spec.groups[0].updates_encoder):
            out.add("text_read_after_m_by_a_later_group")
        # the reverse: the first group only reads the text, the next updates it, M spans both
        if (spec.two_streams and not spec.groups[0].updates_encoder and spec.groups[1].updates_encoder
                and cfg.Fn < spec.groups[0].depth and cfg.Bn < spec.groups[1].depth):
            out.add("text_updated_in_m_by_a_later_group")
    for g in spec.groups:
        out |= {f"norm={g.norm}", f"attn={g.attn}", f"mlp={g.mlp}", f"modulation={g.modulation}",
                f"returns={g.returns}", f"call={g.call}"}
        out |= {name for name, on in (("cross_attention", g.cross), ("inplace", g.inplace)) if on}
    return out


def run_prune_reference(model: RandomDiT, inputs: dict, ref, step: int, slot: int = 0) -> torch.Tensor:
    """``model``'s forward with DBPrune (dbprune_reference.RefPrune) over its whole stack: a pruned
    block adds its residual per stream it returns; the glue between groups always runs."""
    h, enc, ctx = model.prologue(**inputs)
    ref.begin(step, slot)
    b = 0
    for item in model.stack():
        if item[1] is None:
            h, enc = model.run_item(item, h, enc, ctx)
            continue
        if ref.prune(b, h):
            res = ref.residuals(b, {"hidden": h, "encoder": enc})
            h = h + res["hidden"]
            if "encoder" in res:
                enc = enc + res["encoder"]
        else:
            h_out, enc_out = model.run_item(item, h, enc, ctx)
            res = {"hidden": h_out - h}
            if enc is not None and enc_out is not enc:
                res["encoder"] = enc_out - enc
            ref.store(b, h, res, {"hidden": h, "encoder": enc})
            h, enc = h_out, enc_out
        b += 1
    ref.end()
    return model.epilogue(h, ctx)
