"""The zoo beyond FLUX/SD3/Wan/PixArt: block discovery and exactness on a fast subset of diffusers DiTs.

``bench/zoo.py`` runs every ZOO model; these are the ones cheap enough for every test run (a few
seconds each on 2 cores), one per structural family: a joint two-stream MMDiT with a mask
(QwenImage), a double + single stream video DiT (HunyuanVideo), CogVideoX's text-in-sequence joint
blocks, single-stream cross-attention video blocks (LTX), linear-attention blocks (Sana) and a 1-D
audio DiT whose blocks read a precomputed rotary table (Stable Audio).
"""

import re

import pytest
import torch

import cdcompile
from cdcompile.zoo import ZOO

FAST = ["qwenimage", "hunyuanvideo", "cogvideox", "ltx", "sana", "stableaudio"]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _tensors(o)] if isinstance(out, (tuple, list)) else []


@pytest.mark.parametrize("name", FAST)
def test_zoo_model_has_a_block_group_and_backend_matches_eager(name):
    model, kwargs = ZOO[name]()
    with torch.no_grad():
        expected = _tensors(model(**kwargs))
        report = cdcompile.explain(model, **kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="cachedit", options={"compiler": "eager", "enable_cache": False})
        got = _tensors(compiled(**kwargs))

    assert report.graph_breaks == 0, report.break_reasons
    assert any(g["blocks"] >= 2 for g in report.groups), str(report)
    assert "hidden" in report.groups[-1]["streams"]
    # every one of them has a timestep input the clock reads (steps, requests and CFG slots)
    assert [r.cache["timestep_source"] for r in report.graph_reports if r.cache] == ["own"]
    assert expected and len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # explain ran the cache-enabled graph once: a first call computes every block, so it is exact too
    for a, b in zip(_tensors(report.output), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_zoo_builder_builds_an_eval_fp32_model_with_inputs():
    assert {"flux", "sd3", "wan", "pixart"} <= set(ZOO) and len(ZOO) >= 60
    classes = set()
    for name, build in ZOO.items():
        model, kwargs = build()
        assert not model.training, name
        assert all(p.dtype == torch.float32 for p in model.parameters()), name
        assert isinstance(kwargs, dict) and kwargs, name
        classes.add(type(model).__name__)
    assert len(classes) == len(ZOO)  # one builder per diffusers class


@pytest.mark.parametrize("name, group, why", [("krea2", "transformer_blocks", "joins in tokens that are no stream"),
                                               ("zimage", "layers", "joins in tokens that are no stream"),
                                               ("lumina2", "layers", "is written in place")])
def test_tokens_joined_from_outside_the_first_group_leave_the_stack_at_the_join_and_say_so(name, group, why):
    # Krea 2's text-only fusion blocks feed its transformer blocks, joined with the image tokens:
    # a stack starting at the text blocks would decide from the text, the same at every step.
    # Z-Image joins its noise refiner's image tokens with text its context refiner made; Lumina 2
    # does too, by writing both into new_zeros in place. None of these joins is replayed, so the
    # stack has no residual across it and the largest group is cached alone.
    model, kwargs = ZOO[name]()
    with torch.no_grad(), pytest.warns(UserWarning, match=rf"cached {re.escape(group)} \(\d+\) alone"):
        report = cdcompile.explain(model, **kwargs)
    (graph,) = [g for g in report.graph_reports if g.cache]
    assert graph.cache["groups"] == [group] and "has no residual across it" in graph.cache["fallback"]
    assert "is not replayed on the entries: " in graph.cache["fallback"] and why in graph.cache["fallback"]
    with torch.no_grad():
        for a, b in zip(_tensors(report.output), _tensors(model(**kwargs))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _flux2_cached_by_hooks(model, calls):
    """FLUX.2 in eager with F1 B0 and every step after the first cached, by forward hooks: on a
    cached step the last single block returns the first double block's outputs joined as FLUX.2
    joins them (text first) plus the joined stream's residual of step 0, and the model's own tail
    (split, norm, projection) runs on that."""
    state = {}

    def after_first(mod, args, out):  # a double block returns (text, image)
        state["f"] = torch.cat(out, dim=1)

    def after_last(mod, args, out):
        if "residual" not in state:
            state["residual"] = out - state["f"]
            return None
        return state["f"] + state["residual"]

    hooks = [model.transformer_blocks[0].register_forward_hook(after_first),
             model.single_transformer_blocks[-1].register_forward_hook(after_last)]
    try:
        return [model(**kw)[0] for kw in calls]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["flux2", "briafibo"])
def test_text_and_image_tokens_joined_for_the_single_blocks_are_cached_across_both_groups(name):
    # FLUX.2 joins its text and image streams (torch.cat) once, before the single blocks; Bria FIBO
    # joins them before every single block, each time with a new text layer. M spans both groups:
    # the joined stream's residual is taken against the join replayed on F's outputs. (Before, both
    # fell back to the single group alone, its F after every double block.)
    model, kwargs = ZOO[name]()
    calls = [{**kwargs, "timestep": kwargs["timestep"] * f, "hidden_states": kwargs["hidden_states"] + 0.1 * k}
             for k, f in enumerate((1.0, 0.9, 0.8))]
    with torch.no_grad(), cdcompile.backend.collect_reports() as reports:
        c = torch.compile(model, backend="cachedit", fullgraph=True,
                          options={"compiler": "eager", "residual_diff_threshold": 1e6, "max_warmup_steps": 1})
        outs = [c(**kw)[0] for kw in calls]
        want = _flux2_cached_by_hooks(model, calls) if name == "flux2" else [model(**calls[0])[0]]
    (graph,) = reports
    assert graph.cache["groups"] == ["transformer_blocks", "single_transformer_blocks"], graph.cache
    assert "fallback" not in graph.cache and (graph.cache["Fn"], graph.cache["Mn"]) == (1, 4)
    assert cdcompile.summary(model).as_dict()["requests"][-1]["slots"][0]["cached_steps"] == [1, 2]
    for k, w in enumerate(want):
        torch.testing.assert_close(outs[k], w, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {k}: {m}")
