"""diffusers' own hooks on a transformer (its caches, layerwise casting, group offloading): found,
named with their fix, and never stacked under the block cache."""

import warnings

import pytest
import torch

import cdcompile
from cdcompile import diffusers_hooks
from cdcompile.testing import flux_inputs, flux_prompt, tiny_flux, tiny_flux_pipeline

OPTS = {"compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 1}


def _fbc(model, threshold=1e9):
    from diffusers.hooks import FirstBlockCacheConfig

    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    return model


def _steps(model, kw, n=4):
    with torch.no_grad(), model.cache_context("cond"):
        return [model(**{**kw, "timestep": kw["timestep"] * (1 - s / n)})[0] for s in range(n)]


def test_on_module_lists_each_kind_with_the_modules_it_hooks():
    m = _fbc(tiny_flux())
    found = diffusers_hooks.on_module(m)
    assert found == {"first_block_cache": ["transformer_blocks.0", "transformer_blocks.1",
                                           "single_transformer_blocks.0", "single_transformer_blocks.1",
                                           "single_transformer_blocks.2", "single_transformer_blocks.3"]}
    assert diffusers_hooks.describe(found) == ("first_block_cache on transformer_blocks.0, transformer_blocks.1, "
                                               "single_transformer_blocks.0, ... (6 modules)")
    assert diffusers_hooks.on_module(tiny_flux()) == {}


def test_the_block_cache_stays_out_of_a_graph_that_runs_a_diffusers_cache():
    # diffusers' first-block cache skips the blocks in Python; under the backend, every step must be
    # what that cache alone gives (no second cache over it), and the warning must name the fix.
    torch.manual_seed(0)
    ref_model, model = _fbc(tiny_flux()), _fbc(tiny_flux())
    kw = flux_inputs(model)
    ref = _steps(ref_model, kw)
    compiled = torch.compile(model, backend="cachedit", options=OPTS)
    with pytest.warns(UserWarning, match=r"not cached: first_block_cache: diffusers' cache .*disable_cache\(\)"):
        with torch.no_grad(), model.cache_context("cond"):
            got = [compiled(**{**kw, "timestep": kw["timestep"] * (1 - s / 4)})[0] for s in range(4)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    text = str(cdcompile.summary(compiled))
    assert text.startswith("cdcompile.summary: no block cache in this model's compiled graphs; the model has "
                           "diffusers hooks (first_block_cache on transformer_blocks.0,"), text


def test_a_graph_traced_through_a_diffusers_cache_names_it():
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    m = tiny_flux()
    m.enable_cache(PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                   current_timestep_callback=lambda: 500))
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad(), m.cache_context("cond"):
        torch.compile(m, backend=keep)(**flux_inputs(m))
    assert [diffusers_hooks.in_graph(g) for g in graphs] == [["pyramid_attention_broadcast"]]
    assert diffusers_hooks.caches(["pyramid_attention_broadcast", "group_offloading"]) == ["pyramid_attention_broadcast"]


def test_explain_names_the_hooks_on_the_model_and_their_fix():
    m = tiny_flux()
    kw = flux_inputs(m)  # float32 (taken from the weights, which are float8 once cast)
    m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = cdcompile.explain(m, **kw)
    assert set(report.diffusers_hooks) == {"layerwise_casting"}
    assert not report.groups  # each hooked layer breaks the graph
    text = str(report)
    assert "diffusers hooks on the model: layerwise_casting on time_text_embed.timestep_embedder.linear_1" in text
    assert "Float8WeightOnlyConfig" in text
    assert report.as_dict()["diffusers_hooks"] == report.diffusers_hooks


def test_enable_refuses_a_transformer_with_a_diffusers_cache_and_says_how_to_remove_it():
    pipe = tiny_flux_pipeline()
    _fbc(pipe.transformer)
    with pytest.raises(ValueError, match=r"pipe\.transformer has diffusers hooks \(first_block_cache on "
                                         r"transformer_blocks\.0, .*transformer\.disable_cache\(\)"):
        cdcompile.enable(pipe, **OPTS)
    assert not getattr(pipe, "_cdcompile_enabled", False)
    with pytest.warns(UserWarning, match="first_block_cache"):  # no block cache: allowed, and said
        cdcompile.enable(pipe, compiler="eager", enable_cache=False)
    cdcompile.disable(pipe)
    pipe.transformer.disable_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cdcompile.enable(pipe, **OPTS)
    with torch.no_grad():
        pipe(**flux_prompt(pipe.transformer), height=32, width=32, num_inference_steps=4, output_type="latent")
    (req,) = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    assert req["slots"][0]["cached_steps"] == [1, 2, 3]


def test_enable_warns_of_hooks_that_split_the_graph():
    pipe = tiny_flux_pipeline()
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                          num_blocks_per_group=2)
    with pytest.warns(UserWarning, match=r"group_offloading on .*model-level offload"):
        cdcompile.enable(pipe, **OPTS)


def test_advice_covers_a_hook_defined_outside_diffusers():
    (line,) = diffusers_hooks.advice(["MyHook"])
    assert line.startswith("MyHook: a hook in diffusers' registry")
    assert len(diffusers_hooks.advice(["first_block_cache", "mag_cache", "layerwise_casting"])) == 2


def test_enable_refuses_diffusers_context_parallelism_under_ulysses():
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    pipe = tiny_flux_pipeline()
    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    registry.register_hook(ContextParallelSplitHook(metadata={}, parallel_config=None), "cp_input---")
    with pytest.raises(ValueError, match=r"context_parallel on <root>\).*use cdcompile's ulysses_degree instead"):
        cdcompile.enable(pipe, compiler="eager", ulysses_degree=2)


def test_a_hook_that_leaves_the_blocks_in_one_graph_is_named_in_explain_and_not_warned_of():
    from diffusers.hooks import HookRegistry, ModelHook

    class Identity(ModelHook):  # runs in the graph: no break
        def post_forward(self, module, output):
            return output

    m = tiny_flux()
    for block in m.single_transformer_blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(Identity(), "identity")
    kw = flux_inputs(m)
    with torch.no_grad():
        ref = m(**kw)[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        report = cdcompile.explain(m, options=OPTS, **kw)
    assert not [w for w in seen if "cachedit" in str(w.message)]
    torch.testing.assert_close(report.output[0], ref)
    (graph,) = report.graph_reports
    assert graph.cache is not None and graph.diffusers_hooks == ["hooks"]
    assert report.diffusers_hooks == {"Identity": [f"single_transformer_blocks.{i}" for i in range(4)]}
