"""The backend object: registration, options validation, graph copying, inner compilers."""

import subprocess
import sys

import pytest
import torch

import cdcompile
from cdcompile import CacheConfig
from cdcompile.testing import SequentialDiT


def test_backend_registered_by_entry_point_without_import():
    code = ("import torch\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())\n"
            "c = torch.compile(m, backend='cachedit', options={'compiler': 'eager'})\n"
            "x = torch.randn(2, 4)\n"
            "assert torch.equal(c(x), m(x))\n"
            "import sys; assert 'cdcompile' in sys.modules, 'backend was not loaded'\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def _compile_error(options):
    m = torch.nn.Linear(2, 2)
    with pytest.raises(Exception) as info:
        torch.compile(m, backend="cachedit", options=options)(torch.randn(2))
    err = info.value
    inner = getattr(err, "inner_exception", err)
    return inner


def test_unknown_option_names_key_and_lists_valid_ones():
    err = _compile_error({"Fn": 1})
    assert isinstance(err, ValueError)
    assert "'Fn'" in str(err) and "Fn_compute_blocks" in str(err) and "residual_diff_threshold" in str(err)


@pytest.mark.parametrize("key,hint", [
    ("residual_diff_treshold", "; did you mean 'residual_diff_threshold'?"),
    ("fn_compute_blocks", "; did you mean 'Fn_compute_blocks'?"),
    ("max_warmup_step", "; did you mean 'max_warmup_steps'?"),
    ("ulysses", ". Valid options"),  # nothing close enough: no guess (ulysses_fp8 would mislead)
    ("enable_separate_cfg", " (a cache-dit option: not needed: calls that share a timestep are told apart as CFG slots"),
    ("enable_taylorseer", ' (a cache-dit option: use calibrator="taylorseer"'),
    ("cfg_compute_first", " (a cache-dit option: not needed"),
])
def test_unknown_option_suggests_the_close_name_or_the_cache_dit_counterpart(key, hint):
    with pytest.raises(ValueError) as info:
        CacheConfig.from_options({key: 1})
    assert f"cachedit: unknown option {key!r}{hint}" in str(info.value)


@pytest.mark.parametrize("key,value,rule", [
    ("compiler", "tensorrt", "inductor"),
    ("Fn_compute_blocks", 0, ">= 1"),
    ("Bn_compute_blocks", -1, ">= 0"),
    ("warmup_interval", 0, ">= 1"),
    ("max_cached_steps", -2, "-1"),
    ("residual_diff_threshold", "high", "expected an int or float"),
    ("Fn_compute_blocks", True, "not a bool"),
    ("disable_passes", ["no_such_pass"], "discover_blocks"),
    ("size_asserts", "off", "expected a bool"),
    ("max_accumulated_residual_diff_threshold", 0, "None (off) or a number > 0"),
    ("downsample_factor", 0, "an int >= 1"),
    ("important_condition_threshold", -0.1, "a finite number >= 0"),
    ("max_accumulated_residual_diff_threshold", "0.5", "expected an int or float"),
    ("mode", "fastest", "max-autotune-no-cudagraphs"),
    ("force_refresh_step_hint", 0, "None (off) or an int >= 1"),
    ("force_refresh_step_hint", True, "not a bool"),
    ("force_refresh_step_policy", "always", '"once" or "repeat"'),
    ("force_refresh_step_policy", "repeat", '"repeat" only with force_refresh_step_hint'),
    ("cfg_diff_compute_separate", "no", "expected a bool"),
])
def test_bad_option_value_is_a_value_error_naming_key_and_value(key, value, rule):
    with pytest.raises(ValueError) as info:
        CacheConfig.from_options({key: value})
    msg = str(info.value)
    assert repr(key) in msg and rule in msg
    assert repr(value if not isinstance(value, list) else value[0]) in msg


def test_options_must_be_a_dict():
    with pytest.raises(TypeError, match="must be a dict"):
        CacheConfig.from_options([("compiler", "eager")])


def test_backend_never_mutates_dynamos_graph():
    seen = {}

    def spy(gm, example_inputs):
        before = [(n.op, n.name) for n in gm.graph.nodes]
        fn = cdcompile.cachedit(gm, example_inputs, options={"compiler": "eager", "residual_diff_threshold": 0.5})
        seen["same"] = before == [(n.op, n.name) for n in gm.graph.nodes]
        return fn

    m = SequentialDiT(depth=3)
    x, t = torch.randn(1, 10, 8), torch.tensor([0.5])
    torch.compile(m, backend=spy, fullgraph=True)(x, t)
    assert seen["same"] is True


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_output_equals_eager_with_caching_off(compiler):
    m = SequentialDiT(depth=4)
    x, t = torch.randn(2, 10, 8), torch.tensor([0.3, 0.3])
    c = torch.compile(m, backend="cachedit", fullgraph=True,
                      options={"compiler": compiler, "enable_cache": False})
    with torch.no_grad():
        torch.testing.assert_close(c(x, t), m(x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_output_equals_eager_with_caching_off_and_mode_passes_through():
    m = SequentialDiT(depth=2)
    x, t = torch.randn(1, 10, 8), torch.tensor([0.3])
    # torch.compile takes mode or options, not both; one call computes every block anyway.
    c = torch.compile(m, backend="cachedit", fullgraph=True, mode="max-autotune-no-cudagraphs")
    with torch.no_grad():
        torch.testing.assert_close(c(x, t), m(x, t), rtol=1e-4, atol=1e-4)


def test_the_mode_option_reaches_inductor_beside_the_cache_options(monkeypatch):
    # torch.compile refuses mode= together with options=; the option is how a cached model gets one
    seen = []

    def fake_inner(gm, example_inputs, compiler, mode, size_asserts=None):
        seen.append((compiler, mode))
        return gm.forward

    monkeypatch.setattr(cdcompile.backend, "compile_inner", fake_inner)
    m = SequentialDiT(depth=3)
    x, t = torch.randn(1, 10, 8), torch.tensor([0.3])
    c = torch.compile(m, backend="cachedit",
                      options={"mode": "max-autotune-no-cudagraphs", "residual_diff_threshold": 0.1})
    with torch.no_grad():
        torch.testing.assert_close(c(x, t), m(x, t))
    assert seen == [(cdcompile.config.Compiler.INDUCTOR, "max-autotune-no-cudagraphs")]


def test_a_mode_with_cuda_graphs_on_a_gpu_graph_with_the_cache_says_it_runs_without_them():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cdcompile.backend import cudagraphs_lost
    from cdcompile.config import Compiler

    with FakeTensorMode():
        gpu, cpu = [torch.empty(2, device="cuda")], [torch.empty(2)]
    why = cudagraphs_lost(Compiler.INDUCTOR, "reduce-overhead", gpu)
    assert why and "mode='reduce-overhead'" in why and "torch.cond" in why and "max-autotune-no-cudagraphs" in why
    assert cudagraphs_lost(Compiler.INDUCTOR, "max-autotune", gpu)
    assert cudagraphs_lost(Compiler.INDUCTOR, "max-autotune-no-cudagraphs", gpu) is None
    assert cudagraphs_lost(Compiler.INDUCTOR, None, gpu) is None
    assert cudagraphs_lost(Compiler.INDUCTOR, "reduce-overhead", cpu) is None  # no CUDA graphs on a CPU
    assert cudagraphs_lost(Compiler.AOT_EAGER, "reduce-overhead", gpu) is None
    with torch._inductor.config.patch({"triton.cudagraphs": True}):
        assert "triton.cudagraphs=True" in cudagraphs_lost(Compiler.INDUCTOR, None, gpu)


def test_export_takes_the_mode_s_inductor_settings_less_cuda_graphs():
    from cdcompile.backend import inductor_patches
    from cdcompile.export import _inductor_configs

    assert _inductor_configs(None).keys() == inductor_patches().keys()
    tuned = _inductor_configs("max-autotune-no-cudagraphs")
    assert tuned["max_autotune"] and tuned["coordinate_descent_tuning"]
    with pytest.warns(UserWarning, match="does not capture"):
        graphed = _inductor_configs("max-autotune")
    assert graphed["max_autotune"] and "triton.cudagraphs" not in graphed


@pytest.mark.slow
def test_size_asserts_false_drops_inductors_input_asserts_and_keeps_the_output():
    from torch._inductor.utils import run_and_get_code

    m = SequentialDiT(depth=3)
    x, t = torch.randn(1, 10, 8), torch.tensor([0.3])
    codes = {}
    for flag in (None, False):
        torch._dynamo.reset()
        opts = {"residual_diff_threshold": 0.5} | ({} if flag is None else {"size_asserts": flag})
        c = torch.compile(m, backend="cachedit", fullgraph=True, options=opts)
        with torch.no_grad():
            out, code = run_and_get_code(c, x, t)
        torch.testing.assert_close(out, m(x, t), rtol=1e-4, atol=1e-4)
        codes[flag] = "\n".join(code)
    # the cond's operands (every weight of the middle blocks) are asserted by default, not with False
    assert codes[None].count("assert_size_stride(") > 20 and "assert_size_stride(" not in codes[False]


def test_a_users_post_grad_passes_run_before_the_cond_operand_layout_pass():
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from cdcompile.backend import CondOperandLayouts, PostGradPasses, inductor_patches

    ran = []

    class Mine(CustomGraphPass):
        def __call__(self, graph):
            ran.append("mine")

        def uuid(self):
            return "mine"

    mine = Mine()
    for user in (None, mine, [mine]):
        with config.patch(post_grad_custom_post_pass=user):
            chain = inductor_patches()["post_grad_custom_post_pass"]
        # one pass object (torch 2.11 takes no list), the user's first
        assert isinstance(chain, PostGradPasses)
        passes = list(chain.passes)
        assert passes[:-1] == ([] if user is None else [mine]) and isinstance(passes[-1], CondOperandLayouts)
        assert isinstance(chain.uuid(), str) and ("mine" in chain.uuid()) == (user is not None)
    ran.clear()
    chain(torch.fx.Graph())
    assert ran == ["mine"]
    with config.patch(post_grad_custom_post_pass=chain):
        again = inductor_patches()["post_grad_custom_post_pass"]
        assert again.passes[:-1] == (mine,) and len(again.passes) == 2  # not added twice


def test_model_without_blocks_compiles_unchanged_and_says_why():
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 4)
    with cdcompile.backend.collect_reports() as reports:
        out = torch.compile(m, backend="cachedit", options={"compiler": "eager"})(x)
    torch.testing.assert_close(out, m(x))
    (report,) = reports
    assert report.groups == []
    assert report.cache is None
    assert any("no repeated block group" in r for r in report.not_cached)
    assert [(p.name, p.ops_before, p.ops_after) for p in report.passes] == [
        ("matmul_attention", 3, 3), ("discover_blocks", 3, 3), ("context_parallel", 3, 3), ("fp8_attention", 3, 3),
        ("block_cache", 3, 3)]


def test_disable_passes_skips_a_pass_by_name():
    m = SequentialDiT(depth=3)
    with cdcompile.backend.collect_reports() as reports:
        torch.compile(m, backend="cachedit",
                      options={"compiler": "eager", "disable_passes": ["block_cache"]})(
            torch.randn(1, 10, 8), torch.tensor([0.5]))
    (report,) = reports
    assert [(p.name, p.skipped) for p in report.passes] == [
        ("matmul_attention", False), ("discover_blocks", False), ("context_parallel", False), ("fp8_attention", False),
        ("block_cache", True)]
    assert report.cache is None
