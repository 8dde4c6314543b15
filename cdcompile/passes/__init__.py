"""The ordered pass list of the ``cachedit`` backend.

Every pass has the signature ``run(gm, ctx) -> None``: it may rewrite ``gm`` (the backend's own
copy of Dynamo's graph, never Dynamo's) and records what it did in ``ctx.report``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch.fx as fx

from ..config import PASS_NAMES, CacheConfig
from ..report import GraphReport, PassRecord
from . import block_cache, context_parallel, discover, fp8_attention


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


def _discover(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Find the repeated block groups (analysis only)."""
    ctx.discovery = discover.find_block_groups(gm, ctx.example_inputs)
    ctx.report.groups = [g.as_dict() for g in ctx.discovery.groups]
    ctx.report.rejected = [r.as_dict() for r in ctx.discovery.rejected]
    if not ctx.discovery.groups:
        ctx.report.not_cached.append("no repeated block group in this graph")


PASSES: list[tuple[str, Callable[[fx.GraphModule, PassContext], None]]] = [
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
