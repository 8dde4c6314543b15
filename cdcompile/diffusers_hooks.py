"""diffusers' own module hooks, found on a model or in a traced graph, and what each means here.

diffusers attaches hooks to a transformer's modules (``module._diffusers_hook``, a registry of
``ModelHook`` objects whose ``new_forward`` wraps the module's forward): its caches
(``transformer.enable_cache(FirstBlockCacheConfig(...))`` and the others), layerwise casting,
group offloading, context parallelism. Each of them either skips blocks itself or runs Python
between modules that Dynamo cannot trace (a ``torch.compiler.disable``'d decision, a
``Parameter`` built per call), so the graph breaks there and no graph holds the stack of blocks.

Two ways to see them:

* :func:`on_module`: the hooks registered on a module and its submodules, by kind (exact; used by
  ``enable`` and ``explain``, which hold the module);
* :func:`in_graph`: the hook kinds whose code a Dynamo graph traced, read from the nodes' stack
  traces (the backend holds only the graph). A hook whose own code breaks the graph before any op
  (layerwise casting) leaves only the generic wrapper, kind ``"hooks"``.

A kind is the name of the diffusers module that defines the hook (``first_block_cache``,
``layerwise_casting``, ...), or the hook's class name for a hook defined elsewhere.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch.fx as fx
import torch.nn as nn

# diffusers' caches: each decides in Python whether to run blocks and keeps outputs of its own.
CACHES = frozenset({"first_block_cache", "taylorseer_cache", "pyramid_attention_broadcast", "faster_cache",
                    "mag_cache", "sea_cache"})
PARALLEL = frozenset({"context_parallel"})
# hooks that run Python between modules wherever they are, so the graph breaks at each of them
SPLITTING = frozenset({"layerwise_casting", "group_offloading"})

# files under diffusers/hooks/ that any hook's code passes through: they name no kind
_PLUMBING = frozenset({"_helpers", "_common", "utils", "__init__"})
_FILE = re.compile(r"diffusers[/\\]hooks[/\\](\w+)\.py")

_ADVICE = {
    "cache": ("{kinds}: diffusers' cache decides in Python at every step which blocks or attentions "
              "to run (a graph break or a recompile each time) and reuses outputs of its own, so the block "
              "cache would skip what it already skipped; remove it before compiling: transformer.disable_cache() "
              "(cdcompile's residual_diff_threshold, Fn_compute_blocks and calibrator options do its work "
              "inside the graph)"),
    "layerwise_casting": ("layerwise_casting: diffusers casts each layer's weights per call in Python "
                          "(a graph break at every layer, so no graph holds two blocks); for weights "
                          "stored in float8, quantize with torchao instead (quantize_(transformer, "
                          "Float8WeightOnlyConfig())), which cdcompile caches through"),
    "group_offloading": ("group_offloading: diffusers moves each group of modules on and off the device "
                         "in Python (a graph break at every group, so the blocks are split between graphs "
                         "and each piece caches on its own, if at all); keep the transformer whole on "
                         "the device while it runs (model-level offload), or compile with enable_cache=False"),
    "context_parallel": ("context_parallel: diffusers' own context parallelism (enable_parallelism) shards "
                         "the sequence with hooks; use cdcompile's ulysses_degree instead, not both"),
    "hooks": ("diffusers hooks (ModelHook) wrap modules of this graph, which holds no block group: where "
              "they run Python that Dynamo cannot trace, the graph breaks; cdcompile.explain(transformer, ...) "
              "names them"),
}


def on_module(module: nn.Module) -> dict[str, list[str]]:
    """The diffusers hooks registered on ``module`` and its submodules: kind -> module paths
    (``""`` for ``module`` itself), in module order."""
    found: dict[str, list[str]] = {}
    for path, sub in module.named_modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            kind = _kind(type(hook))
            paths = found.setdefault(kind, [])
            if path not in paths:
                paths.append(path)
    return found


def in_graph(gm: fx.GraphModule) -> list[str]:
    """The hook kinds whose code ``gm`` traced (from its nodes' stack traces), sorted; ``"hooks"``
    only when no named kind is seen."""
    kinds: set[str] = set()
    for node in gm.graph.nodes:
        trace = node.meta.get("stack_trace")
        if trace and "diffusers" in trace:
            kinds.update(f for f in _FILE.findall(trace) if f not in _PLUMBING)
    if len(kinds) > 1:
        kinds.discard("hooks")
    return sorted(kinds)


def caches(kinds: Iterable[str]) -> list[str]:
    return sorted(k for k in kinds if k in CACHES)


def advice(kinds: Iterable[str]) -> list[str]:
    """One line per kind (the caches together): what the hook does to the graph, and the fix."""
    kinds = sorted(set(kinds))
    lines = []
    if cached := caches(kinds):
        lines.append(_ADVICE["cache"].format(kinds=", ".join(cached)))
    for k in kinds:
        if k in CACHES:
            continue
        lines.append(_ADVICE.get(k, f"{k}: a hook in diffusers' registry; where it runs Python that Dynamo "
                                    f"cannot trace, the graph breaks there (cdcompile.explain lists the breaks)"))
    return lines


def sentence(found: dict[str, list[str]], kinds: Iterable[str] | None = None) -> str:
    """``diffusers hooks (<describe>): <advice>; ...`` for the hooks ``found`` on a module, the
    advice for ``kinds`` (default: all found)."""
    return f"diffusers hooks ({describe(found)}): " + "; ".join(advice(found if kinds is None else kinds))


def describe(found: dict[str, list[str]], limit: int = 3) -> str:
    """``first_block_cache on transformer_blocks.0, transformer_blocks.1, ... (6 modules)``; ..."""
    parts = []
    for kind, paths in found.items():
        shown = ", ".join(p or "<root>" for p in paths[:limit])
        more = f", ... ({len(paths)} modules)" if len(paths) > limit else ""
        parts.append(f"{kind} on {shown}{more}")
    return "; ".join(parts)


def _kind(cls: type) -> str:
    mod = cls.__module__
    if mod.startswith("diffusers.hooks."):
        return mod.rsplit(".", 1)[1]
    return cls.__name__
