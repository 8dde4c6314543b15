"""Per-model cache state, the callable the backend returns, and the user calls over them.

One compiled graph can serve several model instances (Dynamo shares compiled code between
instances of a class: parameters are graph inputs). :class:`CachedGraph` therefore keeps one
:class:`CacheState` per model instance, keyed by a parameter tensor it receives. It appends that
state (plus a reset flag) to the graph's inputs; the graph itself advances the clock, decides and
writes the state (cdcompile.guard). Host-side work per call is a dict lookup: no device sync.

A call that lands in another graph of the same model than the previous call (a new shape, dtype
or device made Dynamo compile another graph) starts a new request there, so no residual of
another shape or dtype is ever reused.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from typing import Any, Callable

import torch

from . import guard

_graphs: "weakref.WeakSet[CachedGraph]" = weakref.WeakSet()
_graph_index = itertools.count()  # creation order: summaries list graphs oldest first
_last_graph: dict[int, "weakref.ref[CachedGraph]"] = {}  # id(key parameter) -> graph called last
_steps_hint: dict[int, int] = {}  # id(parameter) -> num_inference_steps given to new_request


@dataclasses.dataclass
class CacheState:
    """The tensors one model instance's cache lives in (layout: cdcompile.guard docstring)."""

    tensors_by_name: dict[str, torch.Tensor]
    reset_pending: bool = True
    sizes: tuple[int, ...] = ()  # the dynamic sizes it was allocated for (plan.size_sources)

    mask_spec: Any = None
    mask_steps: int | None = None  # step count the mask tensor was built for

    @staticmethod
    def names(plan) -> list[str]:
        head = ["reset", "clock", "counters"]
        hist = ["hist_flag", "hist_diff", "hist_meta"]
        mask = ["mask"] if plan.mask_spec is not None else []
        if plan.prune_blocks is not None:
            per_block = [name for b in plan.prune_blocks for name in b.state_names()]
            return head + ["slot_ctr"] + per_block + hist + ["hist_pruned"] + mask
        return (head + ["anchor", "slot_ctr", "cal_nodes"]
                + [f"residual_{k}" for k in range(len(plan.residuals))] + hist + mask)

    @classmethod
    def allocate(cls, plan, sizes: dict | None = None) -> "CacheState":
        """Zeroed state for ``plan``; ``sizes`` gives the value of each dynamic size (symbol -> int)."""
        dev = plan.anchor.device
        s = plan.slots + 1  # + the overflow slot

        def size(d):
            return int(d.node.expr.xreplace(sizes)) if isinstance(d, torch.SymInt) and sizes is not None else d

        def zeros(shape, dtype):
            return torch.zeros((s, *map(size, shape)), dtype=dtype, device=dev)

        t = {
            "reset": torch.ones((), dtype=torch.bool, device=dev),
            "clock": torch.full((1,), -math.inf, dtype=torch.float32, device=dev),
            "counters": torch.zeros(3, dtype=torch.int64, device=dev),
        }
        if plan.prune_blocks is not None:
            t["slot_ctr"] = zeros((4,), torch.int64)
            for b in plan.prune_blocks:
                t[b.anchor_name] = zeros(b.anchor.shape, b.anchor.dtype)
                for r in b.residuals:
                    t[b.residual_name(r.label)] = zeros(r.shape, r.dtype)
        else:
            t["anchor"] = zeros(plan.anchor.shape, plan.anchor.dtype)
            t["slot_ctr"] = zeros((4,), torch.int64)
            t["cal_nodes"] = zeros((3,), torch.float32)
            for k, r in enumerate(plan.residuals):
                t[f"residual_{k}"] = zeros((plan.history, *r.shape), r.dtype)
        t["hist_flag"] = torch.full((guard.HISTORY, s, guard.MAX_STEPS), -1, dtype=torch.int8, device=dev)
        t["hist_diff"] = torch.full((guard.HISTORY, s, guard.MAX_STEPS), math.nan, device=dev)
        t["hist_meta"] = torch.zeros((guard.HISTORY, 2), dtype=torch.int64, device=dev)
        if plan.prune_blocks is not None:
            t["hist_pruned"] = torch.zeros((guard.HISTORY, s, guard.MAX_STEPS), dtype=torch.int16, device=dev)
        state = cls(t, mask_spec=plan.mask_spec)
        if plan.mask_spec is not None:
            t["mask"] = torch.ones(guard.MAX_STEPS, dtype=torch.int8, device=dev)
            if not isinstance(plan.mask_spec, str) or plan.num_inference_steps is not None:
                state.set_steps(plan.num_inference_steps)
        assert list(t) == cls.names(plan)
        return state

    def set_steps(self, steps: int | None) -> None:
        """Build the steps mask for requests of ``steps`` steps (one host-to-device copy)."""
        from .masks import build_mask

        if self.mask_spec is None or (steps == self.mask_steps and steps is not None):
            return
        bits = build_mask(self.mask_spec, steps)[: guard.MAX_STEPS]
        mask = torch.zeros(guard.MAX_STEPS, dtype=torch.int8)  # steps past the mask count as 0
        mask[: len(bits)] = torch.tensor(bits, dtype=torch.int8)
        self.tensors_by_name["mask"].copy_(mask)
        self.mask_steps = steps

    def carry_on(self, old: "CacheState") -> None:
        """Continue ``old``'s request count, history and steps mask (their shapes never depend on the
        model's sizes); the anchor and residuals stay fresh, and the reset flag starts a request."""
        for name, t in self.tensors_by_name.items():
            if name == "counters" or name == "mask" or name.startswith("hist_"):
                t.copy_(old.tensors_by_name[name])
        self.mask_steps = old.mask_steps

    def tensors(self) -> list[torch.Tensor]:
        return list(self.tensors_by_name.values())

    def new_request(self) -> None:
        """The next call starts a request (the graph reads the flag and clears the slots)."""
        self.tensors_by_name["reset"].fill_(True)

    def requests(self) -> list[dict[str, Any]]:
        """The recorded history, oldest first (reads the device once)."""
        t = self.tensors_by_name
        total = int(t["counters"][2])
        # detach: a call under grad mode leaves the history with an autograd edge
        flags, diffs, meta = (t[k].detach().cpu() for k in ("hist_flag", "hist_diff", "hist_meta"))
        pruned = t["hist_pruned"].detach().cpu() if "hist_pruned" in t else None
        out = []
        for req in range(max(1, total - guard.HISTORY + 1), total + 1):
            row = req % guard.HISTORY
            steps, slots = int(meta[row, 0]), int(meta[row, 1])
            per_slot = []
            for k in range(min(slots, flags.shape[1])):
                f, d = flags[row, k, :steps], diffs[row, k, :steps]
                entry = {
                    "cached_steps": [s for s in range(steps) if int(f[s]) == 1],
                    "computed_steps": [s for s in range(steps) if int(f[s]) == 0],
                    "residual_diffs": {s: float(d[s]) for s in range(steps)
                                       if int(f[s]) >= 0 and not math.isnan(float(d[s]))},
                }
                if pruned is not None:  # DBPrune: blocks pruned per step (0 where no call)
                    entry["pruned_blocks"] = [int(pruned[row, k, s]) for s in range(steps)]
                per_slot.append(entry)
            out.append({"request": req, "steps": steps, "slots": per_slot})
        return out


class CachedGraph:
    """The callable the backend returns when it inserted the block cache."""

    def __init__(self, compiled: Callable, plan, report, first_state: CacheState | None = None):
        self.compiled = compiled
        self.plan = plan
        self.report = report
        self._states: dict[int, tuple[weakref.ref, CacheState]] = {}
        self._spare = first_state
        self.index = next(_graph_index)
        _graphs.add(self)

    def state_for(self, key: torch.Tensor, args: tuple = ()) -> CacheState:
        """The state of the model instance ``key`` identifies, for the sizes of ``args``.

        A graph with dynamic sizes keeps one state per instance: a call with other sizes replaces it
        with a fresh one (a new request, as a new static graph would start), which carries on the
        request count, the history and the steps mask, so ``summary`` still lists earlier requests.
        """
        sizes = self.plan.sizes_of(args)
        entry = self._states.get(id(key))
        old = entry[1] if entry is not None and entry[0]() is key else None
        if old is not None and old.sizes == sizes:
            return old
        # the backend's spare is the first static state (None with dynamic sizes)
        state, self._spare = (self._spare or self.plan.allocate(args)), None
        state.sizes = sizes
        if old is not None:
            state.carry_on(old)
        if self.plan.mask_spec is not None and state.mask_steps is None:
            state.set_steps(_steps_hint.get(id(key), self.plan.num_inference_steps))
        self._states[id(key)] = (weakref.ref(key), state)
        return state

    def __call__(self, *args: Any) -> Any:
        key = args[self.plan.key_input]
        state = self.state_for(key, args)
        last = _last_graph.get(id(key))
        if last is None or last() is not self:
            state.new_request()
            _last_graph[id(key)] = weakref.ref(self)
        out = self.compiled(*args, *state.tensors())
        return out

    def states_of(self, param_ids: set[int]) -> list[CacheState]:
        return [st for k, (ref, st) in self._states.items() if k in param_ids and ref() is not None]


def _params(model: Any) -> set[int]:
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, torch.nn.Module):
        from .pipeline import transformer_names

        names = transformer_names(model)
        hint = f"; for a pipeline, pass its transformer: {', '.join(f'pipe.{n}' for n in names)}" if names else ""
        raise TypeError(f"expected a torch.nn.Module or what torch.compile returned, got {type(model).__name__}{hint}")
    # buffers too: a graph may be keyed by a buffer input (Wan: its rotary table comes first)
    return {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}


def cached_states(model: Any) -> list[tuple[CachedGraph, CacheState]]:
    ids = _params(model)
    return [(g, st) for g in sorted(_graphs, key=lambda g: g.index) for st in g.states_of(ids)]


def new_request(model: Any, num_inference_steps: int | None = None) -> None:
    """Start a new request for ``model`` (the module or what torch.compile returned): the next call
    is step 0 of a fresh request in every compiled graph of the model. ``num_inference_steps``
    rebuilds a steps computation mask given as a preset or bins for that step count."""
    for _, st in cached_states(model):
        st.new_request()
        if num_inference_steps is not None:
            st.set_steps(num_inference_steps)
    if num_inference_steps is not None:  # for graphs not compiled yet (the first pipeline call)
        for pid in _params(model):
            _steps_hint[pid] = num_inference_steps
