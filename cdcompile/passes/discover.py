"""Find the repeated transformer blocks of a Dynamo graph (analysis only; nothing is rewritten).

Algorithm:
1. Membership. Every non-placeholder node's ``nn_module_stack`` is normalised
   (``transformer_blocks.0.attn``); each stack entry whose last path component is an integer makes
   the node a member of block ``(container, index)``, e.g. ``("transformer_blocks", 0)``. A block
   the forward runs again (a loop through the same blocks, RFD4 Proteina's recycling) is one unit
   per call (``blocks.0@1``), Dynamo's stack keys telling the calls apart (:func:`_membership`).
2. Candidates. Per container, modules that run one after another (in any index order: a
   reversed loop, or one that skips a layer) and share a class form a run. Each
   block's op signature is the sequence of what its nodes compute (``linear``, ``.chunk``, ...).
   The majority signature is the group's; a block matches if its signature equals it or is a
   subsequence of it (Dynamo dead-code-eliminates a last block's unused output, so the last
   FLUX single block lacks a slice). A mismatching block splits the run.
3. Outermost only. Candidates are taken shallowest container first; one lying inside a block of
   an accepted group (``ff.net`` inside ``transformer_blocks.0``) is dropped.
4. Dataflow. For consecutive blocks i, i+1, the values block i+1 reads from block i are the
   *streams*; a stream is identified by the offset of its producing op in the signature, so it is
   the same stream in every block. A stream may pass through *glue* between two blocks: ops
   outside any block, between them in the graph, computed from one value of block i (a control
   hint added, per-layer features spliced in); the glue is part of the stream's way from block i
   to block i+1 (the block cache's residual absorbs it). Block 0 reads the stream's *entry* at the
   same consumer positions; each block's stream output is the node at the producer offset. A value
   every block reads at the same positions but no block returns, which glue between blocks i and
   i+1 may replace by one computed from what block i read there, is a *carried* stream (RFD4
   Proteina's pair representation, refreshed after every k-th layer): its value as block i ends is
   the one block i read, and the glue updating it lies in the gap. Values every block reads and
   that are defined before the group are *side inputs* (temb, rotary tables, masks,
   Wan's read-only encoder states). A stream output of any block may also be read after the group:
   a *long skip* (HunyuanDiT's first half hands each block's hidden state to a block of its second
   half, a group of its own); whether a cache region may take in its writer is the block cache's
   question. Any other block output used outside the group other than by the next block, a value
   flowing between non-adjacent blocks of one group, or blocks that do not chain at all make the
   candidate ineligible, with the reason recorded.
5. Interleaved siblings. Two sibling containers with the same indices whose blocks alternate
   (Latte: ``transformer_blocks.i``, then ``temporal_transformer_blocks.i``) and that do not
   chain on their own form one group ``a+b`` whose block i is ``a.i``, the ops up to ``b.i``,
   ``b.i``, and the ops after it computed from the pair (the reshape back to the stream's layout).
   ``b`` may lack ``a``'s last index (RFD4 Proteina updating its pairs after every layer but the
   last): the last unit is ``a``'s block alone, a subsequence of the others' signature.
6. Lone blocks. A module list holding one block (FLUX built with one double block), not itself
   inside an indexed module, is a group of one when it chains directly to a group on the hidden
   stream, before or after it: the group's hidden entry is made of the block's outputs alone
   (through layout ops), or one of the block's entries is made of the group's exits alone. With no
   sibling to compare, each output read outside the block is paired with the one input of the
   same shape and dtype it is computed from, through a skip connection (an add whose one operand
   is that input moved by layout ops only). A lone Linear or norm has no skip: not a block.
7. Blocks under names. Where no numbered group holds or lies inside them, sibling modules of one
   class kept under names (an ``nn.ModuleDict``, or attributes ``self.block0``, ``self.block1``)
   that hold modules of their own are numbered in the order they run and analysed as above; each
   must add what it computes to its entry (a skip connection), which tells blocks from the parts
   of one (``attn1``, ``attn2``). See :func:`_named_groups`.
8. Names. A group is named by its container; where one container holds several groups (a
   signature change splits it: HunyuanDiT's blocks without, then with, a skip input), by its
   container and first and last index, ``blocks[0..20]``.
9. Labels. The stream whose exit reaches the graph output is ``hidden``; where several do, a
   stream feeding a later group's hidden entry inherits its label; else the longest token
   dimension wins. With two streams the other is ``encoder``. A carried stream is ``carried``.

Before/after: the graph is unchanged; the result is a list of :class:`BlockGroup`::

    x_embedder -> [blocks.0 -> blocks.1 -> ... -> blocks.N-1] -> proj_out
                   ^ entry    streams: hidden, encoder   ^ exit
                   side inputs read by all: temb, rotary
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import re
from typing import Iterable

import torch.fx as fx

from . import _fx

_INDEXED = re.compile(r"^(?:(.*)\.)?(\d+)$")


class Ineligible(str, enum.Enum):
    """Why a set of sibling modules is not a cacheable block group."""

    NO_REPEATED_BLOCKS = "no_repeated_blocks"
    SIGNATURE_MISMATCH = "signature_mismatch"
    NOT_CHAINED = "not_chained"
    INCONSISTENT_STREAMS = "inconsistent_streams"
    ESCAPING_OUTPUT = "escaping_output"
    SKIP_CONNECTION = "skip_connection"


@dataclasses.dataclass
class Block:
    index: int
    path: str
    nodes: list[fx.Node]  # graph order; placeholders (weights) excluded
    # signature offset (in the group's majority signature) of each node
    offsets: list[int]

    def node_at(self, offset: int) -> fx.Node | None:
        for n, o in zip(self.nodes, self.offsets):
            if o == offset:
                return n
        return None


@dataclasses.dataclass
class Stream:
    label: str
    producer_offset: int | None  # None: a carried stream, which no block returns
    entry: fx.Node  # value block 0 reads
    # per block, the stream's value as that block ends; None where dead-code-eliminated. A carried
    # stream's value as block i ends is the one block i read (glue after it makes the next one).
    outputs: list[fx.Node | None]

    @property
    def exit(self) -> fx.Node | None:
        return self.outputs[-1]


@dataclasses.dataclass
class BlockGroup:
    name: str
    block_class: str
    blocks: list[Block]
    streams: list[Stream]
    side_inputs: list[fx.Node]
    per_block_inputs: list[list[fx.Node]]  # read by one block only, defined before the group
    glue: list[fx.Node]  # non-block nodes lying between the group's first and last node

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def stream(self, label: str) -> Stream | None:
        return next((s for s in self.streams if s.label == label), None)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "block_class": self.block_class,
            "blocks": self.num_blocks,
            "paths": [b.path for b in self.blocks],  # in the order they run; ``@k``: the k-th later call
            "streams": [s.label for s in self.streams],
            "stream_entries": [s.entry.name for s in self.streams],
            "stream_exits": [s.exit.name if s.exit is not None else None for s in self.streams],
            "side_inputs": [n.name for n in self.side_inputs],
            "ops_per_block": len(self.blocks[0].nodes),
            "glue_nodes": len(self.glue),
        }


@dataclasses.dataclass
class Rejection:
    name: str
    reason: Ineligible
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason.value, "detail": self.detail}


@dataclasses.dataclass
class Discovery:
    groups: list[BlockGroup]
    rejected: list[Rejection]


def find_block_groups(gm: fx.GraphModule, example_inputs: Iterable[object] | None = None) -> Discovery:
    """Find the repeated block groups of ``gm`` (see the module docstring)."""
    weights = _fx.weight_placeholders(gm, example_inputs)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}

    members, classes, repeats = _membership(nodes)

    by_container: dict[str, list[int]] = collections.defaultdict(list)
    for container, idx in members:
        by_container[container].append(idx)

    groups: list[BlockGroup] = []
    rejected: list[Rejection] = []
    accepted_paths: list[str] = []
    for container in sorted(by_container, key=lambda c: (c.count(".") if c else -1, c)):
        if any(_inside(container, p) for p in accepted_paths):
            continue
        ran = sorted(by_container[container], key=lambda i: position[members[(container, i)][0]])
        paths = repeats.get(container)  # blocks called more than once: one unit per call
        for run in _same_class_runs(container, ran, classes):
            for sub in _signature_runs(container, run, members, rejected, paths=paths):
                group = _analyse(container, sub, members, classes, weights, position, rejected, paths)
                if group is not None:
                    groups.append(group)
                    accepted_paths.extend(b.path for b in group.blocks)
    # Interleaved siblings (Latte: spatial 0, temporal 0, spatial 1, ...): neither container chains
    # on its own; block i of the pair is a.i, the glue after it, and b.i.
    for a, b in _interleaved_pairs(by_container, members, position):
        paths = [f"{c}.{i}" for c in (a, b) for i in by_container[a]]
        if any(g.name in (a, b) for g in groups):
            continue
        name = f"{a}+{b}"
        idx_list = sorted(by_container[a])
        for k, idx in enumerate(idx_list):
            last_of = (b, idx) if (b, idx) in classes else (a, idx)  # b may lack a's last index
            lo, hi = position[members[(a, idx)][0]], position[members[last_of][-1]]
            members[(name, idx)] = [n for n in nodes if lo <= position[n] <= hi]
            classes[(name, idx)] = f"{classes[(a, idx)]}+{classes[(b, idx_list[0])]}"
            # The glue after b.i (Latte's reshape back to the spatial layout) belongs to unit i, so
            # that a unit maps the stream's layout to itself; the last unit takes the same glue.
            end = position[members[(a, idx_list[k + 1])][0]] if k + 1 < len(idx_list) else len(position)
            unit = set(members[(name, idx)])
            after = []
            for n in nodes:
                if hi < position[n] < end and any(x in unit for x in n.all_input_nodes):
                    unit.add(n)
                    after.append(n)
            if k + 1 == len(idx_list):  # the last unit: only glue shaped like the previous unit's
                after = after[:len(tail)] if tail and _signature(after[:len(tail)]) == _signature(tail) else []
            tail = after
            members[(name, idx)] += tail
        for run in _same_class_runs(name, sorted(by_container[a]), classes):
            for sub in _signature_runs(name, run, members, rejected):
                group = _analyse(name, sub, members, classes, weights, position, rejected)
                if group is not None:
                    groups[:] = [g for g in groups if not any(_inside(g.name, p) for p in paths)]
                    groups.append(group)
    named, named_rejected = _named_groups(nodes, groups, weights, position)
    groups += named
    groups.sort(key=lambda g: position[g.blocks[0].nodes[0]])
    _label_streams(gm, groups)
    lone = _lone_blocks(by_container, members, classes, groups, weights, position)
    if lone:
        groups = sorted(groups + lone, key=lambda g: position[g.blocks[0].nodes[0]])
        _label_streams(gm, groups)
    # One container split into groups (HunyuanDiT's blocks without, then with, a skip input): the
    # names say which blocks each holds.
    counts = collections.Counter(g.name for g in groups)
    for g in groups:
        if counts[g.name] > 1:
            g.name = f"{g.name}[{g.blocks[0].index}..{g.blocks[-1].index}]"
    if not groups:  # why blocks kept under names are no group, said only where nothing was found
        rejected += named_rejected
    if not groups and not rejected:
        rejected.append(Rejection("<graph>", Ineligible.NO_REPEATED_BLOCKS,
                                  "no two sibling modules of the same class run in sequence"))
    return Discovery(groups, rejected)


def _named_groups(nodes, groups, weights, position) -> tuple[list[BlockGroup], list[Rejection]]:
    """Blocks kept under names, not numbers: an ``nn.ModuleDict`` (``blocks.layer_a``) or attributes
    (``self.block0``, ``self.block1``). Sibling modules of one class, each holding modules of its
    own, run one after another: their order is the order they run in, and a run of them is
    analysed like a module list. Names also tell apart parts of one block (``attn1``, ``attn2``),
    so a block under a name must be a residual function of each stream it passes on (an add of
    its entry, moved by layout ops only, to something it computes, as a lone block must): an
    attention module whose residual is added outside it is no block. Modules inside a numbered
    module that ran (a block, or a part of one), or holding or inside a group found already, are
    not considered; a numbered container that never runs itself (``groups.0``, a ModuleDict in a
    ModuleList) is no block.

    Returns the groups and, separately, why the other candidates are none (said only where the
    graph has no group at all: elsewhere two sibling embedders of one class are no news)."""
    members: dict[tuple[str, str], list[fx.Node]] = collections.defaultdict(list)
    classes: dict[tuple[str, str], str] = {}
    paths: set[str] = set()
    for n in nodes:
        if _fx.is_shape_bookkeeping(n):
            continue
        for path, cls in _fx.module_stack(n):
            paths.add(path)
    numbered = {p for p in paths if _INDEXED.match(p)}  # numbered modules that ran: blocks, or parts

    def in_numbered(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:k]) in numbered for k in range(1, len(parts) + 1))

    holders = {p.rpartition(".")[0] for p in paths}  # modules that hold a module that ran
    for n in nodes:
        if _fx.is_shape_bookkeeping(n):
            continue
        for call, path, cls in _own_calls(n):
            if not path or in_numbered(path):
                continue
            parent, _, child = path.rpartition(".")
            if call:  # run again by the forward: a unit per call, as numbered blocks
                child = f"{child}@{call}"
            if not members[(parent, child)] or members[(parent, child)][-1] is not n:
                members[(parent, child)].append(n)
            classes.setdefault((parent, child), _fx.class_name(cls))
    taken = [b.path for g in groups for b in g.blocks]

    def candidate(key):
        child = key[1].partition("@")[0]
        path = f"{key[0]}.{child}" if key[0] else child
        return path in holders and not any(_inside(path, p) or _inside(p, path) for p in taken)

    by_parent: dict[str, list[str]] = collections.defaultdict(list)
    for parent, child in members:
        if candidate((parent, child)):
            by_parent[parent].append(child)
    found: list[BlockGroup] = []
    rejected: list[Rejection] = []
    for parent in sorted(by_parent, key=lambda c: (c.count(".") if c else -1, c)):
        children = sorted(by_parent[parent], key=lambda c: position[members[(parent, c)][0]])
        if len(children) < 2 or any(_inside(parent, b.path) for g in found for b in g.blocks):
            continue
        ordinal = {(parent, k): members[(parent, c)] for k, c in enumerate(children)}
        kinds = {(parent, k): classes[(parent, c)] for k, c in enumerate(children)}
        block_paths = {(parent, k): f"{parent}.{c}" if parent else c for k, c in enumerate(children)}
        for run in _same_class_runs(parent, list(range(len(children))), kinds):
            for sub in _signature_runs(parent, run, ordinal, rejected, paths=block_paths):
                group = _analyse(parent, sub, ordinal, kinds, weights, position, rejected, block_paths)
                if group is None:
                    continue
                not_residual = _not_residual(group, weights)
                if not_residual is not None:
                    label = f"{group.blocks[0].path}..{group.blocks[-1].path.rpartition('.')[2]}"
                    rejected.append(Rejection(label, Ineligible.NOT_CHAINED, not_residual))
                    continue
                found.append(group)
    return found, rejected


def _not_residual(group: BlockGroup, weights) -> str | None:
    """Why a block of ``group`` is not a residual function of a stream it passes on, or None."""
    for i, b in enumerate(group.blocks):
        block = set(b.nodes)
        inputs = _external_inputs(b.nodes, weights)
        for s in group.streams:
            out = s.outputs[i]
            if s.producer_offset is None or out is None:
                continue
            path, todo = {out}, [out]
            while todo:  # what ``out`` is computed from inside the block
                for a in todo.pop().all_input_nodes:
                    if a in block and a not in path:
                        path.add(a)
                        todo.append(a)
            if not any(_skips(a, out, path, block) for a in inputs):
                return (f"{b.path} passes {out.name} on, which adds nothing to what it read "
                        "(no skip connection): a part of a block, not a block")
    return None


def _lone_blocks(by_container, members, classes, groups, weights, position) -> list[BlockGroup]:
    """Groups of one: a module list holding a single block that chains to a group on its hidden stream.

    FLUX built with one double block is ``transformer_blocks.0`` then the single blocks; cache-dit
    and reference/algorithms.md count that block in the stack (it is F). A lone block has no
    sibling to say which of its inputs each output continues, so a stream pairs an output read
    outside the block with the one input of the same shape and dtype it is computed from; any
    ambiguity (two such inputs), or an output with no skip connection from its input (a lone
    Linear), leaves the block out. The chain must be direct, with the group right after or right
    before the block (see the comment at ``chained``).
    """
    taken = [b.path for g in groups for b in g.blocks]
    spans = sorted((position[g.blocks[0].nodes[0]], position[g.blocks[-1].nodes[-1]], g) for g in groups)
    out = []
    for container, indices in by_container.items():
        if len(indices) != 1:
            continue
        if any(part.isdigit() for part in container.split(".")):  # inside an indexed module
            continue
        idx = indices[0]
        path = f"{container}.{idx}" if container else str(idx)
        if any(_inside(container, p) or _inside(p, path) for p in taken):
            continue
        nodes = members[(container, idx)]
        first, last = position[nodes[0]], position[nodes[-1]]
        if any(lo <= last and first <= hi for lo, hi, _ in spans):  # overlaps a group
            continue
        before = next((g for lo, _, g in spans if lo > last), None)
        after = next((g for _, hi, g in reversed(spans) if hi < first), None)
        streams = _lone_streams(nodes, weights)
        if streams is None:
            continue
        outputs = {o for o, _ in streams}
        entries = {a for _, a in streams}
        h_next = before.stream("hidden") if before is not None else None
        h_prev = after.stream("hidden") if after is not None else None
        # Direct: the next group's hidden entry is made of this block's outputs alone (moved by
        # layout ops: FLUX's joint sequence), or one of this block's entries is made of the previous
        # group's exits alone. A text refiner whose output is concatenated with image tokens from
        # elsewhere (MiniMax H3) does not chain: its residual would make the decision.
        exits = {s.exit for s in after.streams} - {None} if after is not None else set()
        chained = (h_next is not None and _layout_sources(h_next.entry) <= outputs) or (
            h_prev is not None and h_prev.exit is not None
            and any(h_prev.exit in src and src <= exits for src in map(_layout_sources, entries)))
        if not chained:
            continue
        node_set = set(nodes)
        side = sorted(set(_external_inputs(nodes, weights)) - entries, key=position.__getitem__)
        offsets = list(range(len(nodes)))
        graph_nodes = list(nodes[0].graph.nodes)
        out.append(BlockGroup(
            name=container or "<root>", block_class=classes[(container, idx)],
            blocks=[Block(idx, path, nodes, offsets)],
            streams=[Stream(f"stream{k}", nodes.index(o), a, [o]) for k, (o, a) in enumerate(streams)],
            side_inputs=side, per_block_inputs=[[]],
            glue=[n for n in graph_nodes[first:last + 1] if n not in node_set]))
    return out


def _lone_streams(nodes: list[fx.Node], weights) -> list[tuple[fx.Node, fx.Node]] | None:
    """(output, entry) per value a lone block passes on, or None when a pairing is not unique."""
    node_set = set(nodes)
    inputs = _external_inputs(nodes, weights)
    pairs = []
    for o in nodes:
        if not any(u not in node_set and not _fx.is_shape_bookkeeping(u) for u in o.users):
            continue
        ov = _fx.fake_value(o)
        up = _fx.ancestors(o)
        same = [a for a in inputs if a in up and _fx.same_meta(_fx.fake_value(a), ov)]
        if len(same) != 1 or not _skips(same[0], o, up | {o}, node_set):
            return None
        pairs.append((o, same[0]))
    if not pairs or len({a for _, a in pairs}) != len(pairs):
        return None
    return pairs


def _external_inputs(nodes: list[fx.Node], weights) -> list[fx.Node]:
    """The values ``nodes`` read from outside themselves, weights and attributes left out."""
    node_set = set(nodes)
    return list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes
                              if a not in node_set and a.op != "get_attr"
                              and not (a.op == "placeholder" and a in weights)))


# Ops that move or reshape a value without computing on it: a skip connection may pass through them
# (FLUX's single block concatenates text and image tokens, adds its residual, and slices them apart).
_LAYOUT = frozenset({"cat", "concat", "getitem", "view", "reshape", "flatten", "unflatten", "permute",
                     "transpose", "contiguous", "clone", "to", "type", "float", "half", "bfloat16",
                     "split", "chunk", "narrow", "squeeze", "unsqueeze", "expand"})
_ADD = frozenset({"add", "iadd", "sub"})


def _is_layout(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and _fx.target_name(n).lstrip(".") in _LAYOUT


def _skips(entry: fx.Node, out: fx.Node, path: set[fx.Node], block: set[fx.Node]) -> bool:
    """Whether ``out`` is ``entry`` plus something: on the way from ``entry`` to ``out`` there is an
    add whose one operand is ``entry`` moved by layout ops only (a skip connection), and whose
    other operand is computed. A lone Linear or norm has none, so it is no block."""
    carried, todo = {entry}, [entry]
    while todo:
        for u in todo.pop().users:
            if u in block and u in path and u not in carried and _is_layout(u):
                carried.add(u)
                todo.append(u)
    for n in path & block:
        if _fx.target_name(n).lstrip(".").lstrip("_") in _ADD:
            ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
            if len(ops) == 2 and (ops[0] in carried) != (ops[1] in carried):
                return True
    return False


def _layout_sources(value: fx.Node) -> set[fx.Node]:
    """The values ``value`` is made of by layout ops alone (itself if it is computed)."""
    out, todo, seen = set(), [value], set()
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if _is_layout(x):
            todo.extend(a for a in x.all_input_nodes if not _fx.is_shape_bookkeeping(a))
        else:
            out.add(x)
    return out


def _interleaved_pairs(by_container, members, position) -> list[tuple[str, str]]:
    """Sibling containers whose blocks alternate a.0 < b.0 < a.1 < ...: with the same indices, or
    with b lacking a's last (an update module after every block but the last)."""
    out = []
    names = sorted(by_container)
    for a in names:
        for b in names:
            if a == b or a.rpartition(".")[0] != b.rpartition(".")[0]:
                continue
            idx, idx_b = sorted(by_container[a]), sorted(by_container[b])
            if idx_b not in (idx, idx[:-1]) or len(idx) < 2:
                continue
            spans = [(position[members[(c, i)][0]], position[members[(c, i)][-1]])
                     for i in idx for c in (a, b) if i in idx_b or c == a]
            if all(spans[k][1] < spans[k + 1][0] for k in range(len(spans) - 1)):
                out.append((a, b))
    return out


def _membership(nodes: list[fx.Node]):
    """Which nodes each numbered module computes: ``(members, classes, repeats)``.

    ``members[(container, index)]`` lists the nodes in graph order and ``classes`` names the
    module's class. A module that runs more than once in the forward (a loop that passes through
    the same blocks again, sharing their weights) is one unit per call: Dynamo tells the calls
    apart in ``nn_module_stack`` (the key of the k-th later call ends in ``@k``), and the call ``k``
    of block ``i`` gets the index ``k * (largest index + 1) + i``; ``repeats[container]`` then gives
    every unit of that container its path (``blocks.0``, ..., ``blocks.0@1``)."""
    calls: dict[tuple[str, int, int], list[fx.Node]] = collections.defaultdict(list)
    kinds: dict[tuple[str, int], str] = {}
    for n in nodes:
        if _fx.is_shape_bookkeeping(n):
            continue
        for call, path, cls in _own_calls(n):
            m = _INDEXED.match(path)
            if m is None:
                continue
            unit = (m.group(1) or "", int(m.group(2)), call)
            if not calls[unit] or calls[unit][-1] is not n:
                calls[unit].append(n)
            kinds.setdefault(unit[:2], _fx.class_name(cls))
    width = collections.defaultdict(int)
    repeated = set()
    for container, idx, call in calls:
        width[container] = max(width[container], idx + 1)
        if call:
            repeated.add(container)
    members: dict[tuple[str, int], list[fx.Node]] = collections.defaultdict(list)
    classes: dict[tuple[str, int], str] = {}
    repeats: dict[str, dict[tuple[str, int], str]] = {c: {} for c in repeated}
    for (container, idx, call), ns in calls.items():
        if container not in repeated:
            call = 0  # calls of a container's modules taken together: as before
        key = (container, call * width[container] + idx)
        members[key].extend(ns)
        classes[key] = kinds[(container, idx)]
        if container in repeated:
            base = f"{container}.{idx}" if container else str(idx)
            repeats[container][key] = f"{base}@{call}" if call else base
    return members, classes, repeats


def _own_calls(node: fx.Node) -> list[tuple[int, str, type | str]]:
    """The node's module stack as ``[(call, path, class), ...]``, outermost first: ``call`` is
    which call of the module the node is in (Dynamo keys the k-th later call of a module instance
    ``<id>@k``), counted only where every enclosing module runs its first call. A module inside a
    block the forward runs again runs again with it: its calls are the block's, not its own."""
    out, first = [], True
    for key, path, cls in _fx.module_stack_entries(node):
        _, at, k = key.rpartition("@")
        call = int(k) if at and k.isdigit() else 0
        out.append((call if first else 0, path, cls))
        first = first and call == 0
    return out


def _inside(container: str, block_path: str) -> bool:
    return container == block_path or container.startswith(block_path + ".")


def _same_class_runs(container, indices, classes):
    """Runs of ``indices`` (in the order the modules run) whose modules share a class."""
    runs, cur = [], [indices[0]]
    for idx in indices[1:]:
        if classes[(container, idx)] == classes[(container, cur[-1])]:
            cur.append(idx)
        else:
            runs.append(cur)
            cur = [idx]
    runs.append(cur)
    return [r for r in runs if len(r) >= 2]


def _signature(ns: list[fx.Node]) -> tuple[str, ...]:
    return tuple(_fx.target_name(n) for n in ns)


def _align(sig: tuple, major: tuple) -> list[int] | None:
    """Offsets of ``sig``'s entries in ``major`` if ``sig`` is a subsequence of it, else None."""
    if sig == major:
        return list(range(len(major)))
    out, j = [], 0
    for s in sig:
        while j < len(major) and major[j] != s:
            j += 1
        if j == len(major):
            return None
        out.append(j)
        j += 1
    return out


def _signature_runs(container, run, members, rejected, out=None, paths=None):
    """Split a same-class run into sub-runs whose blocks share one op signature.

    The majority signature claims the blocks that match it; consecutive blocks that do not are
    split again by their own majority (HunyuanDiT's second half carries an extra skip layer), and
    a lone misfit is rejected.
    """
    out = [] if out is None else out
    sigs = {idx: _signature(members[(container, idx)]) for idx in run}
    major = collections.Counter(sigs.values()).most_common(1)[0][0]
    rich_major = tuple(_fx.op_key(n) for n in members[(container, next(i for i in run if sigs[i] == major))])
    cur, misfit = [], []

    def flush_misfit():
        if len(misfit) >= 2:
            _signature_runs(container, list(misfit), members, rejected, out, paths)
        for idx in misfit[:1] if len(misfit) == 1 else []:
            rejected.append(Rejection(
                _block_path(container, idx, paths), Ineligible.SIGNATURE_MISMATCH,
                f"{len(sigs[idx])} ops differ from the {len(major)}-op signature of its siblings"))
        misfit.clear()

    for idx in run:
        # Align on ops with their constants first (tells apart two slices of one tensor), then on
        # ops alone (a block whose constants differ, e.g. a per-layer scale).
        rich = tuple(_fx.op_key(n) for n in members[(container, idx)])
        offsets = _align(rich, rich_major) or _align(sigs[idx], major)
        if offsets is None:
            if len(cur) >= 2:
                out.append(cur)
            cur = []
            misfit.append(idx)
            continue
        flush_misfit()
        cur.append((idx, offsets))
    flush_misfit()
    if len(cur) >= 2:
        out.append(cur)
    return out


def _inputs(block_nodes: set[fx.Node], ns: list[fx.Node], offsets: list[int]):
    """(producer, consumer offset, arg position) for every value a block reads from outside."""
    out = []
    for n, off in zip(ns, offsets):
        for pos, a in enumerate(n.all_input_nodes):
            if a not in block_nodes:
                out.append((a, (off, pos)))
    return out


def _block_path(container: str, idx: int, paths: dict | None = None) -> str:
    if paths is not None:
        return paths[(container, idx)]
    return f"{container}.{idx}" if container else str(idx)


def _analyse(container, sub, members, classes, weights, position, rejected, paths=None) -> BlockGroup | None:
    name = container or "<root>"
    blocks = [Block(idx, _block_path(container, idx, paths), members[(container, idx)], offsets)
              for idx, offsets in sub]
    label = (f"{name}[{blocks[0].index}..{blocks[-1].index}]" if paths is None
             else f"{blocks[0].path}..{blocks[-1].path.rpartition('.')[2]}")
    sets = [set(b.nodes) for b in blocks]
    owner = {n: i for i, s in enumerate(sets) for n in s}
    ins = [_inputs(sets[i], b.nodes, b.offsets) for i, b in enumerate(blocks)]
    offset_of = [dict(zip(b.nodes, b.offsets)) for b in blocks]

    # Streams: producer offsets in block i of the values block i+1 reads from block i, directly
    # or through glue: non-block ops between the two blocks computed from one block-i value
    # (Wan VACE adds a control hint, Bria FIBO splices per-layer text features into the encoder).
    bounds = [(position[b.nodes[0]], position[b.nodes[-1]]) for b in blocks]
    consumer_keys: dict[int, set] = collections.defaultdict(set)
    producer_sets = []
    bridges: list[set[fx.Node]] = []  # glue nodes carrying a stream from block i to block i+1
    stream_ins: list[set] = [set() for _ in blocks]  # (value, key) pairs that are stream inputs
    # Another module list's entries between the blocks are blocks of their own (Latte's temporal
    # blocks, one in every gap: an interleaved group, found as pairs) unless they sit in some gaps
    # only: then they are glue (Wan-Animate's face adapter, injected every k blocks).
    between = sorted((x for x in position if bounds[0][1] < position[x] < bounds[-1][0]), key=position.get)
    gap_lists = [{c for x in between if bounds[i][1] < position[x] < bounds[i + 1][0]
                  for c in _indexed_containers(x)} for i in range(len(blocks) - 1)]
    interleaved = set.intersection(*gap_lists) if gap_lists else set()

    def gap(i):  # whether a node is glue between blocks i and i+1
        return lambda x: (x not in owner and x.op not in ("placeholder", "get_attr")
                          and not (_indexed_containers(x) & interleaved)
                          and bounds[i][1] < position[x] < bounds[i + 1][0])

    carried, carried_glue = _carried_streams(blocks, ins, owner, gap, position, label, rejected)
    if carried is None:
        return None
    carried_keys = {k for keys, _ in carried for k in keys}
    for i in range(len(blocks) - 1):
        prods, bridge = set(), set(carried_glue[i])
        in_gap = gap(i)
        for a, key in ins[i + 1]:
            if key in carried_keys:
                continue
            if owner.get(a) == i:
                src = a
            elif in_gap(a):
                sources, via = _gap_sources(a, in_gap, lambda x: owner.get(x) == i)
                if len(sources) != 1:
                    continue  # glue mixing several block values (or none): not a stream input
                (src,) = sources
                bridge |= via
            else:
                continue
            off = offset_of[i][src]
            prods.add(off)
            consumer_keys[off].add(key)
            stream_ins[i + 1].add((a, key))
        producer_sets.append(prods)
        bridges.append(bridge)
    if not producer_sets or not producer_sets[0]:
        detail = "no value flows from one block to the next"
        if carried:  # every block reads a value glue updates from what the previous one read
            detail = (f"no block reads what the previous one returns; each reads {carried[0][1][0].name} "
                      "as glue between them updates it (a residual added outside the blocks?)")
        rejected.append(Rejection(label, Ineligible.NOT_CHAINED, detail))
        return None
    if any(p != producer_sets[0] for p in producer_sets):
        rejected.append(Rejection(label, Ineligible.INCONSISTENT_STREAMS,
                                  f"blocks pass different values on: {producer_sets}"))
        return None

    stream_keys = set().union(*consumer_keys.values())
    streams = []
    for off in sorted(producer_sets[0]):
        entries = {a for a, key in ins[0] if key in consumer_keys[off]}
        if len(entries) != 1:
            rejected.append(Rejection(label, Ineligible.INCONSISTENT_STREAMS,
                                      f"block 0 reads {len(entries)} values where block 1 reads one stream"))
            return None
        streams.append(Stream(f"stream{len(streams)}", off, entries.pop(),
                              [b.node_at(off) for b in blocks]))
    streams += [Stream("carried", None, values[0], values) for _, values in carried]

    # Side inputs, per-block inputs and values skipping blocks.
    side_by_key: dict[tuple, set] = collections.defaultdict(set)
    per_block: list[list[fx.Node]] = [[] for _ in blocks]
    for i, block_ins in enumerate(ins):
        for a, key in block_ins:
            if key in carried_keys or key in stream_keys and (i == 0 or (a, key) in stream_ins[i]):
                continue
            if a in owner:
                rejected.append(Rejection(label, Ineligible.SKIP_CONNECTION,
                                          f"{blocks[i].path} reads {a.name} from {blocks[owner[a]].path}"))
                return None
            if a.op == "placeholder" and a in weights:
                continue
            side_by_key[key].add(a)
            per_block[i].append(a)
    common = {next(iter(v)) for v in side_by_key.values() if len(v) == 1}
    side_inputs = sorted(common, key=position.__getitem__)
    per_block = [sorted(set(p) - common, key=position.__getitem__) for p in per_block]

    # A stream the last block does not return (its producer lies in the part of an interleaved
    # unit the last one lacks) leaves the group as the last block read it, when read after it.
    end = bounds[-1][1]
    for s in streams:
        if s.outputs[-1] is None and len(s.outputs) > 1 and s.outputs[-2] is not None \
                and any(position[u] > end for u in s.outputs[-2].users):
            s.outputs[-1] = s.outputs[-2]

    # Escaping outputs: block i's values used outside the group, except by block i+1 (streams)
    # and, after the last block, the stream exits. A stream output of any block may also be read
    # after the group: a long skip (HunyuanDiT's first half hands each block's hidden state to a
    # block of its second half). Whether a cache region may take such a block in is the block
    # cache's question (a value the skipped region computes and something after it reads refuses).
    exits = {s.exit for s in streams}
    for i, b in enumerate(blocks):
        for n in b.nodes:
            for u in n.users:
                j = owner.get(u)
                if j == i or (j == i + 1 and offset_of[i][n] in producer_sets[0]):
                    continue
                if _fx.is_shape_bookkeeping(u):  # a size of it (checked or summed): not its value
                    continue
                if i < len(blocks) - 1 and u in bridges[i] and offset_of[i][n] in producer_sets[0]:
                    continue  # glue carrying the stream on to block i+1
                if j is None and n in exits and (i == len(blocks) - 1 or position[u] > end):
                    continue
                if j is None and position[u] > end and offset_of[i][n] in producer_sets[0]:
                    continue  # a long skip
                where = blocks[j].path if j is not None else u.name
                rejected.append(Rejection(label, Ineligible.ESCAPING_OUTPUT,
                                          f"{n.name} of {b.path} is read by {where}"))
                return None

    first, last = position[blocks[0].nodes[0]], position[blocks[-1].nodes[-1]]
    graph_nodes = list(blocks[0].nodes[0].graph.nodes)
    glue = [n for n in graph_nodes[first:last + 1] if n not in owner]
    return BlockGroup(name=name, block_class=classes[(container, blocks[0].index)], blocks=blocks,
                      streams=streams, side_inputs=side_inputs, per_block_inputs=per_block, glue=glue)


def _carried_streams(blocks, ins, owner, gap, position, label, rejected):
    """Streams no block returns: a value every block reads at the same inputs, which glue between
    blocks i and i+1 may replace by one computed from the value block i read there (and from block
    i's streams). RFD4 Proteina's blocks read the pair representation, which an update module
    refreshes after every k-th block from the hidden stream. ``gap(i)``: whether a node is glue
    between blocks i and i+1.

    Returns ``([(keys, values)], glue)``: per carried stream the consumer keys it is read at and the
    value each block reads; per gap the glue nodes that update one. ``(None, None)`` (a rejection
    recorded) when such a value is not carried consistently."""
    reads = [{key: a for a, key in block_ins} for block_ins in ins]  # a key is one op's argument

    def update_glue(i, key, a):
        """The glue nodes making ``a`` (read by block i+1 at ``key``) from what block i read there."""
        prev = reads[i].get(key)
        if prev is None or not gap(i)(a):
            return None
        _, via = _gap_sources(a, gap(i), lambda x: owner.get(x) == i)
        return via if any(prev in x.all_input_nodes for x in via) else None

    keys: dict[fx.Node, set] = collections.defaultdict(set)  # block 0's value -> its carried keys
    for i in range(len(blocks) - 1):
        for a, key in ins[i + 1]:
            if key in reads[0] and update_glue(i, key, a) is not None:
                keys[reads[0][key]].add(key)
    carried, glue = [], [set() for _ in range(len(blocks) - 1)]
    for entry, ks in keys.items():
        values = []
        for i in range(len(blocks)):
            read = {reads[i][k] for k in ks if k in reads[i]}
            if len(read) != 1:
                detail = ", ".join(sorted(x.name for x in read)) or "none"
                rejected.append(Rejection(label, Ineligible.INCONSISTENT_STREAMS,
                                          f"{blocks[i].path} reads {len(read)} values ({detail}) where "
                                          f"{blocks[0].path} reads {entry.name}, which glue between blocks updates"))
                return None, None
            values.append(read.pop())
        if entry in owner or position[entry] > position[blocks[0].nodes[0]]:
            rejected.append(Rejection(label, Ineligible.INCONSISTENT_STREAMS,
                                      f"{entry.name}, updated between blocks, is not defined before the group"))
            return None, None
        for i in range(len(blocks) - 1):
            if values[i + 1] is values[i]:
                continue
            via = update_glue(i, next(iter(ks)), values[i + 1])
            if via is None or not _fx.same_meta(_fx.fake_value(values[i + 1]), _fx.fake_value(entry)):
                rejected.append(Rejection(label, Ineligible.INCONSISTENT_STREAMS,
                                          f"{blocks[i + 1].path} reads {values[i + 1].name} where {blocks[i].path} "
                                          f"reads {values[i].name}: not an update of it between the two, of its shape"))
                return None, None
            glue[i] |= via
        carried.append((ks, values))
    return carried, glue


def _indexed_containers(node: fx.Node) -> set[str]:
    """The containers of the ``<container>.<int>`` modules ``node`` runs in."""
    return {m.group(1) or "" for path, _ in _fx.module_stack(node) if (m := _INDEXED.match(path))}


def _gap_sources(value: fx.Node, in_gap, from_block) -> tuple[set[fx.Node], set[fx.Node]]:
    """The block values ``value`` is computed from through glue nodes (``in_gap``), and that glue."""
    sources, via, todo = set(), set(), [value]
    while todo:
        x = todo.pop()
        if x in via:
            continue
        via.add(x)
        for y in x.all_input_nodes:
            if from_block(y):
                sources.add(y)
            elif in_gap(y):
                todo.append(y)
    return sources, via


def _label_streams(gm: fx.GraphModule, groups: list[BlockGroup]) -> None:
    reaches_output = _fx.ancestors(next(n for n in gm.graph.nodes if n.op == "output"))
    for gi in range(len(groups) - 1, -1, -1):
        g = groups[gi]
        carried = [s for s in g.streams if s.producer_offset is None]
        for k, s in enumerate(carried):
            s.label = "carried" if len(carried) == 1 else f"carried{k}"
        returned = [s for s in g.streams if s.producer_offset is not None]
        if len(returned) == 1:
            returned[0].label = "hidden"
            continue
        live = [s for s in returned if s.exit is not None and s.exit in reaches_output]
        hidden = live[0] if len(live) == 1 else None
        if hidden is None:
            later_hidden = {h.entry for later in groups[gi + 1:]
                            if (h := later.stream("hidden")) is not None}
            fed = [s for s in returned if s.exit in later_hidden]
            hidden = fed[0] if len(fed) == 1 else None
        if hidden is None:
            hidden = max(returned, key=lambda s: _tokens(s.entry))
        hidden.label = "hidden"
        others = [s for s in returned if s is not hidden]
        for k, s in enumerate(others):
            s.label = "encoder" if len(others) == 1 else f"encoder{k}"


def _tokens(node: fx.Node) -> int:
    v = _fx.fake_value(node)
    shape = getattr(v, "shape", None)
    if shape is None or len(shape) < 2:
        return -1
    try:
        return int(shape[-2])
    except TypeError:  # symbolic
        return -1
