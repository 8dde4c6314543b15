"""The zoo beyond FLUX/SD3/Wan/PixArt: block discovery and exactness on a fast subset of diffusers DiTs.

``bench/zoo.py`` runs every ZOO model; these are the ones cheap enough for every test run (a few
seconds each on 2 cores), one per structural family: a joint two-stream MMDiT with a mask
(QwenImage), a double + single stream video DiT (HunyuanVideo), CogVideoX's text-in-sequence joint
blocks, single-stream cross-attention video blocks (LTX), linear-attention blocks (Sana) and a 1-D
audio DiT whose blocks read a precomputed rotary table (Stable Audio).
"""

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


def test_a_chain_without_a_residual_across_it_caches_its_largest_group_and_says_so():
    # Bria FIBO's single blocks carry text + image tokens in one stream, the double blocks two
    # streams: no M residual spans both groups, so the single group is cached alone.
    model, kwargs = ZOO["briafibo"]()
    with torch.no_grad(), pytest.warns(UserWarning, match=r"cached single_transformer_blocks \(3\) alone"):
        report = cdcompile.explain(model, **kwargs)
    (graph,) = report.graph_reports
    assert graph.cache["groups"] == ["single_transformer_blocks"]
    assert (graph.cache["Fn"], graph.cache["Mn"], graph.cache["Bn"]) == (1, 2, 0)
    assert "has no residual across it" in graph.cache["fallback"]
    with torch.no_grad():
        for a, b in zip(_tensors(report.output), _tensors(model(**kwargs))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
