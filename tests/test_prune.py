"""DBPrune compiled into the graph (cache_type="dbprune"): per-block decisions against the reference."""

import pytest
import torch

import cdcompile
from cdcompile import guard
from cdcompile.testing import PairDiT, SequentialDiT, SkipDiT, tiny_flux
from dbprune_reference import PruneConfig, RefPrune, run_flux, run_pair_dit, run_sequential_dit, run_skip_dit

STEPS = 10
DEPTH = 6


def _trajectory(steps=STEPS, seed=0, speed=0.05):
    g = torch.Generator().manual_seed(seed)
    x, d = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    return [(x + speed * s * d, torch.full((2,), 1.0 - s / steps)) for s in range(steps)]


def _slots(model, request=-1):
    return cdcompile.summary(model).as_dict()["requests"][request]["slots"]


def _pruned_per_step(ref: RefPrune, slot=0):
    return [len(p) for _, k, p in ref.decisions if k == slot]


def _run(cfg: PruneConfig, requests=1, compiler="eager"):
    m = SequentialDiT(depth=DEPTH)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=cfg.options(compiler))
    ref = RefPrune(cfg, DEPTH)
    with torch.no_grad():
        for _ in range(requests):
            ref.new_request()
            ref.decisions.clear()
            for s, (x, t) in enumerate(_trajectory()):
                got, want = c(x, t), run_sequential_dit(m, x, t, ref, s)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda msg: f"step {s}: {msg}")
    return m, ref


@pytest.mark.parametrize("cfg", [
    PruneConfig(threshold=0.1, warmup=2),
    PruneConfig(threshold=0.15, warmup=2, interval=2, max_cached=4, max_continuous=2),
    PruneConfig(Fn=2, Bn=1, threshold=0.12, warmup=1, non_prune=(3,)),
    PruneConfig(threshold=0.06, warmup=1, dynamic=True),
    # relaxed thresholds up to 0.199 here, where the default 1.25 and cap 0.12 stay below 0.12 and
    # prune other blocks (steps 2-9: 0 1 4 0 4 0 5 4 blocks by default, 2 3 2 4 1 3 3 3 tuned)
    PruneConfig(threshold=0.06, warmup=1, dynamic=True, relax=1.6, cap=0.2),
    # every third channel of each block's input: steps 6 and 9 prune instead of 5 (all channels at 0.1)
    PruneConfig(threshold=0.1, warmup=2, downsample=3),
    # the tokens that changed by more than 0.2: steps 3 and 5 compute (every token: steps 5 and 6)
    PruneConfig(threshold=0.2, warmup=2, important=0.2),
    # a refresh every 4 steps: 4, 5 and 8, 9 warm up again; blocks pruned per step
    # 0 0 5 0 0 0 5 0 0 0 (without: 0 0 5 0 5 5 0 5 5 0)
    PruneConfig(threshold=0.1, warmup=2, refresh=4, repeat=True),
    # calibrators: each block's residual forecast from the steps that block computed
    PruneConfig(threshold=0.1, warmup=2, calibrator="taylorseer", order=1),
    PruneConfig(threshold=0.1, warmup=2, max_continuous=3, calibrator="taylorseer", order=2, form="newton"),
    PruneConfig(threshold=0.1, warmup=2, calibrator="foca"),
    PruneConfig(threshold=0.1, warmup=2, calibrator="foca", foca_slope="step", values=True),
    PruneConfig(threshold=0.1, warmup=2, refresh=5, calibrator="taylorseer", order=2, values=True),
], ids=["thr0.1", "limits", "F2B1_nonprune3", "dynamic", "dynamic_relax1.6_cap0.2", "downsample3",
        "important0.2", "refresh_every4", "taylorseer1", "taylorseer2_newton", "foca", "foca_step_values",
        "taylorseer2_values_refresh5"])
def test_sequential_dit_prune_decisions_and_outputs_equal_the_reference(cfg):
    m, ref = _run(cfg, requests=2)
    for request in (-1, -2):  # identical requests prune alike
        (slot,) = _slots(m, request)
        assert slot["pruned_blocks"] == _pruned_per_step(ref)
        assert slot["cached_steps"] == [s for s, _, p in ref.decisions if p]
    per_step = _pruned_per_step(ref)
    from cdcompile.runtime import cached_states

    ((_, state),) = cached_states(m)  # a block's anchor keeps the channels its guard compares
    assert {t.shape for n, t in state.tensors_by_name.items() if n.startswith("anchor_b")} == \
        {(2, 2, 10, -(-32 // cfg.downsample))}
    if cfg.dynamic:  # summary states the rule it ran
        cap = "2 x 0.06" if cfg.cap is None else f"{cfg.cap:g}"
        assert f"dynamic threshold max(0.06, {cfg.relax:g} x mean of the call's first 5 positive block diffs) " \
               f"while below {cap}" in str(cdcompile.summary(m))
    prunable = DEPTH - cfg.Fn - cfg.Bn - len(cfg.non_prune)
    assert any(per_step) and any(p < prunable for p in per_step[cfg.warmup:]), \
        "the trajectory must exercise both branches"


def test_dynamic_threshold_relaxes_and_prunes_more_than_the_base_threshold():
    m = SequentialDiT(depth=DEPTH)
    refs = {}
    for dynamic in (False, True):
        refs[dynamic] = RefPrune(PruneConfig(threshold=0.06, warmup=1, dynamic=dynamic), DEPTH)
        with torch.no_grad():
            for s, (x, t) in enumerate(_trajectory()):
                run_sequential_dit(m, x, t, refs[dynamic], s)
    assert max(refs[True].thresholds) > 0.06 == max(refs[False].thresholds)
    assert sum(_pruned_per_step(refs[True])) > sum(_pruned_per_step(refs[False]))
    # the base threshold prunes whole steps here; the relaxed one prunes parts of steps too
    assert any(0 < p < DEPTH - 1 for p in _pruned_per_step(refs[True]))


def test_dynamic_threshold_is_the_relaxed_mean_of_the_first_five_positive_diffs_below_the_cap():
    base = 0.1
    anchor = torch.ones(1, 4, 2)

    def run(diffs):
        acc = torch.zeros(5)
        ctr = torch.tensor([1, 0, 0, 1])
        out = []
        for d in diffs:
            prune, _, acc = guard.prune_decide(anchor[0] * (1 + d), anchor, torch.tensor([0]), torch.tensor(False),
                                               torch.tensor(False), torch.tensor(True), ctr, acc, threshold=base,
                                               dynamic=True)
            out.append(bool(prune))
        return out, acc

    # 0.12: no earlier diff, threshold 0.1 -> compute; 0.14 < 1.25 * 0.12 = 0.15 -> prune;
    # 0.5 > 1.25 * 0.13 -> compute; now 1.25 * mean(0.12, 0.14, 0.5) = 0.317 >= 2 * 0.1: back to 0.1,
    # so 0.11 computes.
    assert run([0.12, 0.14, 0.5, 0.11])[0] == [False, True, False, False]
    # zeros are not samples (and prune); only the first five positive diffs are averaged
    pruned, acc = run([0.0, 0.12, 0.12, 0.12, 0.12, 0.12, 0.3, 0.149, 0.151])
    assert pruned == [True, False, True, True, True, True, False, True, False]
    assert acc[1] == 5 and abs(float(acc[0]) - 0.6) < 1e-5  # sum and count of the samples
    assert acc[2] == 6  # blocks pruned

    # dynamic_prune_threshold_relax_ratio and max_dynamic_prune_threshold replace the 1.25 and the cap:
    # 0.17 < 1.5 * 0.12 = 0.18 < cap 0.3 -> prune (by default 0.15 -> compute); 0.5: compute;
    # 1.5 * mean(0.12, 0.17, 0.5) = 0.395 >= 0.3 -> back to 0.1, so 0.11 computes
    def tuned(diffs, **kw):
        acc, ctr, out = torch.zeros(5), torch.tensor([1, 0, 0, 1]), []
        for d in diffs:
            prune, _, acc = guard.prune_decide(anchor[0] * (1 + d), anchor, torch.tensor([0]), torch.tensor(False),
                                               torch.tensor(False), torch.tensor(True), ctr, acc, threshold=base,
                                               dynamic=True, **kw)
            out.append(bool(prune))
        return out

    assert tuned([0.12, 0.17, 0.5, 0.11], relax=1.5, cap=0.3) == [False, True, False, False]
    assert tuned([0.12, 0.17]) == [False, False]
    assert tuned([0.12, 0.14], cap=0.151) == [False, True] and tuned([0.12, 0.14], cap=0.149) == [False, False]


def test_threshold_zero_prunes_nothing_and_equals_the_model():
    m = SequentialDiT(depth=DEPTH)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=PruneConfig(threshold=0.0, warmup=0).options())
    with torch.no_grad():
        for x, t in _trajectory():
            torch.testing.assert_close(c(x, t), m(x, t), rtol=1e-6, atol=1e-6)
    (slot,) = _slots(m)
    assert slot["pruned_blocks"] == [0] * STEPS and slot["prune_ratio"] == 0.0 and slot["cached_steps"] == []


def test_forced_prune_skips_every_prunable_block_and_never_a_non_prune_block():
    cfg = PruneConfig(Fn=1, Bn=1, threshold=1e9, warmup=2, non_prune=(2, 4))
    m, ref = _run(cfg)
    (slot,) = _slots(m)
    # prunable: 1 and 3 (0 is F, 5 is B, 2 and 4 are kept by the option)
    assert [p for _, _, p in ref.decisions] == [[], []] + [[1, 3]] * (STEPS - 2)
    assert slot["pruned_blocks"] == [0, 0] + [2] * (STEPS - 2)
    assert slot["prune_ratio"] == pytest.approx(2 * (STEPS - 2) / (DEPTH * STEPS))
    graph = cdcompile.summary(m).as_dict()["graphs"][0]
    assert graph["prunable_blocks"] == [1, 3] and graph["cache_type"] == "dbprune"
    assert "prune ratio 0.267" in str(cdcompile.summary(m))


def test_each_prunable_block_is_its_own_cond_in_the_graph():
    cfg = PruneConfig(Fn=1, Bn=1, threshold=0.1, non_prune=(2,))
    seen = {}

    def spy(gm, example_inputs):
        fn = cdcompile.cachedit(gm, example_inputs, options=cfg.options())
        seen["conds"] = sum(1 for n in fn.compiled.__self__.graph.nodes
                            if n.target is torch.ops.higher_order.cond)
        return fn

    m = SequentialDiT(depth=DEPTH)
    torch.compile(m, backend=spy, fullgraph=True)(*_trajectory()[0])
    assert seen["conds"] == 3  # blocks 1, 3, 4


@pytest.mark.parametrize("cfg", [
    PruneConfig(threshold=0.03, warmup=1),
    PruneConfig(threshold=0.03, warmup=2, calibrator="taylorseer", order=2, streams="hidden"),
    # block 3 computes on every step from the text stream blocks 1 and 2 forecast
    PruneConfig(threshold=0.03, warmup=2, non_prune=(3,), calibrator="foca", streams="encoder", values=True),
], ids=["plain", "taylorseer2_hidden", "foca_encoder_values"])
def test_tiny_flux_prunes_both_streams_across_both_groups_like_the_reference(cfg):
    m = tiny_flux()  # 2 double + 4 single blocks: one stack of 6; the single blocks slice their outputs
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=cfg.options())
    ref = RefPrune(cfg, 6)
    from test_block_cache import _flux_trajectory

    with torch.no_grad():
        for s, kw in enumerate(_flux_trajectory(m, 8)):
            torch.testing.assert_close(c(**kw)[0], run_flux(m, kw, ref, s), rtol=1e-4, atol=1e-4,
                                       msg=lambda msg: f"step {s}: {msg}")
    (slot,) = _slots(m)
    assert slot["pruned_blocks"] == _pruned_per_step(ref)
    pruned = {b for _, _, p in ref.decisions for b in p}
    assert pruned & {1} and pruned & {2, 3, 4, 5}, "prune blocks of both groups"
    assert 0 < slot["prune_ratio"] < (5 - len(cfg.non_prune)) / 6


def test_blocks_reading_a_carried_stream_prune_like_the_reference():
    cfg = PruneConfig(threshold=0.15, warmup=1)
    m = PairDiT(depth=DEPTH)  # the pairs: no block returns them; updated after blocks 0, 2, 4
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=cfg.options("aot_eager"))
    ref = RefPrune(cfg, DEPTH)
    with torch.no_grad():
        for s, (x, t) in enumerate(_trajectory()):
            torch.testing.assert_close(c(x, t), run_pair_dit(m, x, t, ref, s), rtol=1e-4, atol=1e-5,
                                       msg=lambda msg: f"step {s}: {msg}")
    (slot,) = _slots(m)
    assert slot["pruned_blocks"] == _pruned_per_step(ref)
    per_step = _pruned_per_step(ref)
    assert any(0 < k < DEPTH - 1 for k in per_step), "some step must prune some prunable blocks, not all"


def test_blocks_whose_outputs_are_long_skips_prune_like_the_reference():
    cfg = PruneConfig(threshold=0.15, warmup=1)
    m = SkipDiT(depth=7)  # a pruned block's output is also the skip a later block reads
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=cfg.options("aot_eager"))
    ref = RefPrune(cfg, 7)
    with torch.no_grad():
        for s, (x, t) in enumerate(_trajectory()):
            torch.testing.assert_close(c(x, t), run_skip_dit(m, x, t, ref, s), rtol=1e-4, atol=1e-5,
                                       msg=lambda msg: f"step {s}: {msg}")
    (slot,) = _slots(m)
    assert slot["pruned_blocks"] == _pruned_per_step(ref)
    pruned = {b for _, _, p in ref.decisions for b in p}
    assert pruned & {1, 2} and pruned & {4, 5, 6}, f"a skip writer and a skip reader must be pruned: {pruned}"


def test_a_graph_compiled_for_dynamic_token_counts_prunes_every_size_like_the_reference():
    from test_block_cache import _flux_request

    cfg = PruneConfig(threshold=0.03, warmup=1)
    m = tiny_flux()
    with cdcompile.backend.collect_reports() as reports:
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=cfg.options("aot_eager"))
        with torch.no_grad():
            for tokens in (16, 36, 64):  # the second size recompiles with a symbolic token count
                ref = RefPrune(cfg, 6)
                cdcompile.new_request(c)
                for s, kw in enumerate(_flux_request(m, 8, tokens, seed=tokens)):
                    torch.testing.assert_close(c(**kw)[0], run_flux(m, kw, ref, s), rtol=1e-4, atol=1e-4,
                                               msg=lambda msg: f"{tokens} tokens, step {s}: {msg}")
                (slot,) = _slots(m)
                assert slot["pruned_blocks"] == _pruned_per_step(ref) and sum(slot["pruned_blocks"]) > 0, tokens
    assert [r.cache is not None for r in reports] == [True, True], [r.not_cached for r in reports]


def test_cfg_slots_prune_separately():
    cfg = PruneConfig(threshold=0.1, warmup=2)
    m = SequentialDiT(depth=DEPTH)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=cfg.options())
    ref = RefPrune(cfg, DEPTH)
    offset = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for s, (x, t) in enumerate(_trajectory()):
            for slot, xi in enumerate((x, x * 0.5 + offset)):  # same timestep: CFG slots 0 and 1
                torch.testing.assert_close(c(xi, t), run_sequential_dit(m, xi, t, ref, s, slot),
                                           rtol=1e-4, atol=1e-5)
    slots = _slots(m)
    assert [s["pruned_blocks"] for s in slots] == [_pruned_per_step(ref, 0), _pruned_per_step(ref, 1)]
    assert slots[0]["pruned_blocks"] != slots[1]["pruned_blocks"]


def test_static_mask_zeros_prune_every_prunable_block():
    mask = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    m = SequentialDiT(depth=DEPTH)
    opts = {**PruneConfig(threshold=0.0, warmup=0).options(), "steps_computation_mask": mask,
            "steps_computation_policy": "static"}
    c = torch.compile(m, backend="cachedit", fullgraph=True, options=opts)
    with torch.no_grad():
        for x, t in _trajectory():
            c(x, t)
    (slot,) = _slots(m)
    assert slot["pruned_blocks"] == [0 if b else DEPTH - 1 for b in mask]


def test_zero_graph_breaks_and_recompiles_over_requests_with_prune_foca_taylorseer_and_masks():
    from torch._dynamo.utils import counters

    for opts in ({"cache_type": "dbprune", "residual_diff_threshold": 0.1},
                 {"calibrator": "foca", "residual_diff_threshold": 0.3},
                 {"taylorseer_order": 2, "residual_diff_threshold": 0.3},
                 {"steps_computation_mask": [1, 1] + [0, 1] * ((STEPS - 2) // 2), "steps_computation_policy": "static"},
                 {"steps_computation_mask": [1, 1] + [0, 1] * ((STEPS - 2) // 2), "residual_diff_threshold": 0.3}):
        torch._dynamo.reset()
        counters.clear()
        m = SequentialDiT(depth=DEPTH)
        c = torch.compile(m, backend="cachedit", options={"compiler": "eager", "max_warmup_steps": 1, **opts})
        with torch.no_grad():
            for _ in range(3):
                for x, t in _trajectory():
                    c(x, t)
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1
        assert sum(counters["recompiles"].values()) == 0
        reqs = cdcompile.summary(m).as_dict()["requests"]
        assert [r["steps"] for r in reqs] == [STEPS] * 3 and reqs[0]["slots"] == reqs[1]["slots"] == reqs[2]["slots"]
        assert reqs[0]["slots"][0]["cached_steps"], opts


def test_non_prune_block_ids_beyond_the_stack_is_a_value_error_naming_n():
    m = SequentialDiT(depth=4)
    c = torch.compile(m, backend="cachedit", options={"compiler": "eager", "cache_type": "dbprune",
                                                      "non_prune_block_ids": [1, 7]})
    with pytest.raises(Exception) as info:
        c(*_trajectory()[0])
    err = getattr(info.value, "inner_exception", info.value)
    assert isinstance(err, ValueError)
    assert "[7]" in str(err) and "N = 4" in str(err) and "0..3" in str(err)


@pytest.mark.parametrize("opts,match", [
    ({"cache_type": "prune"}, r"'cache_type'.*'prune'.*dbcache.*dbprune"),
    ({"cache_type": "dbprune", "non_prune_block_ids": [-1]}, r"'non_prune_block_ids'.*>= 0"),
    ({"cache_type": "dbprune", "non_prune_block_ids": ["2"]}, r"'non_prune_block_ids'"),
    ({"cache_type": "dbprune", "enable_dynamic_prune_threshold": 1}, r"'enable_dynamic_prune_threshold'.*bool"),
    ({"cache_type": "dbprune", "dynamic_prune_threshold_relax_ratio": 0}, r"'dynamic_prune_threshold_relax_ratio': 0;.*> 0"),
    ({"cache_type": "dbprune", "dynamic_prune_threshold_relax_ratio": "2"}, r"'dynamic_prune_threshold_relax_ratio'"),
    ({"cache_type": "dbprune", "residual_diff_threshold": 0.1, "max_dynamic_prune_threshold": 0.1},
     r"'max_dynamic_prune_threshold': 0.1;.*above residual_diff_threshold = 0.1"),
    ({"residual_diff_threshold": float("nan")}, r"'residual_diff_threshold': nan"),
    ({"cache_type": "dbprune", "max_accumulated_residual_diff_threshold": 0.5},
     r"'max_accumulated_residual_diff_threshold': 0.5;.*dbprune"),
    ({"cache_type": "dbprune", "cfg_diff_compute_separate": False}, r"'cfg_diff_compute_separate': False;.*dbprune"),
])
def test_bad_prune_options_are_value_errors_naming_the_key(opts, match):
    with pytest.raises(ValueError, match=match):
        cdcompile.CacheConfig.from_options(opts)


def test_prune_options_normalise_and_warn_when_ignored():
    cfg = cdcompile.CacheConfig.from_options({"cache_type": "DBPrune", "non_prune_block_ids": [5, 2, 2]})
    assert cfg.cache_type.value == "dbprune" and cfg.non_prune_block_ids == (2, 5)
    assert cdcompile.CacheConfig.from_options(cfg.as_dict()) == cfg
    with pytest.warns(UserWarning, match="non_prune_block_ids is ignored"):
        cdcompile.CacheConfig.from_options({"non_prune_block_ids": [2]})
    with pytest.warns(UserWarning, match='max_dynamic_prune_threshold is ignored with cache_type="dbcache"'):
        cdcompile.CacheConfig.from_options({"max_dynamic_prune_threshold": 0.2})
    with pytest.warns(UserWarning, match="dynamic_prune_threshold_relax_ratio is ignored without enable_dynamic"):
        cdcompile.CacheConfig.from_options({"cache_type": "dbprune", "dynamic_prune_threshold_relax_ratio": 2})
    cfg = cdcompile.CacheConfig.from_options({"cache_type": "dbprune", "enable_dynamic_prune_threshold": True,
                                              "dynamic_prune_threshold_relax_ratio": 2, "max_dynamic_prune_threshold": 1})
    assert (cfg.dynamic_prune_threshold_relax_ratio, cfg.max_dynamic_prune_threshold) == (2.0, 1.0)
    assert cdcompile.CacheConfig.from_options(cfg.as_dict()) == cfg
