"""What the backend did to one graph: groups found, passes run, and why anything was not cached.

Reports are plain data (enums + numbers), built once per compiled graph, never in a hot loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any


# Branch operands from which explain() points at the per-call checks (FLUX.1-dev's cond takes ~1000).
LARGE_BRANCH = 200


@dataclasses.dataclass
class PassRecord:
    name: str
    ops_before: int
    ops_after: int
    skipped: bool = False  # switched off with ``disable_passes``

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GraphReport:
    """One compiled graph: what was found and what was done."""

    graph_index: int
    num_nodes: int
    groups: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rejected: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    cache: dict[str, Any] | None = None  # what block_cache inserted (stack, F/M/B, streams)
    not_cached: list[str] = dataclasses.field(default_factory=list)  # reasons, user-facing
    # What context_parallel did (passes.context_parallel.ContextParallelRecord); None when off.
    context_parallel: Any = None
    # What fp8_attention did (passes.fp8_attention.Fp8AttentionRecord); None when off.
    fp8_attention: Any = None
    # Attention written as matmuls that became SDPA calls (with context parallelism or FP8 attention)
    matmul_attention: int = 0
    # Tensor-subclass cond operands (torchao's quantized weights) passed as their inner tensors,
    # per subclass name (passes._branch.flatten_subclass_operands)
    subclass_operands: dict[str, int] = dataclasses.field(default_factory=dict)
    # diffusers hook kinds whose code this graph traced (cdcompile.diffusers_hooks.in_graph)
    diffusers_hooks: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passes"] = [p.as_dict() for p in self.passes]
        return d

    def __str__(self) -> str:
        lines = [f"graph {self.graph_index}: {self.num_nodes} nodes"]
        for g in self.groups:
            lines.append(f"  group {g['name']}: {g['blocks']} x {g['block_class']} "
                         f"({g['ops_per_block']} ops/block), streams {g['streams']}, "
                         f"side inputs {len(g['side_inputs'])}")
        for r in self.rejected:
            lines.append(f"  not a group: {r['name']}: {r['reason']} ({r['detail']})")
        if self.cache:
            c = self.cache
            ops = c.get("branch_operands")
            lines.append(f"  block cache: {c['num_blocks']} blocks in {c['groups']}, "
                         f"F={c['Fn']} M={c['Mn']} B={c['Bn']}, cached streams {c['streams']}"
                         + (f" (forecast: {c['calibrated']})" if "calibrated" in c else "")
                         + (f", {ops} branch operands" if ops is not None else ""))
            lines.append("  block cache clock: " + {
                "own": f"steps, requests and CFG slots from the timestep input {c.get('timestep_input')}",
                "borrowed": "steps, requests and CFG slots from the timestep an earlier graph of the call "
                            "reads (this graph has none: the timestep is embedded before a graph break)",
            }.get(c.get("timestep_source"), "no timestep input, so every call is a step, only new_request(model) "
                                             "or enable(pipe) starts a request, and two calls per step (separate "
                                             "CFG) share one slot"))
            if c.get("guard"):
                lines.append(f"  block cache guard: {c['guard']}")
            if c.get("constant_float_arguments"):
                floats = ", ".join(f"{k}={v!r}" for k, v in c["constant_float_arguments"].items())
                lines.append(f"  block cache clock: the forward's Python float arguments ({floats}) are constants of "
                             f"this graph (Dynamo compiles another, taking them as inputs, at the next value); a "
                             f"timestep among them has no clock here and the first request counts from its second "
                             f"call: pass it as a tensor, or torch.compile(..., dynamic=True)")
            if c.get("dynamic_sizes"):
                lines.append(f"  block cache state: allocated per call size, {', '.join(c['dynamic_sizes'])}")
            elif c.get("state_bytes"):
                lines.append(f"  block cache state: {state_size(*c['state_bytes'], c['slots'])}")
            if c.get("specialized_floats"):
                floats = ", ".join(f"{k}={v!r}" for k, v in c["specialized_floats"].items())
                lines.append(f"  block cache: floats made guarded constants (a new value compiles a new graph): {floats}")
            if c.get("runtime_size_checks"):
                lines.append(f"  runtime size checks (compute branch, torch._check): "
                             f"{'; '.join(c['runtime_size_checks'])}")
            if ops is not None and ops >= LARGE_BRANCH and c.get("size_asserts") is not False:
                lines.append(f"  per-call work: compiled by Inductor, the graph checks the size of each of the "
                             f"{ops} branch operands on every call, cached or not, and Dynamo guards every "
                             f"module; where the model does not change between calls, options "
                             f"size_asserts=False and guard_filter_fn drop both (README: Per-call overhead)")
        if self.subclass_operands:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.subclass_operands.items()))
            lines.append(f"  cond operands that are tensor subclasses ({kinds}): passed as their inner "
                         f"tensors, rebuilt in each branch")
        if self.diffusers_hooks:
            lines.append(f"  diffusers hooks traced in this graph: {', '.join(self.diffusers_hooks)}")
        for reason in self.not_cached:
            lines.append(f"  not cached: {reason}")
        if self.context_parallel is not None:
            cp = self.context_parallel
            if cp.applied:
                kinds = ", ".join(f"{n} {k}" for k, n in sorted(cp.attention.items()))
                lines.append(f"  context parallel: rank {cp.rank}/{cp.world}, sharded {cp.sharded_streams}, "
                             f"attention {kinds}, {cp.collectives} collective nodes"
                             f"{f', {cp.halos} halo exchanges' if cp.halos else ''}"
                             f"{', fp8' if cp.fp8 else ''}{', async' if cp.overlap else ''}")
                if cp.unsharded_groups:
                    lines.append(f"  context parallel: left {cp.unsharded_groups} unsharded ({cp.reason})")
            else:
                lines.append(f"  context parallel: not applied ({cp.reason})")
        if self.matmul_attention:
            lines.append(f"  attention written as matmuls -> scaled_dot_product_attention: {self.matmul_attention}")
        if self.fp8_attention is not None:
            lines.append(f"  fp8 attention: {self.fp8_attention}")
        for p in self.passes:
            state = "skipped" if p.skipped else f"{p.ops_before} -> {p.ops_after} ops"
            lines.append(f"  pass {p.name}: {state}")
        return "\n".join(lines)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**17 else f"{n / 2**10:.1f} KiB"


def state_size(total: int, sized: int, slots: int) -> str:
    """``"75.3 MiB on the device (75.0 MiB of anchors and residuals for 2 CFG slots)"``."""
    return (f"{mib(total)} on the device ({mib(sized)} of anchors and residuals for {slots} CFG "
            f"slot{'s' if slots > 1 else ''}, the rest counters and history)")
