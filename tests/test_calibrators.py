"""TaylorSeer calibrator: exact on polynomial residuals, equal to the eager reference."""

import pytest
import torch
import torch.nn as nn

import cdcompile
from cdcompile import calibrators
from cdcompile.testing import SequentialDiT
from dbcache_reference import RefCache, RefConfig, newton_forecast, run_sequential_dit


def _fit_and_forecast(points, order, at):
    """Feed computed (step, value) points through the in-graph update; forecast at ``at``."""
    shape = points[0][1].shape
    d = torch.zeros(order + 1, *shape, dtype=torch.float64)
    nodes = torch.zeros(3)
    for n, (s, y) in enumerate(points):
        step, computed = torch.tensor(s), torch.tensor(n)
        d = calibrators.differences(y, d, step, nodes, computed)
        nodes = torch.cat([step.float().reshape(1), nodes[:2]])
    coef = calibrators.coefficients(torch.tensor(at), nodes, torch.tensor(len(points)), order)
    return calibrators.forecast(d, coef.double())


@pytest.mark.parametrize("order,poly", [
    (1, lambda s: 0.5 - 0.25 * s),
    (2, lambda s: 0.5 - 0.25 * s + 0.125 * s * s),
])
@pytest.mark.parametrize("steps", [[0, 1, 2], [0, 3, 4, 9], [2, 5, 6]])
def test_order_n_is_exact_on_degree_n_trajectories_with_any_spacing(order, poly, steps):
    base = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    points = [(s, base * poly(s)) for s in steps]
    for at in (steps[-1] + 1, steps[-1] + 4):
        torch.testing.assert_close(_fit_and_forecast(points, order, at), base * poly(at), rtol=1e-12, atol=1e-12)


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


@pytest.mark.parametrize("degree", [1, 2])
def test_taylorseer_of_matching_order_makes_cached_steps_exact_in_the_graph(degree):
    torch.manual_seed(0)
    m = _PolyDiT(degree)
    x = torch.randn(1, 5, 4)
    errors = {}
    for order in (0, degree):
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True, options={
            "compiler": "aot_eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 3,
            "taylorseer_order": order})
        with torch.no_grad():
            errs = [(c(x, t) - m(x, t)).abs().max().item()
                    for t in (torch.tensor([1.0 - s / 10]) for s in range(10))]
        cached = cdcompile.summary(m).as_dict()["requests"][-1]["slots"][0]["cached_steps"]
        assert cached == list(range(3, 10))
        errors[order] = max(errs)
    assert errors[degree] < 1e-4 < errors[0]


@pytest.mark.parametrize("order", [1, 2])
def test_compiled_taylorseer_equals_the_reference(order):
    cfg = RefConfig(threshold=0.3, warmup=2, order=order)
    m = SequentialDiT(depth=5)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "eager", "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup,
        "taylorseer_order": order})
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
