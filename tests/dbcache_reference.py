"""An eager reference of reference/algorithms.md §1 (DBCache), written for the tests only.

It runs a model's blocks by hand (the tests know the models) and keeps the cache state in Python,
one :class:`RefSlot` per CFG slot. The compiled backend must reproduce its decisions and outputs.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass
class RefCalibration:
    """The calibrator's options, shared by the DBCache and DBPrune references."""

    order: int = 0  # TaylorSeer order
    form: str = "taylor"  # TaylorSeer form: "taylor" (algorithms.md §2) or "newton"
    calibrator: str | None = None  # None / "taylorseer" (uses order) / "foca" / "dmd"
    foca_slope: str = "gap"  # FoCa's DF: "gap" (algorithms.md: F_full - F_full_prev) or "step" (/ w)
    streams: str = "all"  # calibrated_streams: "all", "hidden" or "encoder" (every stream but "hidden")
    values: bool = False  # calibrator_cache_type="hidden_states": forecast M's output, not its residual
    dmd: tuple = (6, 0, 1e-8, 1, "cache-dit")  # DMD's history, rank, ridge, Taylor fallback order and kind

    def calibrates(self, key: str) -> bool:
        """Whether the calibrator forecasts stream ``key`` (else its last residual is reused)."""
        on = self.calibrator is not None or self.order > 0
        return on and (self.streams == "all" or (key == "hidden") == (self.streams == "hidden"))

    def calibrator_options(self) -> dict:
        """The backend's options for these fields."""
        if self.calibrator is None and self.order == 0:
            return {}
        opts = {"calibrated_streams": self.streams,
                "calibrator_cache_type": "hidden_states" if self.values else "residual"}
        if self.calibrator == "foca":
            return {**opts, "calibrator": "foca", "foca_slope": self.foca_slope}
        if self.calibrator == "dmd":
            return {**opts, "calibrator": "dmd", **dict(zip(("dmd_history", "dmd_rank", "dmd_ridge",
                                                             "dmd_fallback_order", "dmd_fallback"), self.dmd))}
        return {**opts, "calibrator": "taylorseer", "taylorseer_order": self.order, "taylorseer_form": self.form}

    def kept(self, residuals: dict, entries: dict | None) -> dict:
        """What a computed step keeps per stream: its residual, or (``values``) the calibrated
        streams' output, entry + residual."""
        return {k: entries[k] + r if self.values and self.calibrates(k) else r for k, r in residuals.items()}

    def forecast(self, history: list, used: list, last: dict, step: int, entries: dict | None) -> dict:
        """The residual per stream a skipped step adds to its entry ``entries``: the calibrator's
        forecast at ``step`` from ``history``, the (step, kept) of the computed steps (and FoCa's
        ``used``, the values used at each step, which this extends), or the ``last`` kept."""
        if self.calibrator == "foca":
            if len(used) == 0 or used[-1][0] != step:  # forecast once per step, then reuse
                used.append((step, {k: foca_forecast([(s, r[k]) for s, r in history], [u[k] for _, u in used],
                                                     step, self.foca_slope) for k in last}))
            fc = used[-1][1]
        elif self.calibrator == "dmd":
            fc = {k: dmd_forecast([(s, r[k]) for s, r in history], step, *self.dmd) for k in last}
        elif self.order == 0:
            fc = last
        else:
            form = taylor_forecast if self.form == "taylor" else newton_forecast
            fc = {k: form([(s, r[k]) for s, r in history], step, self.order) for k in last}
        fc = {k: v if self.calibrates(k) else last[k] for k, v in fc.items()}
        return {k: v - entries[k] if self.values and self.calibrates(k) else v for k, v in fc.items()}


@dataclasses.dataclass
class RefConfig(RefCalibration):
    Fn: int = 1
    Bn: int = 0
    threshold: float = 0.08
    warmup: int = 8
    interval: int = 1
    max_cached: int = -1
    max_continuous: int = -1
    max_accumulated: float | None = None  # max_accumulated_residual_diff_threshold
    downsample: int = 1  # downsample_factor: the guard sees every k-th channel of the residual
    important: float = 0.0  # important_condition_threshold
    refresh: int | None = None  # force_refresh_step_hint
    repeat: bool = False  # force_refresh_step_policy="repeat"
    share: bool = False  # cfg_diff_compute_separate=False: later slots take slot 0's diff of the step


def context_of(step: int, hint: int | None, repeat: bool) -> tuple[int, int]:
    """(which cache context of the request ``step`` falls in, its step counted from the context's
    first): contexts begin at step 0 and at ``hint`` (``repeat``: every multiple of it)."""
    if hint is None:
        return 0, step
    if repeat:
        return step // hint, step % hint
    return (1, step - hint) if step >= hint else (0, step)


def relative_l1(r: torch.Tensor, a: torch.Tensor, important: float = 0.0) -> float:
    """``mean|r - a| / mean|a|``; with ``important`` > 0 over the tokens (rows of the last dim)
    whose own such ratio exceeds it, if any (cache-dit's important_condition_threshold)."""
    d, m = (r - a).abs(), a.abs()
    if important > 0:
        keep = d.mean(-1) / m.mean(-1) > important
        if keep.any():
            d, m = d[keep], m[keep]
    return float(d.mean() / m.mean())


def taylor_forecast(history: list[tuple[int, torch.Tensor]], step: int, order: int) -> torch.Tensor:
    """algorithms.md §2 as written: d0 = Y, d(i+1) = (d_i(now) - d_i(prev)) / w with w the steps
    between the last two computed steps, updated at each computed step in turn; then
    Y(k) = sum_i d_i k^i / i! with k the steps since the last computed one."""
    d: list[torch.Tensor] = []
    last = None
    for s, y in history:
        new = [y.double()]
        for i in range(min(order, len(d))):  # d_(i+1) needs the previous d_i
            new.append((new[i] - d[i]) / (s - last))
        d, last = new, s
    k = step - last
    out = sum(di * (k ** i / math.factorial(i)) for i, di in enumerate(d))
    return out.to(history[-1][1].dtype)


def newton_forecast(history: list[tuple[int, torch.Tensor]], step: int, order: int) -> torch.Tensor:
    """Interpolating polynomial through the last ``order + 1`` computed (step, residual) points."""
    pts = history[-(order + 1):][::-1]  # most recent first
    xs = [float(x) for x, _ in pts]
    table = [y.double() for _, y in pts]
    out = table[0].clone()
    prod = 1.0
    coefs = [table[0]]
    for i in range(1, len(pts)):
        table = [(table[j] - table[j + 1]) / (xs[j] - xs[j + i]) for j in range(len(table) - 1)]
        coefs.append(table[0])
    for i in range(1, len(pts)):
        prod *= (step - xs[i - 1])
        out = out + coefs[i] * prod
    return out.to(pts[0][1].dtype)


def foca_forecast(full: list[tuple[int, torch.Tensor]], window: list[torch.Tensor], step: int,
                  slope: str = "gap") -> torch.Tensor:
    """FoCa as algorithms.md §2 writes it, from scratch: ``full`` the computed (step, residual)
    points, ``window`` the residuals used at the slot's previous steps, oldest first. ``slope="step"``
    divides DF by the steps between the last two computed ones (cdcompile's foca_slope option)."""
    if len(full) < 2:
        return full[-1][1]
    (x1, prev), (x0, last) = full[-2], full[-1]
    df = (last.double() - prev.double()) / ((x0 - x1) if slope == "step" else 1)
    dc = window[-1].double() - window[-2].double()
    e = step - x0

    def heun(h):
        return last.double() + h / 2 * (df + dc)

    out = heun(e) if e <= 3 else (3 / e) * heun(3) + (1 - 3 / e) * last.double()
    return out.to(last.dtype)


def dmd_forecast(history: list[tuple[int, torch.Tensor]], step: int, window: int, rank: int, ridge: float,
                 order: int, fallback: str) -> torch.Tensor:
    """cache-dit 1.5.3's DMD calibrator from its description, the direct way: on the newest
    ``window`` computed (step, residual) points, the longest tail a constant spacing apart; with 4
    or more, per batch item an SVD of the d x n snapshot matrix, the propagator's eigenvalues and
    modes, the amplitudes by least squares, advanced by (step - last) / spacing powers; else the
    Taylor ladder that differences each point against the one two points back (``fallback``
    "cache-dit") or the one before ("taylorseer")."""
    pts, n = history[-window:], 0
    if len(pts) >= 2 and pts[-1][0] > pts[-2][0]:
        n = 2
        while n < len(pts) and pts[-n][0] - pts[-n - 1][0] == pts[-1][0] - pts[-2][0]:
            n += 1
    tail = pts[-n:] if n else []
    last = history[-1][1]
    if len(tail) >= 4:
        k = (step - tail[-1][0]) / (tail[-1][0] - tail[-2][0])
        rows = []
        for b in range(last.shape[0]):
            traj = torch.stack([y[b].reshape(-1).double() for _, y in tail], 1)
            x, xp = traj[:, :-1], traj[:, 1:]
            u, sv, vh = torch.linalg.svd(x, full_matrices=False)
            r = rank or int((sv > sv[0] * 1e-4).sum().clamp(min=1))
            r = min(r, sv.numel())
            ur, vr, inv = u[:, :r], vh[:r].T, 1.0 / (sv[:r] + ridge)
            lam, w = torch.linalg.eig((ur.T @ xp @ vr) * inv)
            phi = ((xp @ vr) * inv).to(torch.complex128) @ w
            amp = torch.linalg.lstsq(phi, traj[:, -1].to(torch.complex128).unsqueeze(1)).solution.squeeze(1)
            rows.append((phi @ (lam ** k * amp)).real.reshape(last.shape[1:]))
        out = torch.stack(rows).to(last.dtype)
        return out if bool(torch.isfinite(out).all()) else last
    ladders: list[list[torch.Tensor]] = []  # per computed point, oldest first
    for j, (s, y) in enumerate(history):
        new = [y.double()]
        back = 2 if fallback == "cache-dit" else 1
        older = ladders[j - back] if j >= back else []
        for i in range(order):
            if i >= len(older) or (s <= 1 and back == 2):
                break
            new.append((new[i] - older[i]) / (s - history[j - 1][0]))
        ladders.append(new)
    e = step - history[-1][0]
    return sum(d * (e ** i / math.factorial(i)) for i, d in enumerate(ladders[-1])).to(last.dtype)


@dataclasses.dataclass
class RefSlot:
    anchor: torch.Tensor | None = None
    residuals: dict | None = None
    history: list = dataclasses.field(default_factory=list)  # (step, residuals) of computed steps
    cached: int = 0
    run: int = 0
    accumulated: float = 0.0  # positive diffs of the steps whose diff was compared with the threshold
    used: list = dataclasses.field(default_factory=list)  # residuals used per step (FoCa's window)
    context: int = 0  # the request's cache context this state belongs to (force_refresh_step_hint)


class RefCache:
    def __init__(self, cfg: RefConfig):
        self.cfg = cfg
        self.slots: dict[int, RefSlot] = {}
        self.decisions: list[tuple[int, int, bool]] = []  # (step, slot, cached)
        self.first_diff: tuple[int, float] | None = None  # (step, diff) slot 0 last compared

    def new_request(self) -> None:
        self.slots = {}
        self.first_diff = None

    def decide(self, step: int, slot: int, r: torch.Tensor) -> bool:
        c = self.cfg
        ctx, local = context_of(step, c.refresh, c.repeat)
        st = self.slots.get(slot)
        if st is None or st.context != ctx:  # a refresh forgets all the slot knew
            st = self.slots[slot] = RefSlot(context=ctx)
        r = r[..., ::c.downsample]
        if local in range(0, c.warmup, c.interval):
            cache = False
        elif c.max_cached >= 0 and st.cached >= c.max_cached:
            cache = False
        elif c.max_continuous >= 0 and st.run >= c.max_continuous:
            cache = False
        elif c.max_accumulated is not None and st.accumulated >= c.max_accumulated:
            cache = False
        elif c.threshold <= 0 or st.anchor is None or st.anchor.shape != r.shape:
            cache = False
        else:
            diff = relative_l1(r, st.anchor, c.important)
            if slot == 0:
                self.first_diff = (step, diff)
            elif c.share and self.first_diff is not None and self.first_diff[0] == step:
                diff = self.first_diff[1]
            cache = bool(diff < c.threshold)
            st.accumulated += max(float(diff), 0.0)
        if cache:
            st.cached += 1
            st.run += 1
        else:
            st.run = 0
            st.anchor = r
        self.decisions.append((step, slot, cache))
        return cache

    def residuals(self, slot: int, entries: dict | None = None) -> dict:
        """The residual per stream a cached step adds to M's entry ``entries`` (needed with
        ``values``: the forecast is then of M's output, and the residual is it minus the entry)."""
        st = self.slots[slot]
        return self.cfg.forecast(st.history, st.used, st.residuals, self.decisions[-1][0], entries)

    def store(self, slot: int, residuals: dict, entries: dict | None = None) -> None:
        """Keep a computed step's middle residuals (with ``values``: M's outputs, entry + residual,
        for the calibrated streams)."""
        st = self.slots[slot]
        kept = self.cfg.kept(residuals, entries)
        st.residuals = kept
        st.history.append((self.decisions[-1][0], kept))
        st.used.append((self.decisions[-1][0], kept))


def sequential_temb(model, x, t):
    """cdcompile.testing.SequentialDiT's timestep embedding."""
    half = model.proj_in.out_features // 2
    angles = t.reshape(-1, 1).float() * 1000 * torch.exp(-9.21 * torch.arange(half) / half)
    return model.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1).to(x.dtype))


def run_sequential_dit(model, x, t, cache: RefCache, step: int, slot: int = 0):
    """cdcompile.testing.SequentialDiT's forward with DBCache over ``model.blocks``."""
    temb = sequential_temb(model, x, t)
    h = cache_blocks(cache, model.blocks, model.proj_in(x), lambda block, h: block(h, temb), step, slot)
    return model.proj_out(h)


def cache_blocks(cache: RefCache, blocks, h: torch.Tensor, run, step: int, slot: int = 0) -> torch.Tensor:
    """DBCache over one hidden stream: ``run(block, h)`` computes a block."""
    c, blocks = cache.cfg, list(blocks)
    n = len(blocks)
    h0 = h
    for b in blocks[:c.Fn]:
        h = run(b, h)
    if cache.decide(step, slot, h - h0):
        h = h + cache.residuals(slot, {"hidden": h})["hidden"]
    else:
        hf = h
        for b in blocks[c.Fn:n - c.Bn]:
            h = run(b, h)
        cache.store(slot, {"hidden": h - hf}, {"hidden": hf})
    for b in blocks[n - c.Bn:]:
        h = run(b, h)
    return h


def run_skip_dit(model, x, t, cache: RefCache, step: int, slot: int = 0):
    """cdcompile.testing.SkipDiT with DBCache over its whole stack. Block ``j > k`` reads the output
    of block ``n - 1 - j``; on a cached step M's blocks do not run, and M's exit reads as F's exit
    plus the residual. A B block whose skip comes from inside M is not cacheable (the backend
    refuses it): the reference asserts that it never needs one."""
    temb = sequential_temb(model, x, t)
    c, blocks = cache.cfg, list(model.blocks)
    n, k = len(blocks), len(blocks) // 2
    outs: dict[int, torch.Tensor] = {}

    def run(i, h):
        outs[i] = blocks[i](h, temb, outs[n - 1 - i]) if i > k else blocks[i](h, temb)
        return outs[i]

    h0 = h = model.proj_in(x)
    for i in range(c.Fn):
        h = run(i, h)
    if cache.decide(step, slot, h - h0):
        h = outs[n - c.Bn - 1] = h + cache.residuals(slot)["hidden"]
    else:
        hf = h
        for i in range(c.Fn, n - c.Bn):
            h = run(i, h)
        cache.store(slot, {"hidden": h - hf})
    for i in range(n - c.Bn, n):
        assert n - 1 - i not in range(c.Fn, n - c.Bn - 1), "a B block reads a skip from inside M"
        h = run(i, h)
    return model.proj_out(h)


def run_pair_dit(model, x, t, cache: RefCache, step: int, slot: int = 0):
    """cdcompile.testing.PairDiT with DBCache over its blocks. The pairs are a carried stream: its
    value as a block ends is the one the block read, and an update after a block is glue. Updated
    between M's blocks, the pairs leave M with a residual (M's last value minus the one F's last
    block read), which absorbs the update between F and M as a returned stream's residual absorbs
    glue; not updated there, M leaves them as it read them, computed on every step."""
    c, blocks = cache.cfg, list(model.blocks)
    n = len(blocks)
    cached_pairs = any(str(i) in model.updates for i in range(c.Fn, n - c.Bn - 1))
    temb, h0, p = model.embed(x, t)
    h = h0
    for i in range(c.Fn):
        pf = p
        h = blocks[i](h, temb, p)
        p = model.update(i, h, p)
    hf = h
    if cache.decide(step, slot, h - h0):
        r = cache.residuals(slot)
        h, p = h + r["hidden"], pf + r["carried"] if cached_pairs else p
    else:
        for i in range(c.Fn, n - c.Bn):
            h = blocks[i](h, temb, p)
            if i < n - c.Bn - 1:
                p = model.update(i, h, p)
        cache.store(slot, {"hidden": h - hf, **({"carried": p - pf} if cached_pairs else {})})
    p = model.update(n - c.Bn - 1, h, p)
    for i in range(n - c.Bn, n):
        h = blocks[i](h, temb, p)
        p = model.update(i, h, p)
    return model.head(h, p)


def run_flux(model, kw: dict, cache: RefCache, step: int, slot: int = 0):
    """FluxTransformer2DModel's forward (diffusers 0.42) with DBCache over its 2-group stack.

    Double blocks return (encoder, hidden); single blocks take and return the two streams too.
    ControlNet residuals (``controlnet_block_samples``, ``controlnet_single_block_samples``), which
    FLUX adds to the hidden stream after each block, belong to the block they follow, except F's
    last: the residual is taken from F's last block output, so that add is part of M (a cached
    step does not run it); the add after M's last block runs on every step, as B does.
    """
    c = cache.cfg
    hs = model.x_embedder(kw["hidden_states"])
    t = kw["timestep"].to(hs.dtype) * 1000
    temb = model.time_text_embed(t, kw["pooled_projections"])
    enc = model.context_embedder(kw["encoder_hidden_states"])
    rope = model.pos_embed(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=0))
    stack = [(b, "double") for b in model.transformer_blocks] + [
        (b, "single") for b in model.single_transformer_blocks]
    n, n_double = len(stack), len(model.transformer_blocks)

    def run(block, h, e):
        e, h = block(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
        return h, e

    def control(k, h):  # the ControlNet residual after stack block k, as FLUX's loops add it
        samples, i, size = kw.get("controlnet_block_samples"), k, n_double
        if k >= n_double:
            samples, i, size = kw.get("controlnet_single_block_samples"), k - n_double, n - n_double
        return h if samples is None else h + samples[i // math.ceil(size / len(samples))]

    h0 = hs
    for k in range(c.Fn):
        hs, enc = run(stack[k][0], hs, enc)
        if k < c.Fn - 1:
            hs = control(k, hs)
    if cache.decide(step, slot, hs - h0):
        r = cache.residuals(slot, {"hidden": hs, "encoder": enc})
        hs = hs + r["hidden"]
        if "encoder" in r:
            enc = enc + r["encoder"]
    else:
        hf, ef = hs, enc
        hs = control(c.Fn - 1, hs)
        for k in range(c.Fn, n - c.Bn):
            hs, enc = run(stack[k][0], hs, enc)
            if k < n - c.Bn - 1:
                hs = control(k, hs)
        res = {"hidden": hs - hf}
        if c.Bn > 0:  # with Bn = 0 the encoder stream leaves M unused (dead in the graph)
            res["encoder"] = enc - ef
        cache.store(slot, res, {"hidden": hf, "encoder": ef})
    hs = control(n - c.Bn - 1, hs)
    for k in range(n - c.Bn, n):
        hs, enc = run(stack[k][0], hs, enc)
        hs = control(k, hs)
    hs = model.norm_out(hs, temb)
    return model.proj_out(hs)


def run_pair_units(model, x, t, cache: RefCache, step: int, slot: int = 0):
    """cdcompile.testing.PairDiT(every=1) with DBCache over its units: unit i is block i and the
    update after it (an interleaved pair of module lists; the last unit is a block alone), so the
    pairs are a stream the units return, labelled ``encoder``."""
    c, n = cache.cfg, len(model.blocks)
    temb, h0, p = model.embed(x, t)

    def unit(i, h, p):
        h = model.blocks[i](h, temb, p)
        return h, model.update(i, h, p)

    h = h0
    for i in range(c.Fn):
        h, p = unit(i, h, p)
    hf, pf = h, p
    if cache.decide(step, slot, h - h0):
        r = cache.residuals(slot)
        h, p = hf + r["hidden"], pf + r["encoder"]
    else:
        for i in range(c.Fn, n - c.Bn):
            h, p = unit(i, h, p)
        cache.store(slot, {"hidden": h - hf, "encoder": p - pf})
    for i in range(n - c.Bn, n):
        h, p = unit(i, h, p)
    return model.head(h, p)
