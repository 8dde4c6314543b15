"""Per-model cache state, the callable the backend returns, and the user calls over them.

One compiled graph can serve several model instances (Dynamo shares compiled code between
instances of a class: parameters are graph inputs), and one model instance can run several graphs
(one per resolution with ``dynamic=False``, one per text length, a graph recompiled with symbolic
sizes). A model instance, identified by a parameter tensor the graph receives, therefore owns its
:class:`CacheState` objects, one per state *layout*: the state tensors' names, shapes, dtypes and
devices, and the cache options they serve. Every graph whose state has that layout reads and
writes the same state. :class:`CachedGraph` appends it (plus a reset flag) to the graph's inputs;
the graph itself advances the clock, decides and writes the state (cdcompile.guard). Host-side
work per call is two dict lookups: no device sync.

So calls whose graphs differ only in what the state does not hold share a request: true CFG whose
negative prompt is shorter than the prompt (two graphs, one per text length) keeps slot 0 for the
prompt and slot 1 for the negative prompt, as one graph would; Dynamo's recompile with symbolic
sizes carries on the request it interrupts. Where the layout differs (the residual of the text
stream has the text length), each branch has its own state and counts its own steps. A call whose
cached hidden stream has another shape, dtype or device than the model's previous call (a new
resolution, ``model.half()``) starts a new request in the state it lands in: no residual of
another shape or dtype is ever reused, and a stale request never continues.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import os
import sys
import warnings
import weakref
from typing import Any, Callable

import torch

from . import calibrators, guard

_layout_ids: dict[tuple, int] = {}  # CacheState.layout -> a small int the per-call lookups hash
# id(key parameter) -> (key ref, {layout id: state}, least recently used first)
_model_states: dict[int, tuple[weakref.ref, collections.OrderedDict]] = {}
MAX_STATES = 8  # layouts kept per model instance (resolutions, text lengths), least recently used out
_last_call: dict[int, tuple["weakref.ref[CacheState]", tuple]] = {}  # id(key parameter) -> (state, signature)
_use_clock = itertools.count()  # call order: summaries list the state used last at the end
_graph_clock = itertools.count()  # creation order: summaries number the graphs in it
_steps_hint: dict[int, int] = {}  # id(parameter) -> num_inference_steps given to new_request
# The timestep input of the last graph called that has one, with the model code frame that called
# it: a graph that caches but lost its timestep to an earlier graph break of the same call reads it
# (CachePlan.timestep_source == "borrowed") while that frame is still on its own call stack.
_published: list[Any] = [None, 0, None]  # tensor, id(frame), frame's code
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _caller_frame():
    """The model code that called a compiled graph (past torch's wrappers and this module)."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename == __file__):
        f = f.f_back
    return f


def publish_timestep(t: torch.Tensor) -> None:
    f = _caller_frame()
    _published[:] = [t, id(f), f.f_code if f is not None else None]


def published_timestep() -> torch.Tensor | None:
    """The timestep published by an earlier graph of the call running now (its frame is on the
    stack), else None: a stale one from another call or model is never read."""
    t, frame_id, code = _published
    if t is None:
        return None
    f = sys._getframe(1)
    while f is not None:
        if id(f) == frame_id and f.f_code is code:
            return t
        f = f.f_back
    return None


class TimestepPublisher:
    """A graph without the block cache whose input ``index`` is a timestep: each call publishes it
    (a reference, no device work) for a graph after a break of the same call."""

    def __init__(self, compiled: Callable, index: int):
        self.compiled, self.index = compiled, index

    def __call__(self, *args: Any) -> Any:
        publish_timestep(args[self.index])
        return self.compiled(*args)


@dataclasses.dataclass
class CacheState:
    """The tensors one model instance's cache lives in (layout: cdcompile.guard docstring)."""

    tensors_by_name: dict[str, torch.Tensor]
    reset_pending: bool = True
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # symbol -> value it was allocated for
    signature: tuple = ()  # the cached hidden stream's (shape, dtype, device) at those sizes
    last_used: int = -1  # _use_clock at its last call
    graph: Any = None  # weakref to the CachedGraph that ran it last
    ran_in: list = dataclasses.field(default_factory=list)  # weakrefs to every CachedGraph that ran it

    def layout(self, plan) -> tuple:
        """What a graph must share to use this state: the plan's fingerprint and the tensors' metadata."""
        return (plan.fingerprint, tuple((name, tuple(t.shape), t.dtype, t.device)
                                        for name, t in self.tensors_by_name.items()))

    mask_spec: Any = None
    mask_steps: int | None = None  # step count the mask tensor was built for
    overflow_warned: bool = False  # new_request warned that calls overflowed the CFG slots

    @staticmethod
    def names(plan) -> list[str]:
        head = ["reset", "clock", "counters"]
        hist = ["hist_flag", "hist_diff", "hist_meta"]
        mask = ["mask"] if plan.mask_spec is not None else []
        if plan.prune_blocks is not None:
            per_block = [name for b in plan.prune_blocks for name in b.state_names()]
            return head + ["slot_ctr"] + per_block + hist + ["hist_pruned"] + mask
        return (head + ["anchor", "slot_ctr"] + (["slot_acc"] if plan.budget is not None else [])
                + (["step_diff"] if plan.share_diff else []) + ["cal_nodes"]
                + [f"residual_{k}" for k in range(len(plan.residuals))] + hist + mask)

    @classmethod
    def allocate(cls, plan, sizes: dict | None = None) -> "CacheState":
        """Zeroed state for ``plan``; ``sizes`` gives the value of each dynamic size (symbol -> int)."""
        dev = plan.anchor.device
        s = plan.slots + 1  # + the overflow slot

        def size(d):
            if not isinstance(d, torch.SymInt):
                return d
            if not d.node.expr.free_symbols:  # a size Dynamo specialized, still wrapped as a SymInt
                return int(d.node.expr)
            return int(d.node.expr.xreplace(sizes)) if sizes is not None else d

        def zeros(shape, dtype, rows=s):
            return torch.zeros((rows, *map(size, shape)), dtype=dtype, device=dev)

        def sized(shape, dtype):  # the streams' size: no row for the overflow slot (guard.gate's ``row``)
            return zeros(shape, dtype, plan.slots)

        def anchor(shape, dtype):  # every downsample-th channel (guard.downsample)
            *lead, last = map(size, shape)
            return sized((*lead, -(-last // plan.downsample)), dtype)

        t = {
            "reset": torch.ones((), dtype=torch.bool, device=dev),
            "clock": torch.full((1,), -math.inf, dtype=torch.float32, device=dev),
            "counters": torch.zeros(6, dtype=torch.int64, device=dev),
        }
        if plan.prune_blocks is not None:
            t["slot_ctr"] = zeros((4,), torch.int64)
            for b in plan.prune_blocks:
                t[b.anchor_name] = anchor(b.anchor.shape, b.anchor.dtype)
                if b.cal_name:
                    t[b.cal_name] = zeros((calibrators.nodes_width(b.dmd) + 1,), torch.float32)
                for k, r in enumerate(b.residuals):
                    t[b.residual_name(r.label)] = sized((b.history_of(k), *r.shape), r.dtype)
        else:
            t["anchor"] = anchor(plan.anchor.shape, plan.anchor.dtype)
            t["slot_ctr"] = zeros((4,), torch.int64)
            if plan.budget is not None:
                t["slot_acc"] = zeros((), torch.float32)
            if plan.share_diff:
                t["step_diff"] = torch.full((1,), math.nan, device=dev)
            t["cal_nodes"] = zeros((calibrators.nodes_width(plan.dmd),), torch.float32)
            for k, r in enumerate(plan.residuals):
                t[f"residual_{k}"] = sized((plan.history_of(k), *r.shape), r.dtype)
        t["hist_flag"] = torch.full((guard.HISTORY, s, guard.MAX_STEPS), -1, dtype=torch.int8, device=dev)
        t["hist_diff"] = torch.full((guard.HISTORY, s, guard.MAX_STEPS), math.nan, device=dev)
        t["hist_meta"] = torch.zeros((guard.HISTORY, 2), dtype=torch.int64, device=dev)
        if plan.prune_blocks is not None:
            t["hist_pruned"] = torch.zeros((guard.HISTORY, s, guard.MAX_STEPS), dtype=torch.int16, device=dev)
        state = cls(t, mask_spec=plan.mask_spec)
        state.signature = (tuple(map(size, plan.anchor.shape)), plan.anchor.dtype, plan.anchor.device)
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

    def tensors(self) -> list[torch.Tensor]:
        return list(self.tensors_by_name.values())

    def nbytes(self) -> tuple[int, int]:
        """Bytes held: ``(all state, the part of the streams' size)``: anchors and residuals, one
        row per CFG slot; the rest is counters and the history."""
        sized = sum(t.nbytes for n, t in self.tensors_by_name.items() if n.startswith(("anchor", "residual")))
        return sum(t.nbytes for t in self.tensors_by_name.values()), sized

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
        cache_slots = self.cache_slots()  # the history's last row is the overflow slot's
        for req in range(max(1, total - guard.HISTORY + 1), total + 1):
            row = req % guard.HISTORY
            steps, slots = int(meta[row, 0]), int(meta[row, 1])
            per_slot = []
            for k in range(min(slots, cache_slots + 1)):
                f, d = flags[row, k, :steps], diffs[row, k, :steps]
                entry = {
                    "cached_steps": [s for s in range(steps) if int(f[s]) == 1],
                    "computed_steps": [s for s in range(steps) if int(f[s]) == 0],
                    "residual_diffs": {s: float(d[s]) for s in range(steps)
                                       if int(f[s]) >= 0 and not math.isnan(float(d[s]))},
                }
                if pruned is not None:  # DBPrune: blocks pruned per step (0 where no call)
                    entry["pruned_blocks"] = [int(pruned[row, k, s]) for s in range(steps)]
                if k == cache_slots:  # calls k.. of each timestep share it (the last one's record)
                    entry["overflow_calls"] = [k, slots - 1]
                per_slot.append(entry)
            out.append({"request": req, "steps": steps, "calls_per_step": slots, "slots": per_slot})
        return out

    def last_calls_per_step(self) -> int:
        """Calls that shared a timestep in the latest request (reads the device)."""
        t = self.tensors_by_name
        return int(t["hist_meta"][int(t["counters"][2]) % guard.HISTORY, 1])

    def cache_slots(self) -> int:
        """CFG slots with a state of their own (the counters' last row is the overflow slot's)."""
        return self.tensors_by_name["slot_ctr"].shape[0] - 1


def overflow_advice(calls: int, cache_slots: int) -> str:
    """What to do when more calls share a timestep than there are CFG slots."""
    one = calls == cache_slots + 1
    which = (f"call {cache_slots} of each timestep is" if one
             else f"calls {cache_slots}-{calls - 1} of each timestep are")
    return (f"{calls} calls share each timestep (CFG, a sampler that evaluates a timestep twice such as "
            f"Heun, or both); cache_slots={cache_slots} keeps a cache state for the first {cache_slots}, so "
            f"{which} never cached: set cache_slots={calls}")


class CachedGraph:
    """The callable the backend returns when it inserted the block cache."""

    def __init__(self, compiled: Callable, plan, report, first_state: CacheState | None = None):
        self.compiled = compiled
        self.plan = plan
        self.report = report
        self.created = next(_graph_clock)
        self._layouts: dict[tuple, int] = {}  # call sizes -> state layout id
        self._spare = first_state  # the backend's first static state (None with dynamic sizes)

    def state_for(self, key: torch.Tensor, args: tuple = ()) -> CacheState:
        """The state of the model instance ``key`` identifies, for the sizes of ``args``."""
        sizes = self.plan.sizes_of(args)
        fresh = None
        layout = self._layouts.get(sizes)
        if layout is None:  # first call at these sizes: allocate once to learn the layout
            fresh, self._spare = (self._spare or self.plan.allocate(args)), None
            layout = self._layouts[sizes] = _layout_ids.setdefault(fresh.layout(self.plan), len(_layout_ids))
        entry = _model_states.get(id(key))
        if entry is None or entry[0]() is not key:
            entry = _model_states[id(key)] = (weakref.ref(key), collections.OrderedDict())
            weakref.finalize(key, _forget, id(key))  # the states go with the model
        states = entry[1]
        state = states.get(layout)
        if state is not None and state.graph is not None and state.graph() is None:
            state = None  # the graphs that ran it were dropped (torch._dynamo.reset()): start afresh
        if state is not None:
            states.move_to_end(layout)
            return state
        state = fresh or self.plan.allocate(args)
        state.sizes = {str(sym): v for sym, v in zip(self.plan.size_sources, sizes)}
        if self.plan.mask_spec is not None and state.mask_steps is None:
            state.set_steps(_steps_hint.get(id(key), self.plan.num_inference_steps))
        states[layout] = state
        states.move_to_end(layout)
        while len(states) > MAX_STATES:
            states.popitem(last=False)
        return state

    def __call__(self, *args: Any) -> Any:
        key = args[self.plan.key_input]
        state = self.state_for(key, args)
        last = _last_call.get(id(key))
        if last is None or last[0]() is not state:
            if last is None or last[1] != state.signature:
                state.new_request()  # a new hidden shape, dtype or device: never continue a request
            _last_call[id(key)] = (weakref.ref(state), state.signature)
        if state.graph is None or state.graph() is not self:
            state.graph = weakref.ref(self)
            if all(g() is not self for g in state.ran_in):
                state.ran_in.append(state.graph)
        state.last_used = next(_use_clock)
        source = self.plan.timestep_source
        if source == "own":
            publish_timestep(args[self.plan.timestep_index])
        elif source == "borrowed":  # the clock reads the largest value: pass just that
            t = published_timestep()  # none this call: NaN, and the clock counts the call as a step
            t = torch.full((1,), math.nan) if t is None else t.detach().amax().to(torch.float32).reshape(1)
            return self.compiled(*args, t.to(state.tensors_by_name["clock"].device), *state.tensors())
        return self.compiled(*args, *state.tensors())


@contextlib.contextmanager
def traced_module(model: Any, who: str, stacklevel: int = 2):
    """``model`` as the module a fresh ``torch.compile`` should trace (``explain``, ``export``): the
    module inside a ``torch.compile`` wrapper, its own compiled call (``Module.compile``,
    ``cdcompile.enable``) set aside until the block ends, which would otherwise run instead. Warns
    when the model holds cache state, which the Dynamo reset of the caller drops (``stacklevel``:
    the user's frame, counted from the caller's)."""
    target = getattr(model, "_orig_mod", model)
    if not isinstance(target, torch.nn.Module):
        yield target
        return
    if cached_states(target):
        warnings.warn(f"{who} resets Dynamo, as torch._dynamo.explain does: the compiled graphs of every model "
                      f"are dropped and compile again at their next call, and the block cache's statistics "
                      f"(cdcompile.summary) start afresh", stacklevel=stacklevel + 2)
    call = target.__dict__.pop("_compiled_call_impl", None)
    try:
        yield target
    finally:
        if call is not None:
            target._compiled_call_impl = call


def _forget(key_id: int) -> None:
    _model_states.pop(key_id, None)
    _last_call.pop(key_id, None)


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
    """Every (graph that ran it last, state) of ``model``, the state called last at the end."""
    pairs = []
    for pid in _params(model):
        entry = _model_states.get(pid)
        if entry is None or entry[0]() is None:
            continue
        for st in entry[1].values():
            graph = st.graph() if st.graph is not None else None
            if graph is not None:  # a state whose graphs were dropped (torch._dynamo.reset()) is gone
                pairs.append((graph, st))
    return sorted(pairs, key=lambda p: p[1].last_used)


def warn_overflow(model: Any, stacklevel: int = 2) -> None:
    """Warn, once per state, when the latest request of ``model`` had more calls per timestep than
    CFG slots (one small read of the device per state; called once per request)."""
    for _, st in cached_states(model):
        if st.overflow_warned:
            continue
        calls, slots = st.last_calls_per_step(), st.cache_slots()
        if calls > slots:
            st.overflow_warned = True
            warnings.warn(f"cdcompile: {overflow_advice(calls, slots)}", stacklevel=stacklevel + 1)


def new_request(model: Any, num_inference_steps: int | None = None) -> None:
    """Start a new request for ``model`` (the module or what torch.compile returned): the next call
    is step 0 of a fresh request in every compiled graph of the model. ``num_inference_steps``
    rebuilds a steps computation mask given as a preset or bins for that step count."""
    warn_overflow(model)
    for _, st in cached_states(model):
        st.new_request()
        if num_inference_steps is not None:
            st.set_steps(num_inference_steps)
    if num_inference_steps is not None:  # for graphs not compiled yet (the first pipeline call)
        for pid in _params(model):
            _steps_hint[pid] = num_inference_steps
