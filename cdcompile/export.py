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

With ``dynamic_shapes`` (torch.export's form, keyed by ``forward``'s parameter names), Dynamo
captures with those sizes marked dynamic, the sizes Dynamo passes as graph inputs are read from the
tensor inputs that hold them, and the state tensors whose shapes hold a dynamic size (anchor,
residuals) become inputs of the package rather than buffers (AOTInductor writes into them, as into
any mutated input); their shapes are stored as size expressions for the loader.

load returns a :class:`CachedArtifact`: call it like the model (same args/kwargs); it keeps the
cache across calls, detects requests from the timestep like the compiled model, and offers
``new_request()``, ``decisions()`` and (DBPrune) ``pruned_blocks()``. With dynamic sizes it
allocates the sized state for the sizes of each call, anew (and a new request) when they change.
It needs torch only (no diffusers).
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


def _sympy_functions() -> dict:
    """The functions torch's size expressions print with (``FloorDiv(s0, 2)``, ...), for sympify."""
    from torch.utils._sympy import functions

    return {name: getattr(functions, name) for name in ("FloorDiv", "CeilDiv", "Mod", "PythonMod", "CleanDiv",
                                                         "IntTrueDiv", "Max", "Min") if hasattr(functions, name)}


_SYMPY = _sympy_functions()


def export(model: nn.Module, args: tuple = (), kwargs: dict | None = None, path: str = "model.pt2",
           *, options: dict | None = None, dynamic_shapes: dict | None = None, progress: bool = True) -> str:
    """Write ``model`` with the block cache as one AOTInductor package at ``path``; returns it.

    ``dynamic_shapes`` (torch.export's form, keyed by the names of ``model.forward``'s parameters:
    ``{"hidden_states": {1: Dim("tokens", max=8192)}, "img_ids": {0: Dim("tokens", max=8192)}}``)
    makes those sizes symbolic: one package serves every size in range, the cache state is
    allocated by the loaded package for each size it is called with, and a new size starts a new
    request (as in the compiled model). Without it every size is fixed to the example's.

    ``progress`` shows a bar over the four stages on stderr (capture, torch.export,
    decompositions, AOTInductor's compile, which takes minutes for a full-size model)."""
    if not isinstance(progress, bool):
        raise ValueError(f"cdcompile.export: progress must be True or False, got {progress!r}")
    with _Stages(progress) as bar:
        return _export(model, args, kwargs, path, options, dynamic_shapes, bar)


def _export(model, args, kwargs, path, options, dynamic_shapes, bar: "_Stages") -> str:
    from .backend import build
    from .runtime import traced_module

    kwargs = dict(kwargs or {})
    cfg = CacheConfig.from_options({**(options or {}), "compiler": "eager"})
    dims = _user_dims(model, args, kwargs, dynamic_shapes)
    captured: dict[str, Any] = {}

    def capture(gm, example_inputs):
        if captured:
            raise ValueError("cdcompile.export: the model traces to more than one graph")
        gm2, ctx = build(gm, example_inputs, cfg)
        captured.update(gm=gm2, ctx=ctx, inputs=list(example_inputs))
        return gm.forward

    if dims:  # Dynamo's copies of the inputs, so the caller's tensors keep no dynamic marks
        args, kwargs = _marked(args, kwargs, dims)
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    bar.stage("capture: Dynamo and the passes")
    try:
        with traced_module(model, "cdcompile.export", stacklevel=3) as target, torch.no_grad():
            torch._dynamo.reset()
            # dynamic=False: the artifact's sizes, even after a dynamic recompile of the same code;
            # only the sizes marked from dynamic_shapes are symbolic
            torch.compile(target, backend=capture, fullgraph=True, dynamic=False)(*args, **kwargs)
    except ConstraintViolationError as e:
        raise ValueError(f"cdcompile.export: a size named in dynamic_shapes cannot vary as given: {e.args[0]}\n"
                         f"Where the model ties it to a size of another input (FLUX: hidden_states dim 1 and "
                         f"img_ids dim 0), give both the same torch.export.Dim") from None
    finally:
        torch._dynamo.reset()
    ctx = captured["ctx"]
    if ctx.cache_plan is None:
        raise ValueError(f"cdcompile.export: no block cache could be inserted: {ctx.report.not_cached}")
    _scalars_as_full(captured["gm"])
    wrapper, spec, user = _wrap(model, captured["gm"], captured["inputs"], ctx.cache_plan, args, kwargs)
    reset = torch.ones((), dtype=torch.bool, device=ctx.cache_plan.anchor.device)
    sized = wrapper.sized_example()
    shapes = None
    if dims:
        shapes = ([dims.get(tuple(where), None) for where in spec] + [None]
                  + [{d: torch.export.Dim.AUTO for d in sizes} for sizes in wrapper.sized_dims()])
        shapes = (tuple(shapes),)
    bar.stage("torch.export")
    with torch.no_grad():
        ep = torch.export.export(wrapper, tuple(user) + (reset,) + tuple(sized), strict=False,
                                 dynamic_shapes=shapes)
    bar.stage("decompositions")
    ep = ep.run_decompositions()
    from torch._inductor import aoti_compile_and_package

    bar.stage("AOTInductor compile")
    out = aoti_compile_and_package(ep, package_path=path, inductor_configs=_inductor_configs(cfg.mode))
    with zipfile.ZipFile(out, "a") as z:
        z.writestr(_root(z) + _SPEC, json.dumps({"inputs": spec, "sized_state": wrapper.sized_spec,
                                                 "sizes": wrapper.sizes}))
    bar.stage(None)
    return out


class _Stages:
    """A progress bar over export's stages (tqdm, on stderr), shown from the first stage on;
    nothing when off or without tqdm."""

    TOTAL = 4

    def __init__(self, on: bool):
        self.on, self.bar, self.name = on, None, ""

    def stage(self, name: str | None) -> None:
        """Start stage ``name`` (None: all done)."""
        if not self.on:
            return
        if self.bar is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                self.on = False
                return
            self.bar = tqdm(total=self.TOTAL, unit="stage", bar_format="{desc} [{elapsed}]")
        else:
            self.bar.update(1)
        self.name = name or "written"
        self._show(self.name)

    def _show(self, text: str) -> None:
        self.bar.set_description_str(f"cdcompile.export: {self.bar.n}/{self.TOTAL} {text}")

    def __enter__(self) -> "_Stages":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self.bar is not None:
            if kind is not None:
                self._show(f"{self.name}: failed ({kind.__name__})")
            self.bar.close()


def _user_dims(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: dict | None) -> dict:
    """``dynamic_shapes`` as ``{("args", k) | ("kwargs", name): {dim: Dim}}`` for tensor inputs."""
    if not dynamic_shapes:
        return {}
    import inspect

    if not isinstance(dynamic_shapes, dict):
        raise ValueError(f"cdcompile.export: dynamic_shapes must be a dict keyed by the names of "
                         f"{type(model).__name__}.forward's parameters, got {type(dynamic_shapes).__name__}")
    names = list(inspect.signature(model.forward).parameters)
    where = {names[k]: ("args", k) for k in range(min(len(args), len(names)))}
    where.update({name: ("kwargs", name) for name in kwargs})
    out = {}
    for name, spec in dynamic_shapes.items():
        if spec is None:
            continue
        if name not in where:
            raise ValueError(f"cdcompile.export: dynamic_shapes names {name!r}, which is no input of this call "
                             f"(inputs: {sorted(where)})")
        kind, key = where[name]
        value = args[key] if kind == "args" else kwargs[key]
        if not isinstance(value, torch.Tensor) or not isinstance(spec, dict):
            raise ValueError(f"cdcompile.export: dynamic_shapes[{name!r}] must map dims of a tensor input to "
                             f"torch.export.Dim objects, got {spec!r} for a {type(value).__name__}")
        for d, dim in spec.items():
            if not isinstance(d, int) or not -value.dim() <= d < value.dim():
                raise ValueError(f"cdcompile.export: dynamic_shapes[{name!r}] names dim {d!r}; "
                                 f"{name} has shape {tuple(value.shape)}")
        out[(kind, key)] = {d % value.dim(): dim for d, dim in spec.items()}
    return out


def _marked(args: tuple, kwargs: dict, dims: dict) -> tuple[tuple, dict]:
    """Copies of the inputs named in ``dims`` (aliases of the same tensor stay one copy), with
    their sizes marked dynamic for Dynamo, in the bounds each Dim gives."""
    copies: dict[int, torch.Tensor] = {}

    def mark(where, value):
        if where not in dims:
            return value
        if id(value) not in copies:
            copies[id(value)] = value.detach().clone()
        t = copies[id(value)]
        for d, dim in dims[where].items():
            lo, hi = getattr(dim, "min", None), getattr(dim, "max", None)
            torch._dynamo.mark_dynamic(t, d, min=lo if lo is not None and lo > 0 else None,
                                       max=hi if hi is not None and hi < 2**62 else None)
        return t

    args = tuple(mark(("args", k), a) for k, a in enumerate(args))
    kwargs = {k: mark(("kwargs", k), v) for k, v in kwargs.items()}
    return args, kwargs


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
    """The rewritten graph as a module: parameters, cache state as buffers, a reset input.

    With dynamic sizes, the state tensors whose shapes hold them (anchor, residuals) are inputs
    instead, after ``reset``: the loaded package's caller allocates them per size (``sized_spec``)."""

    def __init__(self, gm, layout, params, consts, state, sized, sizes):
        super().__init__()
        self.gm = gm
        self.layout = layout  # per graph input: ("user", k) | ("param", name) | ("const", name) | ("size", k, dim)
        for name, p in params.items():
            self.register_parameter(name, p)
        for name, c in consts.items():
            self.register_buffer(name, c)
        self.state_names = [n for n in state if n != "reset"]
        self.sized_spec = sized  # name -> {"shape": [int | expr], "dtype": str}
        self.sizes = sizes  # symbol -> [user input index, dim]
        for name in self.state_names:
            if name not in sized:
                self.register_buffer(f"state_{name}", state[name].clone())
        self._sized_example = {n: state[n].clone() for n in sized}

    def sized_example(self) -> list[torch.Tensor]:
        return [self._sized_example[n] for n in self.sized_spec]

    def sized_dims(self) -> list[list[int]]:
        """Per sized state input, the dims that hold a dynamic size."""
        return [[d for d, e in enumerate(v["shape"]) if isinstance(e, str)] for v in self.sized_spec.values()]

    def forward(self, *inputs):
        k = len(inputs) - len(self.sized_spec)
        *user, reset = inputs[:k]
        sized = dict(zip(self.sized_spec, inputs[k:]))
        args = [user[e[1]] if e[0] == "user" else user[e[1]].shape[e[2]] if e[0] == "size" else getattr(self, e[1])
                for e in self.layout]
        states = [sized[n] if n in sized else getattr(self, f"state_{n}") for n in self.state_names]
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
    user_at: dict[int, int] = {}  # graph input position -> user input index
    sym_inputs = []
    for k, (node, ex) in enumerate(zip(placeholders, example_inputs)):
        if id(ex) in owners and isinstance(ex, nn.Parameter):
            name = "p_" + owners[id(ex)].replace(".", "__")
            params[name] = ex
            layout.append(("param", name))
            continue
        hit = next((p for p, t in user_paths if t is ex), None)
        if hit is not None:
            user_at[k] = len(user)
            layout.append(("user", len(user)))
            spec.append(list(hit))
            user.append(ex)
            continue
        if isinstance(node.meta.get("example_value"), torch.SymInt):
            sym_inputs.append((len(layout), node))
            layout.append(None)  # a size of a user input: found below
            continue
        if not isinstance(ex, torch.Tensor):
            raise ValueError(f"cdcompile.export: graph input {node.name} is a {type(ex).__name__}, "
                             "not a tensor; export needs tensor inputs")
        name = "c_" + (owners.get(id(ex), node.name)).replace(".", "__")
        consts[name] = ex.detach().clone()
        layout.append(("const", name))
    # a size Dynamo passes as an input of its own: read it from the user input that holds it
    where = {}
    for k, uk in user_at.items():
        v = placeholders[k].meta.get("example_value")
        for d, size in enumerate(v.shape if isinstance(v, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt):
                where.setdefault(size.node.expr, (uk, d))
    for pos, node in sym_inputs:
        expr = node.meta["example_value"].node.expr
        if expr not in where:
            raise ValueError(f"cdcompile.export: the graph takes the size {expr} ({node.name}), which no "
                             f"tensor input's shape holds")
        layout[pos] = ("size", *where[expr])
    state = plan.allocate(example_inputs).tensors_by_name
    sized, sizes = _sized_state(gm, plan, user_at)
    return _Exported(gm, layout, params, consts, state, sized, sizes), spec, user


def _sized_state(gm, plan, user_at: dict[int, int]) -> tuple[dict[str, dict], dict[str, list[int]]]:
    """The state tensors whose shapes hold dynamic sizes, for the loader to allocate per size:
    ``({name: {"shape": [int | expression], "dtype"}}, {symbol: [user input index, dim]})``."""
    if not plan.size_sources:
        return {}, {}
    from .runtime import CacheState

    values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    fake = torch._guards.detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    with fake:
        symbolic = CacheState.allocate(plan).tensors_by_name
    sources = {}
    for sym, (k, d) in plan.size_sources.items():
        if k not in user_at:
            raise ValueError(f"cdcompile.export: the cache state's size {sym} is read from graph input {k}, "
                             f"which is no tensor input of the call")
        sources[str(sym)] = [user_at[k], d]
    out = {}
    for name, t in symbolic.items():
        shape = [int(d.node.expr) if isinstance(d, torch.SymInt) and not d.node.expr.free_symbols
                 else str(d.node.expr) if isinstance(d, torch.SymInt) else int(d) for d in t.shape]
        if any(isinstance(e, str) for e in shape):
            out[name] = {"shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}
    return out, sources


class CachedArtifact:
    """A loaded ``.pt2``: call it like the model; the cache state lives inside the package (with
    dynamic sizes, the state tensors that hold them live here, one set for the sizes last called)."""

    def __init__(self, path: str):
        from torch._inductor import aoti_load_package

        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read(_root(z) + _SPEC))
        if isinstance(meta, list):  # written before dynamic sizes: the input layout alone
            meta = {"inputs": meta, "sized_state": {}, "sizes": {}}
        self.spec = [tuple(p) for p in meta["inputs"]]
        self.sized_spec, self.sizes = meta["sized_state"], meta["sizes"]
        self.runner = aoti_load_package(path)
        self._reset = True
        self._flags: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decisions: list[torch.Tensor] = []
        self._sized: tuple[Any, list[torch.Tensor]] | None = None  # (sizes, device) and their state

    def new_request(self) -> None:
        self._reset = True

    def __call__(self, *args: Any, **kwargs: Any):
        tensors = [args[k] if where == "args" else kwargs[k] for where, k in self.spec]
        dev = tensors[0].device if tensors else torch.device("cpu")
        if dev not in self._flags:  # made once per device: no host-to-device copy per call
            self._flags[dev] = (torch.tensor(False, device=dev), torch.tensor(True, device=dev))
        sized = self._sized_state(tensors, dev) if self.sized_spec else []
        reset = self._flags[dev][self._reset]
        self._reset = False
        *out, did = self.runner(*tensors, reset, *sized)
        self._decisions.append(did)
        return tuple(out)

    def _sized_state(self, tensors: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
        """The state tensors for these inputs' sizes: kept while the sizes stay, fresh (and a new
        request) when they change, as a shape change resets the compiled model."""
        import sympy

        sizes = {name: tensors[k].shape[d] for name, (k, d) in self.sizes.items()}
        key = (tuple(sorted(sizes.items())), dev)
        if self._sized is None or self._sized[0] != key:
            subs = {sympy.Symbol(name): v for name, v in sizes.items()}
            state = []
            for spec in self.sized_spec.values():
                shape = [e if isinstance(e, int) else int(sympy.sympify(e, locals=_SYMPY).xreplace(subs))
                         for e in spec["shape"]]
                state.append(torch.zeros(shape, dtype=getattr(torch, spec["dtype"]), device=dev))
            self._sized = (key, state)
            self._reset = True
        return self._sized[1]

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
