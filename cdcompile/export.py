"""``cdcompile.export`` / ``cdcompile.load``: one AOTInductor ``.pt2`` with the block cache inside.

export:
1. Dynamo captures the model (``fullgraph=True``) and the same pass list as the backend rewrites
   it (nothing is implemented twice): guard, cond and state updates are in the graph.
2. An ``nn.Module`` wraps the rewritten graph: the model's parameters as parameters, the cache
   state as buffers; its inputs are the model's tensor inputs plus a ``reset`` flag; it returns
   the graph's outputs and what this call did (reused the cache; blocks pruned).
3. ``torch.export`` + ``run_decompositions`` + ``aoti_compile_and_package`` write the ``.pt2``
   (a Python number written into a tensor inside a cond branch, ``x[:, a:] = 1.0``, is first made
   a ``torch.full`` node: export cannot functionalize a tensor constant created in a branch,
   pytorch/pytorch#180354); the
   input layout (which argument is which) is stored beside the AOTI files in the same archive.
   Every option goes in (calibrators, masks, ``cache_type="dbprune"``): the state is whatever
   the plan allocates.

load returns a :class:`CachedArtifact`: call it like the model (same args/kwargs); it keeps the
cache across calls, detects requests from the timestep like the compiled model, and offers
``new_request()``, ``decisions()`` and (DBPrune) ``pruned_blocks()``. It needs torch only (no diffusers).
"""

from __future__ import annotations

import json
import operator
import warnings
import zipfile
from typing import Any

import torch
import torch.nn as nn

from . import guard
from .config import CacheConfig

_SPEC = "extra/cdcompile_inputs.json"  # inside the archive's root folder, next to data/


def export(model: nn.Module, args: tuple = (), kwargs: dict | None = None, path: str = "model.pt2",
           *, options: dict | None = None) -> str:
    """Write ``model`` with the block cache as one AOTInductor package at ``path``; returns it."""
    from .backend import build

    kwargs = dict(kwargs or {})
    cfg = CacheConfig.from_options({**(options or {}), "compiler": "eager"})
    captured: dict[str, Any] = {}

    def capture(gm, example_inputs):
        if captured:
            raise ValueError("cdcompile.export: the model traces to more than one graph")
        gm2, ctx = build(gm, example_inputs, cfg)
        captured.update(gm=gm2, ctx=ctx, inputs=list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            # dynamic=False: the artifact's sizes, even after a dynamic recompile of the same code
            torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    ctx = captured["ctx"]
    if ctx.cache_plan is None:
        raise ValueError(f"cdcompile.export: no block cache could be inserted: {ctx.report.not_cached}")
    _scalars_as_full(captured["gm"])
    wrapper, spec, user = _wrap(model, captured["gm"], captured["inputs"], ctx.cache_plan, args, kwargs)
    reset = torch.ones((), dtype=torch.bool, device=ctx.cache_plan.anchor.device)
    with torch.no_grad():
        ep = torch.export.export(wrapper, tuple(user) + (reset,), strict=False)
    ep = ep.run_decompositions()
    from torch._inductor import aoti_compile_and_package

    out = aoti_compile_and_package(ep, package_path=path, inductor_configs=_inductor_configs(cfg.mode))
    with zipfile.ZipFile(out, "a") as z:
        z.writestr(_root(z) + _SPEC, json.dumps(spec))
    return out


def _inductor_configs(mode: str | None) -> dict[str, Any]:
    """AOTInductor's configs: the backend's patches over the settings of Inductor's ``mode``, less
    CUDA graphs, which an AOTInductor package does not capture (said when the mode asks for them)."""
    from .backend import inductor_patches, mode_settings

    settings = mode_settings(mode)
    if settings.pop("triton.cudagraphs", False):
        warnings.warn(f"cdcompile.export: mode={mode!r} asks for CUDA graphs, which an AOTInductor package "
                      f"does not capture; its other settings {sorted(settings)} apply", stacklevel=3)
    return {**settings, **inductor_patches()}


def _scalars_as_full(gm: torch.fx.GraphModule) -> None:
    """In the cond branches of ``gm``: ``x[i] = 1.0`` becomes ``x[i] = torch.full((), 1.0, ...)``, and
    ``torch.tensor(1.0, ...)`` a ``torch.full``. Traced by torch.export, a Python number written into a
    tensor becomes a tensor constant of the branch, which ``run_decompositions`` and AOTInductor then
    fail to functionalize ("Attempting to use FunctionalTensor on its own", pytorch/pytorch#180354);
    a ``full`` is an op, not a constant. Same values, so the artifact computes what the model does."""
    from .passes import _fx

    for name, sub in gm.named_modules():
        if not name or not isinstance(sub, torch.fx.GraphModule):
            continue
        changed = False
        for n in list(sub.graph.nodes):
            if n.op != "call_function":
                continue
            if n.target is operator.setitem and isinstance(n.args[2], (bool, int, float)):
                like = _fx.fake_value(n.args[0])
                if not isinstance(like, torch.Tensor):
                    continue
                with sub.graph.inserting_before(n):
                    full = sub.graph.call_function(torch.full, ((), n.args[2]),
                                                   {"dtype": like.dtype, "device": like.device})
                n.args = (n.args[0], n.args[1], full)
                changed = True
            elif n.target is torch.tensor and len(n.args) == 1 and isinstance(n.args[0], (bool, int, float)):
                out = _fx.fake_value(n)
                if not isinstance(out, torch.Tensor):
                    continue
                n.target, n.args = torch.full, ((), n.args[0])
                n.kwargs = {"dtype": out.dtype, "device": out.device}
                changed = True
        if changed:
            sub.recompile()


def _root(z: zipfile.ZipFile) -> str:
    name = next(n for n in z.namelist() if n.endswith("archive_format"))
    return name[: -len("archive_format")]


class _Exported(nn.Module):
    """The rewritten graph as a module: parameters, cache state as buffers, a reset input."""

    def __init__(self, gm, layout, params, consts, state):
        super().__init__()
        self.gm = gm
        self.layout = layout  # per graph input: ("user", k) | ("param", name) | ("const", name)
        for name, p in params.items():
            self.register_parameter(name, p)
        for name, c in consts.items():
            self.register_buffer(name, c)
        self.state_names = [n for n in state if n != "reset"]
        for name in self.state_names:
            self.register_buffer(f"state_{name}", state[name].clone())

    def forward(self, *inputs):
        *user, reset = inputs
        args = [user[k] if kind == "user" else getattr(self, k) for kind, k in self.layout]
        states = [getattr(self, f"state_{n}") for n in self.state_names]
        out = self.gm(*args, reset.clone(), *states)
        flags, counters = getattr(self, "state_hist_flag"), getattr(self, "state_counters")
        row = counters[2] % guard.HISTORY
        slot = torch.clamp(counters[1], max=flags.shape[1] - 1)
        step = torch.clamp(counters[0], max=guard.MAX_STEPS - 1)
        # What this call did: [reused the cache (DBCache) / pruned a block (DBPrune), blocks pruned]
        pruned = getattr(self, "state_hist_pruned", None)
        did = torch.stack([(_at(flags, row, slot, step) == 1).to(torch.int64),
                           _at(pruned, row, slot, step).to(torch.int64) if pruned is not None
                           else torch.zeros_like(counters[0])])
        return (*out, did) if isinstance(out, (tuple, list)) else (out, did)


def _at(t: torch.Tensor, *index: torch.Tensor) -> torch.Tensor:
    """``t[i, j, k]`` for 0-d index tensors, as ``index_select``s: torch 2.11's non-strict export
    turns a 0-d tensor index into a data-dependent int and fails."""
    for dim, i in enumerate(index):
        t = t.index_select(dim, i.reshape(1))
    return t.reshape(())


def _wrap(model, gm, example_inputs, plan, args, kwargs):
    owners = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    user_paths = [(("args", k), a) for k, a in enumerate(args) if isinstance(a, torch.Tensor)]
    user_paths += [(("kwargs", k), v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][:len(example_inputs)]
    layout, params, consts, spec, user = [], {}, {}, [], []
    for node, ex in zip(placeholders, example_inputs):
        if id(ex) in owners and isinstance(ex, nn.Parameter):
            name = "p_" + owners[id(ex)].replace(".", "__")
            params[name] = ex
            layout.append(("param", name))
            continue
        hit = next((p for p, t in user_paths if t is ex), None)
        if hit is not None:
            layout.append(("user", len(user)))
            spec.append(list(hit))
            user.append(ex)
            continue
        if not isinstance(ex, torch.Tensor):
            raise ValueError(f"cdcompile.export: graph input {node.name} is a {type(ex).__name__}, "
                             "not a tensor; export needs static shapes and tensor inputs")
        name = "c_" + (owners.get(id(ex), node.name)).replace(".", "__")
        consts[name] = ex.detach().clone()
        layout.append(("const", name))
    state = plan.allocate().tensors_by_name
    return _Exported(gm, layout, params, consts, state), spec, user


class CachedArtifact:
    """A loaded ``.pt2``: call it like the model; the cache state lives inside the package."""

    def __init__(self, path: str):
        from torch._inductor import aoti_load_package

        with zipfile.ZipFile(path) as z:
            self.spec = [tuple(p) for p in json.loads(z.read(_root(z) + _SPEC))]
        self.runner = aoti_load_package(path)
        self._reset = True
        self._flags: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decisions: list[torch.Tensor] = []

    def new_request(self) -> None:
        self._reset = True

    def __call__(self, *args: Any, **kwargs: Any):
        tensors = [args[k] if where == "args" else kwargs[k] for where, k in self.spec]
        dev = tensors[0].device if tensors else torch.device("cpu")
        if dev not in self._flags:  # made once per device: no host-to-device copy per call
            self._flags[dev] = (torch.tensor(False, device=dev), torch.tensor(True, device=dev))
        reset = self._flags[dev][self._reset]
        self._reset = False
        *out, did = self.runner(*tensors, reset)
        self._decisions.append(did)
        return tuple(out)

    def decisions(self) -> list[bool]:
        """Whether each call so far reused the cache (DBCache) or pruned any block (DBPrune)."""
        return [bool(d) for d in self._read()[:, 0]]

    def pruned_blocks(self) -> list[int]:
        """Blocks pruned by each call so far (DBPrune; 0 for DBCache)."""
        return [int(d) for d in self._read()[:, 1]]

    def _read(self) -> torch.Tensor:
        # one device read for all calls so far
        return torch.stack(self._decisions).cpu() if self._decisions else torch.zeros(0, 2, dtype=torch.int64)


def load(path: str) -> CachedArtifact:
    """Load a package written by :func:`export`."""
    return CachedArtifact(path)
