"""``cdcompile.explain``: trace a model through the backend and say what it found.

    report = cdcompile.explain(transformer, hidden_states=..., timestep=..., ...)
    print(report)              # graphs, graph breaks, block groups, what was not eligible and why
    json.dumps(report.as_dict())

Tracing uses Dynamo with the ``cachedit`` backend and ``compiler="eager"`` (no inductor work), and
resets Dynamo's caches before and after, like ``torch._dynamo.explain``: compiled models compile
again at their next call (it warns when the model has cache state it drops). A module compiled in
place (``Module.compile``, ``cdcompile.enable``) is traced as the module, not through its own call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import torch

from . import diffusers_hooks
from .backend import cachedit, collect_reports
from .report import GraphReport
from .runtime import traced_module


@dataclasses.dataclass
class ExplainReport:
    graphs: int
    graph_breaks: int
    break_reasons: list[str]
    graph_reports: list[GraphReport]
    output: Any = dataclasses.field(default=None, repr=False)  # the model's output (not serialised)
    # diffusers hooks registered on the model: kind -> module paths (cdcompile.diffusers_hooks.on_module)
    diffusers_hooks: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def groups(self) -> list[dict[str, Any]]:
        return [g for r in self.graph_reports for g in r.groups]

    def as_dict(self) -> dict[str, Any]:
        return {
            "graphs": self.graphs,
            "graph_breaks": self.graph_breaks,
            "break_reasons": self.break_reasons,
            "groups": self.groups,
            "diffusers_hooks": self.diffusers_hooks,
            "graph_reports": [r.as_dict() for r in self.graph_reports],
        }

    def __str__(self) -> str:
        lines = [f"cdcompile.explain: {self.graphs} graph(s), {self.graph_breaks} graph break(s)"]
        # a break inside a block repeats once per block: say it once
        for reason, k in collections.Counter(self.break_reasons).items():
            lines.append(f"  break{f' (x{k})' if k > 1 else ''}: {reason}")
        hint = _capture_hint(self.break_reasons)
        if hint:
            lines.append(f"  hint: {hint}")
        if self.diffusers_hooks:
            lines.append(f"  diffusers hooks on the model: {diffusers_hooks.describe(self.diffusers_hooks)}")
            lines.extend(f"    {line}" for line in diffusers_hooks.advice(self.diffusers_hooks))
        lines.extend(str(r) for r in self.graph_reports)
        if not self.groups:
            lines.append("  no repeated block group found: the backend compiles the model unchanged")
        return "\n".join(lines)


def explain(model: torch.nn.Module, *args: Any, options: dict | None = None, **kwargs: Any) -> ExplainReport:
    """Trace ``model(*args, **kwargs)`` through the backend; return what it found (see module doc)."""
    from torch._dynamo.backends.debugging import ExplainWithBackend

    opts = {**(options or {}), "compiler": "eager"}
    recorder = ExplainWithBackend(functools.partial(cachedit, options=opts))
    with traced_module(model, "cdcompile.explain") as target:
        torch._dynamo.reset()
        try:
            with collect_reports() as reports:
                output = torch.compile(target, backend=recorder)(*args, **kwargs)
            out = recorder.output()
        finally:
            torch._dynamo.reset()
    reasons = [_reason(r) for r in out.break_reasons]
    return ExplainReport(graphs=out.graph_count, graph_breaks=out.graph_break_count,
                         break_reasons=reasons, output=output,
                         # numbered in this trace's order (the backend's count is the process's)
                         graph_reports=[dataclasses.replace(r, graph_index=k) for k, r in enumerate(reports)],
                         diffusers_hooks=diffusers_hooks.on_module(target))


def _reason(r: Any) -> str:
    where = ""
    stack = getattr(r, "user_stack", None)
    if stack:
        frame = stack[-1]
        where = f" at {frame.filename}:{frame.lineno}"
    return f"{getattr(r, 'reason', r)}{where}"


# What Dynamo says when it breaks the graph at an op it could capture with the flags below.
_DATA_DEPENDENT = ("Data dependent operator", "Dynamic shape operator")


def _capture_hint(reasons: list[str]) -> str | None:
    """How to keep data-dependent ops in the graph, when some break it and the flags are off."""
    k = sum(any(d in r for d in _DATA_DEPENDENT) for r in reasons)
    cfg = torch._dynamo.config
    if not k or (cfg.capture_scalar_outputs and cfg.capture_dynamic_output_shape_ops):
        return None
    return (f"{k} break(s) come from data-dependent ops (.item(), nonzero, boolean indexing); set "
            f"torch._dynamo.config.capture_scalar_outputs = True and "
            f"torch._dynamo.config.capture_dynamic_output_shape_ops = True before compiling to keep "
            f"them in the graph; the block cache handles the unbacked sizes they produce")
