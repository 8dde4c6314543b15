"""DBCache compiled into the graph: decisions and outputs against the eager reference."""

import contextlib
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from hypothesis import given, settings
from hypothesis import strategies as st

import cdcompile
from cdcompile import guard
from cdcompile.testing import PairDiT, SeqBlock, SequentialDiT, SkipDiT, flux_inputs, tiny_flux
from dbcache_reference import (RefCache, RefConfig, cache_blocks, run_flux, run_pair_dit, run_pair_units, run_skip_dit,
                               run_sequential_dit, sequential_temb)

STEPS = 10


def _opts(ref: RefConfig, compiler="eager", **extra):
    return {"compiler": compiler, "Fn_compute_blocks": ref.Fn, "Bn_compute_blocks": ref.Bn,
            "residual_diff_threshold": ref.threshold, "max_warmup_steps": ref.warmup,
            "warmup_interval": ref.interval, "max_cached_steps": ref.max_cached,
            "max_continuous_cached_steps": ref.max_continuous,
            "max_accumulated_residual_diff_threshold": ref.max_accumulated, "downsample_factor": ref.downsample,
            "important_condition_threshold": ref.important, "force_refresh_step_hint": ref.refresh,
            "force_refresh_step_policy": "repeat" if ref.repeat else "once",
            "cfg_diff_compute_separate": not ref.share, **extra}


def _seq_trajectory(steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 10, 8, generator=g)
    d = torch.randn(2, 10, 8, generator=g)
    return [(x + 0.02 * s * d, torch.full((2,), 1.0 - s / steps)) for s in range(steps)]


def _cached_steps(model, request=-1, slot=0):
    return cdcompile.summary(model).as_dict()["requests"][request]["slots"][slot]["cached_steps"]


def _ref_cached(ref: RefCache, slot=0):
    return [s for s, k, c in ref.decisions if c and k == slot]


def _run_seq(ref_cfg, compiler="eager", depth=5, requests=1):
    m = SequentialDiT(depth=depth)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(ref_cfg, compiler))
    ref = RefCache(ref_cfg)
    outs, refs = [], []
    with torch.no_grad():
        for _ in range(requests):
            ref.new_request()
            ref.decisions.clear()
            for s, (x, t) in enumerate(_seq_trajectory()):
                outs.append(c(x, t))
                refs.append(run_sequential_dit(m, x, t, ref, s))
    return m, ref, outs, refs


@pytest.mark.parametrize("cfg", [
    RefConfig(threshold=0.15, warmup=2),
    RefConfig(threshold=0.3, warmup=1, max_cached=3),
    RefConfig(threshold=0.5, warmup=3, interval=2, max_continuous=2),
    RefConfig(Fn=2, Bn=1, threshold=0.25, warmup=2),
    RefConfig(threshold=0.05, warmup=0),
    # the diffs of steps 2-3 (0.111 + 0.138) use up a budget of 0.2: steps 5-9 compute
    RefConfig(threshold=0.15, warmup=2, max_accumulated=0.2),
    # every third channel: steps 2, 4-6, 8, 9 cache (all channels at 0.12: 2, 4, 8, 9)
    RefConfig(threshold=0.12, warmup=2, downsample=3),
    # only the tokens that changed by more than 0.12: steps 4 and 9 cache (every token: 2, 4, 8, 9)
    RefConfig(threshold=0.12, warmup=2, important=0.12),
    # a refresh at step 5 warms up again: 2, 3, 7, 8, 9 cache (without: 2, 3, 5, 6, 8, 9)
    RefConfig(threshold=0.15, warmup=2, refresh=5),
    # every third step: 1, 2, 4, 5, 7, 8 (without: 1, 2, then max_cached)
    RefConfig(threshold=0.3, warmup=1, max_cached=2, refresh=3, repeat=True),
], ids=["thr0.15", "max_cached3", "interval2_mc2", "F2B1", "thr0.05", "budget0.2", "downsample3", "important0.12",
        "refresh5", "refresh_every3"])
def test_sequential_dit_decisions_and_outputs_equal_the_reference(cfg):
    m, ref, outs, refs = _run_seq(cfg, requests=2)
    from cdcompile.runtime import cached_states

    ((_, state),) = cached_states(m)  # the anchor keeps the channels the guard compares: 32 -> 11 at k = 3
    assert state.tensors_by_name["anchor"].shape == (2, 2, 10, -(-32 // cfg.downsample))
    assert _cached_steps(m) == _ref_cached(ref)
    assert _cached_steps(m, request=-2) == _ref_cached(ref), "identical requests must cache alike"
    for k, (a, b) in enumerate(zip(outs, refs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"call {k}: {m}")


def test_the_thresholds_above_cache_something_and_not_everything():
    # guards the parametrization above against degenerate trajectories
    _, ref, _, _ = _run_seq(RefConfig(threshold=0.15, warmup=2))
    cached = _ref_cached(ref)
    assert 0 < len(cached) < STEPS - 2


@pytest.mark.parametrize("cfg,expected", [
    (RefConfig(threshold=1e9, warmup=3), [3, 4, 5, 6, 7, 8, 9]),
    (RefConfig(threshold=1e9, warmup=6, interval=2), [1, 3, 5, 6, 7, 8, 9]),
    (RefConfig(threshold=1e9, warmup=1, max_cached=4), [1, 2, 3, 4]),
    (RefConfig(threshold=1e9, warmup=1, max_continuous=2), [1, 2, 4, 5, 7, 8]),
    (RefConfig(threshold=0.0, warmup=1), []),
    (RefConfig(threshold=1e9, warmup=1, max_accumulated=0.3), [1, 2, 3]),  # 0.106 + 0.121 + 0.210 > 0.3
    # force_refresh_step_hint: warmup, limits and budget start again at the refresh
    (RefConfig(threshold=1e9, warmup=2, refresh=5), [2, 3, 4, 7, 8, 9]),
    (RefConfig(threshold=1e9, warmup=1, max_cached=2, refresh=5), [1, 2, 6, 7]),
    (RefConfig(threshold=1e9, warmup=1, refresh=4, repeat=True), [1, 2, 3, 5, 6, 7, 9]),
    # the budget is spent at step 3 (as above) and starts again at 6: 0.134 + 0.098 at steps 7-8
    (RefConfig(threshold=1e9, warmup=1, max_accumulated=0.3, refresh=6), [1, 2, 3, 7, 8, 9]),
])
def test_always_caching_threshold_caches_exactly_the_predicted_steps(cfg, expected):
    m, ref, _, _ = _run_seq(cfg)
    assert _cached_steps(m) == expected == _ref_cached(ref)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_decisions_equal_the_reference(compiler):
    cfg = RefConfig(threshold=0.15, warmup=2, max_continuous=3)
    m, ref, outs, refs = _run_seq(cfg, compiler=compiler)
    assert _cached_steps(m) == _ref_cached(ref)
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_caching_disabled_or_threshold_zero_equals_plain_compile():
    m = SequentialDiT(depth=4)
    plain = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = [plain(x, t) for x, t in _seq_trajectory()]
    for opts in ({"enable_cache": False}, {"residual_diff_threshold": 0.0, "max_warmup_steps": 0}):
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "aot_eager", **opts})
        with torch.no_grad():
            got = [c(x, t) for x, t in _seq_trajectory()]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _flux_trajectory(model, steps, seed=0):
    base = flux_inputs(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    d = torch.randn(base["hidden_states"].shape, generator=g)
    out = []
    for s in range(steps):
        kw = dict(base)
        kw["hidden_states"] = base["hidden_states"] + 0.01 * s * d
        kw["timestep"] = torch.full_like(base["timestep"], 1.0 - s / steps)
        out.append(kw)
    return out


@pytest.mark.parametrize("double,single,cfg", [
    (2, 4, RefConfig(threshold=0.35, warmup=2)),
    (2, 4, RefConfig(Fn=2, Bn=1, threshold=0.3, warmup=1, max_cached=4)),
    # One double block (F, the decision's residual) or one single block (in M) is no repeated
    # group; it is still one of the N blocks the reference (and cache-dit) counts.
    (1, 3, RefConfig(threshold=0.35, warmup=2)),
    (3, 1, RefConfig(threshold=0.35, warmup=2)),
    (1, 3, RefConfig(Fn=2, Bn=1, threshold=0.3, warmup=1)),
], ids=["F1B0", "F2B1_spans_groups", "lone_double_F1B0", "lone_single_F1B0", "lone_double_F2B1"])
def test_tiny_flux_decisions_and_outputs_equal_the_reference(double, single, cfg):
    m = tiny_flux(num_layers=double, num_single_layers=single)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, "aot_eager"))
    ref = RefCache(cfg)
    with torch.no_grad():
        for s, kw in enumerate(_flux_trajectory(m, STEPS)):
            got = c(**kw)[0]
            want = run_flux(m, kw, ref, s)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda x: f"step {s}: {x}")
    cached = _ref_cached(ref)
    assert 0 < len(cached) < STEPS, "trajectory must exercise both branches"
    assert _cached_steps(m) == cached
    (report,) = cdcompile.explain(m, **_flux_trajectory(m, 1)[0]).graph_reports
    assert report.cache["num_blocks"] == double + single


@pytest.mark.parametrize("cfg", [RefConfig(threshold=0.35, warmup=2), RefConfig(Fn=2, Bn=1, threshold=0.3, warmup=1)],
                         ids=["F1B0", "F2B1"])
def test_flux_with_controlnet_residuals_between_its_blocks_caches_like_the_reference(cfg):
    # FLUX's ControlNet pipelines pass residuals that FLUX adds after its blocks, picked with
    # int(np.ceil(len(blocks) / len(samples))): Dynamo leaves that as dead number ops between the
    # blocks (torch.sym_int(2.0), wrapped_item(wrapped_ceil(2.0))). Before, the pass took them for
    # side effects and compiled without the cache.
    m = tiny_flux(num_layers=4, num_single_layers=3)
    g = torch.Generator().manual_seed(5)
    control = dict(controlnet_block_samples=[0.3 * torch.randn(1, 64, 32, generator=g) for _ in range(2)],
                   controlnet_single_block_samples=[0.3 * torch.randn(1, 64, 32, generator=g) for _ in range(2)])
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, "aot_eager"))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, kw in enumerate(_flux_trajectory(m, STEPS)):
                got = c(**kw, **control)[0]
                torch.testing.assert_close(got, run_flux(m, {**kw, **control}, ref, s), rtol=1e-4, atol=1e-4,
                                           msg=lambda x: f"step {s}: {x}")
                assert not torch.allclose(got, m(**kw)[0], rtol=1e-3, atol=1e-3)  # the samples count
    (r,) = reports
    assert r.cache is not None and r.cache["num_blocks"] == 7, r.not_cached
    cached = _ref_cached(ref)
    assert 0 < len(cached) < STEPS and _cached_steps(m) == cached


def test_dynamic_true_finds_both_groups_and_caches_with_its_float_inputs_specialized():
    # dynamic=True (specialize_float off) makes each module's float attributes graph inputs read
    # with .item(); diffusers' attention dispatch reads one such float in block 0 for every block.
    # That read is a scalar, not a block value: discovery still finds the double blocks. A cond
    # takes no float: the pass makes each one a guarded constant, Dynamo then restarts the frame
    # with those floats constants (previous test), and the graph it keeps caches: decisions and
    # outputs equal the reference with no recompile over the trajectory.
    from torch._dynamo.utils import counters

    cfg = RefConfig(threshold=0.35, warmup=2)
    m = tiny_flux(num_layers=1, num_single_layers=3)
    counters.clear()
    with cdcompile.backend.collect_reports() as reports, torch.no_grad():
        c = torch.compile(m, backend="cachedit", fullgraph=True, dynamic=True, options=_opts(cfg, "aot_eager"))
        ref = RefCache(cfg)
        for s, kw in enumerate(_flux_trajectory(m, STEPS)):
            torch.testing.assert_close(c(**kw)[0], run_flux(m, kw, ref, s), rtol=1e-4, atol=1e-4)
    first, kept = reports
    for report in reports:
        assert [(g["name"], g["blocks"]) for g in report.groups] == [
            ("transformer_blocks", 1), ("single_transformer_blocks", 3)]
        assert report.cache is not None, report.not_cached
    assert first.cache["specialized_floats"] and not kept.cache["specialized_floats"]
    assert _cached_steps(m) == _ref_cached(ref) and 0 < len(_ref_cached(ref)) < STEPS
    assert counters["stats"]["unique_graphs"] == 1


class _ScaledBlock(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mod = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x, temb, scale: float):
        return x + scale * self.mlp(F.layer_norm(x, x.shape[-1:]) * (1 + self.mod(temb)[:, None]))


class _ScaledDiT(torch.nn.Module):
    """Blocks that read a float argument of the forward (as a LoRA ``scale`` reaches peft's layers)."""

    def __init__(self, dim: int = 16, depth: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.proj_in, self.t_embed = torch.nn.Linear(8, dim), torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList(_ScaledBlock(dim) for _ in range(depth))
        self.proj_out = torch.nn.Linear(dim, 8)

    def forward(self, x, timestep, scale: float = 1.0):
        h, temb = self.proj_in(x), self.t_embed(timestep[:, None])
        for b in self.blocks:
            h = b(h, temb, scale)
        return self.proj_out(h)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_a_float_argument_that_changes_between_requests_gets_a_cached_graph_per_value(compiler):
    # Dynamo compiles the first value as a constant; when it changes, Dynamo recompiles with the
    # float symbolic (automatic dynamic), which a cond cannot take. The pass specializes it back
    # with a guard: each value has its own graph with the cache, and a value seen before reuses
    # its graph. Before, the second graph ran every step without the cache (only a warning said so).
    from torch._dynamo.utils import counters

    cfg = RefConfig(threshold=0.3, warmup=2)
    m = _ScaledDiT()
    counters.clear()
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, compiler))
    with cdcompile.backend.collect_reports() as reports, torch.no_grad():
        for scale in (1.0, 0.5, 0.25, 0.5):
            cdcompile.new_request(c)
            ref = RefCache(cfg)
            for s, (x, t) in enumerate(_seq_trajectory()):
                temb = m.t_embed(t[:, None])
                want = m.proj_out(cache_blocks(ref, m.blocks, m.proj_in(x), lambda b, h: b(h, temb, scale), s))
                torch.testing.assert_close(c(x, t, scale), want, rtol=1e-5, atol=1e-6,
                                           msg=lambda e: f"scale {scale}, step {s}: {e}")
            assert _cached_steps(m) == _ref_cached(ref) and 0 < len(_ref_cached(ref)) < STEPS, scale
    assert counters["stats"]["unique_graphs"] == 3  # 1.0, 0.5, 0.25; the second 0.5 reuses its graph
    assert all(r.cache is not None for r in reports), [r.not_cached for r in reports]
    # With AOTAutograd (aot_eager, inductor) a float specialized while compiling makes Dynamo
    # restart the frame with that float a constant from then on (torch's tensorify pass): 0.5 is
    # specialized here once, its graph is compiled again static, and 0.25 arrives static.
    specialized = [v for r in reports for v in r.cache["specialized_floats"].values()]
    assert specialized == ([0.5, 0.25] if compiler == "eager" else [0.5])


class _SizeScaledDiT(_ScaledDiT):
    def forward(self, x, timestep):
        return super().forward(x, timestep, x.shape[1] ** -0.5)


def test_a_float_of_symbolic_sizes_refuses_the_cache_and_dynamic_false_caches_each_size():
    # Specializing a float made of sizes would fix those sizes in a graph compiled to vary them.
    cfg = RefConfig(threshold=0.3, warmup=2)
    m = _SizeScaledDiT()
    x, t = _seq_trajectory()[0]
    wider = torch.cat([x, x[:, :2]], dim=1)
    for dynamic, cached in ((None, [True, False]), (False, [True, True])):
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", dynamic=dynamic, options=_opts(cfg))
        with cdcompile.backend.collect_reports() as reports, torch.no_grad():
            torch.testing.assert_close(c(x, t), m(x, t))
            with (pytest.warns(UserWarning, match="computed from symbolic sizes") if dynamic is None
                  else contextlib.nullcontext()):
                torch.testing.assert_close(c(wider, t), m(wider, t))
        assert [r.cache is not None for r in reports] == cached, dynamic
        if dynamic is None:
            assert "a float computed from symbolic sizes" in reports[1].not_cached[0]
            assert "dynamic=False" in reports[1].not_cached[0]


def test_dbprune_specializes_a_changing_float_argument_once_for_all_its_blocks():
    # Every prunable block's cond reads the same float: one guarded constant serves them all.
    from dbprune_reference import PruneConfig, RefPrune, prune_blocks

    cfg = PruneConfig(threshold=0.3, warmup=2)
    m = _ScaledDiT()
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=cfg.options("eager"))
    with cdcompile.backend.collect_reports() as reports, torch.no_grad():
        for scale in (1.0, 0.5):
            cdcompile.new_request(c)
            ref = RefPrune(cfg, len(m.blocks))
            for s, (x, t) in enumerate(_seq_trajectory()):
                temb = m.t_embed(t[:, None])
                h = prune_blocks(ref, m.blocks, m.proj_in(x), lambda block, h: block(h, temb, scale), s)
                torch.testing.assert_close(c(x, t, scale), m.proj_out(h), rtol=1e-5, atol=1e-6,
                                           msg=lambda e: f"scale {scale}, step {s}: {e}")
            assert any(pruned for _, _, pruned in ref.decisions), scale
    assert [list(r.cache["specialized_floats"].values()) for r in reports] == [[], [0.5]]


def test_a_lora_adapted_flux_caches_like_the_reference_at_each_lora_scale():
    # peft's LoRA layers (lora_A/lora_B module dicts inside every projection) leave the block
    # structure to discover; the LoRA scale diffusers passes through joint_attention_kwargs is a
    # float the second scale makes symbolic (previous test).
    from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
    from peft import LoraConfig

    cfg = RefConfig(threshold=0.35, warmup=2)
    m = tiny_flux(num_layers=2, num_single_layers=3)
    m.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]))
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, "aot_eager"))
    with torch.no_grad():
        for scale in (1.0, 0.5):
            cdcompile.new_request(c)
            ref = RefCache(cfg)
            for s, kw in enumerate(_flux_trajectory(m, STEPS)):
                got = c(**kw, joint_attention_kwargs={"scale": scale})[0]
                scale_lora_layers(m, scale)
                want = run_flux(m, kw, ref, s)
                unscale_lora_layers(m, scale)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda e: f"scale {scale}, step {s}: {e}")
            assert _cached_steps(m) == _ref_cached(ref) and 0 < len(_ref_cached(ref)) < STEPS, scale


def test_zero_graph_breaks_and_recompiles_over_three_requests_of_twenty_steps():
    from torch._dynamo.utils import counters

    counters.clear()
    m = tiny_flux()
    c = torch.compile(m, backend="cachedit", options={"compiler": "eager", "residual_diff_threshold": 0.35,
                                                      "max_warmup_steps": 2})
    with torch.no_grad():
        for _ in range(3):
            for kw in _flux_trajectory(m, 20):
                c(**kw)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0
    reqs = cdcompile.summary(m).as_dict()["requests"]
    assert [r["steps"] for r in reqs] == [20, 20, 20]
    assert reqs[0]["slots"] == reqs[1]["slots"] == reqs[2]["slots"]
    assert len(reqs[0]["slots"][0]["cached_steps"]) > 0


@pytest.mark.parametrize("cfg", [RefConfig(threshold=0.2, warmup=2), RefConfig(threshold=0.2, warmup=2, max_accumulated=0.3),
                                 RefConfig(threshold=0.2, warmup=2, refresh=5)],
                         ids=["thr0.2", "budget0.3", "refresh5"])
def test_cfg_alternating_calls_equal_two_separately_cached_models(cfg):
    m = SequentialDiT(depth=5)
    traj = _seq_trajectory()
    offset = torch.randn(traj[0][0].shape, generator=torch.Generator().manual_seed(7))
    uncond = [(x + offset, t) for x, t in traj]  # another input, the same timestep
    both = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg))
    with torch.no_grad():
        got = [(both(*a), both(*b)) for a, b in zip(traj, uncond)]
    summary = cdcompile.summary(m).as_dict()["requests"][-1]
    assert summary["steps"] == STEPS and len(summary["slots"]) == 2

    for k, calls in enumerate((traj, uncond)):
        torch._dynamo.reset()
        single = SequentialDiT(depth=5)
        single.load_state_dict(m.state_dict())
        c = torch.compile(single, backend="cachedit", fullgraph=True, options=_opts(cfg))
        with torch.no_grad():
            want = [c(x, t) for x, t in calls]
        for (a, b), w in zip(got, want):
            torch.testing.assert_close((a, b)[k], w, rtol=1e-5, atol=1e-6)
        assert summary["slots"][k]["cached_steps"] == _cached_steps(single)
    assert summary["slots"][0]["cached_steps"] != [] and summary["slots"][1]["cached_steps"] != []


def test_cfg_calls_taking_the_first_calls_diff_decide_like_the_reference():
    # cfg_diff_compute_separate=False: the unconditional call (its own drift) decides on the
    # conditional call's diff: both cache steps 2, 3, 5, 6, 8, 9 (on its own diffs: 2, 4, 6, 8, 9)
    cfg = RefConfig(threshold=0.15, warmup=2, share=True)
    m = SequentialDiT(depth=5)
    traj = _seq_trajectory()
    g = torch.Generator().manual_seed(7)
    offset, drift = torch.randn(traj[0][0].shape, generator=g), torch.randn(traj[0][0].shape, generator=g)
    uncond = [(x + offset + 0.1 * s * drift, t) for s, (x, t) in enumerate(traj)]
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg))
    ref = RefCache(cfg)
    with torch.no_grad():
        for s, (a, b) in enumerate(zip(traj, uncond)):
            for slot, (x, t) in enumerate((a, b)):
                torch.testing.assert_close(c(x, t), run_sequential_dit(m, x, t, ref, s, slot), rtol=1e-4, atol=1e-5)
    slots = cdcompile.summary(m).as_dict()["requests"][-1]["slots"]
    assert [sl["cached_steps"] for sl in slots] == [_ref_cached(ref, 0), _ref_cached(ref, 1)]
    own = RefCache(dataclasses.replace(cfg, share=False))
    with torch.no_grad():
        for s, (a, b) in enumerate(zip(traj, uncond)):
            for slot, (x, t) in enumerate((a, b)):
                run_sequential_dit(m, x, t, own, s, slot)
    assert _ref_cached(own, 1) != _ref_cached(ref, 1) and _ref_cached(own, 0) == _ref_cached(ref, 0)


@pytest.mark.parametrize("extra", [{}, {"calibrator": "taylorseer", "taylorseer_order": 2}, {"calibrator": "foca"},
                                   {"cache_type": "dbprune"}], ids=["dbcache", "taylorseer2", "foca", "dbprune"])
def test_more_calls_per_timestep_than_cache_slots_are_reported_and_fit_when_raised(extra):
    # Heun with CFG calls the model four times per timestep (two evaluations x cond/uncond). With
    # the default two CFG slots, calls 2-3 shared the overflow state, were never cached, and the
    # summary showed one row for them with no word why. The overflow slot keeps no anchor or
    # residuals (a third less state at two slots): its calls leave the last slot's row as it was.
    cfg = RefConfig(threshold=0.2, warmup=2)
    traj = _seq_trajectory()
    g = torch.Generator().manual_seed(7)
    offsets = [torch.zeros_like(traj[0][0])] + [torch.randn(traj[0][0].shape, generator=g) for _ in range(3)]
    calls = [[(x + o, t) for x, t in traj] for o in offsets]  # calls[k][step]
    m = SequentialDiT(depth=5)

    def run(slots):
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, cache_slots=slots, **extra))
        with torch.no_grad():
            outs = [[c(*calls[k][s]) for k in range(4)] for s in range(STEPS)]
        return c, outs

    def alone(k):  # call k of every timestep in a model of its own
        torch._dynamo.reset()
        single = SequentialDiT(depth=5)
        single.load_state_dict(m.state_dict())
        c = torch.compile(single, backend="cachedit", fullgraph=True, options=_opts(cfg, **extra))
        with torch.no_grad():
            outs = [c(x, t) for x, t in calls[k]]
        return outs, _cached_steps(single)

    c, outs = run(2)
    from cdcompile.runtime import cached_states

    ((_, state),) = cached_states(c)
    rows = {n: t.shape[0] for n, t in state.tensors_by_name.items() if n.startswith(("anchor", "residual"))}
    assert rows and set(rows.values()) == {2} and state.tensors_by_name["slot_ctr"].shape[0] == 3
    summary = cdcompile.summary(c)
    req = summary.as_dict()["requests"][-1]
    assert req["calls_per_step"] == 4 and len(req["slots"]) == 3
    assert req["slots"][2]["overflow_calls"] == [2, 3] and req["slots"][2]["cached_steps"] == []
    assert "overflow_calls" not in req["slots"][1]
    text = str(summary)
    assert "      1  2-3 " in text and "calls 2-3 of each timestep are never cached: set cache_slots=4" in text
    with pytest.warns(UserWarning, match="cache_slots=2 keeps a cache state for the first 2.*set cache_slots=4"):
        cdcompile.new_request(c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per state
        cdcompile.new_request(c)

    want = [alone(k) for k in range(4)]
    assert all(w[1] for w in want)  # each call's sequence caches on its own
    for k in range(2):  # the slots that fit are unchanged
        assert req["slots"][k]["cached_steps"] == want[k][1]
        for s in range(STEPS):
            torch.testing.assert_close(outs[s][k], want[k][0][s], rtol=1e-5, atol=1e-6)

    c, outs = run(4)
    req = cdcompile.summary(c).as_dict()["requests"][-1]
    assert [sl["cached_steps"] for sl in req["slots"]] == [w[1] for w in want]
    assert not any("overflow_calls" in sl for sl in req["slots"])
    for k in range(4):
        for s in range(STEPS):
            torch.testing.assert_close(outs[s][k], want[k][0][s], rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cdcompile.new_request(c)


def _wan_call(x, t, text, first_frame_at_zero):
    # Wan 2.2 TI2V (expand_timesteps): one timestep per token, the conditioning frame's tokens at 0
    ts = torch.full((1, 32), t)
    if first_frame_at_zero:
        ts[:, :16] = 0
    return dict(hidden_states=x, timestep=ts, encoder_hidden_states=text, return_dict=False)


@pytest.mark.parametrize("first_frame_at_zero", [False, True], ids=["t2v", "i2v"])
def test_per_token_timesteps_give_steps_requests_and_cfg_slots(first_frame_at_zero):
    # Before, a (batch, tokens) timestep was not a timestep input: every call was a step of one
    # endless request, so the uncond call of a step was cached with the cond call's residual.
    from cdcompile.testing import tiny_wan

    opts = {"compiler": "eager", "residual_diff_threshold": 0.3, "max_warmup_steps": 2}
    m = tiny_wan()
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 4, 2, 8, 8, generator=g)
    texts = [torch.randn(1, 7, 16, generator=g) for _ in range(2)]
    steps = 6
    calls = [[_wan_call(x + 0.03 * s * d, 1000 * (1 - s / steps), text, first_frame_at_zero) for s in range(steps)]
             for text in texts]
    both = torch.compile(m, backend="cachedit", fullgraph=True, options=opts)
    with torch.no_grad():
        got = [[both(**calls[k][s])[0] for k in range(2)] for _ in range(2) for s in range(steps)]
    reqs = cdcompile.summary(m).as_dict()["requests"]
    assert [(r["steps"], len(r["slots"])) for r in reqs] == [(steps, 2), (steps, 2)]
    assert reqs[0]["slots"] == reqs[1]["slots"]
    for k in range(2):
        torch._dynamo.reset()
        single = type(m).from_config(m.config).eval()
        single.load_state_dict(m.state_dict())
        c = torch.compile(single, backend="cachedit", fullgraph=True, options=opts)
        with torch.no_grad():
            want = [c(**kw)[0] for kw in calls[k]]
        for s, w in enumerate(want):
            torch.testing.assert_close(got[s][k], w, rtol=1e-5, atol=1e-6)
        assert reqs[0]["slots"][k]["cached_steps"] == _cached_steps(single)
    assert 0 < len(reqs[0]["slots"][1]["cached_steps"]) < steps


def _two_requests_of_five_steps(name: str, **options) -> tuple[torch.nn.Module, dict, list[dict]]:
    """Zoo model ``name`` run twice over timesteps 999 .. 200, no new_request; its requests."""
    from cdcompile.zoo import ZOO

    m, kw = ZOO[name]()
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "eager", **options})
    with torch.no_grad():
        for _ in range(2):
            for t in (999, 800, 600, 400, 200):
                c(**dict(kw, timestep=torch.tensor([t])))
    return m, kw, cdcompile.summary(m).as_dict()["requests"]


def test_an_integer_timestep_starts_requests_by_itself():
    # DPM-Solver and DDIM give int64 timesteps (PixArt's and CogVideoX's pipelines pass them on):
    # two identical requests back to back, no new_request, decide alike.
    _, _, reqs = _two_requests_of_five_steps("pixart", residual_diff_threshold=1e9, max_warmup_steps=2)
    assert [r["steps"] for r in reqs] == [5, 5]
    assert [r["slots"][0]["cached_steps"] for r in reqs] == [[2, 3, 4]] * 2


@pytest.mark.parametrize("prune", [False, True])
def test_a_timestep_embedded_inside_every_block_starts_requests_by_itself(prune):
    # DiT-XL (DiTTransformer2DModel) embeds its timestep in each block's AdaLayerNormZero, so no
    # sinusoid runs before the first block: the clock finds the input whose sinusoid feeds a matrix
    # product within the first block. Before, every call was a step of one request: the second
    # request went on from the first one's step 5 and cached from its first call.
    options = {"max_warmup_steps": 2, "residual_diff_threshold": 1e9, "cache_type": "dbprune" if prune else "dbcache"}
    m, kw, reqs = _two_requests_of_five_steps("dit", **options)
    assert [r["steps"] for r in reqs] == [5, 5]
    if prune:  # blocks 1 and 2 of 3 (F1) pruned on every step after the warmup
        assert [r["slots"][0]["pruned_blocks"] for r in reqs] == [[0, 0, 2, 2, 2]] * 2
    else:
        assert [r["slots"][0]["cached_steps"] for r in reqs] == [[2, 3, 4]] * 2
    explained = str(cdcompile.explain(m, options=options, **kw))
    assert "clock: steps, requests and CFG slots from the timestep input l_timestep_" in explained, explained


class _GuidedDiT(torch.nn.Module):
    """A fuzz_dit model with a guidance input embedded as the timestep is, before it (FLUX-dev's and
    HunyuanVideo's guidance embedding), and a timestep named ``t``."""

    def __init__(self):
        from fuzz_dit import RandomDiT, draw_spec

        super().__init__()
        self.dit = RandomDiT(draw_spec(6))
        self.g_in = torch.nn.Linear(16, self.dit.spec.width)

    def forward(self, x, guidance, t):
        freqs = torch.exp(-torch.arange(8, dtype=x.dtype))
        g = self.g_in(torch.cat([(guidance[:, None] * freqs).cos(), (guidance[:, None] * freqs).sin()], dim=-1))
        h, enc, ctx = self.dit.prologue(x, t)
        ctx["temb"] = ctx["temb"] + g
        for item in self.dit.stack():
            h, enc = self.dit.run_item(item, h, enc, ctx)
        return self.dit.epilogue(h, ctx)


def test_a_guidance_input_embedded_like_the_timestep_is_not_read_as_the_clock():
    # Read as the timestep, the guidance scale (the same at every call) made every call one more CFG
    # slot of one step, and nothing was cached. Dynamo orders the inputs by first use, so the
    # guidance came first.
    from fuzz_dit import trajectory

    m = _GuidedDiT().eval()
    c = torch.compile(m, backend="cachedit", fullgraph=True,
                      options={"compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 2})
    calls = [step[0] for step in trajectory(m.dit.spec, 5)]
    with torch.no_grad():
        for _ in range(2):
            for kw in calls:
                c(kw["x"], torch.full_like(kw["t"], 3.5), kw["t"])
    reqs = cdcompile.summary(m).as_dict()["requests"]
    assert [r["steps"] for r in reqs] == [5, 5]
    assert [[s["cached_steps"] for s in r["slots"]] for r in reqs] == [[[2, 3, 4]]] * 2
    with torch.no_grad():
        explained = str(cdcompile.explain(m, calls[0]["x"], torch.full_like(calls[0]["t"], 3.5), calls[0]["t"]))
    assert "from the timestep input l_t_" in explained, explained


@pytest.mark.parametrize("dynamic,bn", [(False, 0), (None, 0), (False, 1), (True, 1), (None, 1)])
def test_cfg_calls_whose_text_lengths_differ_each_cache_like_the_reference(dynamic, bn):
    # A negative prompt with fewer text tokens than the prompt (Qwen-Image's true CFG): the cond and
    # uncond calls of every step land in two graphs (dynamic=False), in two call sizes of one symbolic
    # graph (True), or first in a static graph and then in the symbolic one Dynamo recompiles at the
    # first uncond call (None). With Bn=0 the state holds no text-length tensor: every graph shares
    # one state, prompt in slot 0 and negative prompt in slot 1. With Bn=1 the encoder residual has
    # the text length: each branch has a state of its own. Before, every switch of graph or size
    # started a request, so no step was ever cached.
    from torch._dynamo.utils import counters

    counters.clear()
    cfg = RefConfig(Fn=1, Bn=bn, threshold=0.35, warmup=2)
    m = tiny_flux(num_layers=2, num_single_layers=3)
    g = torch.Generator().manual_seed(5)
    cond = flux_inputs(m, tokens=16, text_tokens=8, seed=1)
    uncond = dict(cond, encoder_hidden_states=torch.randn(1, 5, 32, generator=g), txt_ids=torch.zeros(5, 3))
    d = torch.randn(cond["hidden_states"].shape, generator=g)
    c = torch.compile(m, backend="cachedit", fullgraph=True, dynamic=dynamic, options=_opts(cfg, "aot_eager"))
    refs = [RefCache(cfg), RefCache(cfg)]
    with torch.no_grad():
        for s in range(STEPS):
            step = dict(hidden_states=cond["hidden_states"] + 0.01 * s * d, timestep=torch.full((1,), 1 - s / STEPS))
            for k, kw in enumerate((cond, uncond)):
                kw = dict(kw, **step)
                torch.testing.assert_close(c(**kw)[0], run_flux(m, kw, refs[k], s), rtol=1e-4, atol=1e-4,
                                           msg=lambda x: f"step {s}, {'un' * k}cond: {x}")
    assert counters["stats"]["unique_graphs"] == (1 if dynamic else 2)
    summary = cdcompile.summary(m)
    want = [_ref_cached(ref) for ref in refs]
    assert all(0 < len(w) < STEPS for w in want), "the trajectory must exercise both branches"
    reqs = summary.as_dict()["requests"]
    if bn == 0:
        (req,) = reqs
        assert req["steps"] == STEPS and [s["cached_steps"] for s in req["slots"]] == want
    else:
        assert [r["steps"] for r in reqs] == [STEPS, STEPS]
        assert sorted(r["slots"][0]["cached_steps"] for r in reqs) == sorted(want)
        if dynamic:
            assert sorted(sum(r["sizes"].values()) for r in reqs) == [5, 8]
        assert "1x16x32 float32" in str(summary)  # the table says which state ran each request


class _BreakBeforeBlocks(SequentialDiT):
    """The timestep is embedded, then the graph breaks (Lumina 2's ``.item()``): the graph holding
    the blocks has no timestep input of its own."""

    def forward(self, x, timestep):
        temb = sequential_temb(self, x, timestep)
        torch._dynamo.graph_break()
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h)


class _NoTimestep(SequentialDiT):
    def forward(self, x, temb):
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h)


class _FloatTimestepDiT(torch.nn.Module):
    """A DiT whose forward takes its timestep as a Python float."""

    def __init__(self, dim=32, depth=4):
        super().__init__()
        torch.manual_seed(0)
        self.proj_in, self.t_embed = torch.nn.Linear(8, dim), torch.nn.Linear(dim, dim)
        self.blocks = torch.nn.ModuleList(SeqBlock(dim) for _ in range(depth))

    def forward(self, x, t: float):
        angles = t * 1000 * torch.exp(-9.21 * torch.arange(16) / 16)
        temb = self.t_embed(torch.cat([angles.cos(), angles.sin()]).unsqueeze(0))
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, temb)
        return h


def test_a_python_float_timestep_is_named_by_explain_and_dynamic_true_clocks_the_first_request():
    m = _FloatTimestepDiT()
    x = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = str(cdcompile.explain(m, x, 0.5))
    assert "no timestep input" in text and "Python float arguments (t=0.5) are constants of this graph" in text
    with torch.no_grad():
        assert "Python float" not in str(cdcompile.explain(m, x, torch.tensor(0.5)))

    def steps_per_request(dynamic):
        torch._dynamo.reset()
        c = torch.compile(_FloatTimestepDiT(), backend="cachedit", dynamic=dynamic,
                          options={"compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 2})
        with torch.no_grad():
            for _ in range(2):
                for s in range(6):
                    c(x + 0.01 * s, 1.0 - s / 6)
        return [r["steps"] for r in cdcompile.summary(c).as_dict()["requests"]]

    # as the README says: by default the first graph holds the first value as a constant and has no
    # clock (the first call is a request of one step there), so the first request counts from its
    # second call; dynamic=True clocks it from the start
    assert steps_per_request(None) == [1, 5, 6]
    assert steps_per_request(True) == [6, 6]


def test_a_timestep_embedded_before_a_graph_break_gives_steps_requests_and_cfg_slots():
    # The graph before the break publishes its timestep input on each call; the graph holding the
    # blocks reads it, so separate CFG calls are slots of one step, as the reference has them.
    # Before, every call was a step of one request and the uncond call used the cond's anchor.
    cfg = RefConfig(threshold=0.2, warmup=2)
    m = _BreakBeforeBlocks(depth=5)
    traj = _seq_trajectory()
    offset = torch.randn(traj[0][0].shape, generator=torch.Generator().manual_seed(7))
    c = torch.compile(m, backend="cachedit", options=_opts(cfg))
    with cdcompile.backend.collect_reports() as reports, torch.no_grad():
        for _ in range(2):  # a second request: the timestep rises, nothing else marks it
            refs = [RefCache(cfg), RefCache(cfg)]
            for s, (x, t) in enumerate(traj):
                for k, xk in enumerate((x, x + offset)):
                    torch.testing.assert_close(c(xk, t), run_sequential_dit(m, xk, t, refs[k], s),
                                               rtol=1e-5, atol=1e-6, msg=lambda e: f"step {s} slot {k}: {e}")
    (cache,) = [r.cache for r in reports if r.cache]
    assert cache["timestep_source"] == "borrowed"
    reqs = cdcompile.summary(m).as_dict()["requests"]
    assert [r["steps"] for r in reqs] == [STEPS, STEPS]
    assert [s["cached_steps"] for s in reqs[1]["slots"]] == [_ref_cached(ref) for ref in refs]
    assert all(0 < len(_ref_cached(ref)) < STEPS for ref in refs)

    # A model with no timestep at all, called next, reads none of it: a step per call
    other = _NoTimestep(depth=4)
    c2 = torch.compile(other, backend="cachedit",
                       options={"compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 2})
    temb = torch.randn(2, 32)
    with cdcompile.backend.collect_reports() as reports, torch.no_grad():
        for x, _ in traj[:5]:
            c(x, traj[0][1])  # the first model publishes between the second's calls
            c2(x, temb)
    assert [r.cache["timestep_source"] for r in reports if r.cache] == [None]
    assert [(r["steps"], r["slots"][0]["cached_steps"]) for r in cdcompile.summary(other).as_dict()["requests"]] == [
        (5, [2, 3, 4])]


def test_a_nan_timestep_counts_a_step_as_no_timestep_does():
    # What the runtime passes for a borrowed timestep that no earlier graph of the call published
    def run(ts):
        clock, counters, reset = torch.full((1,), -torch.inf), torch.zeros(6, dtype=torch.int64), torch.tensor(True)
        return [tuple(int(v) for v in guard.tick(t, clock, counters, reset, borrowed=True)) for t in ts]

    nan = torch.tensor([torch.nan])
    assert run([nan] * 4) == run([None] * 4) == [(0, 0, 1), (1, 0, 0), (2, 0, 0), (3, 0, 0)]
    # the clock stays a number: a timestep after them starts a request (step 0, new_request)
    assert run([nan, nan, torch.tensor([0.5])]) == [(0, 0, 1), (1, 0, 0), (0, 0, 1)]


def test_time_that_rises_over_a_request_is_learned_from_two_lone_steps_and_unlearned_alike():
    clock, counters, reset = torch.full((1,), -torch.inf), torch.zeros(6, dtype=torch.int64), torch.tensor(True)

    def run(ts):  # (step, slot, new_request, request) per call
        out = []
        for t in ts:
            step, slot, new = guard.tick(torch.tensor([t]), clock, counters, reset)
            out.append((int(step), int(slot), int(new), int(counters[2])))
        return out

    up = [0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4]  # flow matching from 0 to 1, two CFG calls per step
    # steps 0 and 1 look like requests of one step each; the third call flips the direction and
    # continues the first request at step 2
    assert run(up) == [(0, 0, 1, 1), (0, 1, 0, 1), (0, 0, 1, 2), (0, 1, 0, 2),
                       (2, 0, 0, 1), (2, 1, 0, 1), (3, 0, 0, 1), (3, 1, 0, 1)]
    assert int(counters[3]) == 1
    assert run(up) == [(s, k, int(s == 0 and k == 0), 2) for s in range(4) for k in range(2)]  # known now
    # a falling request after them: its first step joins the last request, the next two look like
    # lone requests, then the direction flips back
    assert run([0.9, 0.8, 0.7, 0.6, 0.5]) == [(4, 0, 0, 2), (0, 0, 1, 3), (0, 0, 1, 4), (2, 0, 0, 3), (3, 0, 0, 3)]
    assert int(counters[3]) == 0
    assert run([0.9, 0.8, 0.7]) == [(0, 0, 1, 4), (1, 0, 0, 4), (2, 0, 0, 4)]


def test_a_model_whose_time_rises_caches_like_the_reference_from_its_first_request():
    cfg = RefConfig(threshold=0.3, warmup=2)
    m = SequentialDiT(depth=5)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg))
    ref = RefCache(cfg)
    traj = [(x, 1 - t) for x, t in _seq_trajectory()]  # the same inputs, time running up
    with torch.no_grad():
        for _ in range(2):
            ref.new_request()
            ref.decisions.clear()
            for s, (x, t) in enumerate(traj):
                torch.testing.assert_close(c(x, t), run_sequential_dit(m, x, t, ref, s), rtol=1e-4, atol=1e-5)
    reqs = cdcompile.summary(m).as_dict()["requests"]
    assert [r["steps"] for r in reqs] == [len(traj)] * 2 and all(r["time_rises"] for r in reqs)
    assert "time rises over a request" in str(cdcompile.summary(m))
    assert [r["slots"][0]["cached_steps"] for r in reqs] == [_ref_cached(ref)] * 2 and _ref_cached(ref)
    # the history has the first request's step 1 (taken for a request of its own at first) moved in
    computed = cdcompile.summary(m).requests[0]["slots"][0]["computed_steps"]
    assert computed == [s for s in range(len(traj)) if s not in _ref_cached(ref)]


def test_new_request_resets_even_when_timesteps_do_not_rise():
    m = SequentialDiT(depth=4)
    c = torch.compile(m, backend="cachedit", fullgraph=True,
                      options={"compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 2})
    traj = _seq_trajectory()
    with torch.no_grad():
        for x, t in traj[:5]:
            c(x, t)
        cdcompile.new_request(c)  # what torch.compile returned works as well as the module
        for x, t in traj[5:]:  # timesteps keep falling: only new_request marks the boundary
            c(x, t)
    reqs = cdcompile.summary(m).as_dict()["requests"]
    assert [r["steps"] for r in reqs] == [5, 5]
    assert reqs[1]["slots"][0]["cached_steps"] == [2, 3, 4]


def test_shape_change_starts_a_new_request_and_never_reuses_a_stale_residual():
    m = SequentialDiT(depth=4)
    c = torch.compile(m, backend="cachedit", fullgraph=True, dynamic=False,
                      options={"compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 1})
    small = _seq_trajectory()
    with torch.no_grad():
        for x, t in small[:4]:
            c(x, t)
        x, t = small[4]
        big = torch.randn(2, 12, 8)
        out = c(big, t)  # same timestep sequence, another shape: a new graph and a new request
        torch.testing.assert_close(out, m(big, t), rtol=1e-5, atol=1e-5)
        out = c(x, small[5][1])  # back to the first shape: that graph starts over too
        torch.testing.assert_close(out, m(x, small[5][1]), rtol=1e-5, atol=1e-5)
    steps = sorted(r["steps"] for r in cdcompile.summary(m).as_dict()["requests"])
    assert steps == [1, 1, 4]


def test_fn_plus_bn_above_n_is_a_value_error_naming_n_and_the_group():
    m = SequentialDiT(depth=3)
    c = torch.compile(m, backend="cachedit", options={"compiler": "eager", "Fn_compute_blocks": 2,
                                                      "Bn_compute_blocks": 2})
    with pytest.raises(Exception) as info:
        c(torch.randn(1, 10, 8), torch.tensor([0.5]))
    err = getattr(info.value, "inner_exception", info.value)
    assert isinstance(err, ValueError)
    assert "N = 3" in str(err) and "blocks (3)" in str(err)


def test_middle_output_read_after_the_stack_compiles_without_cache_and_says_why():
    class Taps(SequentialDiT):
        def forward(self, x, timestep):
            temb = self.t_embed(torch.cat([timestep.reshape(-1, 1).float().cos()] * 32, -1))
            h = self.proj_in(x)
            taps = []
            for block in self.blocks:
                h = block(h, temb)
                taps.append(h)
            return self.proj_out(h + taps[2])

    m = Taps(depth=5)  # block 2's output is read after the stack: inside M at F1, inside F at F3
    x, t = torch.randn(1, 10, 8), torch.tensor([0.5])
    with cdcompile.backend.collect_reports() as reports, \
            pytest.warns(UserWarning, match="compiling without the block cache: .* computed in the middle blocks"):
        c = torch.compile(m, backend="cachedit", options={"compiler": "eager"})
        with torch.no_grad():
            torch.testing.assert_close(c(x, t), m(x, t))
    (r,) = reports
    assert r.cache is None and [g["blocks"] for g in r.groups] == [5]
    (reason,) = r.not_cached
    assert "computed in the middle blocks, is read by" in reason and "cannot be skipped" in reason
    assert "no block cache" in str(cdcompile.summary(m))
    torch._dynamo.reset()
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", options={"compiler": "eager", "Fn_compute_blocks": 3})
        with torch.no_grad():
            torch.testing.assert_close(c(x, t), m(x, t))
    (r,) = reports
    assert (r.cache["Fn"], r.cache["Mn"]) == (3, 2)


@settings(max_examples=60)
@given(thr_lo=st.floats(0.0, 2.0), thr_hi=st.floats(0.0, 2.0), seed=st.integers(0, 2**16),
       step=st.integers(0, 12), ctr=st.tuples(st.integers(0, 1), st.integers(0, 5), st.integers(0, 5)))
def test_guard_is_monotone_in_the_threshold(thr_lo, thr_hi, seed, step, ctr):
    thr_lo, thr_hi = sorted((thr_lo, thr_hi))
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(3, 5, generator=g)
    anchor = torch.stack([r + torch.randn(3, 5, generator=g) * 0.3, torch.zeros(3, 5), torch.zeros(3, 5)])

    def decide(thr):
        slot_ctr = torch.tensor([list(ctr), [0, 0, 0], [0, 0, 0]])
        cache, *_ = guard.decide(r, anchor.clone(), slot_ctr, torch.tensor(step), torch.tensor(0),
                                 torch.tensor(False), threshold=thr, warmup_steps=3, warmup_interval=1,
                                 max_cached=4, max_continuous=3, slots=2)
        return bool(cache)

    assert decide(thr_lo) <= decide(thr_hi)  # caching at a lower threshold implies caching at a higher


def test_side_effect_calls_around_middle_blocks_refuse_the_cache_with_a_reason():
    class WritingBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, h, scale):  # writes into a tensor the blocks did not make
            scale.mul_(1.0)
            return h + torch.tanh(self.fc(h)) * scale

    class WritingDiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(WritingBlock() for _ in range(4))

        def forward(self, h, timestep):
            scale = torch.cos(timestep).reshape(-1, 1, 1)
            h = h * scale
            for b in self.blocks:
                h = b(h, scale)
            return h

    m = WritingDiT()
    x, t = torch.randn(2, 5, 8), torch.tensor([0.3, 0.3])
    with cdcompile.backend.collect_reports() as reports, pytest.warns(UserWarning, match="mul_"):
        c = torch.compile(m, backend="cachedit", options={"compiler": "eager"})
        with torch.no_grad():
            torch.testing.assert_close(c(x, t), m(x, t))
    (r,) = reports
    assert r.groups and r.cache is None
    assert any("side-effecting op" in reason and "mul_" in reason for reason in r.not_cached)


class _ScopedBlock(torch.nn.Module):
    """A SeqBlock run inside ``with torch.autocast(..., enabled=False)`` (as Z-Image's RoPE is), with
    a dead cast of a side input (as Sana-WM leaves one): neither may keep the block cache out."""

    def __init__(self, block):
        super().__init__()
        self.inner = block

    def forward(self, x, temb):
        _ = temb.float()
        with torch.autocast("cpu", enabled=False):
            return self.inner(x, temb)


def _assert_wrapped_blocks_cached_as_the_reference(wrapper, compiler):
    """SequentialDiT with every block wrapped in ``wrapper``: the block cache is in the graph and
    its outputs and cached steps equal the eager reference's."""
    cfg = RefConfig(threshold=0.15, warmup=2)
    m = SequentialDiT(depth=5)
    m.blocks = torch.nn.ModuleList(wrapper(b) for b in m.blocks)
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, compiler))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, (x, t) in enumerate(_seq_trajectory()):
                torch.testing.assert_close(c(x, t), run_sequential_dit(m, x, t, ref, s), rtol=1e-5, atol=1e-6)
    assert reports[0].cache is not None, reports[0].not_cached
    assert _ref_cached(ref) and _cached_steps(m) == _ref_cached(ref)


def test_an_autocast_scope_and_a_dead_cast_inside_the_blocks_move_into_the_branch():
    _assert_wrapped_blocks_cached_as_the_reference(_ScopedBlock, "aot_eager")


class _KernelScopedBlock(torch.nn.Module):
    """A SeqBlock followed by an attention run inside ``with sdpa_kernel(...)`` scopes, the outer one
    with a priority, as diffusers' _native_math / _native_flash / _native_cudnn attention backends
    run theirs: Dynamo records each enter and exit as a call that sets the SDPA backends. (A
    priority set inside a scope that disabled some backends does not restore the order of those,
    in eager too.) ``scoped=False`` runs the same attention with the default kernels."""

    scoped = True

    def __init__(self, block):
        super().__init__()
        self.inner = block
        dim = block.mod.in_features
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, temb):
        x = self.inner(x, temb)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        if not self.scoped:
            return x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION], set_priority=True):
            with sdpa_kernel([SDPBackend.MATH]):
                a = F.scaled_dot_product_attention(q, k, v)
        return x + a.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_sdpa_kernel_scopes_inside_the_blocks_move_into_the_branch(compiler):
    # they refused the cache as "side-effecting op _sdpa_kernel" until the region moved a setting
    # the middle blocks restore into the branch
    before = torch.nn.attention._cur_sdpa_kernel_backends(with_priority=True)
    _assert_wrapped_blocks_cached_as_the_reference(_KernelScopedBlock, compiler)
    assert torch.nn.attention._cur_sdpa_kernel_backends(with_priority=True) == before


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_the_branch_runs_its_attention_with_the_kernels_its_scope_sets(compiler, monkeypatch):
    # In bfloat16 the math kernel and the CPU flash kernel differ by about 1e-2, so an attention in
    # the compute branch that ran with the default kernels shows. (FX's dead-code elimination took
    # the setting calls out of the branch, which returns None: the first version of the move did.)
    m = SequentialDiT(depth=4)
    m.blocks = torch.nn.ModuleList(_KernelScopedBlock(b) for b in m.blocks)
    m = m.to(torch.bfloat16)
    x, t = torch.randn(2, 24, 8, dtype=torch.bfloat16), torch.tensor([0.3, 0.3], dtype=torch.bfloat16)

    def run(**options):
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": compiler, **options})
        with torch.no_grad():
            return c(x, t)

    plain = run(enable_cache=False)
    with cdcompile.backend.collect_reports() as reports:
        torch.testing.assert_close(run(residual_diff_threshold=0.0), plain, rtol=0, atol=0)
    assert reports[0].cache is not None, reports[0].not_cached
    monkeypatch.setattr(_KernelScopedBlock, "scoped", False)
    assert not torch.equal(run(enable_cache=False), plain)  # the kernel the scope picks shows


def test_flux_on_diffusers_native_math_attention_backend_caches_like_the_reference():
    cfg = RefConfig(threshold=0.35, warmup=2)
    m = tiny_flux()
    m.set_attention_backend("_native_math")
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, "aot_eager"))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, kw in enumerate(_flux_trajectory(m, STEPS)):
                torch.testing.assert_close(c(**kw)[0], run_flux(m, kw, ref, s), rtol=1e-4, atol=1e-4)
    assert reports[0].cache is not None, reports[0].not_cached
    cached = _ref_cached(ref)
    assert 0 < len(cached) < STEPS and _cached_steps(m) == cached


def _setter_graph(*settings):
    """x -> relu -> ... with a ``_sdpa_kernel`` call of each setting (a list of backend names)
    between the relus, the way Dynamo records ``with sdpa_kernel``."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    core = []
    for names in settings:
        backends = [g.call_function(torch.nn.attention._backend_from_string, (b,)) for b in names]
        g.call_function(torch.nn.attention._sdpa_kernel, (backends, False))
        x = g.call_function(torch.relu, (x,))
        core.append(x)
    g.output(x)
    return list(g.nodes), core


def test_a_setting_the_middle_blocks_do_not_restore_refuses_and_names_it():
    from cdcompile.passes import _branch
    everything = [b.name for b in torch.nn.attention._cur_sdpa_kernel_backends()]
    nodes, core = _setter_graph(["MATH"], everything)
    order = {n: k for k, n in enumerate(nodes)}
    moved = _branch._take_settings(nodes, 1, order[core[-1]], order, set(core), list(core), "the middle blocks")
    assert {n.name for n in moved} == {"_sdpa_kernel", "_sdpa_kernel_1"}
    # A scope around no region node (a block of another group between the middle blocks) stays.
    region = [core[-1]]
    kept = _branch._take_settings(nodes, 1, order[core[-1]], order, set(region), region, "the middle blocks")
    assert {n.name for n in kept} == {"_sdpa_kernel", "_sdpa_kernel_1"} and region == [core[-1]]
    nodes, core = _setter_graph(["MATH"], ["FLASH_ATTENTION"])
    order = {n: k for k, n in enumerate(nodes)}
    reason = _branch._take_settings(nodes, 1, order[core[-1]], order, set(core), list(core), "the middle blocks")
    assert isinstance(reason, str) and "['FLASH_ATTENTION']" in reason and "MATH" in reason


class _DeadValuesBlock(torch.nn.Module):
    """A SeqBlock that first computes values from its side input and never reads them (a default
    the modulation then overwrites): Dynamo keeps such dead ops in the graph."""

    def __init__(self, block):
        super().__init__()
        self.inner = block

    def forward(self, x, temb):
        gate = torch.ones_like(temb)[:, None]
        shift, scale = torch.zeros_like(temb).chunk(2, dim=-1)
        _ = temb * 2.0 + 1.0
        gate = shift = scale = None
        return self.inner(x, temb) if gate is None and shift is None and scale is None else x


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_dead_pure_ops_on_side_inputs_between_the_blocks_stay_before_the_cond(compiler):
    # these refused the cache as "side-effecting op ones_like" until the region told a pure op
    # that makes tensors from a state toggle (tests/fuzz_dit.py found it)
    _assert_wrapped_blocks_cached_as_the_reference(_DeadValuesBlock, compiler)


class _MaskedBlock(torch.nn.Module):
    """A SeqBlock whose output is smoothed over a band of neighbouring tokens, the band built with
    ``torch.vmap`` from positions only (as ``create_block_mask`` builds a flex_attention mask)."""

    def __init__(self, block):
        super().__init__()
        self.inner = block

    def forward(self, x, temb):
        pos = torch.arange(x.shape[1])
        near = torch.vmap(lambda i: ((pos - i).abs() <= 2).float())(pos)
        y = self.inner(x, temb)
        return y + 0.1 * (near @ (y - x)) / near.sum(-1, keepdim=True)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_a_vmap_that_does_not_read_the_streams_runs_before_the_cond(compiler):
    _assert_wrapped_blocks_cached_as_the_reference(_MaskedBlock, compiler)


class _RowVmapBlock(torch.nn.Module):
    """A SeqBlock followed by a per-token MLP run through ``torch.vmap`` over the tokens of its
    output (as Kandinsky 6 SR's NABLA mask is built, under vmap, from the queries and keys)."""

    def __init__(self, block):
        super().__init__()
        self.inner = block
        dim = block.mod.in_features
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x, temb):
        y = self.inner(x, temb)
        return y + 0.1 * torch.vmap(torch.vmap(lambda row: torch.tanh(self.fc(row))))(y)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_a_vmap_that_reads_the_streams_is_lowered_into_the_branch(compiler):
    _assert_wrapped_blocks_cached_as_the_reference(_RowVmapBlock, compiler)


class _Encoder(torch.nn.Module):
    """A block of a side encoder whose stream narrows (no residual across its chain)."""

    def __init__(self, i, o):
        super().__init__()
        self.fc = torch.nn.Linear(i, o)

    def forward(self, m):
        return torch.tanh(self.fc(m))


class _Adapter(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = torch.nn.Linear(4, dim)

    def forward(self, h, m):
        return torch.tanh(self.fc(m)).unsqueeze(1) * h


class _AdapterDiT(SequentialDiT):
    """Wan-Animate's shape: a side encoder of 5 blocks (more than the 4 DiT blocks) whose stream
    narrows 16 -> 4, and an adapter list applied after every second DiT block (glue in some gaps)."""

    def __init__(self):
        super().__init__(depth=4)
        self.enc = torch.nn.ModuleList(_Encoder(16, 16 if k < 4 else 4) for k in range(5))
        self.adapters = torch.nn.ModuleList(_Adapter(32) for _ in range(2))

    def motion(self, m):
        for e in self.enc:
            m = e(m)
        return m

    def forward(self, x, timestep, motion):
        m = self.motion(motion)
        half = self.proj_in.out_features // 2
        freqs = torch.exp(-9.21 * torch.arange(half, device=x.device) / half)
        angles = timestep.reshape(-1, 1).float() * 1000 * freqs
        temb = self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1).to(x.dtype))
        h = self.proj_in(x)
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if i % 2 == 0:
                h = self.adapters[i // 2](h, m) + h
        return self.proj_out(h)


def _run_adapter_dit(model, x, t, motion, cache: RefCache, step: int):
    """_AdapterDiT with DBCache F1B0 over its DiT blocks: the adapter after block 0 belongs to M."""
    m = model.motion(motion)
    half = model.proj_in.out_features // 2
    angles = t.reshape(-1, 1).float() * 1000 * torch.exp(-9.21 * torch.arange(half) / half)
    temb = model.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1))
    h0 = model.proj_in(x)
    h1 = model.blocks[0](h0, temb)
    if cache.decide(step, 0, h1 - h0):
        return model.proj_out(h1 + cache.residuals(0)["hidden"])
    h = model.adapters[0](h1, m) + h1
    for i in range(1, 4):
        h = model.blocks[i](h, temb)
        if i == 2:
            h = model.adapters[1](h, m) + h
    cache.store(0, {"hidden": h - h1})
    return model.proj_out(h)


def test_adapters_in_some_gaps_are_glue_and_a_narrowing_side_chain_yields_to_the_dit_blocks():
    cfg = RefConfig(threshold=0.2, warmup=2)
    m = _AdapterDiT()
    motion = torch.randn(2, 16, generator=torch.Generator().manual_seed(3))
    with cdcompile.backend.collect_reports() as reports, pytest.warns(UserWarning, match="cached blocks"):
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, (x, t) in enumerate(_seq_trajectory()):
                torch.testing.assert_close(c(x, t, motion), _run_adapter_dit(m, x, t, motion, ref, s),
                                           rtol=1e-5, atol=1e-6)
    (r,) = reports
    assert {g["name"]: g["blocks"] for g in r.groups} == {"enc": 5, "blocks": 4}
    assert r.cache["groups"] == ["blocks"] and "enc (5)" in r.cache["fallback"]
    assert _ref_cached(ref) and _cached_steps(m) == _ref_cached(ref)


@pytest.mark.parametrize("cfg,depth,streams", [
    (RefConfig(threshold=0.1, warmup=2), 5, ["carried", "hidden"]),
    (RefConfig(Fn=2, Bn=1, threshold=0.1, warmup=2), 6, ["carried", "hidden"]),
    (RefConfig(Fn=1, Bn=2, threshold=0.1, warmup=2), 5, ["hidden"]),  # no update between M's blocks
], ids=["F1B0", "F2B1", "F1B2"])
def test_a_stream_no_block_returns_updated_between_blocks_is_carried_like_the_reference(cfg, depth, streams):
    m = PairDiT(depth=depth)  # the pairs: read by every block, refreshed after blocks 0, 2 (, 4)
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, "aot_eager"))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, (x, t) in enumerate(_seq_trajectory()):
                torch.testing.assert_close(c(x, t), run_pair_dit(m, x, t, ref, s), rtol=1e-5, atol=1e-6,
                                           msg=lambda msg: f"step {s}: {msg}")
    (r,) = reports
    assert [(g["name"], g["blocks"], g["streams"]) for g in r.groups] == [("blocks", depth, ["hidden", "carried"])]
    assert r.cache["streams"] == streams
    cached = _ref_cached(ref)
    assert cached and len(cached) < STEPS - cfg.warmup and _cached_steps(m) == cached


@pytest.mark.parametrize("cfg", [RefConfig(threshold=0.1, warmup=2), RefConfig(Fn=2, Bn=1, threshold=0.1, warmup=2)],
                         ids=["F1B0", "F2B1"])
def test_an_update_after_every_block_but_the_last_pairs_with_the_blocks_like_the_reference(cfg):
    m = PairDiT(depth=5, every=1)  # updates.i after blocks.i for i < 4: units of an interleaved group
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, "aot_eager"))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, (x, t) in enumerate(_seq_trajectory()):
                torch.testing.assert_close(c(x, t), run_pair_units(m, x, t, ref, s), rtol=1e-5, atol=1e-6,
                                           msg=lambda msg: f"step {s}: {msg}")
    (r,) = reports
    assert [(g["name"], g["blocks"], g["streams"]) for g in r.groups] == [("blocks+updates", 5, ["hidden", "encoder"])]
    assert sorted(r.cache["streams"]) == ["encoder", "hidden"]  # the last unit passes the pairs on to the head
    cached = _ref_cached(ref)
    assert cached and len(cached) < STEPS - cfg.warmup and _cached_steps(m) == cached


@pytest.mark.parametrize("cfg,mn", [
    (RefConfig(threshold=0.1, warmup=2), 6),  # every skip is read inside M
    (RefConfig(Fn=2, Bn=1, threshold=0.1, warmup=2), 4),  # B (block 6) reads block 0's output, in F
    (RefConfig(Fn=1, Bn=5, threshold=0.1, warmup=2), 1),  # block 5 reads M's exit (block 1): F's exit + residual
], ids=["F1B0", "F2B1", "F1B5"])
def test_long_skips_across_the_stack_cache_it_whole_like_the_reference(cfg, mn):
    m = SkipDiT(depth=7)  # blocks 0..2 push their outputs, blocks 4..6 pop them
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, "aot_eager"))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, (x, t) in enumerate(_seq_trajectory()):
                torch.testing.assert_close(c(x, t), run_skip_dit(m, x, t, ref, s), rtol=1e-5, atol=1e-6,
                                           msg=lambda msg: f"step {s}: {msg}")
    (r,) = reports
    assert [(g["name"], g["blocks"], g["block_class"]) for g in r.groups] == [
        ("blocks[0..3]", 4, "SeqBlock"), ("blocks[4..6]", 3, "SkipBlock")]
    assert r.cache["groups"] == ["blocks[0..3]", "blocks[4..6]"] and r.cache["Mn"] == mn
    cached = _ref_cached(ref)
    assert cached and len(cached) < STEPS - cfg.warmup and _cached_steps(m) == cached


def test_a_back_block_reading_a_skip_from_inside_m_falls_back_and_names_the_value():
    m = SkipDiT(depth=7)  # Bn=2: block 5 reads block 1's output, which a cached step would not compute
    x, t = _seq_trajectory()[0]
    with torch.no_grad(), pytest.warns(UserWarning, match=r"computed in the middle blocks, is read by"):
        report = cdcompile.explain(m, x, t, options={"Bn_compute_blocks": 2})
    (graph,) = report.graph_reports
    assert graph.cache["groups"] == ["blocks[0..3]"] and "has no residual across it" in graph.cache["fallback"]
    torch.testing.assert_close(report.output, m(x, t), rtol=1e-5, atol=1e-6)


class _ContextBlock(torch.nn.Module):
    """A SeqBlock plus a gate from the mean of the valid context tokens (their count ``n`` is data)."""

    def __init__(self, dim):
        super().__init__()
        self.inner = SeqBlock(dim)
        self.gate = torch.nn.Linear(dim, dim)

    def forward(self, h, temb, ctx, n):
        return self.inner(h, temb) + 0.1 * torch.tanh(self.gate(ctx.sum(0) / n))


class _ValidContextDiT(SequentialDiT):
    """SequentialDiT whose blocks also read the valid context tokens and the first invalid one: under
    Dynamo's ``capture_dynamic_output_shape_ops`` their count is a sum of unbacked symbols, as
    HunyuanVideo 1.5's text tokens are after their boolean-mask reordering."""

    def __init__(self, depth=5):
        super().__init__(depth=depth)
        self.blocks = torch.nn.ModuleList(_ContextBlock(self.proj_in.out_features) for _ in range(depth))

    def embed(self, x, timestep):
        half = self.proj_in.out_features // 2
        angles = timestep.reshape(-1, 1).float() * 1000 * torch.exp(-9.21 * torch.arange(half) / half)
        return self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1)), self.proj_in(x)

    def forward(self, x, timestep, context, valid):
        temb, h = self.embed(x, timestep)
        ctx = torch.cat([context[valid], context[~valid][:1]])
        for block in self.blocks:  # the branch reads a tensor of unbacked size and an unbacked SymInt
            h = block(h, temb, ctx, ctx.shape[0])
        return self.proj_out(h)


def _run_valid_context_dit(model, x, t, context, valid, cache: RefCache, step: int):
    """_ValidContextDiT with DBCache F1B0."""
    temb, h0 = model.embed(x, t)
    ctx = torch.cat([context[valid], context[~valid][:1]])
    h1 = model.blocks[0](h0, temb, ctx, ctx.shape[0])
    if cache.decide(step, 0, h1 - h0):
        return model.proj_out(h1 + cache.residuals(0)["hidden"])
    h = h1
    for b in model.blocks[1:]:
        h = b(h, temb, ctx, ctx.shape[0])
    cache.store(0, {"hidden": h - h1})
    return model.proj_out(h)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_middle_blocks_reading_a_tensor_of_data_dependent_size_are_cached(compiler):
    cfg = RefConfig(threshold=0.15, warmup=2)
    m = _ValidContextDiT()
    context = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    valid = torch.tensor([True, False, True, True, False, True])
    ref = RefCache(cfg)
    with cdcompile.backend.collect_reports() as reports, \
            torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, compiler))
        with torch.no_grad():
            for s, (x, t) in enumerate(_seq_trajectory()):
                torch.testing.assert_close(c(x, t, context, valid),
                                           _run_valid_context_dit(m, x, t, context, valid, ref, s),
                                           rtol=1e-5, atol=1e-6)
    assert reports[0].cache is not None, reports[0].not_cached
    assert _ref_cached(ref) and _cached_steps(m) == _ref_cached(ref)


class _JointBlock(torch.nn.Module):
    """Attention and MLP over the image tokens joined with the text tokens, whose image part it takes
    back at ``:-text.shape[1]`` (HunyuanVideo Framepack's blocks)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.mod, self.qkv, self.mlp = (torch.nn.Linear(dim, k * dim) for k in (2, 3, 1))

    def joint(self, h, temb, text):
        torch._check(h.shape[1] > 1)  # lets Dynamo broadcast over the joint length
        joint = torch.cat([h, text], dim=1)
        shift, scale = self.mod(temb).unsqueeze(1).chunk(2, dim=-1)
        q, k, v = self.qkv(self.norm(joint) * (1 + scale) + shift).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        joint = joint + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return joint + self.mlp(self.norm(joint))


class _JointAddBlock(_JointBlock):
    def forward(self, h, temb, text):  # adds the sliced update: h keeps its (static) length
        return h + 0.5 * self.joint(h, temb, text)[:, :-text.shape[1]]


class _JointSliceBlock(_JointBlock):
    def forward(self, h, temb, text):  # returns the slice: a fresh unbacked length
        return self.joint(h, temb, text)[:, :-text.shape[1]]


class _JointSliceDiT(SequentialDiT):
    """Two groups of joint blocks, as HunyuanVideo Framepack's double and single blocks; the text
    tokens are cut to the mask's count, read with ``.item()``. Under ``capture_scalar_outputs`` each
    slice block's image tokens leave it with a fresh unbacked length that Dynamo cannot prove equal
    to the entry's (it is, unless the text is empty)."""

    def __init__(self):
        super().__init__(depth=1)
        dim = self.proj_in.out_features
        self.pre = torch.nn.ModuleList(_JointAddBlock(dim) for _ in range(2))
        self.blocks = torch.nn.ModuleList(_JointSliceBlock(dim) for _ in range(3))

    def forward(self, x, timestep, text, mask):
        temb, h = _ValidContextDiT.embed(self, x, timestep)
        text = text[:, :mask.sum().item()]
        for block in [*self.pre, *self.blocks]:
            h = block(h, temb, text)
        return self.proj_out(h)


def _run_joint_slice_dit(model, x, t, text, mask, cache: RefCache, step: int):
    """_JointSliceDiT with DBCache F1B0 over its 5 blocks."""
    temb, h0 = _ValidContextDiT.embed(model, x, t)
    text = text[:, :int(mask.sum())]
    h1 = model.pre[0](h0, temb, text)
    if cache.decide(step, 0, h1 - h0):
        return model.proj_out(h1 + cache.residuals(0)["hidden"])
    h = h1
    for b in [model.pre[1], *model.blocks]:
        h = b(h, temb, text)
    cache.store(0, {"hidden": h - h1})
    return model.proj_out(h)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_stream_leaving_with_an_unbacked_length_is_checked_at_run_time_and_cached(compiler):
    cfg = RefConfig(threshold=0.15, warmup=2)
    m = _JointSliceDiT()
    text = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([1, 1, 1, 1, 0, 0])
    ref = RefCache(cfg)
    with cdcompile.backend.collect_reports() as reports, \
            torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, compiler))
        with torch.no_grad():
            for s, (x, t) in enumerate(_seq_trajectory()):
                torch.testing.assert_close(c(x, t, text, mask), _run_joint_slice_dit(m, x, t, text, mask, ref, s),
                                           rtol=1e-5, atol=1e-6)
    (r,) = reports
    assert r.cache is not None, r.not_cached
    (check,) = r.cache["runtime_size_checks"]
    assert check.startswith("hidden dim 1: u") and check.endswith(" == 10"), check
    assert _ref_cached(ref) and _cached_steps(m) == _ref_cached(ref)


def test_dbprune_checks_each_unbacked_block_exit_at_run_time_and_prunes_as_the_reference():
    # DBPrune gets DBCache's run-time check per block: each slice block's exit (an unbacked length)
    # leaves its cond with its entry's shape, which the next block's anchor and residual take; the
    # size checks Dynamo placed right after each slice follow that block's cond.
    from dbprune_reference import PruneConfig, RefPrune, prune_blocks

    cfg = PruneConfig(threshold=0.05, warmup=2)
    m = _JointSliceDiT()
    text = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([1, 1, 1, 1, 0, 0])
    blocks = [*m.pre, *m.blocks]
    ref = RefPrune(cfg, len(blocks))
    with cdcompile.backend.collect_reports() as reports, \
            torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=cfg.options("aot_eager"))
        with torch.no_grad():
            for s, (x, t) in enumerate(_seq_trajectory()):
                temb, h = _ValidContextDiT.embed(m, x, t)
                cut = text[:, :int(mask.sum())]
                h = prune_blocks(ref, blocks, h, lambda block, h: block(h, temb, cut), s)
                torch.testing.assert_close(c(x, t, text, mask), m.proj_out(h), rtol=1e-5, atol=1e-6,
                                           msg=lambda e: f"step {s}: {e}")
    (r,) = reports
    assert r.cache is not None and r.cache["prunable_blocks"] == [1, 2, 3, 4], r.not_cached
    pruned = [p for _, _, p in ref.decisions]
    assert [] in pruned[2:] and [1, 2, 3, 4] in pruned, pruned


class _ChannelsFirstDiT(SequentialDiT):
    """SequentialDiT fed channels-first, ``(batch, dim, tokens)``: its stream starts as
    ``x.transpose(1, 2) + temb``, whose eager strides are transposed, as HunyuanVideo 1.5's are after
    its graph break."""

    def forward(self, x, timestep):
        half = self.proj_in.out_features // 2
        angles = timestep.reshape(-1, 1).float() * 1000 * torch.exp(-9.21 * torch.arange(half) / half)
        temb = self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1))
        h = x.transpose(1, 2) + temb[:, None]
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h)


@pytest.mark.slow
def test_inductor_branches_take_a_transposed_stream_with_the_strides_they_were_compiled_for():
    # Inductor compiles the branches for the FX strides of their operands; without
    # backend.CondOperandLayouts it writes the stream entering M contiguous, and the compute branch's
    # input assert fails.
    m = _ChannelsFirstDiT(depth=4)
    dim = m.proj_in.out_features
    c = torch.compile(m, backend="cachedit", fullgraph=True,
                      options=dict(compiler="inductor", residual_diff_threshold=0.0))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in (0.9, 0.8):
            x = torch.randn(1, dim, 12, generator=g)
            torch.testing.assert_close(c(x, torch.tensor([t])), m(x, torch.tensor([t])), rtol=1e-4, atol=1e-5)
    assert _cached_steps(m) == []


def _flux_request(model, steps, tokens, seed):
    base = flux_inputs(model, tokens=tokens, text_tokens=5, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    d = torch.randn(base["hidden_states"].shape, generator=g)
    return [dict(base, hidden_states=base["hidden_states"] + 0.01 * s * d,
                 timestep=torch.full_like(base["timestep"], 1.0 - s / steps)) for s in range(steps)]


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_graph_compiled_for_dynamic_token_counts_caches_every_size_as_the_reference(compiler):
    # The second token count makes Dynamo recompile with a symbolic token count (automatic dynamic):
    # that graph serves every later size, with cache state allocated per size.
    from torch._dynamo.utils import counters

    counters.clear()
    cfg = RefConfig(threshold=0.35, warmup=2)
    m = tiny_flux()
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, compiler))
        with torch.no_grad():
            for tokens in (16, 36, 64, 36):
                ref = RefCache(cfg)
                cdcompile.new_request(c)
                for s, kw in enumerate(_flux_request(m, STEPS, tokens, seed=tokens)):
                    torch.testing.assert_close(c(**kw)[0], run_flux(m, kw, ref, s), rtol=1e-4, atol=1e-4,
                                               msg=lambda x: f"{tokens} tokens, step {s}: {x}")
                cached = _ref_cached(ref)
                assert 0 < len(cached) < STEPS, f"{tokens} tokens: trajectory must exercise both branches"
                last = cdcompile.summary(m).as_dict()["requests"][-1]
                assert last["slots"][0]["cached_steps"] == cached, tokens
    assert [r.cache is not None for r in reports] == [True, True], [r.not_cached for r in reports]
    assert counters["stats"]["unique_graphs"] == 2
    assert reports[0].cache["dynamic_sizes"] == [] and "per call size" not in str(reports[0])
    sizes = reports[1].cache["dynamic_sizes"]  # the image token count; the 5 text tokens stayed static
    assert len(sizes) == 1 and sizes[0].endswith(".shape[1]") and "per call size" in str(reports[1]), sizes
    # a new size replaced the dynamic graph's state twice; its history kept the earlier requests
    assert [r["steps"] for r in cdcompile.summary(m).as_dict()["requests"]] == [STEPS] * 4


@pytest.mark.parametrize("extra", [
    {"calibrator": "taylorseer", "taylorseer_order": 2},
    {"calibrator": "foca"},
    {"steps_computation_mask": [1, 1, 1, 0, 0, 1, 0, 0, 0, 1], "steps_computation_policy": "static"},
    {"cache_type": "dbprune"},
], ids=["taylorseer2", "foca", "mask", "dbprune"])
def test_one_symbolic_graph_decides_and_outputs_as_one_static_graph_per_size(extra):
    # Batch and token count both change between requests; dynamic=True compiles one graph with both
    # sizes symbolic, dynamic=False one graph per size. Decisions, residual diffs and outputs agree.
    cfg = RefConfig(threshold=0.15, warmup=2)
    g = torch.Generator().manual_seed(3)
    requests = []
    for batch, tokens in ((2, 10), (3, 10), (2, 14), (3, 10)):  # Dynamo specialises sizes 0 and 1
        x, d = torch.randn(batch, tokens, 8, generator=g), torch.randn(batch, tokens, 8, generator=g)
        requests.append([(x + 0.05 * s * d, torch.full((batch,), 1.0 - s / STEPS)) for s in range(STEPS)])
    from torch._dynamo.utils import counters

    runs, graphs = {}, {}
    for dynamic in (True, False):
        torch._dynamo.reset()
        counters.clear()
        m = SequentialDiT(depth=5)
        c = torch.compile(m, backend="cachedit", fullgraph=True, dynamic=dynamic, options=_opts(cfg, **extra))
        with torch.no_grad():
            outs = []
            for req in requests:
                cdcompile.new_request(c)
                outs.append([c(x, t) for x, t in req])
        slots = [r["slots"] for r in cdcompile.summary(m).as_dict()["requests"]]
        runs[dynamic], graphs[dynamic] = (outs, slots), counters["stats"]["unique_graphs"]
    assert graphs == {True: 1, False: 3}
    (dyn_outs, dyn_slots), (static_outs, static_slots) = runs[True], runs[False]
    for a, b in zip(dyn_outs, static_outs):
        for s, (x, y) in enumerate(zip(a, b)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {s}: {m}")
    # the static graphs list their requests graph by graph: (2, 10) x1, (3, 10) x2, (2, 14) x1
    assert len(dyn_slots) == len(static_slots) == 4
    key = lambda slots: [s.get("cached_steps", s.get("pruned_blocks")) for s in slots]  # noqa: E731
    assert sorted(map(key, dyn_slots)) == sorted(map(key, static_slots))
    assert any(key(s)[0] and any(key(s)[0]) for s in dyn_slots), "some step must be cached or pruned"


def _group(updates, cross=False, joined=False):
    from fuzz_dit import GroupSpec

    return GroupSpec(depth=3, norm="layer", attn="sdpa", mlp="gelu", modulation="adaln", inplace=False,
                     updates_encoder=updates, returns="tuple_he" if updates else "h", call="kw", cross=cross,
                     joined=joined)


def _assert_two_text_groups_cached_across_both(groups, mask, cfg, compiler, join=False,
                                               streams=("encoder", "hidden")):
    """A fuzz_dit model with two groups of 3 blocks over image and text tokens, F1 B1: the block
    cache spans both groups (M = 4, no fallback), caches ``streams``, and its outputs and cached
    steps equal the eager reference's."""
    from fuzz_dit import DiTSpec, RandomDiT, run_reference, trajectory

    spec = DiTSpec(seed=7, width=16, heads=2, two_streams=True, img_tokens=12, txt_tokens=4, batch=2, rope=True,
                   mask=mask, groups=groups, glue=False, same_class=False, cfg=False, join=join)
    m = RandomDiT(spec).eval()
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, compiler))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, (kw,) in enumerate(trajectory(spec, STEPS)):
                torch.testing.assert_close(c(**kw), run_reference(m, kw, ref, s), rtol=1e-4, atol=1e-5)
    (r,) = reports
    assert r.cache is not None and "fallback" not in r.cache, (r.not_cached, r.cache)
    assert r.cache["Mn"] == 4 and sorted(r.cache["streams"]) == list(streams)
    assert 0 < len(_ref_cached(ref)) < STEPS - 2 and _cached_steps(m) == _ref_cached(ref)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_a_text_stream_the_first_group_refines_and_the_next_only_reads_is_cached_across_both(compiler):
    # Double blocks update image and text tokens; the next group attends to the text but returns only
    # the image stream, and its last block (B) reads the text. M spans both groups, so the text leaves
    # M as the first group's last output: it is cached as a stream. (Refused before as "read other
    # than through the streams"; tests/fuzz_dit.py found it.)
    _assert_two_text_groups_cached_across_both([_group(True), _group(False)], False,
                                               RefConfig(Fn=1, Bn=1, threshold=0.3, warmup=2), compiler)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_text_and_image_tokens_joined_between_the_groups_are_cached_across_both(compiler):
    # Double blocks over image and text tokens, then torch.cat([text, image], dim=1) and single
    # blocks over the one stream (FLUX.2, Chroma, AuraFlow, BFL's FLUX); the image tokens are split
    # off after the stack. M spans the join: the joined stream's residual is taken against the join
    # replayed on F's outputs, cat([EF, HF]). (Before, the pass fell back to the single blocks
    # alone, so F held every double block; tests/fuzz_dit.py's join draws test it further.)
    _assert_two_text_groups_cached_across_both(
        [_group(True), _group(False, joined=True)], True, RefConfig(Fn=1, Bn=1, threshold=0.3, warmup=2),
        compiler, join=True, streams=("hidden",))


class _ThreeGroups(torch.nn.Module):
    """Two groups of two-stream blocks (two classes), then the streams joined (text first) for a
    third group of single-stream blocks; ``run`` with a ``RefCache`` is its DBCache reference, F1 B0."""

    def __init__(self):
        from fuzz_dit import DiTSpec, RandomDiT

        super().__init__()
        groups = [_group(True), _group(True), _group(False, joined=True)]
        self.spec = DiTSpec(seed=3, width=16, heads=2, two_streams=True, img_tokens=10, txt_tokens=4, batch=1,
                            rope=False, mask=False, groups=groups, glue=False, same_class=False, cfg=False)
        self.dit = RandomDiT(self.spec)

    def run(self, x, t, enc_in, cache=None, step=0):
        h, enc, ctx = self.dit.prologue(x, t, enc_in)
        blocks = [(gi, b) for gi, group in enumerate(self.dit.groups) for b in group]

        def block(k, h, enc):
            gi, b = blocks[k]
            if gi == 2 and enc is not None:
                h, enc = torch.cat([enc, h], dim=1), None
            return self.dit.call_block(gi, b, h, enc, ctx)

        h0 = h
        h, enc = block(0, h, enc)
        if cache is not None and cache.decide(step, 0, h - h0):
            h = torch.cat([enc, h], dim=1) + cache.residuals(0)["hidden"]
        else:
            hf, ef = h, enc
            for k in range(1, len(blocks)):
                h, enc = block(k, h, enc)
            if cache is not None:
                cache.store(0, {"hidden": h - torch.cat([ef, hf], dim=1)})
        return self.dit.x_out(self.dit.norm_out(h[:, self.spec.txt_tokens:]))

    def forward(self, x, t, enc_in):
        return self.run(x, t, enc_in)


def test_a_join_before_the_third_group_is_replayed_through_the_second():
    # The join's entry is made from the second group's entries to M, which are the first group's
    # (F's outputs): the replay asks for them in turn.
    from fuzz_dit import trajectory

    m = _ThreeGroups().eval()
    cfg = RefConfig(Fn=1, Bn=0, threshold=0.3, warmup=2, max_continuous=2)
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg))
        ref = RefCache(cfg)
        with torch.no_grad():
            for s, (kw,) in enumerate(trajectory(m.spec, STEPS)):
                torch.testing.assert_close(c(**kw), m.run(**kw, cache=ref, step=s), rtol=1e-4, atol=1e-5)
    (r,) = reports
    assert r.cache["Mn"] == 8 and "fallback" not in r.cache, r.cache
    assert 0 < len(_ref_cached(ref)) < STEPS - 2 and _cached_steps(m) == _ref_cached(ref)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_a_text_stream_the_first_group_only_reads_and_the_next_refines_is_cached_across_both(compiler):
    # The reverse: the first group cross-attends to the text (a side input: no block of it returns
    # the text), the next updates it in joint attention. M spans both groups, so the text's residual
    # is taken from its value before M. (Before, the pass fell back to caching the first group
    # alone; tests/fuzz_dit.py found it.)
    _assert_two_text_groups_cached_across_both(
        [_group(False, cross=True), _group(True)], True,
        RefConfig(Fn=1, Bn=1, threshold=0.3, warmup=2, max_continuous=2), compiler)


@pytest.mark.parametrize("config,compiler,subclass", [
    ("Int8WeightOnlyConfig", "eager", "Int8Tensor"),
    ("Int8WeightOnlyConfig", "aot_eager", "Int8Tensor"),
    ("Int8DynamicActivationInt8WeightConfig", "aot_eager", "Int8Tensor"),
    ("Float8WeightOnlyConfig", "aot_eager", "Float8Tensor"),
])
def test_a_torchao_quantized_flux_caches_like_the_reference(config, compiler, subclass):
    # torchao's quantized weights are tensor subclasses, and torch.cond has no rule for them ("There
    # was no rule registered for HOP cond and subclass Int8Tensor"): the cond takes their inner
    # tensors, and each branch builds the weights again.
    import torchao.quantization

    m = tiny_flux(num_layers=2, num_single_layers=3)
    torchao.quantization.quantize_(m, getattr(torchao.quantization, config)())
    assert type(m.transformer_blocks[1].attn.to_q.weight).__name__ == subclass
    cfg = RefConfig(threshold=0.35, warmup=2)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg, compiler))
    ref = RefCache(cfg)
    with torch.no_grad():
        for s, kw in enumerate(_flux_trajectory(m, STEPS)):
            torch.testing.assert_close(c(**kw)[0], run_flux(m, kw, ref, s), rtol=1e-4, atol=1e-4,
                                       msg=lambda x: f"step {s}: {x}")
    cached = _ref_cached(ref)
    assert 0 < len(cached) < STEPS and _cached_steps(m) == cached
    (report,) = cdcompile.explain(m, **_flux_trajectory(m, 1)[0], options={"compiler": compiler}).graph_reports
    n = report.subclass_operands[subclass]  # every quantized weight of the 4 M blocks, at least 4 each
    assert n >= 4 * 4 and f"tensor subclasses ({n} {subclass})" in str(report)


class _LoopedDiT(SequentialDiT):
    """SequentialDiT whose forward passes through its blocks ``passes`` times (shared weights)."""

    def __init__(self, depth: int, passes: int):
        super().__init__(depth=depth)
        self.passes = passes

    def forward(self, x, timestep):
        temb = sequential_temb(self, x, timestep)
        h = self.proj_in(x)
        for _ in range(self.passes):
            for block in self.blocks:
                h = block(h, temb)
        return self.proj_out(h)


@pytest.mark.parametrize("cfg", [RefConfig(threshold=0.3, warmup=2), RefConfig(Fn=2, Bn=2, threshold=0.3, warmup=1)],
                         ids=["F1B0", "F2B2"])
def test_blocks_run_again_by_a_loop_are_one_stack_of_their_calls(cfg):
    # a loop that passes through the same blocks twice: each call is a unit of the stack (6 here),
    # so M spans both passes, and the cache equals the reference over the calls in order
    m = _LoopedDiT(depth=3, passes=2)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=_opts(cfg))
    ref = RefCache(cfg)
    calls = list(m.blocks) * 2
    with torch.no_grad():
        for s, (x, t) in enumerate(_seq_trajectory()):
            temb = sequential_temb(m, x, t)
            want = m.proj_out(cache_blocks(ref, calls, m.proj_in(x), lambda b, h: b(h, temb), s))
            torch.testing.assert_close(c(x, t), want, rtol=1e-4, atol=1e-5, msg=lambda e: f"step {s}: {e}")
    assert _cached_steps(m) == _ref_cached(ref) and _ref_cached(ref)
    (graph,) = cdcompile.summary(m).as_dict()["graphs"]
    assert graph["num_blocks"] == 6
    report = cdcompile.explain(m, *_seq_trajectory()[0], options=_opts(cfg))
    (group,) = report.groups
    assert group["paths"] == ["blocks.0", "blocks.1", "blocks.2",
                                                    "blocks.0@1", "blocks.1@1", "blocks.2@1"]
