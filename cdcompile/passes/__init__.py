"""The ordered pass list of the ``cachedit`` backend.

Every pass has the signature ``run(gm, ctx) -> None``: it may rewrite ``gm`` (the backend's own
copy of Dynamo's graph, never Dynamo's) and records what it did in ``ctx.report``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from .. import diffusers_hooks
from ..config import PASS_NAMES, CacheConfig
from ..report import GraphReport, PassRecord
from . import block_cache, context_parallel, discover, fp8_attention, matmul_attention


@dataclasses.dataclass
class PassContext:
    cfg: CacheConfig
    example_inputs: list[Any]
    report: GraphReport
    discovery: discover.Discovery | None = None
    # Set by block_cache: the state the compiled graph reads and updates (runtime.CacheState spec).
    cache_plan: Any = None
    # Set by context_parallel when ulysses_degree > 1 (context_parallel.ContextParallelRecord).
    context_parallel: Any = None
    # The example of a timestep an earlier graph of the call published, for a graph that caches
    # but has no timestep input (the backend sets it; export, one graph, never does).
    borrowed_timestep: Any = None


def _discover(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Find the repeated block groups (analysis only)."""
    ctx.discovery = discover.find_block_groups(gm, ctx.example_inputs)
    hooks = ctx.report.diffusers_hooks = diffusers_hooks.in_graph(gm)
    # the caches: block_cache says; a hook that splits the graph, always; any other, where this
    # graph has no group (a hook that leaves the blocks in one graph is no one's concern)
    said = [k for k in hooks if k in diffusers_hooks.SPLITTING or not ctx.discovery.groups]
    if said and not diffusers_hooks.caches(hooks):
        for line in diffusers_hooks.advice(said):
            warnings.warn(f"cachedit: {line}", stacklevel=2)  # once per kind: same text
    ctx.report.groups = [g.as_dict() for g in ctx.discovery.groups]
    ctx.report.rejected = [r.as_dict() for r in ctx.discovery.rejected]
    if not ctx.discovery.groups:
        ctx.report.not_cached.append("no repeated block group in this graph")
        lone = _lone_block()
        if lone is not None:
            ctx.report.not_cached.append(lone)
            warnings.warn(f"cachedit: {lone}", stacklevel=2)  # once per block class: same text


def _lone_block() -> str | None:
    """Why a graph without a group has none, when it is the forward of one block compiled on its own
    with ``Module.compile`` (regional compilation: diffusers' ``compile_repeated_blocks`` compiles
    each block so). A block traced alone after a graph break in the model says nothing here:
    ``explain`` shows the breaks."""
    try:  # the frame Dynamo is translating; private, so any failure only drops the hint
        from torch._dynamo.symbolic_convert import InstructionTranslator

        root = InstructionTranslator.current_tx().f_locals.get("self")
    except Exception:
        return None
    if (not isinstance(root, nn.Module) or getattr(root, "_compiled_call_impl", None) is None
            or _holds_block_list(root)):
        return None
    name = type(root).__name__
    return (f"this graph is {name}.forward alone ({name} is compiled on its own, as "
            f"compile_repeated_blocks does), and the block cache needs the stack of blocks in one "
            f'graph: compile the whole transformer, torch.compile(transformer, backend="cachedit")')


def _holds_block_list(module: nn.Module) -> bool:
    """Whether ``module`` holds a ModuleList, Sequential or ModuleDict with two composite modules of
    one class."""
    for m in module.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            composite = [type(c) for c in m.children() if next(c.children(), None) is not None]
            if len(composite) != len(set(composite)):
                return True
    return False


PASSES: list[tuple[str, Callable[[fx.GraphModule, PassContext], None]]] = [
    ("matmul_attention", matmul_attention.run),
    ("discover_blocks", _discover),
    ("context_parallel", context_parallel.run),
    ("fp8_attention", fp8_attention.run),
    ("block_cache", block_cache.run),
]
assert tuple(name for name, _ in PASSES) == PASS_NAMES, "keep config.PASS_NAMES in sync"


def run_passes(gm: fx.GraphModule, ctx: PassContext) -> None:
    for name, fn in PASSES:
        before = _num_ops(gm)
        if name in ctx.cfg.disable_passes:
            ctx.report.passes.append(PassRecord(name, before, before, skipped=True))
            continue
        fn(gm, ctx)
        ctx.report.passes.append(PassRecord(name, before, _num_ops(gm)))


def _num_ops(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))
