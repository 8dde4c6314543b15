"""An eager reference of reference/algorithms.md §4 (DBPrune), written for the tests only.

Like dbcache_reference.py it runs the models' blocks by hand and keeps the state in Python: per CFG
slot, per block, the block's input when it last computed and its residual per stream. The compiled
backend (cache_type="dbprune") must reproduce its decisions and outputs.
"""

from __future__ import annotations

import dataclasses

import torch

from dbcache_reference import RefCalibration, context_of, relative_l1, sequential_temb


@dataclasses.dataclass
class PruneConfig(RefCalibration):
    """DBPrune's options; the calibrator's (RefCalibration) forecast each block's residual from the
    steps that block computed."""

    Fn: int = 1
    Bn: int = 0
    threshold: float = 0.08
    warmup: int = 8
    interval: int = 1
    max_cached: int = -1
    max_continuous: int = -1
    non_prune: tuple[int, ...] = ()
    dynamic: bool = False
    relax: float = 1.25  # dynamic_prune_threshold_relax_ratio
    cap: float | None = None  # max_dynamic_prune_threshold (None: 2 * threshold)
    downsample: int = 1  # downsample_factor: a block's input is compared on every k-th channel
    important: float = 0.0  # important_condition_threshold
    refresh: int | None = None  # force_refresh_step_hint
    repeat: bool = False  # force_refresh_step_policy="repeat"

    def options(self, compiler: str = "eager") -> dict:
        return {"compiler": compiler, "cache_type": "dbprune", "Fn_compute_blocks": self.Fn,
                "Bn_compute_blocks": self.Bn, "residual_diff_threshold": self.threshold,
                "max_warmup_steps": self.warmup, "warmup_interval": self.interval,
                "max_cached_steps": self.max_cached, "max_continuous_cached_steps": self.max_continuous,
                "non_prune_block_ids": list(self.non_prune), "enable_dynamic_prune_threshold": self.dynamic,
                "dynamic_prune_threshold_relax_ratio": self.relax, "max_dynamic_prune_threshold": self.cap,
                "downsample_factor": self.downsample, "important_condition_threshold": self.important,
                "force_refresh_step_hint": self.refresh,
                "force_refresh_step_policy": "repeat" if self.repeat else "once", **self.calibrator_options()}


@dataclasses.dataclass
class PruneSlot:
    inputs: dict = dataclasses.field(default_factory=dict)  # block -> hidden input when last computed
    residuals: dict = dataclasses.field(default_factory=dict)  # block -> {stream: residual}
    history: dict = dataclasses.field(default_factory=dict)  # block -> [(step, residuals)] of its computed steps
    used: dict = dataclasses.field(default_factory=dict)  # block -> [(step, residuals used)] (FoCa's window)
    cached: int = 0  # steps with a pruned block, this request
    run: int = 0  # such steps in a row
    context: int = 0  # the request's cache context (force_refresh_step_hint)


class RefPrune:
    def __init__(self, cfg: PruneConfig, num_blocks: int):
        self.cfg, self.n = cfg, num_blocks
        self.slots: dict[int, PruneSlot] = {}
        self.decisions: list[tuple[int, int, list[int]]] = []  # (step, slot, pruned block indices)
        self.thresholds: list[float] = []  # the threshold each block decision used

    def new_request(self) -> None:
        self.slots = {}

    def prunable(self, b: int) -> bool:
        c = self.cfg
        return c.Fn <= b < self.n - c.Bn and b not in c.non_prune

    def begin(self, step: int, slot: int) -> None:
        c = self.cfg
        ctx, local = context_of(step, c.refresh, c.repeat)
        st = self.slots.get(slot)
        if st is None or st.context != ctx:
            st = self.slots[slot] = PruneSlot(context=ctx)
        self.allowed = not (local in range(0, c.warmup, c.interval)
                            or (c.max_cached >= 0 and st.cached >= c.max_cached)
                            or (c.max_continuous >= 0 and st.run >= c.max_continuous)
                            or c.threshold <= 0)
        self.step, self.slot, self.diffs = step, slot, []
        self.decisions.append((step, slot, []))

    def prune(self, b: int, h: torch.Tensor) -> bool:
        c, st = self.cfg, self.slots[self.slot]
        if not self.prunable(b) or b not in st.inputs:
            return False
        a, h = st.inputs[b], h[..., ::c.downsample]
        diff = relative_l1(h, a, c.important)
        thr = c.threshold
        positive = [d for d in self.diffs if d > 0][:5]
        if c.dynamic and positive:
            relaxed = c.relax * sum(positive) / len(positive)
            if relaxed < (2 * c.threshold if c.cap is None else c.cap):
                thr = max(thr, relaxed)
        self.diffs.append(diff)
        self.thresholds.append(thr)
        hit = self.allowed and diff < thr
        if hit:
            self.decisions[-1][2].append(b)
        return hit

    def residuals(self, b: int, entries: dict) -> dict:
        """What pruned block ``b`` adds to its inputs ``entries`` per stream: its last residual, or
        the calibrator's forecast from the steps the block computed."""
        st = self.slots[self.slot]
        return self.cfg.forecast(st.history[b], st.used[b], st.residuals[b], self.step, entries)

    def store(self, b: int, h: torch.Tensor, residuals: dict, entries: dict) -> None:
        """Block ``b`` computed from its inputs ``entries`` (``h`` the hidden one)."""
        if self.prunable(b):
            st = self.slots[self.slot]
            kept = self.cfg.kept(residuals, entries)
            st.inputs[b], st.residuals[b] = h[..., ::self.cfg.downsample], kept
            st.history.setdefault(b, []).append((self.step, kept))
            st.used.setdefault(b, []).append((self.step, kept))

    def end(self) -> None:
        st = self.slots[self.slot]
        if self.decisions[-1][2]:
            st.cached += 1
            st.run += 1
        else:
            st.run = 0


def prune_blocks(ref: RefPrune, blocks, h: torch.Tensor, run, step: int, slot: int = 0) -> torch.Tensor:
    """DBPrune over one hidden stream: ``run(block, h)`` computes a block."""
    ref.begin(step, slot)
    for b, block in enumerate(blocks):
        if ref.prune(b, h):
            h = h + ref.residuals(b, {"hidden": h})["hidden"]
        else:
            out = run(block, h)
            ref.store(b, h, {"hidden": out - h}, {"hidden": h})
            h = out
    ref.end()
    return h


def run_sequential_dit(model, x, t, ref: RefPrune, step: int, slot: int = 0):
    """cdcompile.testing.SequentialDiT's forward with DBPrune over ``model.blocks``."""
    temb = sequential_temb(model, x, t)
    h = prune_blocks(ref, model.blocks, model.proj_in(x), lambda block, h: block(h, temb), step, slot)
    return model.proj_out(h)


def run_pair_dit(model, x, t, ref: RefPrune, step: int, slot: int = 0):
    """cdcompile.testing.PairDiT with DBPrune over its blocks: a pruned block adds its hidden
    residual; the pairs, which no block returns, are updated after it all the same."""
    temb, h, p = model.embed(x, t)
    ref.begin(step, slot)
    for b, block in enumerate(model.blocks):
        if ref.prune(b, h):
            h = h + ref.residuals(b, {"hidden": h})["hidden"]
        else:
            out = block(h, temb, p)
            ref.store(b, h, {"hidden": out - h}, {"hidden": h})
            h = out
        p = model.update(b, h, p)
    ref.end()
    return model.head(h, p)


def run_skip_dit(model, x, t, ref: RefPrune, step: int, slot: int = 0):
    """cdcompile.testing.SkipDiT with DBPrune over its blocks: a pruned block's output (its input
    plus its residual) is also the skip a block of the second half reads."""
    temb = sequential_temb(model, x, t)
    blocks = list(model.blocks)
    n, k = len(blocks), len(blocks) // 2
    outs: dict[int, torch.Tensor] = {}
    h = model.proj_in(x)
    ref.begin(step, slot)
    for b, block in enumerate(blocks):
        if ref.prune(b, h):
            out = h + ref.residuals(b, {"hidden": h})["hidden"]
        else:
            out = block(h, temb, outs[n - 1 - b]) if b > k else block(h, temb)
            ref.store(b, h, {"hidden": out - h}, {"hidden": h})
        h = outs[b] = out
    ref.end()
    return model.proj_out(h)


def run_flux(model, kw: dict, ref: RefPrune, step: int, slot: int = 0):
    """FluxTransformer2DModel's forward (diffusers 0.42) with DBPrune over its 2-group stack."""
    hs = model.x_embedder(kw["hidden_states"])
    t = kw["timestep"].to(hs.dtype) * 1000
    temb = model.time_text_embed(t, kw["pooled_projections"])
    enc = model.context_embedder(kw["encoder_hidden_states"])
    rope = model.pos_embed(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=0))
    stack = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    ref.begin(step, slot)
    for b, block in enumerate(stack):
        if ref.prune(b, hs):
            res = ref.residuals(b, {"hidden": hs, "encoder": enc})
            hs, enc = hs + res["hidden"], enc + res["encoder"]
        else:
            e, h = block(hidden_states=hs, encoder_hidden_states=enc, temb=temb, image_rotary_emb=rope)
            ref.store(b, hs, {"hidden": h - hs, "encoder": e - enc}, {"hidden": hs, "encoder": enc})
            hs, enc = h, e
    ref.end()
    return model.proj_out(model.norm_out(hs, temb))
