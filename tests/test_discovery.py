"""Block discovery: one structural rule finds the repeated blocks of every DiT shape."""

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import cdcompile
from cdcompile.testing import SeqBlock, SequentialDiT
from cdcompile.zoo import ZOO


def _explain(model, *args, **kwargs):
    with torch.no_grad():
        return cdcompile.explain(model, *args, **kwargs)


def _groups(report):
    return [(g["name"], g["block_class"], g["blocks"], g["streams"]) for g in report.groups]


def test_tiny_flux_has_double_and_single_groups_with_two_streams():
    m, kw = ZOO["flux"]()
    r = _explain(m, **kw)
    assert (r.graphs, r.graph_breaks) == (1, 0)
    assert _groups(r) == [
        ("transformer_blocks", "FluxTransformerBlock", 2, ["hidden", "encoder"]),
        ("single_transformer_blocks", "FluxSingleTransformerBlock", 4, ["encoder", "hidden"]),
    ]
    double, single = r.groups
    # the double group's exits are the single group's entries, stream by stream
    assert dict(zip(double["streams"], double["stream_exits"])) == dict(
        zip(single["streams"], single["stream_entries"]))
    # the last single block's encoder output is dead code: the stream has no exit
    assert dict(zip(single["streams"], single["stream_exits"]))["encoder"] is None
    # every block reads temb and the two rotary tables
    assert len(double["side_inputs"]) == 3 and double["side_inputs"] == single["side_inputs"]


def test_sd3_joint_blocks_exclude_the_context_pre_only_last_block():
    m, kw = ZOO["sd3"]()
    r = _explain(m, **kw)
    assert _groups(r) == [("transformer_blocks", "JointTransformerBlock", 2, ["hidden", "encoder"])]
    rejected = [x for g in r.graph_reports for x in g.rejected]
    assert [(x["name"], x["reason"]) for x in rejected] == [("transformer_blocks.2", "signature_mismatch")]


def test_wan_single_stream_with_read_only_encoder_as_side_input():
    m, kw = ZOO["wan"]()
    r = _explain(m, **kw)
    (g,) = r.groups
    assert (g["name"], g["blocks"], g["streams"]) == ("blocks", 3, ["hidden"])
    # rotary cos/sin, the projected text states and the timestep projection are read by every block
    assert len(g["side_inputs"]) == 4


def test_pixart_blocks_read_text_and_timestep_as_side_inputs():
    m, kw = ZOO["pixart"]()
    r = _explain(m, **kw)
    (g,) = r.groups
    assert (g["name"], g["block_class"], g["blocks"], g["streams"]) == (
        "transformer_blocks", "BasicTransformerBlock", 3, ["hidden"])
    assert len(g["side_inputs"]) == 2


def test_hand_written_modulelist_dit():
    r = _explain(SequentialDiT(depth=5), torch.randn(2, 10, 8), torch.tensor([0.5, 0.5]))
    assert _groups(r) == [("blocks", "SeqBlock", 5, ["hidden"])]


class _MLPBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def test_plain_sequential_of_blocks_at_the_root():
    m = nn.Sequential(nn.Linear(8, 16), *[_MLPBlock(16) for _ in range(4)], nn.Linear(16, 8))
    r = _explain(m, torch.randn(3, 8))
    # the root Sequential's children 1..4 are the blocks; 0 and 5 are Linear, another class
    assert _groups(r) == [("<root>", "_MLPBlock", 4, ["hidden"])]


def test_explain_report_is_printable_and_json():
    m, kw = ZOO["flux"]()
    r = _explain(m, **kw)
    text = str(r)
    assert "transformer_blocks: 2 x FluxTransformerBlock" in text
    d = json.loads(json.dumps(r.as_dict()))
    assert d["graphs"] == 1 and d["graph_breaks"] == 0 and len(d["groups"]) == 2


class _AfterFirst(nn.Module):
    """Three _MLPBlocks with ``between(x, *extra)`` run after the first (where a test breaks the graph)."""

    def __init__(self, between):
        super().__init__()
        self.blocks = nn.ModuleList(_MLPBlock(8) for _ in range(3))
        self.between = between

    def forward(self, x, *extra):
        x = self.between(self.blocks[0](x), *extra)
        for b in self.blocks[1:]:
            x = b(x)
        return x


def _print_through(x):
    print("host side effect")  # a graph break
    return x


def test_explain_reports_graph_breaks():
    r = _explain(_AfterFirst(_print_through), torch.randn(2, 8))
    assert r.graphs == 2 and r.graph_breaks == 1 and len(r.break_reasons) == 1
    assert _groups(r) == [("blocks", "_MLPBlock", 2, ["hidden"])]


def _breaking(x):
    torch._dynamo.graph_break()
    return x


def test_a_break_repeated_in_every_block_is_printed_once_with_its_count():
    class BlockBreaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(_MLPBlock(8) for _ in range(3))

        def forward(self, x):
            x = _breaking(self.blocks[0](x))  # the same break after every block
            x = _breaking(self.blocks[1](x))
            return _breaking(self.blocks[2](x))

    r = _explain(BlockBreaks(), torch.randn(2, 8))
    k = len(r.break_reasons)
    assert r.graph_breaks >= 2 and k >= 2 and len(set(r.break_reasons)) == 1
    assert str(r).count(f"  break (x{k}): ") == 1 and "  break: " not in str(r)


def _add_nonzero_count(x, valid):
    return x + valid.nonzero().sum()  # nonzero: an output shape Dynamo cannot know


def test_breaks_at_data_dependent_ops_come_with_the_dynamo_flags_that_keep_them():
    x, valid = torch.randn(2, 8), torch.tensor([True, False])
    r = _explain(_AfterFirst(_add_nonzero_count), x, valid)
    assert r.graph_breaks >= 1 and "hint: " in str(r) and "capture_dynamic_output_shape_ops = True" in str(r)
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        r = _explain(_AfterFirst(_add_nonzero_count), x, valid)
    assert r.graph_breaks == 0 and "hint: " not in str(r)
    assert _groups(r) == [("blocks", "_MLPBlock", 3, ["hidden"])]


class _TwoStreamBlock(nn.Module):
    def __init__(self, d, e):
        super().__init__()
        self.h = nn.Linear(d, d)
        self.e = nn.Linear(e, e)
        self.mix = nn.Linear(e, d)

    def forward(self, h, enc, temb):
        h = h + torch.relu(self.h(h)) * temb + self.mix(enc).mean(1, keepdim=True)
        enc = enc + torch.tanh(self.e(enc))
        return h, enc


class _RandomDiT(nn.Module):
    def __init__(self, depth, d, two_streams, tail):
        super().__init__()
        self.two = two_streams
        self.inp = nn.Linear(4, d)
        self.temb = nn.Linear(1, d)
        self.blocks = nn.ModuleList(_TwoStreamBlock(d, 6) if two_streams else _MLPBlock(d)
                                    for _ in range(depth))
        self.tail = nn.ModuleList(nn.Linear(d, d) for _ in range(tail))  # not chained blocks
        self.out = nn.Linear(d, 4)

    def forward(self, x, enc, t):
        h, temb = self.inp(x), self.temb(t.reshape(-1, 1, 1))
        for b in self.blocks:
            h, enc = b(h, enc, temb) if self.two else (b(h), enc)
        return self.out(h + sum(lin(h) for lin in self.tail))


@settings(max_examples=12)
@given(depth=st.integers(2, 7), width=st.sampled_from([4, 12, 24]), two=st.booleans(),
       tail=st.integers(0, 3), batch=st.integers(1, 3), tokens=st.integers(1, 9))
def test_random_block_structured_models_are_discovered_with_the_right_count(depth, width, two, tail, batch, tokens):
    torch._dynamo.reset()
    m = _RandomDiT(depth, width, two, tail).eval()
    x, enc, t = torch.randn(batch, tokens, 4), torch.randn(batch, 3, 6), torch.rand(batch)
    r = _explain(m, x, enc, t)
    streams = ["hidden", "encoder"] if two else ["hidden"]
    got = [(g["name"], g["blocks"]) for g in r.groups]
    assert got == [("blocks", depth)], got
    assert sorted(r.groups[0]["streams"]) == sorted(streams)
    # the parallel Linear heads share a class but do not chain: never a group
    if tail >= 2:
        rejected = [x for g in r.graph_reports for x in g.rejected]
        assert any(x["name"].startswith("tail") and x["reason"] == "not_chained" for x in rejected)


def test_a_lone_block_chained_to_a_group_is_a_group_of_one_and_a_lone_linear_is_not():
    from cdcompile.testing import flux_inputs, tiny_flux

    m = tiny_flux(num_layers=1, num_single_layers=3)
    r = _explain(m, **flux_inputs(m))
    assert _groups(r) == [
        ("transformer_blocks", "FluxTransformerBlock", 1, ["hidden", "encoder"]),
        ("single_transformer_blocks", "FluxSingleTransformerBlock", 3, ["encoder", "hidden"]),
    ]
    double, single = r.groups
    # each output of the lone block is paired with the input of its shape: its exits are the entries
    assert dict(zip(double["streams"], double["stream_exits"])) == dict(
        zip(single["streams"], single["stream_entries"]))
    assert r.graph_reports[0].cache["num_blocks"] == 4

    # A ModuleList of one Linear after the blocks reads the hidden exit and has its shape, but it
    # has no skip connection inside: not a block.
    torch._dynamo.reset()
    r = _explain(_RandomDiT(3, 12, False, 1).eval(), torch.randn(1, 5, 4), torch.randn(1, 3, 6), torch.rand(1))
    assert [(g["name"], g["blocks"]) for g in r.groups] == [("blocks", 3)]


class _Outer(nn.Module):
    """A lone block that holds a lone residual block of its own."""

    def __init__(self, dim):
        super().__init__()
        self.inner = nn.ModuleList([SeqBlock(dim)])
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, temb):
        x = self.inner[0](x, temb)
        return x + self.lin(x)


class _PreBlockDiT(SequentialDiT):
    def __init__(self):
        super().__init__(depth=3)
        self.pre = nn.ModuleList([_Outer(self.proj_in.out_features)])

    def forward(self, x, timestep):
        h = self.proj_in(x)
        temb = self.t_embed(torch.cat([timestep.reshape(-1, 1).float().expand(-1, 16).sin(),
                                       timestep.reshape(-1, 1).float().expand(-1, 16).cos()], -1))
        h = self.pre[0](h, temb)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h)


def test_a_lone_block_inside_a_lone_block_is_part_of_it_not_a_group():
    m = _PreBlockDiT().eval()
    x, t = torch.randn(1, 9, 8), torch.tensor([0.3])
    r = _explain(m, x, t)
    assert [(g["name"], g["blocks"]) for g in r.groups] == [("pre", 1), ("blocks", 3)]
    assert r.graph_reports[0].cache["num_blocks"] == 4
    torch._dynamo.reset()
    c = torch.compile(m, backend="cachedit", options={"compiler": "eager", "residual_diff_threshold": 0.0})
    with torch.no_grad():
        torch.testing.assert_close(c(x, t), m(x, t))


class _RefinerDiT(SequentialDiT):
    """MiniMax-H3-like: one text refiner block, its output concatenated with the image tokens."""

    def __init__(self):
        super().__init__(depth=3)
        d = self.proj_in.out_features
        self.text_in = nn.Linear(6, d)
        self.refiner = nn.ModuleList([SeqBlock(d)])

    def forward(self, x, enc, timestep):
        temb = self.t_embed(torch.cat([timestep.reshape(-1, 1).float().expand(-1, 16).sin(),
                                       timestep.reshape(-1, 1).float().expand(-1, 16).cos()], -1))
        text = self.refiner[0](self.text_in(enc), temb)
        h = torch.cat([text, self.proj_in(x)], dim=1)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h[:, enc.shape[1]:])


def test_a_lone_text_refiner_joined_to_image_tokens_does_not_chain():
    # Its output is only part of the blocks' hidden entry: made the stack's F, the text refiner's
    # residual would decide when to cache.
    r = _explain(_RefinerDiT().eval(), torch.randn(1, 9, 8), torch.randn(1, 4, 6), torch.tensor([0.3]))
    assert [(g["name"], g["blocks"]) for g in r.groups] == [("blocks", 3)]
    assert r.graph_reports[0].cache["num_blocks"] == 3


def test_a_middle_blocks_output_read_after_the_group_is_a_long_skip():
    # The group stands; whether a cache may skip the block writing it is the block cache's call
    # (test_block_cache: test_middle_output_read_after_the_stack_...).
    class Taps(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(_MLPBlock(8) for _ in range(4))

        def forward(self, x):
            feats = []
            for b in self.blocks:
                x = b(x)
                feats.append(x)
            return x + feats[1]

    with pytest.warns(UserWarning, match="x_1, computed in the middle blocks, is read by add_4"):
        r = _explain(Taps(), torch.randn(2, 8))  # explain's default F1 skips block 1: no cache
    assert [(g["name"], g["blocks"], g["streams"]) for g in r.groups] == [("blocks", 4, ["hidden"])]
    assert [x for g in r.graph_reports for x in g.rejected] == []


def test_a_value_inside_a_block_read_after_the_group_is_not_a_group():
    class _Tapped(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc = nn.Linear(d, d)

        def forward(self, x):
            f = torch.tanh(self.fc(x))
            return x + f, f

    class Escapes(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(_Tapped(8) for _ in range(4))

        def forward(self, x):
            feats = []
            for b in self.blocks:
                x, f = b(x)
                feats.append(f)
            return x + feats[1]  # block 1's inner feature, not what it passes on

    r = _explain(Escapes(), torch.randn(2, 8))
    assert r.groups == []
    rejected = [x for g in r.graph_reports for x in g.rejected]
    assert [x["reason"] for x in rejected] == ["escaping_output"]
    assert "of blocks.1 is read by" in rejected[0]["detail"]


class _HintedDiT(SequentialDiT):
    """Wan-VACE-like: a control hint is added to the hidden stream after every even block."""

    def __init__(self, depth=5):
        super().__init__(depth=depth)
        self.hints = nn.Parameter(torch.randn(depth, self.proj_in.out_features))

    def forward(self, x, timestep):
        temb, h = self._embed(x, timestep)
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if i % 2 == 0:
                h = h + 0.5 * self.hints[i]
        return self.proj_out(h)

    def _embed(self, x, timestep):
        half = self.proj_in.out_features // 2
        freqs = torch.exp(-9.21 * torch.arange(half) / half)
        angles = timestep.reshape(-1, 1).float() * 1000 * freqs
        return self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1)), self.proj_in(x)


def test_a_stream_passing_through_glue_between_blocks_is_found_and_cached():
    m = _HintedDiT(depth=5).eval()
    x = torch.randn(2, 10, 8)
    r = _explain(m, x, torch.tensor([0.9, 0.9]))
    assert _groups(r) == [("blocks", "SeqBlock", 5, ["hidden"])]
    assert r.groups[0]["glue_nodes"] > 0

    # F1 B1, always cache after one warm-up step: step 2 must reuse step 1's residual of M
    # (blocks 1-3 and the glue between them), measured from block 0's output.
    torch._dynamo.reset()
    c = torch.compile(m, backend="cachedit", fullgraph=True,
                      options={"compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 1,
                               "Bn_compute_blocks": 1})
    with torch.no_grad():
        t1, t2 = torch.tensor([0.9, 0.9]), torch.tensor([0.8, 0.8])
        torch.testing.assert_close(c(x, t1), m(x, t1))
        temb, h = m._embed(x, t1)
        f_out = m.blocks[0](h, temb)
        mid = f_out + 0.5 * m.hints[0]
        for i in (1, 2, 3):
            mid = m.blocks[i](mid, temb)
            mid = mid + 0.5 * m.hints[i] if i % 2 == 0 else mid
        residual = mid - f_out
        temb, h = m._embed(x, t2)
        expected = m.proj_out(m.blocks[4](m.blocks[0](h, temb) + residual, temb) + 0.5 * m.hints[4])
        got = c(x, t2)
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, m(x, t2), atol=1e-4)  # it did cache


@pytest.mark.parametrize("every,group", [
    (2, ("transformer_layers", "RFD4ProteinaTrunkLayer", 4, ["hidden", "carried"])),
    (1, ("transformer_layers+pair_update_layers", "RFD4ProteinaTrunkLayer+RFD4ProteinaPairUpdate", 4,
         ["hidden", "encoder"])),
])
def test_rfd4_proteinas_pair_representation_is_followed_and_its_trunk_is_cached(every, group):
    # Every trunk layer reads the pairs, which an update module refreshes after every `every`-th
    # layer but the last: after some layers, a carried stream; after all, an interleaved pair.
    m, kw = ZOO["rfd4proteina"](update_pair_repr_every_n=every)
    r = _explain(m, **kw)
    assert _groups(r) == [group]
    (gr,) = r.graph_reports
    assert gr.cache["Mn"] == 3 and gr.cache["streams"] == ["hidden"]  # the pairs do not leave the trunk
    with torch.no_grad():
        expected = m(**kw)[0]
    torch.testing.assert_close(r.output[0], expected)  # a first call computes every block


def test_hunyuandits_long_skips_leave_its_whole_stack_cached():
    # 10 layers: 0..3 push their outputs, 4 and 5 do not, 6..9 (with a skip_linear: a second group)
    # pop them. Every skip is written and read inside M, so a cached step runs block 0 alone.
    m, kw = ZOO["hunyuandit"](num_layers=10)
    r = _explain(m, **kw)
    assert _groups(r) == [("blocks[0..5]", "HunyuanDiTBlock", 6, ["hidden"]),
                          ("blocks[6..9]", "HunyuanDiTBlock", 4, ["hidden"])]
    (gr,) = r.graph_reports
    assert (gr.cache["Fn"], gr.cache["Mn"], gr.cache["Bn"]) == (1, 9, 0)
    with torch.no_grad():
        torch.testing.assert_close(r.output[0], m(**kw)[0])  # a first call computes every block
        outs = {}
        hooks = [m.blocks[i].register_forward_hook(lambda mod, a, out, i=i: outs.__setitem__(i, out)) for i in (0, 9)]
        m(**kw)  # eager, as the compiled first call: block 0's and block 9's outputs
        residual = outs[9] - outs[0]
        kw2 = dict(kw, timestep=kw["timestep"] - 20)
        m(**kw2)  # block 0's output at the second step
        for h in hooks:
            h.remove()
        last = m.blocks[9].register_forward_hook(lambda mod, a, out: outs[0] + residual)
        expected = m(**kw2)[0]  # block 9's output is block 0's plus the residual
        last.remove()
        torch._dynamo.reset()
        c = torch.compile(m, backend="cachedit", fullgraph=True, options={
            "compiler": "eager", "residual_diff_threshold": 1.0, "max_warmup_steps": 1})
        c(**kw)
        got = c(**kw2)[0]
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, m(**kw2)[0], atol=1e-4)  # it did cache


class _SpaceTimeDiT(nn.Module):
    """Latte-like: spatial and temporal blocks from two ModuleLists alternate, with reshapes between."""

    def __init__(self, depth=4, dim=16, frames=3, tokens=5):
        super().__init__()
        torch.manual_seed(0)
        self.frames, self.tokens = frames, tokens
        self.proj_in, self.proj_out = nn.Linear(8, dim), nn.Linear(dim, 8)
        self.t_embed = nn.Linear(1, dim)
        self.spatial = nn.ModuleList(SeqBlock(dim) for _ in range(depth))
        self.temporal = nn.ModuleList(SeqBlock(dim) for _ in range(depth))

    def unit(self, i, h, temb):
        f, s = self.frames, self.tokens
        h = self.spatial[i](h, temb.expand(f, -1))                      # (frames, tokens, dim)
        h = h.permute(1, 0, 2).reshape(s, f, -1)                         # to (tokens, frames, dim)
        h = self.temporal[i](h, temb.expand(s, -1))
        return h.permute(1, 0, 2).reshape(f, s, -1)                      # back

    def forward(self, x, timestep):
        temb, h = self.t_embed(timestep.reshape(1, 1).sin()), self.proj_in(x)
        for i in range(len(self.spatial)):
            h = self.unit(i, h, temb)
        return self.proj_out(h)


def test_interleaved_sibling_block_lists_form_one_group_of_pairs_and_cache():
    m = _SpaceTimeDiT().eval()
    x = torch.randn(3, 5, 8)
    r = _explain(m, x, torch.tensor([0.9]))
    assert [(g["name"], g["blocks"], g["streams"]) for g in r.groups] == [("spatial+temporal", 4, ["hidden"])]

    torch._dynamo.reset()
    c = torch.compile(m, backend="cachedit", fullgraph=True,
                      options={"compiler": "eager", "residual_diff_threshold": 1e9, "max_warmup_steps": 1,
                               "Bn_compute_blocks": 1})
    with torch.no_grad():
        t1, t2 = torch.tensor([0.9]), torch.tensor([0.8])
        torch.testing.assert_close(c(x, t1), m(x, t1))
        temb, h = m.t_embed(t1.reshape(1, 1).sin()), m.proj_in(x)
        f_out = m.unit(0, h, temb)
        residual = m.unit(2, m.unit(1, f_out, temb), temb) - f_out
        temb, h = m.t_embed(t2.reshape(1, 1).sin()), m.proj_in(x)
        expected = m.proj_out(m.unit(3, m.unit(0, h, temb) + residual, temb))
        got = c(x, t2)
        torch.testing.assert_close(got, expected)
        assert not torch.allclose(got, m(x, t2), atol=1e-4)  # it did cache


def test_size_checks_dynamo_emits_in_some_blocks_only_are_not_part_of_the_signature():
    # Under capture_scalar_outputs HunyuanVideo Framepack splits its tokens by data-dependent sizes;
    # Dynamo puts the asserts on those sizes where each is first needed, so the last single block
    # holds two more than its siblings, and a block's internal sizes are read by those checks.
    m, kw = ZOO["hunyuanvideoframepack"]()
    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        r = _explain(m, **kw)
    assert (r.graphs, r.graph_breaks) == (1, 0)
    assert [(name, n) for name, _, n, _ in _groups(r)] == [("transformer_blocks", 2), ("single_transformer_blocks", 3)]
    # the single blocks' hidden stream leaves with an unbacked length: the compute branch checks it
    (gr,) = r.graph_reports
    assert gr.cache is not None, gr.not_cached
    assert [c.split(":")[0] for c in gr.cache["runtime_size_checks"]] == ["hidden dim 1"]
    assert gr.cache["runtime_size_checks"][0].endswith(" == 69")
    assert "runtime size checks (compute branch, torch._check): hidden dim 1: u" in str(r)


def test_explain_counts_branch_operands_and_points_at_the_per_call_checks_when_they_are_many():
    x, t = torch.randn(1, 10, 8), torch.tensor([0.5])
    small = str(_explain(SequentialDiT(depth=3), x, t))
    assert "branch operands" in small and "per-call work" not in small
    big = _explain(SequentialDiT(depth=24), x, t)  # 23 middle blocks, 10 weights each
    (gr,) = big.graph_reports
    assert gr.cache["branch_operands"] >= 230
    assert "per-call work" in str(big) and "size_asserts=False" in str(big)
    with torch.no_grad():  # the asserts already dropped: no advice
        done = cdcompile.explain(SequentialDiT(depth=24), x, t, options={"size_asserts": False})
    assert "branch operands" in str(done) and "per-call work" not in str(done)


class _NamedBlocksDiT(SequentialDiT):
    """SequentialDiT with its blocks kept under names: in an ``nn.ModuleDict`` whose keys do not sort
    in the order the blocks run, or as attributes of the model. ``order`` is the order they run in."""

    def __init__(self, kind: str, depth: int = 5):
        super().__init__(depth=depth)
        blocks = list(self.blocks)
        del self.blocks
        self.names = ["in_", "down", "mid", "up", "out", "tail"][:depth]
        if kind == "dict":
            self.blocks = nn.ModuleDict(dict(zip(self.names, blocks)))
        else:
            for name, b in zip(self.names, blocks):
                setattr(self, f"{name}_block", b)
        self.kind = kind

    def ordered(self):
        if self.kind == "dict":
            return list(self.blocks.values())
        return [getattr(self, f"{name}_block") for name in self.names]

    def forward(self, x, timestep):
        half = self.proj_in.out_features // 2
        angles = timestep.reshape(-1, 1).float() * 1000 * torch.exp(-9.21 * torch.arange(half) / half)
        temb = self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1))
        h = self.proj_in(x)
        for block in self.ordered():
            h = block(h, temb)
        return self.proj_out(h)


@pytest.mark.parametrize("kind,name,first", [("dict", "blocks", "blocks.in_"), ("attr", "<root>", "in__block")])
def test_blocks_kept_under_names_are_found_in_the_order_they_run_and_cached(kind, name, first):
    from dbcache_reference import RefCache, RefConfig, cache_blocks, sequential_temb

    m = _NamedBlocksDiT(kind).eval()
    x, t = torch.randn(2, 10, 8), torch.tensor([0.9, 0.9])
    r = _explain(m, x, t)
    assert _groups(r) == [(name, "SeqBlock", 5, ["hidden"])]
    assert r.graph_reports[0].cache["num_blocks"] == 5
    # the path of each block is its name, in the order the blocks run (not sorted: "down" < "in_")
    torch._dynamo.reset()
    gm_paths = []

    def record(gm, example_inputs):
        from cdcompile.passes.discover import find_block_groups
        gm_paths.append([b.path for b in find_block_groups(gm, example_inputs).groups[0].blocks])
        return gm

    torch.compile(m, backend=record)(x, t)
    prefix = "blocks." if kind == "dict" else ""
    suffix = "" if kind == "dict" else "_block"
    assert gm_paths == [[f"{prefix}{n}{suffix}" for n in m.names]] and gm_paths[0][0] == first

    cfg = RefConfig(threshold=0.3, warmup=2)
    torch._dynamo.reset()
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "eager", "residual_diff_threshold": cfg.threshold, "max_warmup_steps": cfg.warmup})
    ref = RefCache(cfg)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(2, 10, 8, generator=g)
    with torch.no_grad():
        for s in range(8):
            xs, ts = x + 0.02 * s * d, torch.full((2,), 1.0 - s / 8)
            temb = sequential_temb(m, xs, ts)
            expected = m.proj_out(cache_blocks(ref, m.ordered(), m.proj_in(xs), lambda b, h: b(h, temb), s))
            torch.testing.assert_close(c(xs, ts), expected, rtol=1e-4, atol=1e-5)
    cached = cdcompile.summary(c).as_dict()["requests"][-1]["slots"][0]["cached_steps"]
    assert cached == [s for s, _, hit in ref.decisions if hit] and cached  # it did cache


class _Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))


class _NamedPartsDiT(SequentialDiT):
    """Two attentions of one class under names, as a block's ``attn1`` and ``attn2``: with their
    residuals added outside them (``outside``), or run one into the other with none."""

    def __init__(self, outside: bool):
        super().__init__(depth=2)
        dim = self.proj_in.out_features
        self.attn1, self.attn2 = _Attention(dim), _Attention(dim)
        self.outside = outside

    def forward(self, x, timestep):
        h = self.proj_in(x) + timestep[:, None, None]
        if self.outside:
            h = h + self.attn1(h)
            h = h + self.attn2(torch.nn.functional.layer_norm(h, h.shape[-1:]))
        else:
            h = self.attn2(torch.nn.functional.gelu(self.attn1(h)))
        return self.proj_out(h)


@pytest.mark.parametrize("outside,detail", [
    (True, "no block reads what the previous one returns; each reads h as glue between them updates it"),
    (False, "attn1 passes linear_2 on, which adds nothing to what it read (no skip connection)"),
])
def test_named_parts_of_a_block_are_no_group_and_explain_says_why(outside, detail):
    r = _explain(_NamedPartsDiT(outside).eval(), torch.randn(2, 10, 8), torch.tensor([0.5, 0.5]))
    assert r.groups == []
    rejected = r.graph_reports[0].rejected
    assert [(x["name"], x["reason"]) for x in rejected] == [("attn1..attn2", "not_chained")]
    assert detail in rejected[0]["detail"]


def test_sibling_modules_of_one_class_outside_the_blocks_add_nothing_to_a_model_with_groups():
    # FLUX's guidance and timestep embedders are siblings of one class (TimestepEmbedding), neither a
    # block: they leave the groups and the explanation as they were.
    from diffusers import FluxTransformer2DModel

    from cdcompile.testing import flux_inputs

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                               pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True).eval()
    r = _explain(m, **flux_inputs(m), guidance=torch.full((1,), 3.5))
    assert [g["name"] for g in r.groups] == ["transformer_blocks", "single_transformer_blocks"]
    assert r.graph_reports[0].rejected == []


class _OrderedDiT(SequentialDiT):
    """SequentialDiT running its ModuleList in another order than its indices."""

    def __init__(self, order: list[int]):
        super().__init__(depth=5)
        self.order = order

    def forward(self, x, timestep):
        half = self.proj_in.out_features // 2
        angles = timestep.reshape(-1, 1).float() * 1000 * torch.exp(-9.21 * torch.arange(half) / half)
        temb = self.t_embed(torch.cat([angles.cos(), angles.sin()], dim=-1))
        h = self.proj_in(x)
        for i in self.order:
            h = self.blocks[i](h, temb)
        return self.proj_out(h)


@pytest.mark.parametrize("order", [[4, 3, 2, 1, 0], [0, 1, 3, 4]], ids=["reversed", "skipping_a_layer"])
def test_numbered_blocks_run_out_of_index_order_are_one_group_in_the_order_they_run(order):
    from dbcache_reference import RefCache, RefConfig, cache_blocks, sequential_temb

    m = _OrderedDiT(order).eval()
    x = torch.randn(2, 10, 8)
    r = _explain(m, x, torch.tensor([0.9, 0.9]))
    assert _groups(r) == [("blocks", "SeqBlock", len(order), ["hidden"])]

    cfg = RefConfig(Fn=1, Bn=1, threshold=0.3, warmup=2)
    torch._dynamo.reset()
    c = torch.compile(m, backend="cachedit", fullgraph=True, options={
        "compiler": "eager", "Bn_compute_blocks": 1, "residual_diff_threshold": cfg.threshold,
        "max_warmup_steps": cfg.warmup})
    ref = RefCache(cfg)
    d = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(1))
    blocks = [m.blocks[i] for i in order]
    with torch.no_grad():
        for s in range(8):
            xs, ts = x + 0.02 * s * d, torch.full((2,), 1.0 - s / 8)
            temb = sequential_temb(m, xs, ts)
            expected = m.proj_out(cache_blocks(ref, blocks, m.proj_in(xs), lambda b, h: b(h, temb), s))
            torch.testing.assert_close(c(xs, ts), expected, rtol=1e-4, atol=1e-5)
    cached = cdcompile.summary(c).as_dict()["requests"][-1]["slots"][0]["cached_steps"]
    assert cached == [s for s, _, hit in ref.decisions if hit] and cached


def test_explain_states_the_guards_rule_with_cache_dits_options():
    m, kw = ZOO["flux"]()
    opts = {"compiler": "eager", "downsample_factor": 2, "important_condition_threshold": 0.1,
            "max_accumulated_residual_diff_threshold": 0.5, "max_cached_steps": 10, "calibrator": "taylorseer",
            "force_refresh_step_hint": 14, "cfg_diff_compute_separate": False}
    text = str(cdcompile.explain(m, options=opts, **kw))
    assert ("  block cache guard: cache when mean|R - R_anchor| / mean|R_anchor| of F's residual < 0.08; on one "
            "channel in 2; over the tokens that changed by more than 0.1; after warmup steps range(0, 8, 1); at "
            "most 10 cached steps; while the request's summed diffs stay below 0.5; starting afresh at step 14; "
            "a step's later calls taking its first call's diff; forecast by taylorseer (order 1)") in text
    text = str(cdcompile.explain(m, options={"compiler": "eager", "cache_type": "dbprune", "force_refresh_step_hint": 7,
                                             "force_refresh_step_policy": "repeat"}, **kw))
    assert "  block cache guard: prune a block when mean|H - H_anchor| / mean|H_anchor| of its input" in text
    assert "; starting afresh every 7 steps" in text
    rule = cdcompile.CacheConfig(calibrator="foca", foca_slope="step").guard_rule()
    assert rule.endswith("; forecast by foca (slope per step)")
    rule = cdcompile.CacheConfig(calibrator="dmd", dmd_rank=2, dmd_fallback="taylorseer").guard_rule()
    assert rule.endswith("; forecast by dmd (history 6, rank 2, TaylorSeer-1 fallback; its fit on the host)")
