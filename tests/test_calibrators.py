"""TaylorSeer calibrator: exact on polynomial residuals, equal to the eager reference."""

import pytest
import torch
import torch.nn as nn

import cdcompile
from cdcompile import calibrators
from cdcompile.testing import SequentialDiT
from dbcache_reference import RefCache, RefConfig, newton_forecast, run_sequential_dit, taylor_forecast


def _fit_and_forecast(points, order, at, form="taylor"):
    """Feed computed (step, value) points through the in-graph update; forecast at ``at``."""
    shape = points[0][1].shape
    d = torch.zeros(order + 1, *shape, dtype=torch.float64)
    nodes = torch.zeros(3)
    for n, (s, y) in enumerate(points):
        step, computed = torch.tensor(s), torch.tensor(n)
        d = calibrators.differences(y, d, step, nodes, computed, form)
        nodes = torch.cat([step.float().reshape(1), nodes[:2]])
    coef = calibrators.coefficients(torch.tensor(at), nodes, torch.tensor(len(points)), order, form)
    return calibrators.forecast(d, coef.double())


LINEAR = lambda s: 0.5 - 0.25 * s  # noqa: E731
QUADRATIC = lambda s: 0.5 - 0.25 * s + 0.125 * s * s  # noqa: E731


@pytest.mark.parametrize("form,order,poly", [
    ("taylor", 1, LINEAR), ("newton", 1, LINEAR), ("newton", 2, QUADRATIC),
])
@pytest.mark.parametrize("steps", [[0, 1, 2], [0, 3, 4, 9], [2, 5, 6]])
def test_order_n_is_exact_on_degree_n_trajectories_with_any_spacing(form, order, poly, steps):
    base = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    points = [(s, base * poly(s)) for s in steps]
    for at in (steps[-1] + 1, steps[-1] + 4):
        torch.testing.assert_close(_fit_and_forecast(points, order, at, form), base * poly(at),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [[0, 1, 2], [0, 3, 4, 9], [2, 5, 6, 8, 12]])
def test_taylor_form_equals_algorithms_md_on_random_residuals(order, steps):
    g = torch.Generator().manual_seed(len(steps))
    points = [(s, torch.randn(3, 4, generator=g, dtype=torch.float64)) for s in steps]
    for at in (steps[-1] + 1, steps[-1] + 3):
        torch.testing.assert_close(_fit_and_forecast(points, order, at), taylor_forecast(points, at, order),
                                   rtol=1e-12, atol=1e-12)


def test_taylor_form_order_2_on_a_quadratic_is_off_by_half_a_gap_of_the_second_difference():
    # y = s^2 at 0, 1, 2: d0 = 4, d1 = 3, d2 = 2, so Y(k) = 4 + 3k + k^2; the truth is 4 + 4k + k^2.
    base = torch.ones(2, dtype=torch.float64)
    points = [(s, base * s * s) for s in (0, 1, 2)]
    for k in (1, 2, 3):
        torch.testing.assert_close(_fit_and_forecast(points, 2, 2 + k), base * (4 + 3 * k + k * k))
        torch.testing.assert_close(_fit_and_forecast(points, 2, 2 + k, "newton"), base * (2 + k) ** 2)


def test_order_1_is_not_exact_on_a_quadratic_and_order_0_repeats_the_last_residual():
    base = torch.ones(2, 2, dtype=torch.float64)
    points = [(s, base * s * s) for s in (0, 1, 2)]
    assert not torch.allclose(_fit_and_forecast(points, 1, 4), base * 16)
    torch.testing.assert_close(_fit_and_forecast(points, 0, 4), base * 4)


def test_orders_without_history_are_dropped():
    y = torch.full((2,), 3.0, dtype=torch.float64)
    torch.testing.assert_close(_fit_and_forecast([(0, y)], 2, 5), y)  # one point: constant


class _PolyBlock(nn.Module):
    """Adds a_i * p(t) to the hidden state: the stack's middle residual is exactly p(t) * sum a_i."""

    def __init__(self, dim, degree):
        super().__init__()
        self.a = nn.Parameter(torch.randn(dim))
        self.degree = degree

    def forward(self, h, t):
        p = 1 + t + (t * t if self.degree == 2 else 0)
        return h + self.a * p.reshape(-1, 1, 1)


class _PolyDiT(nn.Module):
    def __init__(self, degree, depth=4):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(_PolyBlock(8, degree) for _ in range(depth))
        self.out = nn.Linear(8, 4)

    def forward(self, x, timestep):
        h = self.inp(x)
        t = timestep.float()
        _ = torch.sin(t)  # a sinusoidal use marks the timestep input, as in real DiTs
        for b in self.blocks:
            h = b(h, t)
        return self.out(h)


@pytest.mark.parametrize("degree,form", [(1, "taylor"), (2, "newton")])
def test_taylorseer_of_matching_order_makes_cached_steps_exact_in_the_graph(degree, form):
    torch.manual_seed(0)
    m = _PolyDiT(degree)
    x = torch.randn(1, 5, 4)
    errors = {}
    for order in (0, degree):
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True, options={
            "compiler": "aot_eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 3,
            "taylorseer_order": order, **({"taylorseer_form": form} if order else {})})
        with torch.no_grad():
            errs = [(c(x, t) - m(x, t)).abs().max().item()
                    for t in (torch.tensor([1.0 - s / 10]) for s in range(10))]
        cached = cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"]
        assert cached == list(range(3, 10))
        errors[order] = max(errs)
    assert errors[degree] < 1e-4 < errors[0]


@pytest.mark.parametrize("order,form", [(1, "taylor"), (2, "taylor"), (2, "newton")])
def test_compiled_taylorseer_equals_the_reference(order, form):
    cfg = RefConfig(threshold=0.3, warmup=2, order=order, form=form)
    m = SequentialDiT(depth=5)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "eager", "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup,
        "taylorseer_order": order, "taylorseer_form": form})
    ref = RefCache(cfg)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    with torch.no_grad():
        for s in range(12):
            xi, t = x + 0.02 * s * d, torch.full((2,), 1.0 - s / 12)
            torch.testing.assert_close(c(xi, t), run_sequential_dit(m, xi, t, ref, s), rtol=1e-4, atol=1e-4)
    cached = [s for s, _, hit in ref.decisions if hit]
    assert cached and cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"] == cached


def test_reference_newton_forecast_is_exact_on_a_cubic_with_order_3():
    pts = [(s, torch.tensor([float(s) ** 3])) for s in (0, 2, 3, 7)]
    torch.testing.assert_close(newton_forecast(pts, 9, 3), torch.tensor([729.0]))


# --- FoCa -------------------------------------------------------------------------------------

def _foca_in_graph_functions(pattern, values, slope="gap"):
    """Run the in-graph FoCa functions over a computed(0)/cached(1) pattern; returns what each
    step used. ``values[s]`` is the residual a computed step s produces."""
    d = torch.zeros(calibrators.FOCA_HISTORY, *values[0].shape, dtype=torch.float64)
    nodes, computed, used = torch.zeros(3), 0, []
    for s, cached in enumerate(pattern):
        step, cache = torch.tensor(s), torch.tensor(bool(cached))
        coef = calibrators.foca_coefficients(step, nodes, torch.tensor(computed), slope)
        y = calibrators.forecast(d, coef.double()) if cached else values[s]
        d = calibrators.foca_update(cache, y, d, torch.tensor(False))
        if not cached:
            nodes, computed = torch.cat([step.float().reshape(1), nodes[:2]]), computed + 1
        used.append(y)
    return used


@pytest.mark.parametrize("slope", ["gap", "step"])
def test_foca_state_functions_equal_the_reference_formula_over_a_step_pattern(slope):
    from dbcache_reference import foca_forecast

    g = torch.Generator().manual_seed(0)
    pattern = [0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1]  # gaps 2, 3, 1; runs of 1..5 cached
    values = [torch.randn(3, 4, generator=g, dtype=torch.float64) * (1 + 0.1 * s) for s in range(len(pattern))]
    got = _foca_in_graph_functions(pattern, values, slope)
    full, window = [], []
    for s, cached in enumerate(pattern):
        want = foca_forecast(full, window, s, slope) if cached else values[s]
        if not cached:
            full.append((s, values[s]))
        window.append(want)
        # the graph computes the forecast's weights in float32
        torch.testing.assert_close(got[s], want, rtol=1e-6, atol=1e-6, msg=lambda m: f"step {s}: {m}")


def test_foca_per_step_slope_is_exact_on_linear_residuals_within_three_steps_and_damps_beyond():
    base = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    line = [base * (0.5 + 0.25 * s) for s in range(12)]
    # computed at 0, 2, 3, 7: after 3 the last two computed steps are 1 apart, after 7 they are 4
    # apart; with foca_slope="step" cached steps up to 3 after a computed one are exact
    pattern = [0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1]
    got = _foca_in_graph_functions(pattern, line, "step")
    for s in (4, 5, 6, 8, 9, 10):
        torch.testing.assert_close(got[s], line[s], rtol=1e-6, atol=1e-6, msg=lambda m: f"step {s}: {m}")
    torch.testing.assert_close(got[1], line[0])  # one computed step so far: reuse it
    # e = 4: the trapezoid at e = 3 blended toward F_full with weight 3/4 (damped, no longer exact)
    slope = base * 0.25
    torch.testing.assert_close(got[11], line[7] + 0.75 * 3 * slope, rtol=1e-6, atol=1e-6)
    # "gap" (algorithms.md, cache-dit): exact after the gap of 1, and at step 8 DF spans the gap of
    # 4 steps, (4 - 1) * 1/2 = 1.5 increments too far
    gap = _foca_in_graph_functions(pattern, line)
    for s in (4, 5, 6):
        torch.testing.assert_close(gap[s], line[s], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gap[8], line[8] + 1.5 * slope, rtol=1e-6, atol=1e-6)


def test_foca_before_two_computed_steps_reuses_the_last_residual():
    y = torch.full((2,), 3.0, dtype=torch.float64)
    used = _foca_in_graph_functions([0, 1, 1], [y, y * 5, y * 7])
    torch.testing.assert_close(used[1], y)
    torch.testing.assert_close(used[2], y)


@pytest.mark.parametrize("slope", ["gap", "step"])
def test_compiled_foca_equals_the_reference_and_differs_from_plain_reuse(slope):
    cfg = RefConfig(threshold=0.5, warmup=2, max_continuous=5, calibrator="foca", foca_slope=slope)
    m = SequentialDiT(depth=5)
    opts = {"compiler": "eager", "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup,
            "max_continuous_cached_steps": cfg.max_continuous}
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={**opts, "calibrator": "foca",
                                                                      "foca_slope": slope})
    ref = RefCache(cfg)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    traj = [(x + 0.02 * s * d, torch.full((2,), 1.0 - s / 16)) for s in range(16)]
    with torch.no_grad():
        got = [c(xi, t) for xi, t in traj]
        want = [run_sequential_dit(m, xi, t, ref, s) for s, (xi, t) in enumerate(traj)]
    for s, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda msg: f"step {s}: {msg}")
    cached = [s for s, _, hit in ref.decisions if hit]
    assert cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"] == cached
    runs = "".join("1" if s in cached else "0" for s in range(16)).split("0")
    assert max(map(len, runs)) == 5, "a run of 5 cached steps exercises the damped branch (e > 3)"

    torch._dynamo.reset()
    plain = torch.compile(m, backend="cachedit", fullgraph=True, options=opts)
    with torch.no_grad():
        reuse = [plain(xi, t) for xi, t in traj]
    assert max((a - b).abs().max().item() for a, b in zip(got, reuse)) > 1e-3


@pytest.mark.parametrize("calibrator", ["taylorseer", "foca"])
def test_a_refresh_starts_the_calibrators_history_again_like_the_reference(calibrator):
    # steps 0 and 3 compute, then the refresh at 6: step 7 has one computed step (6) to go on, so
    # it reuses step 6's residual, where steps 3 and 6 together would extrapolate
    cfg = RefConfig(threshold=1e9, warmup=1, max_continuous=2, calibrator=calibrator, refresh=6,
                    order=2 if calibrator == "taylorseer" else 0)
    m = SequentialDiT(depth=5)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "eager", "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup,
        "max_continuous_cached_steps": cfg.max_continuous, "calibrator": calibrator,
        "force_refresh_step_hint": cfg.refresh, **({"taylorseer_order": 2} if cfg.order else {})})
    ref = RefCache(cfg)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    with torch.no_grad():
        for s in range(10):
            xi, t = x + 0.02 * s * d * (1 + s), torch.full((2,), 1.0 - s / 10)
            torch.testing.assert_close(c(xi, t), run_sequential_dit(m, xi, t, ref, s), rtol=1e-4, atol=1e-4,
                                       msg=lambda msg: f"step {s}: {msg}")
    cached = [s for s, _, hit in ref.decisions if hit]
    assert cached == [1, 2, 4, 5, 7, 8]
    assert cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"] == cached


@pytest.mark.parametrize("calibrator,order,streams,values", [
    ("foca", 0, "all", False),
    ("taylorseer", 2, "hidden", False),  # the text stream reuses its last residual
    ("foca", 0, "encoder", True),  # the hidden stream reuses its residual; FoCa forecasts the text stream's output
    ("taylorseer", 1, "all", True),  # M's outputs, both streams
], ids=["foca", "taylorseer2_hidden", "foca_encoder_values", "taylorseer1_values"])
def test_tiny_flux_calibrators_forecast_the_streams_like_the_reference(calibrator, order, streams, values):
    from cdcompile.runtime import cached_states
    from cdcompile.testing import tiny_flux
    from dbcache_reference import run_flux
    from test_block_cache import _flux_trajectory

    cfg = RefConfig(Fn=2, Bn=1, threshold=0.4, warmup=2, max_continuous=3, calibrator=calibrator, order=order,
                    streams=streams, values=values)
    m = tiny_flux()
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "aot_eager", "Fn_compute_blocks": 2, "Bn_compute_blocks": 1, "calibrator": calibrator,
        "taylorseer_order": order or None, "calibrated_streams": streams,
        "calibrator_cache_type": "hidden_states" if values else "residual",
        "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup,
        "max_continuous_cached_steps": cfg.max_continuous})
    ref = RefCache(cfg)
    with torch.no_grad(), cdcompile.backend.collect_reports() as reports:
        for s, kw in enumerate(_flux_trajectory(m, 10)):
            torch.testing.assert_close(c(**kw)[0], run_flux(m, kw, ref, s), rtol=1e-4, atol=1e-4,
                                       msg=lambda msg: f"step {s}: {msg}")
    cached = [s for s, _, hit in ref.decisions if hit]
    assert len(cached) >= 4 and "encoder" in ref.slots[0].residuals
    assert cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"] == cached
    # a stream left out keeps one residual, not the calibrator's history
    ((_, state),) = cached_states(m)
    history = 4 if calibrator == "foca" else order + 1
    kept = {k: state.tensors_by_name[f"residual_{k}"].shape[1] for k in range(2)}
    (report,) = [r.cache for r in reports if r.cache]
    labels = report["streams"]
    assert sorted(labels) == ["encoder", "hidden"] and report["calibrated"] == [
        label for label in labels if cfg.calibrates(label)]
    assert kept == {k: history if cfg.calibrates(label) else 1 for k, label in enumerate(labels)}


@pytest.mark.parametrize("opts,calibrator,order", [
    ({}, None, 0),
    ({"taylorseer_order": 2}, "taylorseer", 2),  # the order alone turns TaylorSeer on, as before
    ({"calibrator": "taylorseer"}, "taylorseer", 1),
    ({"calibrator": "TaylorSeer", "taylorseer_order": 2}, "taylorseer", 2),
    ({"calibrator": "foca"}, "foca", 0),
    ({"calibrator": "foca", "taylorseer_order": 0}, "foca", 0),
    ({"taylorseer_order": 2, "taylorseer_form": "Newton"}, "taylorseer", 2),
    ({"calibrator": "DMD", "dmd_rank": 2}, "dmd", 0),
])
def test_calibrator_and_taylorseer_order_normalise_to_one_meaning(opts, calibrator, order):
    cfg = cdcompile.CacheConfig.from_options(opts)
    assert (cfg.calibrator.value if cfg.calibrator else None, cfg.taylorseer_order) == (calibrator, order)
    assert cdcompile.CacheConfig.from_options(cfg.as_dict()) == cfg  # enable() round-trips as_dict


@pytest.mark.parametrize("opts,match", [
    ({"calibrator": "dmdc"}, r"'calibrator'.*'dmdc'.*taylorseer.*foca.*dmd"),
    ({"calibrator": "dmd", "taylorseer_order": 1}, r"'taylorseer_order'.*dmd_fallback_order"),
    ({"dmd_history": 5}, r"'dmd_history'.*unless calibrator=\"dmd\""),
    ({"calibrator": "dmd", "dmd_history": 0}, r"'dmd_history'.*>= 1"),
    ({"calibrator": "dmd", "dmd_rank": -1}, r"'dmd_rank'.*>= 0"),
    ({"calibrator": "dmd", "dmd_ridge": -1e-8}, r"'dmd_ridge'.*finite float >= 0"),
    ({"calibrator": "dmd", "dmd_fallback_order": 3}, r"'dmd_fallback_order'.*0, 1 or 2"),
    ({"calibrator": "dmd", "dmd_fallback": "taylor"}, r"'dmd_fallback'.*'taylor'.*\"cache-dit\" or \"taylorseer\""),
    ({"dmd_fallback": "taylorseer"}, r"'dmd_fallback'.*unless calibrator=\"dmd\""),
    ({"calibrator": "foca", "taylorseer_order": 1}, r"'taylorseer_order'.*FoCa has no order"),
    ({"calibrator": "taylorseer", "taylorseer_order": 0}, r"'taylorseer_order'.*1 or 2"),
    ({"taylorseer_order": 3}, r"'taylorseer_order'.*0 \(off\), 1 or 2"),
    ({"taylorseer_order": 2, "taylorseer_form": "lagrange"}, r"'taylorseer_form'.*'lagrange'.*taylor.*newton"),
    ({"taylorseer_form": "newton"}, r"'taylorseer_form'.*'newton'.*unless TaylorSeer is on"),
    ({"calibrator": "foca", "taylorseer_form": "newton"}, r"'taylorseer_form'.*unless TaylorSeer is on"),
    ({"calibrator": "foca", "foca_slope": "per_step"}, r"'foca_slope'.*'per_step'.*\"gap\".*\"step\""),
    ({"calibrator": "taylorseer", "foca_slope": "step"}, r"'foca_slope'.*'step'.*unless calibrator=\"foca\""),
    ({"calibrator": "foca", "calibrated_streams": "text"}, r"'calibrated_streams'.*'text'.*\"all\" or \"hidden\" or "),
    ({"calibrated_streams": "hidden"}, r"'calibrated_streams'.*'hidden'.*the default \"all\" unless a calibrator is on"),
    ({"calibrator": "foca", "calibrator_cache_type": "hidden"},
     r"'calibrator_cache_type'.*'hidden'.*\"residual\" or \"hidden_states\""),
    ({"calibrator_cache_type": "hidden_states"}, r"'calibrator_cache_type'.*unless a calibrator is on"),
])
def test_bad_calibrator_options_are_value_errors_naming_the_key(opts, match):
    with pytest.raises(ValueError, match=match):
        cdcompile.CacheConfig.from_options(opts)


@pytest.mark.parametrize("cache_type", ["dbcache", "dbprune"])
def test_calibrated_streams_that_select_no_stream_are_warned_of(cache_type):
    m = SequentialDiT(depth=4)  # one stream, "hidden"
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "eager", "cache_type": cache_type, "calibrator": "foca", "calibrated_streams": "encoder"})
    x, t = torch.randn(2, 10, 8), torch.full((2,), 1.0)
    with pytest.warns(UserWarning, match=r"calibrated_streams='encoder' selects none of the streams .*"
                                         r"the foca calibrator forecasts nothing"), torch.no_grad():
        c(x, t)
    from cdcompile.runtime import cached_states

    ((_, state),) = cached_states(m)  # and keeps no calibrator history
    assert {t.shape[1] for n, t in state.tensors_by_name.items() if n.startswith("residual")} == {1}
    assert not any(n.startswith("cal_b") for n in state.tensors_by_name)


# -- DMD (cdcompile.calibrators) ---------------------------------------------------------------------

class _ExpBlock(nn.Module):
    """Adds a_i e^(2t) + b_i e^(-3t): with t falling linearly, the stack's middle residual is a sum
    of two exponentials in the step along two directions, which DMD forecasts exactly."""

    def __init__(self, dim):
        super().__init__()
        self.a = nn.Parameter(torch.randn(dim))
        self.b = nn.Parameter(torch.randn(dim))

    def forward(self, h, t):
        t = t.reshape(-1, 1, 1)
        return h + self.a * torch.exp(2 * t) + self.b * torch.exp(-3 * t)


class _ExpDiT(_PolyDiT):
    def __init__(self, depth=4):
        super().__init__(1, depth)
        self.blocks = nn.ModuleList(_ExpBlock(8) for _ in range(depth))


# warmup 5: DMD from step 5 on, k = 1, 2, ...; warmup 8 computing every second step: steps 0, 2,
# 4, 6 are 2 apart, so from step 7 on k = 1/2, 1, 3/2, ... (before 7 the Taylor fallback)
@pytest.mark.parametrize("compiler,opts,cached,exact_from", [
    ("aot_eager", {"max_warmup_steps": 5}, list(range(5, 12)), 5),
    ("eager", {"max_warmup_steps": 8, "warmup_interval": 2}, [1, 3, 5, 7, 8, 9, 10, 11], 7),
])
def test_dmd_forecasts_a_sum_of_exponentials_exactly_in_the_graph_at_whole_and_fractional_horizons(
        compiler, opts, cached, exact_from):
    torch.manual_seed(0)
    m = _ExpDiT()
    x = torch.randn(1, 5, 4)
    errors = {}
    for calibrator in ("dmd", "taylorseer"):
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True, options={
            "compiler": compiler, "residual_diff_threshold": 1e9, "calibrator": calibrator, **opts})
        with torch.no_grad():
            errs = [(c(x, t) - m(x, t)).abs().max().item() for t in (torch.tensor([1.0 - s / 12]) for s in range(12))]
        assert cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"] == cached
        errors[calibrator] = max(errs[exact_from:])
    assert errors["dmd"] < 1e-4 and errors["taylorseer"] > 0.1, errors


def _dmd_run(schedule, trajectory, **spec):
    """cache-dit's DMDState and calibrators.dmd_weights_reference over one schedule (1: computed):
    the largest forecast difference relative to the forecast's size."""
    from cache_dit.caching.cache_contexts.calibrators.dmd import DMDState

    history, rank, ridge, order = (spec.get(k, d) for k, d in (("history", 6), ("rank", 0), ("ridge", 1e-8),
                                                                   ("order", 1)))
    state = DMDState(history=history, rank=rank, ridge=ridge, n_derivatives=order)
    hs = calibrators.dmd_snapshots(history, order)
    snaps, nodes, worst = [], [], 0.0
    for step, computed in enumerate(schedule):
        state.mark_step_begin()
        y = trajectory(step)
        if computed:
            state.update(y)
            snaps, nodes = ([y] + snaps)[:hs], ([step] + nodes)[:hs]
            continue
        want = state.approximate()
        res = torch.stack(snaps + [torch.zeros_like(y)] * (hs - len(snaps)))
        flat = res.reshape(hs, res.shape[1], -1).double()
        timing = calibrators.dmd_timing(torch.tensor(step), torch.tensor(nodes + [0] * (hs - len(nodes)),
                                                                          dtype=torch.float32),
                                        torch.tensor(sum(schedule[:step])))
        w = calibrators.dmd_weights_reference(torch.einsum("ibd,jbd->bij", flat, flat), timing, history, rank,
                                              ridge, order)
        got = torch.einsum("bi,ib...->b...", w, res.double()).float()
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    return worst


def _modes(step):
    """Two batch items, each a sum of damped, growing and rotating modes plus noise."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 10, 8, generator=g, dtype=torch.float64)
    vals = torch.tensor([0.9, 0.7, 1.02], dtype=torch.float64) ** step * torch.cos(torch.tensor([0.0, 0.3, 0.0]) * step)
    noise = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(step))
    return (base * vals.view(1, 3, 1, 1)).sum(1).float() + 1e-3 * noise


DYNAMIC = [1] * 8 + [0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0]  # the tail breaks: fallback, then DMD again


@pytest.mark.parametrize("schedule,spec", [
    (DYNAMIC, {}),
    ([1] * 3 + [1, 0] * 8, {}),  # every second step: k = 1/2
    ([1] * 2 + [1, 0, 0] * 6, {}),  # every third: k = 1/3, 2/3
    (DYNAMIC, {"order": 2}),
    (DYNAMIC, {"rank": 2, "ridge": 1e-3}),
    (DYNAMIC, {"history": 4}),
    (DYNAMIC, {"history": 3}),  # never 4 snapshots: the Taylor fallback throughout
    ([1, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0], {"order": 2}),
], ids=["dynamic", "every2", "every3", "order2", "rank2_ridge", "history4", "history3", "early"])
def test_dmd_weights_give_cache_dits_dmd_forecast(schedule, spec):
    pytest.importorskip("cache_dit")
    assert _dmd_run(schedule, _modes, **spec) < 1e-6


def test_dmd_taylor_fallback_differences_two_computed_steps_back_as_cache_dit_does():
    # computed steps 5, 4, 3 (most recent first), forecast at 7 (e = 2): d1 = (Y5 - Y3) / (5 - 4)
    def fallback(*args):
        return torch.from_numpy(calibrators._taylor_fallback(*args))

    torch.testing.assert_close(fallback([5, 4, 3], 7, 1, 4), torch.tensor([3.0, 0.0, -2.0, 0.0], dtype=torch.float64))
    # no d1 without a step two back
    torch.testing.assert_close(fallback([5, 4], 7, 1, 4), torch.tensor([1.0, 0, 0, 0]).double())
    # TaylorSeer's: the previous step, d1 = (Y5 - Y4) / (5 - 4)
    torch.testing.assert_close(fallback([5, 4, 3], 7, 1, 4, "taylorseer"), torch.tensor([3.0, -2.0, 0, 0]).double())


def test_a_degenerate_dmd_fit_reuses_the_newest_snapshot():
    # a zero trajectory (no singular value above 0) and a non-finite Gram matrix both reuse snapshot 0
    timing = calibrators.dmd_timing(torch.tensor(6), torch.arange(5, -1, -1, dtype=torch.float32), torch.tensor(6))
    for gram in (torch.zeros(2, 6, 6, dtype=torch.float64), torch.full((2, 6, 6), float("nan"), dtype=torch.float64)):
        w = calibrators.dmd_weights_reference(gram, timing, 6, 0, 1e-8, 1)
        torch.testing.assert_close(w, torch.eye(6, dtype=torch.float64)[:1].expand(2, 6))


@pytest.mark.parametrize("dmd,warmup,max_continuous", [
    ((6, 0, 1e-8, 1, "cache-dit"), 5, 4),  # the fit from step 5; after a run of 4 the fallback, then the fit again
    # a rank-2 fit with ridge over the newest 4 of 6 snapshots; fallback order 2
    ((4, 2, 0.1, 2, "cache-dit"), 6, 2),
    ((5, 0, 1e-8, 2, "taylorseer"), 5, 3),  # TaylorSeer's fallback
], ids=["defaults", "rank2_order2", "taylorseer_fallback"])
def test_compiled_dmd_equals_the_reference(dmd, warmup, max_continuous):
    # tests/dbcache_reference.py computes DMD the direct way (an SVD of the snapshot matrix, least
    # squares on the modes), not through the Gram matrix as the graph does
    cfg = RefConfig(threshold=0.5, warmup=warmup, max_continuous=max_continuous, calibrator="dmd", dmd=dmd)
    m = SequentialDiT(depth=5)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "aot_eager", "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup,
        "max_continuous_cached_steps": max_continuous, **cfg.calibrator_options()})
    ref = RefCache(cfg)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    with torch.no_grad():
        for s in range(16):
            xi, t = x + 0.02 * s * d * (1 + 0.1 * s), torch.full((2,), 1.0 - s / 16)
            torch.testing.assert_close(c(xi, t), run_sequential_dit(m, xi, t, ref, s), rtol=1e-4, atol=1e-4,
                                       msg=lambda msg: f"step {s}: {msg}")
    cached = [s for s, _, hit in ref.decisions if hit]
    assert len(cached) >= 6 and cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"] == cached


@pytest.mark.parametrize("order", [1, 2])
def test_dmd_with_taylorseers_fallback_and_no_fit_forecasts_as_taylorseer_does(order):
    # dmd_history=3 never holds the 4 snapshots a fit needs: every cached step takes the fallback,
    # which with dmd_fallback="taylorseer" is the TaylorSeer calibrator of the same order
    cfg = RefConfig(threshold=0.5, warmup=3, max_continuous=3)
    m = SequentialDiT(depth=5)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 10, 8, generator=g), torch.randn(2, 10, 8, generator=g)
    traj = [(x + 0.02 * s * d * (1 + 0.1 * s), torch.full((2,), 1.0 - s / 14)) for s in range(14)]
    outs = {}
    for name, opts in (("dmd", {"calibrator": "dmd", "dmd_history": 3, "dmd_fallback_order": order,
                                "dmd_fallback": "taylorseer"}),
                       ("taylorseer", {"calibrator": "taylorseer", "taylorseer_order": order}),
                       ("cache-dit", {"calibrator": "dmd", "dmd_history": 3, "dmd_fallback_order": order})):
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True, options={
            "compiler": "eager", "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup,
            "max_continuous_cached_steps": cfg.max_continuous, **opts})
        with torch.no_grad():
            outs[name] = torch.stack([c(xi, t) for xi, t in traj])
        assert len(cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"]) >= 6
    torch.testing.assert_close(outs["dmd"], outs["taylorseer"], rtol=1e-5, atol=1e-5)
    assert (outs["cache-dit"] - outs["taylorseer"]).abs().max() > 1e-3
