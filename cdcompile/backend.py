"""The ``cachedit`` torch.compile backend.

``torch.compile(m, backend="cachedit", options={...})`` calls :func:`cachedit` once per graph
Dynamo captures. It

1. validates ``options`` into a :class:`~cdcompile.config.CacheConfig`;
2. copies Dynamo's GraphModule (Dynamo breaks if the one it hands over is mutated);
3. runs the ordered pass list (``cdcompile.passes.PASSES``) on the copy;
4. compiles the result with the inner compiler (``compiler`` option: inductor, aot_eager, eager),
   passing ``mode`` to inductor;
5. returns a callable; when the block cache was inserted, a :class:`~cdcompile.runtime.CachedGraph`
   that owns the cache state and appends it to the graph's inputs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx

from .config import CacheConfig, Compiler
from .passes import PassContext, run_passes
from .report import GraphReport

log = logging.getLogger("cdcompile")

_graph_counter = itertools.count()
_report_sinks: list[list[GraphReport]] = []


@contextlib.contextmanager
def collect_reports() -> Iterator[list[GraphReport]]:
    """Collect the :class:`GraphReport` of every graph compiled inside the ``with`` block."""
    sink: list[GraphReport] = []
    _report_sinks.append(sink)
    try:
        yield sink
    finally:
        _report_sinks.remove(sink)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node meta copied shallowly)."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {})
    old_output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    graph.output(out).meta = dict(old_output.meta)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def build(gm: fx.GraphModule, example_inputs: Sequence[Any], cfg: CacheConfig) -> tuple[fx.GraphModule, PassContext]:
    """Copy ``gm`` and run the passes; returns the rewritten copy and the pass context."""
    gm2 = copy_graph_module(gm)
    report = GraphReport(graph_index=next(_graph_counter), num_nodes=len(gm.graph.nodes))
    ctx = PassContext(cfg=cfg, example_inputs=list(example_inputs), report=report)
    run_passes(gm2, ctx)
    gm2.graph.lint()
    gm2.recompile()
    for sink in _report_sinks:
        sink.append(report)
    log.info("cachedit: %s", report)
    return gm2, ctx


def cachedit(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None,
             mode: str | None = None) -> Callable:
    """Dynamo backend entry point (registered as ``"cachedit"``)."""
    cfg = CacheConfig.from_options(options)
    gm2, ctx = build(gm, example_inputs, cfg)
    plan = ctx.cache_plan
    inputs = list(example_inputs)
    if plan is not None:
        from .runtime import CachedGraph

        state = plan.allocate()
        compiled = compile_inner(gm2, inputs + state.tensors(), cfg.compiler, mode, cfg.size_asserts)
        return CachedGraph(compiled, plan, ctx.report, first_state=state)
    return compile_inner(gm2, inputs, cfg.compiler, mode, cfg.size_asserts)


def compile_inner(gm: fx.GraphModule, example_inputs: list[Any], compiler: Compiler,
                  mode: str | None, size_asserts: bool | None = None) -> Callable:
    """Compile ``gm`` with the chosen inner compiler (``size_asserts``: see CacheConfig)."""
    if mode is not None and compiler is not Compiler.INDUCTOR:
        log.warning("cachedit: mode=%r only applies to compiler='inductor'; compiler is %r",
                    mode, compiler.value)
    if compiler is Compiler.EAGER:
        return gm.forward
    if compiler is Compiler.AOT_EAGER:
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode is not None else {}
    if size_asserts is not None:
        patches["size_asserts"] = size_asserts
    return compile_fx(gm, example_inputs, config_patches=patches or None)


# Dynamo looks backends up by name; ``torch._dynamo.list_backends()`` shows it once imported.
def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "cachedit" not in _BACKENDS:
        register_backend(name="cachedit")(cachedit)


_register()
