"""User-facing calls: summary, enable(pipe), export/load, request boundaries on dtype changes."""

import json
import statistics
import subprocess
import sys
import warnings

import pytest
import torch

import cdcompile
from cdcompile.testing import (BlockStack, SequentialDiT, flux_prompt, tiny_flux_pipeline, tiny_wan22_pipeline,
                               wan22_latents)

OPTS = {"residual_diff_threshold": 1e9, "max_warmup_steps": 2}


def _traj(steps=6, dtype=torch.float32):
    x = torch.randn(1, 10, 8, generator=torch.Generator().manual_seed(0))
    return [((x + 0.01 * s).to(dtype), torch.tensor([1.0 - s / steps], dtype=dtype)) for s in range(steps)]


def test_summary_as_dict_has_the_documented_shape_and_is_json():
    m = SequentialDiT(depth=4)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "eager", **OPTS})
    with torch.no_grad():
        for x, t in _traj():
            c(x, t)
    d = cdcompile.summary(c).as_dict()
    (req,) = d["requests"]
    assert req["steps"] == 6
    (slot,) = req["slots"]
    assert slot["cached_steps"] == [2, 3, 4, 5]
    assert sorted(slot["residual_diffs"]) == [1, 2, 3, 4, 5]  # step 0 has no anchor yet
    assert all(isinstance(v, float) and v >= 0 for v in slot["residual_diffs"].values())
    json.dumps(d)
    text = str(cdcompile.summary(m))
    assert "N=4 F=1 M=3 B=0" in text and "[2, 3, 4, 5]" in text
    # the compared diffs' median and largest, beside the cached steps (as cache-dit's summary gives them)
    diffs = sorted(slot["residual_diffs"].values())
    row = f"{1:>7} {0:>4} {6:>5} {4:>6} {statistics.median(diffs):>8.3g} {diffs[-1]:>7.3g}  [2, 3, 4, 5]"
    assert row in text.splitlines(), text
    # the state's device memory: anchor and residual (1 x 10 x 32 float32) for each of 2 CFG slots
    assert cdcompile.summary(m).state_bytes[1] == 2 * 2 * 10 * 32 * 4
    assert d["states"] == 1 and d["state_bytes"] > 2 * 2 * 10 * 32 * 4
    assert "cache state: " in text and "(5.0 KiB of anchors and residuals for 2 CFG slots" in text
    assert "block cache state: " in str(cdcompile.explain(SequentialDiT(depth=4), *_traj()[0]))


def test_summary_numbers_graphs_in_compile_order_whichever_state_ran_last():
    # 10 tokens, then 12 (a second static graph), then 10 again. Graphs were numbered in the order
    # of their states' last use, so the 10-token graph was graph 0, then graph 1 after the third
    # request: one index meant two graphs across summaries.
    m = SequentialDiT(depth=4)
    c = torch.compile(m, backend="cachedit", fullgraph=True, dynamic=False,
                      options={"compiler": "eager", **OPTS})

    def request(tokens):
        with torch.no_grad():
            for x, t in _traj(4):
                c(x[:, :1].expand(1, tokens, 8).contiguous(), t)

    def graph_of(summary, tokens):
        return {r["graph"] for r in summary.as_dict()["requests"] if r["hidden"].startswith(f"1x{tokens}x")}

    request(10)
    request(12)
    first = cdcompile.summary(m)
    assert graph_of(first, 10) == {0} and graph_of(first, 12) == {1}
    request(10)
    again = cdcompile.summary(m)
    assert graph_of(again, 10) == {0} and graph_of(again, 12) == {1}
    assert [r["hidden"][:5] for r in again.as_dict()["requests"]] == ["1x12x", "1x10x", "1x10x"]  # last used last
    assert len(again.graphs) == 2 and "graph 0:" in str(again) and "graph 1:" in str(again)


def test_summary_keeps_a_bounded_history_of_requests():
    from cdcompile import guard

    m = SequentialDiT(depth=3)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "eager", **OPTS})
    with torch.no_grad():
        for _ in range(guard.HISTORY + 3):
            for x, t in _traj(3):
                c(x, t)
    reqs = cdcompile.summary(m).as_dict()["requests"]
    assert len(reqs) == guard.HISTORY and all(r["steps"] == 3 for r in reqs)


def test_dtype_change_mid_request_starts_a_new_request():
    m = SequentialDiT(depth=4)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "eager", **OPTS})
    traj32, traj64 = _traj(), _traj(dtype=torch.float64)
    with torch.no_grad():
        for x, t in traj32[:4]:
            c(x, t)
        m.double()  # parameters change dtype in place: Dynamo compiles another graph
        out = c(*traj64[4])
        torch.testing.assert_close(out, m(*traj64[4]))
    steps = sorted(r["steps"] for r in cdcompile.summary(m).as_dict()["requests"])
    assert steps == [1, 4]


def test_enable_compiles_the_pipeline_transformer_and_resets_per_call_on_the_instance_only():
    pipe = tiny_flux_pipeline()
    other = tiny_flux_pipeline(seed=1)
    base_cls = type(pipe)
    prompt = flux_prompt(pipe.transformer)
    run = dict(height=32, width=32, num_inference_steps=6, output_type="latent")
    with torch.no_grad():
        ref = pipe(**prompt, **run, generator=torch.Generator().manual_seed(0)).images
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=3)
    assert type(other) is base_cls and type(pipe) is not base_cls and isinstance(pipe, base_cls)
    with torch.no_grad():
        outs = [pipe(**prompt, **run, generator=torch.Generator().manual_seed(0)).images for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], ref), "steps 3-5 were served from the cache"
    reqs = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    assert [r["steps"] for r in reqs] == [6, 6]
    assert [r["slots"][0]["cached_steps"] for r in reqs] == [[3, 4, 5]] * 2


def test_force_refresh_step_hint_equals_a_new_request_from_a_step_callback():
    # force_refresh_step_hint=4 starts the cache afresh at step 4 inside the graph, warmup included;
    # a new_request before step 4's call does the same from Python, as two requests
    pipe = tiny_flux_pipeline()
    run = dict(**flux_prompt(pipe.transformer), height=32, width=32, num_inference_steps=8, output_type="latent")
    opts = dict(compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=2)
    cdcompile.enable(pipe, **opts, force_refresh_step_hint=4)
    with torch.no_grad():
        hinted = pipe(**run, generator=torch.Generator().manual_seed(0)).images
    reqs = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    assert [(r["steps"], r["slots"][0]["cached_steps"]) for r in reqs] == [(8, [2, 3, 6, 7])]

    def refresh(p, i, t, kwargs):
        if i == 3:
            cdcompile.new_request(p.transformer)
        return kwargs

    cdcompile.disable(pipe)
    torch._dynamo.reset()
    cdcompile.enable(pipe, **opts)
    with torch.no_grad():
        split = pipe(**run, generator=torch.Generator().manual_seed(0), callback_on_step_end=refresh).images
    reqs = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    assert [(r["steps"], r["slots"][0]["cached_steps"]) for r in reqs] == [(4, [2, 3]), (4, [2, 3])]
    torch.testing.assert_close(hinted, split, rtol=0, atol=0)


def test_enable_warns_after_a_call_whose_calls_per_timestep_overflow_the_cfg_slots():
    # true CFG calls the transformer twice per timestep; with one CFG slot the second call of each
    # timestep is never cached. The pipeline says so once, as the call that showed it returns.
    pipe = tiny_flux_pipeline()
    prompt = flux_prompt(pipe.transformer)
    negative = flux_prompt(pipe.transformer, seed=1)
    run = dict(height=32, width=32, num_inference_steps=5, output_type="latent", true_cfg_scale=3.0,
               negative_prompt_embeds=negative["prompt_embeds"],
               negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"])
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=2, cache_slots=1)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"2 calls share each timestep.*cache_slots=1 .*"
                                                            r"call 1 of each timestep is never cached: set cache_slots=2") as rec:
        pipe(**prompt, **run)
    assert [w.filename for w in rec if "calls share" in str(w.message)] == [__file__]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        pipe(**prompt, **run)
    reqs = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    assert [[s["cached_steps"] for s in r["slots"]] for r in reqs] == [[[2, 3, 4], []]] * 2
    assert [r["slots"][1]["overflow_calls"] for r in reqs] == [[1, 1]] * 2


def test_disable_gives_the_pipeline_back_its_class_and_transformer():
    pipe = tiny_flux_pipeline()
    base_cls, transformer = type(pipe), pipe.transformer
    prompt = flux_prompt(pipe.transformer)
    run = dict(height=32, width=32, num_inference_steps=6, output_type="latent")

    def images():
        with torch.no_grad():
            return pipe(**prompt, **run, generator=torch.Generator().manual_seed(0)).images

    ref = images()
    with pytest.raises(ValueError, match="was not enabled"):
        cdcompile.disable(pipe)
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=3)
    assert not torch.equal(images(), ref)
    assert cdcompile.disable(pipe) is pipe
    assert type(pipe) is base_cls and pipe.transformer is transformer
    assert "_compiled_call_impl" not in vars(transformer)  # compiled in place by enable, and no more
    torch.testing.assert_close(images(), ref, rtol=0, atol=0)
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=3)  # again
    assert [r["steps"] for r in cdcompile.summary(pipe.transformer).as_dict()["requests"]] == [6]
    images()
    assert [r["steps"] for r in cdcompile.summary(pipe.transformer).as_dict()["requests"]] == [6, 6]
    # a pipeline sharing the transformer (from_pipe), enabled after it: disabling the first leaves
    # the second's compiled call in place, and disabling the second restores the module
    from diffusers import FluxImg2ImgPipeline

    other = FluxImg2ImgPipeline.from_pipe(pipe)
    assert other.transformer is transformer
    cdcompile.enable(other, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=3)
    second = transformer._compiled_call_impl
    cdcompile.disable(pipe)
    assert transformer._compiled_call_impl is second
    cdcompile.disable(other)
    assert "_compiled_call_impl" not in vars(transformer) and "_cdcompile_calls" not in vars(transformer)
    torch.testing.assert_close(images(), ref, rtol=0, atol=0)
    # the other order: the call enable found is what disable leaves
    transformer.compile(backend="eager")
    own = transformer._compiled_call_impl
    cdcompile.enable(pipe, compiler="eager")
    cdcompile.enable(other, compiler="eager")
    cdcompile.disable(other)
    assert transformer._compiled_call_impl is not own
    cdcompile.disable(pipe)
    assert transformer._compiled_call_impl is own


def test_enable_hands_a_guard_filter_to_torch_compile():
    pipe = tiny_flux_pipeline()
    seen = []

    def keep_all(entries):
        seen.append(len(entries))
        return [True] * len(entries)

    cdcompile.enable(pipe, guard_filter_fn=keep_all, compiler="eager", residual_diff_threshold=0.5)
    with torch.no_grad():
        pipe(**flux_prompt(pipe.transformer), height=32, width=32, num_inference_steps=2, output_type="latent")
    assert seen and seen[0] > 0  # Dynamo asked the filter about the guards of the compiled graph


def test_enable_validates_options_immediately():
    pipe = tiny_flux_pipeline()
    with pytest.raises(ValueError, match="'threshold'"):
        cdcompile.enable(pipe, threshold=0.1)


def _steps_per_transformer(pipe, steps=10) -> dict[str, int]:
    """How many steps each transformer runs in one call (hooks on the uncompiled pipeline)."""
    seen: dict[str, set] = {}
    handles = [getattr(pipe, name).register_forward_hook(
        lambda mod, args, kwargs, out, name=name: seen.setdefault(name, set()).add(float(kwargs["timestep"][0])),
        with_kwargs=True) for name in ("transformer", "transformer_2")]
    wan22_latents(pipe, steps)
    for h in handles:
        h.remove()
    return {name: len(ts) for name, ts in seen.items()}


def test_enable_caches_both_transformers_of_a_two_expert_pipeline_each_on_its_own_steps():
    """Wan 2.2: `transformer` runs the high-noise steps, `transformer_2` the rest; both are compiled
    with the cache, each counts its own steps, and transformer_options sets one of them apart."""
    pipe = tiny_wan22_pipeline()
    per = _steps_per_transformer(pipe)
    assert per["transformer"] >= 4 and per["transformer_2"] >= 3 and sum(per.values()) == 10
    ref = wan22_latents(pipe)
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=2,
                     transformer_options={"transformer_2": {"max_warmup_steps": 1}})
    assert all(getattr(pipe, n)._compiled_call_impl is not None for n in ("transformer", "transformer_2"))
    outs = [wan22_latents(pipe) for _ in range(2)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], ref), "the cached steps changed the result"
    with pytest.raises(TypeError, match=r"WanPipeline; for a pipeline, pass its transformer: pipe.transformer, "
                                        r"pipe.transformer_2"):
        cdcompile.summary(pipe)
    for name, warmup in (("transformer", 2), ("transformer_2", 1)):
        reqs = cdcompile.summary(getattr(pipe, name)).as_dict()["requests"]
        assert [r["steps"] for r in reqs] == [per[name]] * 2, name
        for r in reqs:  # cond and uncond slots, each cached after its own warmup
            assert [s["cached_steps"] for s in r["slots"]] == [list(range(warmup, per[name]))] * 2, name


def test_enable_on_a_two_expert_pipeline_without_caching_equals_the_pipeline():
    pipe = tiny_wan22_pipeline()
    ref = wan22_latents(pipe)
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=0.0)
    torch.testing.assert_close(wan22_latents(pipe), ref, rtol=1e-5, atol=1e-6)


def test_enable_caches_both_cfg_branches_when_the_negative_prompt_is_shorter():
    # Qwen-Image's true CFG: the prompt has 9 text tokens, the negative prompt 4. enable() compiles
    # with dynamic=False, so each step calls two graphs in turn. They share the model's state (no
    # state tensor has the text length): slot 0 for the prompt, slot 1 for the negative prompt, each
    # cached after its warm-up, in every request. Before, each switch started a request.
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from torch._dynamo.utils import counters

    from cdcompile.zoo import ZOO

    counters.clear()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=ZOO["qwenimage"]()[0])
    g = torch.Generator().manual_seed(0)
    prompt = dict(prompt_embeds=torch.randn(1, 9, 32, generator=g), prompt_embeds_mask=torch.ones(1, 9, dtype=torch.long),
                  negative_prompt_embeds=torch.randn(1, 4, 32, generator=g),
                  negative_prompt_embeds_mask=torch.ones(1, 4, dtype=torch.long))

    def run():
        with torch.no_grad():
            return pipe(**prompt, true_cfg_scale=4.0, height=64, width=64, num_inference_steps=6, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=2)
    outs = [run(), run()]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 2
    reqs = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    assert [r["steps"] for r in reqs] == [6, 6]
    assert all([s["cached_steps"] for s in r["slots"]] == [[2, 3, 4, 5]] * 2 for r in reqs)


def test_enable_keeps_cfg_slots_apart_under_per_token_timesteps():
    # Wan 2.2 TI2V's pipeline (expand_timesteps=True) passes a (batch, tokens) timestep; the prompt
    # and negative prompt calls of a step are slots 0 and 1. Before, no timestep input was found:
    # each call was a step (12 a request) and the negative prompt's calls used the prompt's anchor.
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from cdcompile.testing import tiny_wan

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_wan(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), expand_timesteps=True)
    g = torch.Generator().manual_seed(0)
    prompt = dict(prompt_embeds=torch.randn(1, 7, 16, generator=g), negative_prompt_embeds=torch.randn(1, 7, 16, generator=g))
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=2)
    with torch.no_grad():
        for _ in range(2):
            pipe(**prompt, height=32, width=32, num_frames=5, num_inference_steps=6, guidance_scale=3.0,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
    reqs = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    assert [(r["steps"], [s["cached_steps"] for s in r["slots"]]) for r in reqs] == [(6, [[2, 3, 4, 5]] * 2)] * 2


@pytest.mark.parametrize("kwargs,match", [
    ({"transformer_options": {"transformer_3": {}}}, r"transformer_3.*\['transformer', 'transformer_2'\]"),
    ({"transformer_options": {"transformer_2": 0.2}}, r"transformer_options\['transformer_2'\] must be a dict"),
    ({"transformer_options": {"transformer_2": {"threshold": 0.2}}}, r"unknown option 'threshold'"),
    ({"steps_computation_mask": "fast"}, r"2 transformers.*'fast'.*num_inference_steps"),
])
def test_enable_on_a_two_expert_pipeline_rejects_what_it_cannot_apply(kwargs, match):
    pipe = tiny_wan22_pipeline()
    with pytest.raises(ValueError, match=match):
        cdcompile.enable(pipe, compiler="eager", **kwargs)
    assert pipe.transformer._compiled_call_impl is None, "a refused enable() changes nothing"


@pytest.mark.slow
def test_exported_package_reproduces_outputs_and_decisions_in_a_process_without_diffusers(tmp_path, capsys):
    # with DMD (its fit is the op cdcompile::dmd_weights, which importing cdcompile registers; from
    # step 4 on it fits 4 computed steps), one call per step: the step_diff state is written, never read
    m = SequentialDiT(depth=4)
    opts = {"calibrator": "dmd", "residual_diff_threshold": 0.5, "max_warmup_steps": 4,
            "cfg_diff_compute_separate": False}
    traj = _traj(8)
    path = cdcompile.export(m, traj[0], {}, str(tmp_path / "dit.pt2"), options=opts)
    assert "cdcompile.export: 4/4 written" in capsys.readouterr().err  # the bar's last stage
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "eager", **opts})
    with torch.no_grad():
        want = [c(x, t) for _ in range(2) for x, t in traj]
    want_cached = [r["slots"][0]["cached_steps"] for r in cdcompile.summary(m).as_dict()["requests"]]
    assert want_cached == [[4, 5, 6, 7]] * 2
    torch.save({"traj": traj, "want": want}, tmp_path / "io.pt")

    code = f"""
import sys, torch
sys.modules["diffusers"] = None  # importing diffusers would fail
import cdcompile
art = cdcompile.load({path!r})
io = torch.load({str(tmp_path / "io.pt")!r})
got = []
for r in range(2):
    if r == 1:
        art.new_request()
    got += [art(x, t)[0] for x, t in io["traj"]]
for k, (a, b) in enumerate(zip(got, io["want"])):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"call {{k}}: {{m}}")
d = art.decisions()
assert art.pruned_blocks() == [0] * 16
print([s for s in range(8) if d[s]], [s for s in range(8) if d[8 + s]])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"{want_cached[0]} {want_cached[1]}"


@pytest.mark.slow
@pytest.mark.parametrize("opts", [
    # (DMD over M's residuals: the test above, in a process without diffusers)
    # with FoCa over each pruned block's residual
    {"cache_type": "dbprune", "residual_diff_threshold": 0.5, "max_warmup_steps": 2, "non_prune_block_ids": [2],
     "calibrator": "foca"},
    # TaylorSeer over M's output (the FoCa case above forecasts residuals)
    {"taylorseer_order": 2, "residual_diff_threshold": 0.5, "max_warmup_steps": 2,
     "calibrator_cache_type": "hidden_states"},
    # a refresh every 3 steps: warmup and mask start again at step 3 (without: steps 2, 4, 5 cache)
    {"steps_computation_mask": [1, 1, 0, 1, 0, 0], "steps_computation_policy": "static", "max_warmup_steps": 2,
     "force_refresh_step_hint": 3, "force_refresh_step_policy": "repeat"},
    # on every third channel, diffs 0.091 + 0.103 + 0.135 at steps 2-4 reach the budget: step 5
    # computes (all channels: 0.137 + 0.126 reach it at step 3; no budget: steps 2-5 cache); FoCa
    # forecasts M's residuals
    {"residual_diff_threshold": 0.5, "max_warmup_steps": 2, "max_accumulated_residual_diff_threshold": 0.25,
     "downsample_factor": 3, "calibrator": "foca"},
], ids=["dbprune_foca", "taylorseer2_values", "static_mask_refresh", "budget_downsample"])
def test_exported_package_with_each_feature_equals_the_compiled_model(tmp_path, opts):
    m = SequentialDiT(depth=4)
    traj = _traj(6)
    path = cdcompile.export(m, traj[0], {}, str(tmp_path / "dit.pt2"), options=opts)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "eager", **opts})
    art = cdcompile.load(path)
    with torch.no_grad():
        for r in range(2):
            if r == 1:
                art.new_request()
            for x, t in traj:
                torch.testing.assert_close(art(x, t)[0], c(x, t), rtol=1e-5, atol=1e-5)
    slots = [r["slots"][0] for r in cdcompile.summary(m).as_dict()["requests"]]
    cached = [s for s in range(6) if s in slots[0]["cached_steps"]]
    assert cached and slots[0] == slots[1]
    assert art.decisions() == [s in cached for s in range(6)] * 2
    if "max_accumulated_residual_diff_threshold" in opts:
        assert cached == [2, 3, 4]
    if "force_refresh_step_hint" in opts:
        assert cached == [2, 5]
    if opts.get("cache_type") == "dbprune":
        assert art.pruned_blocks() == slots[0]["pruned_blocks"] * 2
        assert set(art.pruned_blocks()) == {0, 2}  # blocks 1 and 3: block 2 is never pruned
    else:
        assert art.pruned_blocks() == [0] * 12


def test_export_of_a_module_compiled_in_place_traces_the_module(tmp_path, capsys):
    # Module.compile (as cdcompile.enable compiles) made export trace the module's own compiled
    # call, so its capture backend never ran (KeyError 'ctx')
    opts = {"residual_diff_threshold": 1e9, "max_warmup_steps": 2}
    m = SequentialDiT(depth=4)
    traj = _traj(6)
    m.compile(backend="cachedit", fullgraph=True, options={"compiler": "eager", **opts})
    with torch.no_grad():
        want = [m(x, t) for x, t in traj]
    with pytest.warns(UserWarning, match="cdcompile.export resets Dynamo") as rec:
        path = cdcompile.export(m, traj[0], {}, str(tmp_path / "dit.pt2"), options=opts, progress=False)
    assert "cdcompile.export" not in capsys.readouterr().err  # progress=False: no bar
    assert [w.filename for w in rec if "resets Dynamo" in str(w.message)] == [__file__]  # the caller's line
    assert m._compiled_call_impl is not None
    art = cdcompile.load(path)
    with torch.no_grad():
        for (x, t), w in zip(traj, want):
            torch.testing.assert_close(art(x, t)[0], w, rtol=1e-5, atol=1e-5)
    assert art.decisions() == [False, False, True, True, True, True]


@pytest.mark.slow
def test_an_export_with_dynamic_shapes_serves_each_size_and_a_new_size_starts_a_request(tmp_path):
    m = SequentialDiT(depth=4)
    opts = {"residual_diff_threshold": 0.5, "max_warmup_steps": 2}

    def traj(tokens):
        x = torch.randn(1, tokens, 8, generator=torch.Generator().manual_seed(tokens))
        return [(x + 0.01 * s, torch.tensor([1.0 - s / 6])) for s in range(6)]

    tokens = torch.export.Dim("tokens", min=2, max=4096)
    path = cdcompile.export(m, traj(10)[0], {}, str(tmp_path / "dyn.pt2"), options=opts,
                            dynamic_shapes={"x": {1: tokens}})
    art = cdcompile.load(path)
    assert list(art.sized_spec) == ["anchor", "residual_0"]  # the state that holds the token count
    want_cached = []
    for n in (10, 17, 10):  # no new_request(): each change of size starts one
        c = torch.compile(m, backend="cachedit", fullgraph=True, dynamic=False, options={"compiler": "eager", **opts})
        cdcompile.new_request(m)
        with torch.no_grad():
            for x, t in traj(n):
                torch.testing.assert_close(art(x, t)[0], c(x, t), rtol=1e-5, atol=1e-5)
        want_cached += [r["slots"][0]["cached_steps"] for r in cdcompile.summary(m).as_dict()["requests"]][-1:]
    d = art.decisions()
    got_cached = [[s for s in range(6) if d[6 * r + s]] for r in range(3)]
    assert got_cached == want_cached and want_cached[0]


def test_export_names_a_bad_dynamic_shape_and_the_fix(tmp_path):
    from cdcompile.testing import flux_inputs, tiny_flux

    m = tiny_flux()
    kw = flux_inputs(m, tokens=16)
    tokens = torch.export.Dim("tokens", min=4, max=4096)
    with pytest.raises(ValueError, match=r"names 'hidden', which is no input of this call \(inputs: \["):
        cdcompile.export(m, (), kw, str(tmp_path / "x.pt2"), dynamic_shapes={"hidden": {1: tokens}})
    with pytest.raises(ValueError, match=r"names dim 3; hidden_states has shape \(1, 16, 16\)"):
        cdcompile.export(m, (), kw, str(tmp_path / "x.pt2"), dynamic_shapes={"hidden_states": {3: tokens}})
    # img_ids holds the same token count: varying one alone cannot trace
    with pytest.raises(ValueError, match=r"cannot vary as given(.|\n)*img_ids dim 0\), give both the same"):
        cdcompile.export(m, (), kw, str(tmp_path / "x.pt2"), dynamic_shapes={"hidden_states": {1: tokens}})


class _ConstantBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, h):
        y = self.lin(h)
        gate = torch.zeros_like(y)
        gate[:, -3:] = 1.0  # a Python number written into a slice
        return h + y * gate * torch.tensor(0.5, device=h.device) + 0.1 * y


@pytest.mark.slow
def test_export_of_blocks_that_create_tensor_constants(tmp_path):
    """torch.export cannot functionalize a tensor constant created inside a cond branch
    (pytorch/pytorch#180354: "Attempting to use FunctionalTensor on its own"); export writes such
    numbers as ``torch.full`` ops first, and the artifact computes what the compiled model does."""
    m = BlockStack(_ConstantBlock, depth=4, dim=8).eval()  # both constants inside the compute branch
    opts = {"residual_diff_threshold": 0.5, "max_warmup_steps": 2}
    traj = _traj(6)
    path = cdcompile.export(m, traj[0], {}, str(tmp_path / "constants.pt2"), options=opts)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "eager", **opts})
    art = cdcompile.load(path)
    with torch.no_grad():
        for x, t in traj:
            torch.testing.assert_close(art(x, t)[0], c(x, t), rtol=1e-5, atol=1e-5)
    (req,) = cdcompile.summary(m).as_dict()["requests"]
    cached = req["slots"][0]["cached_steps"]
    assert cached and art.decisions() == [s in cached for s in range(6)]


def test_blocks_compiled_one_by_one_warn_and_summary_says_to_compile_the_whole_model():
    from cdcompile.testing import flux_inputs, tiny_flux

    m = tiny_flux()
    kw = flux_inputs(m)
    with torch.no_grad():
        ref = m(**kw)[0]
    m.compile_repeated_blocks(backend="cachedit", options={"compiler": "eager", **OPTS})
    with pytest.warns(UserWarning, match=r"Flux(Single)?TransformerBlock is compiled on its own"), torch.no_grad():
        out = m(**kw)[0]
    torch.testing.assert_close(out, ref)
    text = str(cdcompile.summary(m))
    assert "6 of its submodules are compiled one by one (transformer_blocks.0," in text
    assert 'torch.compile(model, backend="cachedit")' in text


class _BreakingBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, temb):
        torch._dynamo.graph_break()
        return self.block(x, temb)


def test_a_block_traced_alone_after_a_graph_break_gives_no_regional_hint():
    m = SequentialDiT(depth=3)
    m.blocks = torch.nn.ModuleList(_BreakingBlock(b) for b in m.blocks)
    c = torch.compile(m, backend="cachedit", options={"compiler": "eager", **OPTS})
    import warnings

    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        for x, t in _traj(3):
            c(x, t)
    assert not [w for w in seen if "compiled on its own" in str(w.message)]
    assert str(cdcompile.summary(m)) == "cdcompile.summary: no block cache in this model's compiled graphs"


def test_summary_after_calls_under_grad_mode_reads_the_history_without_warnings():
    import warnings

    m = SequentialDiT(depth=3)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={"compiler": "aot_eager", **OPTS})
    for x, t in _traj(4):
        assert c(x, t).requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (req,) = cdcompile.summary(m).as_dict()["requests"]
    assert req["slots"][0]["cached_steps"] == [2, 3]


def test_summary_plot_draws_each_slots_residual_diffs_against_the_threshold(tmp_path):
    pytest.importorskip("matplotlib")
    m = SequentialDiT(depth=4)
    c = torch.compile(m, backend="cachedit", fullgraph=True,
                      options={"compiler": "eager", "residual_diff_threshold": 0.5, "max_warmup_steps": 2})
    with torch.no_grad():
        for r in range(3):
            cdcompile.new_request(m)
            for x, t in _traj():
                c(x, t)
                c(x * 0.5, t)  # a second CFG call: slot 1
    s = cdcompile.summary(m)
    fig = s.plot(str(tmp_path / "diffs.png"), last=2)
    assert (tmp_path / "diffs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax, req in zip(axes, s.as_dict()["requests"][-2:]):
        lines = ax.get_lines()
        for k, slot in enumerate(req["slots"]):
            line, filled, hollow = lines[3 * k: 3 * k + 3]
            steps = sorted(slot["residual_diffs"])
            assert list(line.get_xdata()) == steps
            assert list(line.get_ydata()) == [slot["residual_diffs"][i] for i in steps]
            assert list(filled.get_xdata()) == [i for i in steps if i in slot["cached_steps"]]
            assert list(hollow.get_xdata()) == [i for i in steps if i not in slot["cached_steps"]]
        assert list(lines[-1].get_ydata()) == [0.5, 0.5]  # the threshold
        assert f"cached: slot 0 {len(req['slots'][0]['cached_steps'])}, slot 1" in ax.get_title(loc="left")
    with pytest.raises(ValueError, match="last must be a positive int"):
        s.plot(last=0)
    with pytest.raises(ValueError, match="nothing to plot: cdcompile.summary: no block cache"):
        cdcompile.summary(SequentialDiT(depth=4)).plot()


def test_summary_and_its_plot_mark_where_the_cache_starts_afresh():
    pytest.importorskip("matplotlib")
    m = SequentialDiT(depth=4)
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 1,
        "force_refresh_step_hint": 2, "force_refresh_step_policy": "repeat"})
    with torch.no_grad():
        for x, t in _traj(6):
            c(x, t)
    s = cdcompile.summary(m)
    assert "  the cache starts afresh every 2 steps\n" in str(s)
    assert s.as_dict()["requests"][-1]["slots"][0]["cached_steps"] == [1, 3, 5]
    (ax,) = s.plot().get_axes()
    marks = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert [ln.get_xdata()[0] for ln in marks] == [1.5, 3.5]
    assert "cache starts afresh" in [t.get_text() for t in ax.get_legend().get_texts()]


def _lora_file(tmp_path, seed: int, rank: int) -> str:
    """A FLUX LoRA (random, on the attention projections) saved as diffusers writes one."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = tiny_flux_pipeline()
    torch.manual_seed(seed)
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    path = str(tmp_path / f"lora_{seed}")
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return path


def test_a_lora_hotswapped_into_an_enabled_pipeline_runs_in_the_same_graph(tmp_path):
    # diffusers' recipe for serving LoRAs under torch.compile: enable_lora_hotswap, then
    # load_lora_weights(..., hotswap=True) writes the new weights into the compiled ones in place.
    from torch._dynamo.utils import counters

    first, second = _lora_file(tmp_path, 1, 4), _lora_file(tmp_path, 2, 8)
    opts = dict(compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=2)
    run = dict(height=32, width=32, num_inference_steps=6, output_type="latent")

    def images(pipe):
        with torch.no_grad():
            return pipe(**flux_prompt(pipe.transformer), **run, generator=torch.Generator().manual_seed(0)).images

    fresh = tiny_flux_pipeline()
    fresh.load_lora_weights(second, adapter_name="x")
    cdcompile.enable(fresh, **opts)
    want = images(fresh)
    torch._dynamo.reset()

    pipe = tiny_flux_pipeline()
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(first, adapter_name="x")
    cdcompile.enable(pipe, **opts)
    counters.clear()
    before = images(pipe)
    pipe.load_lora_weights(second, adapter_name="x", hotswap=True)
    got = images(pipe)
    assert counters["stats"]["unique_graphs"] == 1  # no recompile for the second LoRA
    assert not torch.equal(before, got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    reqs = cdcompile.summary(pipe.transformer).as_dict()["requests"]
    assert [r["slots"][0]["cached_steps"] for r in reqs] == [[2, 3, 4, 5]] * 2


def test_explain_traces_a_transformer_enable_compiled_in_place_and_warns_of_the_reset():
    # explain on an enabled pipeline's transformer went through the module's own compiled call:
    # "0 graph(s), -1 graph break(s)", and the report of a graph its recorder never saw
    from cdcompile.testing import flux_inputs

    pipe = tiny_flux_pipeline()
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=1e9, max_warmup_steps=2)
    run = dict(height=32, width=32, num_inference_steps=4, output_type="latent")
    with torch.no_grad():
        pipe(**flux_prompt(pipe.transformer), **run)
    with torch.no_grad(), pytest.warns(UserWarning, match="explain resets Dynamo") as rec:
        report = cdcompile.explain(pipe.transformer, **flux_inputs(pipe.transformer, tokens=16))
    assert [w.filename for w in rec if "resets Dynamo" in str(w.message)] == [__file__]  # the caller's line
    assert (report.graphs, report.graph_breaks) == (1, 0)
    assert [r.graph_index for r in report.graph_reports] == [0] and str(report).count("block cache: 6 blocks") == 1
    assert pipe.transformer._compiled_call_impl is not None  # still enabled
    with torch.no_grad():
        pipe(**flux_prompt(pipe.transformer), **run)
    assert [r["slots"][0]["cached_steps"] for r in cdcompile.summary(pipe.transformer).as_dict()["requests"]] \
        == [[2, 3]]  # compiled again after the reset: statistics start afresh, as the warning says


def test_the_pipelines_lora_methods_act_on_an_enabled_pipeline(tmp_path):
    # diffusers' pipeline LoRA methods (unload_lora_weights, fuse_lora, set_adapters, ...) act only
    # on components that are diffusers models and skip a torch.compile wrapper without a word: on
    # an enabled pipeline unload_lora_weights left the LoRA in (0.17 off the base model's latents).
    # enable() compiles in place, so pipe.transformer stays the diffusers model.
    from diffusers import ModelMixin

    first, second = _lora_file(tmp_path, 1, 4), _lora_file(tmp_path, 2, 4)
    run = dict(height=32, width=32, num_inference_steps=4, output_type="latent")

    def images(pipe):
        with torch.no_grad():
            return pipe(**flux_prompt(pipe.transformer), **run, generator=torch.Generator().manual_seed(0)).images

    ref, pipe = tiny_flux_pipeline(), tiny_flux_pipeline()
    cdcompile.enable(pipe, compiler="eager", residual_diff_threshold=0.0)
    assert isinstance(pipe.transformer, ModelMixin)
    steps = [
        ("base", lambda p: None),
        ("two LoRAs", lambda p: (p.load_lora_weights(first, adapter_name="a"), p.load_lora_weights(second, adapter_name="b"))),
        ("weighted", lambda p: p.set_adapters(["a", "b"], [0.5, 1.5])),
        ("disabled", lambda p: p.disable_lora()),
        ("enabled", lambda p: p.enable_lora()),
        ("fused", lambda p: p.fuse_lora(lora_scale=0.7)),
        ("unfused", lambda p: p.unfuse_lora()),
        ("one deleted", lambda p: p.delete_adapters("b")),
        ("unloaded", lambda p: p.unload_lora_weights()),
    ]
    seen = []
    for label, change in steps:
        change(ref)
        change(pipe)
        want = images(ref)
        assert label == "base" or not torch.equal(want, seen[-1]), label  # each step changes the model
        torch.testing.assert_close(images(pipe), want, rtol=0, atol=0, msg=label)
        seen.append(want)
    # unloaded: the base model again, up to the rounding of fuse + unfuse in the weights (4.8e-7)
    torch.testing.assert_close(seen[-1], seen[0], rtol=0, atol=1e-6)
    assert pipe.get_list_adapters() == ref.get_list_adapters() == {}


def test_export_shows_its_stages_in_a_progress_bar(tmp_path, capsys):
    m = SequentialDiT(depth=3)
    x, t = _traj(2)[0]
    with pytest.raises(ValueError, match="names 'y'"):  # before any stage: no bar left behind
        cdcompile.export(m, (x, t), {}, str(tmp_path / "a.pt2"), dynamic_shapes={"y": {1: None}})
    assert "cdcompile.export" not in capsys.readouterr().err
    # a model with no block group fails at the first stage, and the bar says where
    with pytest.raises(ValueError, match="no block cache could be inserted"):
        cdcompile.export(torch.nn.Linear(8, 8), (x,), {}, str(tmp_path / "b.pt2"))
    err = capsys.readouterr().err
    assert "cdcompile.export: 0/4 capture: Dynamo and the passes: failed (ValueError)" in err, err
    with pytest.raises(ValueError, match="progress must be True or False, got 'no'"):
        cdcompile.export(m, (x, t), {}, str(tmp_path / "c.pt2"), progress="no")
    # (progress=False shows nothing: test_export_of_a_module_compiled_in_place_traces_the_module)
