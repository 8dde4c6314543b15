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
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .config import CacheConfig, Compiler
from .passes import PassContext, run_passes
from .passes._branch import flatten_subclass_operands
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


def build(gm: fx.GraphModule, example_inputs: Sequence[Any], cfg: CacheConfig,
          borrowed_timestep: torch.Tensor | None = None) -> tuple[fx.GraphModule, PassContext]:
    """Copy ``gm`` and run the passes; returns the rewritten copy and the pass context."""
    gm2 = copy_graph_module(gm)
    report = GraphReport(graph_index=next(_graph_counter), num_nodes=len(gm.graph.nodes))
    ctx = PassContext(cfg=cfg, example_inputs=list(example_inputs), report=report,
                      borrowed_timestep=borrowed_timestep)
    run_passes(gm2, ctx)
    report.subclass_operands = flatten_subclass_operands(gm2)
    gm2.graph.lint()
    gm2.recompile()
    for sink in _report_sinks:
        sink.append(report)
    log.info("cachedit: %s", report)
    return gm2, ctx


def cachedit(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None,
             mode: str | None = None) -> Callable:
    """Dynamo backend entry point (registered as ``"cachedit"``)."""
    from . import runtime
    from .passes.block_cache import timestep_position

    cfg = CacheConfig.from_options(options)
    mode = mode if mode is not None else cfg.mode  # torch.compile passes one of mode and options
    inputs = list(example_inputs)
    fake = torch._guards.detect_fake_mode(inputs)
    published = runtime.published_timestep()
    borrowed = None
    if published is not None:  # what the runtime would pass for it: its largest value, (1,) float32
        with fake or contextlib.nullcontext():
            borrowed = torch.zeros(1, dtype=torch.float32, device=published.device)
    gm2, ctx = build(gm, example_inputs, cfg, borrowed)
    plan = ctx.cache_plan
    if plan is not None:
        if why := cudagraphs_lost(cfg.compiler, mode, inputs):
            warnings.warn(why, stacklevel=2)
        extra = [borrowed] if plan.timestep_source == "borrowed" else []
        if plan.size_sources:  # dynamic sizes: the state's example inputs share Dynamo's symbols
            state = None
            with fake:
                example = plan.allocate().tensors()
        else:
            state = plan.allocate()
            example = state.tensors()
            ctx.report.cache["state_bytes"] = state.nbytes()
        compiled = compile_inner(gm2, inputs + extra + example, cfg.compiler, mode, cfg.size_asserts)
        return runtime.CachedGraph(compiled, plan, ctx.report, first_state=state)
    compiled = compile_inner(gm2, inputs, cfg.compiler, mode, cfg.size_asserts)
    index = timestep_position(gm, inputs)
    return compiled if index is None else runtime.TimestepPublisher(compiled, index)


def cudagraphs_lost(compiler: Compiler, mode: str | None, inputs: Sequence[Any]) -> str | None:
    """Why a graph with the cache's ``torch.cond`` will not get the CUDA graphs ``mode`` asks for,
    or None. Inductor's lowering of ``cond`` (torch 2.13, graph partitioning on or off) disables
    CUDA graphs for the whole graph when its operands are on the GPU; it says so only under
    ``TORCH_LOGS=perf_hints``."""
    if compiler is not Compiler.INDUCTOR:
        return None
    from torch._inductor import config

    if not mode_settings(mode).get("triton.cudagraphs", config.triton.cudagraphs):
        return None
    if not any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in inputs):
        return None
    asked = f"mode={mode!r}" if mode is not None else "torch._inductor.config.triton.cudagraphs=True"
    return (f"cachedit: {asked} asks for CUDA graphs, but Inductor (torch {torch.__version__}) skips them for "
            f"a whole graph that holds a torch.cond on the GPU, and the block cache puts one in this graph: "
            f"it runs without CUDA graphs. Compile with mode='max-autotune-no-cudagraphs' (or no mode) to "
            f"ask for what runs, or with enable_cache=False to keep CUDA graphs without the cache.")


def mode_settings(mode: str | None) -> dict[str, Any]:
    """The Inductor config an Inductor ``mode`` stands for (``{}`` for none)."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode)) if mode is not None else {}


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
    from torch._inductor.compile_fx import compile_fx

    patches = mode_settings(mode)
    patches.update(inductor_patches())
    if size_asserts is not None:
        patches["size_asserts"] = size_asserts
    return compile_fx(gm, example_inputs, config_patches=patches)


def inductor_patches() -> dict[str, Any]:
    """Inductor config that every cachedit compile (and AOTInductor export) runs with: the user's
    post-grad passes, then :class:`CondOperandLayouts`."""
    from torch._inductor import config

    user = config.post_grad_custom_post_pass
    user = [] if user is None else user if isinstance(user, (list, tuple)) else [user]
    # An enclosing cachedit compile may have set a chain already: flatten it, ours once, last.
    user = [q for p in user for q in (p.passes if isinstance(p, PostGradPasses) else (p,))
            if not isinstance(q, CondOperandLayouts)]
    return {"post_grad_custom_post_pass": PostGradPasses((*user, CondOperandLayouts()))}


class PostGradPasses(CustomGraphPass):
    """Several post-grad passes as one, run in order. torch 2.13 takes a list in
    ``post_grad_custom_post_pass``, torch 2.11 (the GPU machine's) a single pass: one pass suits both."""

    def __init__(self, passes: tuple) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Any:
        ids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        # A pass without a uuid cannot key Inductor's cache (Inductor then bypasses it, as it would).
        return None if None in ids else repr(ids)


class CondOperandLayouts(CustomGraphPass):
    """Inductor post-grad pass: every tensor operand of a ``torch.cond`` is realized with the strides
    its FX value has.

    Inductor (torch 2.13, ``ir.Conditional.create``) compiles both branches for the strides of the
    operands' FX values, but realizes the operands in the outer graph with layouts of its own choice.
    A pointwise result of a non-contiguous stream (``x.transpose(1, 2) + temb``: eager keeps the
    transposed strides) is then written contiguous, and the compute branch's input assert fails, or
    without asserts reads it transposed. The node flag set here is the one Inductor's own
    ``decompose_mem_bound_mm`` pass uses to pin a layout to the FX strides; where the layouts
    already agree it costs nothing.
    """

    def __call__(self, graph: fx.Graph) -> None:
        for cond in graph.find_nodes(op="call_function", target=torch.ops.higher_order.cond):
            for operand in cond.args[3]:
                if isinstance(operand, fx.Node) and isinstance(operand.meta.get("val"), torch.Tensor):
                    operand.meta["inductor_realize_to_strides"] = True

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


# Dynamo looks backends up by name; ``torch._dynamo.list_backends()`` shows it once imported.
def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "cachedit" not in _BACKENDS:
        register_backend(name="cachedit")(cachedit)


_register()
