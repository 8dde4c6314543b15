"""``cdcompile.enable(pipe, **options)``: compile a diffusers pipeline's transformers with the cache.

Every transformer of the pipeline is compiled with the ``cachedit`` backend: the component named
``transformer`` and any named ``transformer_<suffix>`` (Wan 2.2 runs ``transformer`` on the
high-noise steps and ``transformer_2`` on the low-noise ones). Each keeps its own cache state and
counts its own steps. They are compiled in place (``Module.compile``, as diffusers' own docs
compile), so ``pipe.transformer`` stays the diffusers model it was: the pipeline's LoRA methods
(``set_adapters``, ``fuse_lora``, ``unload_lora_weights``, ...) act only on components that are
diffusers models and silently skip a ``torch.compile`` wrapper. Each ``pipe(...)`` call starts a
new request in all of them (and, with one transformer, passes its ``num_inference_steps`` to a
steps computation mask). Only this pipeline instance changes: its class becomes a one-off subclass
whose ``__call__`` resets the cache first (cache-dit patches the pipeline class for every instance).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from typing import Any, Callable, Mapping

import torch

from . import diffusers_hooks
from .config import CacheConfig
from .runtime import new_request, warn_overflow


def transformer_names(pipe: Any) -> list[str]:
    """The pipeline's transformer components, in registration order: ``transformer`` and ``transformer_*``."""
    components = getattr(pipe, "components", None)
    names = list(components) if isinstance(components, Mapping) else ["transformer"]
    return [n for n in names if (n == "transformer" or n.startswith("transformer_"))
            and isinstance(getattr(pipe, n, None), torch.nn.Module)]


def _configs(pipe: Any, names: list[str], options: dict, per_transformer: Mapping | None) -> dict[str, CacheConfig]:
    """One validated config per transformer: the shared options, updated by its own entry."""
    per_transformer = dict(per_transformer or {})
    unknown = sorted(set(per_transformer) - set(names))
    if unknown:
        raise ValueError(f"cdcompile.enable: transformer_options names {unknown}, but {type(pipe).__name__}'s "
                         f"transformers are {names}")
    configs = {}
    for name in names:
        own = per_transformer.get(name) or {}
        if not isinstance(own, Mapping):
            raise ValueError(f"cdcompile.enable: transformer_options[{name!r}] must be a dict of options, "
                             f"got {type(own).__name__}")
        cfg = CacheConfig.from_options({**options, **own})
        mask = cfg.steps_computation_mask
        if len(names) > 1 and isinstance(mask, str) and cfg.num_inference_steps is None:
            raise ValueError(
                f"cdcompile.enable: {type(pipe).__name__} has {len(names)} transformers {names}; each counts "
                f"only the steps it runs, so the steps_computation_mask {mask!r} of {name!r} has no step count "
                f"to scale to. Give it num_inference_steps (that transformer's steps) or an explicit 0/1 list "
                f"over its steps, in transformer_options={{{name!r}: {{...}}}}")
        configs[name] = cfg
    return configs


_CACHE_DIT_KEYWORDS = ("cache_config", "calibrator_config", "parallelism_config", "params_modifiers",
                       "attention_backend", "quantize_config")


def _cache_dit_keywords(pipe: Any, names: list[str], options: dict, per_transformer: Mapping | None,
                        ) -> tuple[dict, Mapping | None]:
    """``cache_dit.enable_cache``'s keywords as options: the config objects through
    :meth:`CacheConfig.from_cache_dit`, and ``params_modifiers`` (one ``ParamsModifier`` per
    transformer, in order) as ``transformer_options``; the caller's options go on top of both."""
    given = {k: options.pop(k) for k in _CACHE_DIT_KEYWORDS if k in options}
    if not given:
        return options, per_transformer
    where = "cdcompile.enable"
    if given.get("quantize_config") is not None:
        raise ValueError(f"{where}: quantize_config has no counterpart here: quantize the transformer with torchao "
                         "before enable (torchao.quantization.quantize_(pipe.transformer, Int8WeightOnlyConfig())); "
                         "the cache compiles quantized weights")
    cache, calibrator, parallel = (given.get(k) for k in ("cache_config", "calibrator_config", "parallelism_config"))
    for backend in (given.get("attention_backend"), getattr(parallel, "attention_backend", None)):
        _check_attention_backend(pipe, names, backend)
    modifiers = _flat_modifiers(given.get("params_modifiers"), names)
    if cache is None and calibrator is None and parallel is None and not modifiers:
        return options, per_transformer
    if cache is None and calibrator is not None:
        raise ValueError(f"{where}: calibrator_config needs a cache_config (cache-dit's DBCacheConfig)")
    if cache is None and parallel is not None and modifiers:
        raise ValueError(f"{where}: params_modifiers need a cache_config: parallelism_config without one compiles "
                         f"without the cache, as cache_dit.enable_cache does")
    if cache is None and parallel is None:  # params_modifiers alone: over cache-dit's default, as it does
        cache = _cache_dit_default_config()

    def converted(cache: Any, calibrator: Any) -> dict:
        return CacheConfig.from_cache_dit(cache, calibrator, parallel, **options).as_dict()

    shared = converted(cache, calibrator)
    per_transformer = {name: dict(own) if isinstance(own, Mapping) else own
                       for name, own in (per_transformer or {}).items()}
    for name, modifier in zip(names, modifiers):
        own_cache = _overridden(cache, modifier.get("cache_config"))
        own_calibrator = _overridden(calibrator, modifier.get("calibrator_config"))
        own = converted(own_cache, own_calibrator)
        # the transformer's own options: what its modifier changed, under what transformer_options gives it
        changed = {k: v for k, v in own.items() if shared.get(k) != v}
        user = per_transformer.get(name) or {}
        per_transformer[name] = {**changed, **user} if isinstance(user, Mapping) else user
    return shared, per_transformer


def _check_attention_backend(pipe: Any, names: list[str], backend: Any) -> None:
    """cache-dit's ``attention_backend``: ``"native"`` (torch's SDPA, diffusers' default) is what the
    transformers run unless ``set_attention_backend`` chose another; any other is refused."""
    if backend is None:
        return
    processors = [m.processor for name in names for m in getattr(pipe, name).modules()
                  if hasattr(getattr(m, "processor", None), "_attention_backend")]
    chosen = {str(getattr(p._attention_backend, "value", p._attention_backend) or "native").lower() for p in processors}
    if str(backend).lower() == "native" and chosen <= {"native"}:
        return
    raise ValueError(f"cdcompile.enable: attention_backend={backend!r} has no counterpart here"
                     + (f" (the transformers run {sorted(chosen)})" if chosen - {"native"} else "")
                     + ": choose diffusers' backend before enable with pipe.transformer.set_attention_backend(name), "
                       "or give fp8_attention=True for cdcompile's INT8/FP8 attention")


def _flat_modifiers(modifiers: Any, names: list[str]) -> list[dict]:
    """cache-dit's ``params_modifiers`` as one dict of configs per transformer, in ``names``' order.

    cache-dit keeps a cache context per block list and applies the modifiers to them in order; here
    each transformer's block groups share one decision, so a transformer takes one modifier."""
    if modifiers is None:
        return []
    entries = list(modifiers) if isinstance(modifiers, (list, tuple)) else [modifiers]
    flat = []
    for entry in entries:
        if isinstance(entry, (list, tuple)):
            if len(entry) != 1:
                raise ValueError(f"cdcompile.enable: params_modifiers gives {len(entry)} ParamsModifiers for one "
                                 f"transformer; its block groups share one cache decision here, so give one per "
                                 f"transformer ({names})")
            entry = entry[0]
        kwargs = getattr(entry, "_context_kwargs", None)
        if not isinstance(kwargs, dict):
            raise TypeError(f"cdcompile.enable: params_modifiers takes cache-dit's ParamsModifier objects, got {entry!r}")
        if "cache_config" not in kwargs and kwargs.get("calibrator_config") is not None:
            warnings.warn("cdcompile.enable: a ParamsModifier with a calibrator_config but no cache_config sets that "
                          "transformer's calibrator here; cache-dit 1.5.3 ignores such a modifier", stacklevel=4)
        flat.append(kwargs)
    if len(flat) > len(names):
        raise ValueError(f"cdcompile.enable: params_modifiers gives {len(flat)} ParamsModifiers, but the pipeline's "
                         f"transformers are {names}: one modifier per transformer, in that order (cache-dit applies "
                         f"them per block list; here each transformer's block groups share one cache decision)")
    return flat


def _overridden(base: Any, new: Any) -> Any:
    """cache-dit's modifier rule: ``new``'s fields that are not None, over a copy of ``base``."""
    if new is None or base is None:
        return base if new is None else new
    out = copy.deepcopy(base)
    for f in dataclasses.fields(new):
        value = getattr(new, f.name)
        if value is not None and hasattr(out, f.name):
            setattr(out, f.name, value)
    return out


def _cache_dit_default_config() -> Any:
    from cache_dit import DBCacheConfig

    return DBCacheConfig()


def enable(pipe: Any, *, fullgraph: bool = False, dynamic: bool | None = False,
           guard_filter_fn: Callable | None = None, transformer_options: Mapping[str, Mapping] | None = None,
           **options: Any) -> Any:
    """Compile the pipeline's transformers with the block cache; returns ``pipe``.

    ``options`` are the backend options for every transformer (validated now: a bad key raises
    ValueError here). ``cache_config=`` / ``calibrator_config=`` / ``parallelism_config=`` take
    cache-dit's config objects, as ``cache_dit.enable_cache`` does (:meth:`CacheConfig.from_cache_dit`),
    and ``params_modifiers=`` its ``ParamsModifier`` objects, one per transformer in order (each
    one's fields that are not None over the shared config); other options go on top.
    ``transformer_options`` maps a transformer's name to options that override them for that
    transformer alone, e.g. ``{"transformer_2": {"residual_diff_threshold": 0.2}}``.
    ``fullgraph`` and ``dynamic`` go to ``torch.compile``: ``dynamic=False`` compiles one graph per
    resolution; ``None`` one graph with symbolic sizes from the second resolution on (cached as well).
    ``guard_filter_fn`` goes to ``torch.compile`` (e.g.
    ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``: no per-call guards on the weights and
    modules, which the block cache's single graph otherwise checks on every step, cached or not;
    safe while they do not change between calls).
    """
    if type(pipe).__name__ == "BlockAdapter" and hasattr(pipe, "blocks"):
        raise ValueError("cdcompile.enable: cdcompile finds the transformer blocks itself, so cache-dit's "
                         "BlockAdapter is not needed: pass its pipeline, cdcompile.enable(adapter.pipe, ...), or "
                         "compile its transformer with torch.compile(adapter.transformer, backend='cachedit', ...)")
    names = transformer_names(pipe)
    if not names:
        hint = (": enable takes a pipeline; compile a transformer with torch.compile(model, backend='cachedit', "
                "options={...}) (cache-dit's configs: options=cdcompile.CacheConfig.from_cache_dit(cache_config))"
                if isinstance(pipe, torch.nn.Module) else "")
        raise ValueError(f"cdcompile.enable: {type(pipe).__name__} has no `transformer` module to compile{hint}")
    if getattr(pipe, "_cdcompile_enabled", False):
        raise ValueError("cdcompile.enable: this pipeline is already enabled")
    options, transformer_options = _cache_dit_keywords(pipe, names, options, transformer_options)
    configs = _configs(pipe, names, options, transformer_options)
    for name, cfg in configs.items():
        _check_hooks(name, getattr(pipe, name), cfg)
    before = {}  # what disable() puts back (a torch.compile wrapper stays one)
    originals = []
    for name, cfg in configs.items():
        component = getattr(pipe, name)
        original = getattr(component, "_orig_mod", component)
        had = original.__dict__.get("_compiled_call_impl")
        compile_options = cfg.as_dict() | ({"guard_filter_fn": guard_filter_fn} if guard_filter_fn is not None else {})
        original.compile(backend="cachedit", options=compile_options, fullgraph=fullgraph, dynamic=dynamic)
        _push_call(original, id(pipe), had)
        before[name] = component
        setattr(pipe, name, original)
        originals.append(original)
    base = type(pipe)

    steps_default = inspect.signature(base.__call__).parameters.get("num_inference_steps")
    steps_default = getattr(steps_default, "default", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        steps = kwargs.get("num_inference_steps", steps_default)
        # with several transformers, no one of them runs the call's step count
        steps = steps if isinstance(steps, int) and len(originals) == 1 else None
        for original in originals:
            new_request(original, num_inference_steps=steps)
        out = base.__call__(self, *args, **kwargs)
        for original in originals:  # calls past the CFG slots were never cached: say so now
            warn_overflow(original)
        return out

    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_cdcompile_enabled": True})
    pipe._cdcompile_before = (base, before)
    return pipe


def _check_hooks(name: str, transformer: torch.nn.Module, cfg: CacheConfig) -> None:
    """Refuse diffusers hooks that would fight the backend (a diffusers cache with the block cache,
    diffusers' context parallelism with Ulysses); warn of those that only split the graph."""
    found = diffusers_hooks.on_module(getattr(transformer, "_orig_mod", transformer))
    if not found:
        return
    clash = set(diffusers_hooks.caches(found)) if cfg.enable_cache else set()
    if cfg.ulysses_degree > 1:
        clash |= diffusers_hooks.PARALLEL & set(found)
    where = f"cdcompile.enable: pipe.{name} has "
    if clash:
        raise ValueError(where + diffusers_hooks.sentence(found, clash))
    warnings.warn(where + diffusers_hooks.sentence(found), stacklevel=3)


def disable(pipe: Any) -> Any:
    """Undo :func:`enable`: the pipeline gets back its class and the transformers it had; returns ``pipe``.

    The compiled transformers are dropped (with their cache state); ``summary`` of a transformer
    still lists the requests it ran while enabled. A transformer another enabled pipeline shares
    (``from_pipe``) keeps running that pipeline's compiled call; one no enabled pipeline holds runs
    the call it had before the first ``enable`` (none, or its own ``Module.compile``).
    """
    if not getattr(pipe, "_cdcompile_enabled", False):
        raise ValueError(f"cdcompile.disable: this {type(pipe).__name__} was not enabled with cdcompile.enable")
    base, before = pipe._cdcompile_before
    for name, component in before.items():
        _pop_call(getattr(component, "_orig_mod", component), id(pipe))
        setattr(pipe, name, component)
    pipe.__class__ = base
    del pipe._cdcompile_before
    return pipe


# A transformer shared by pipelines (``from_pipe``) may be enabled by several: each enable compiles
# it in place anew. The module keeps the compiled calls of the pipelines enabled on it, newest
# last, and the call it had before the first; disable drops its pipeline's and the module runs the
# newest left, or the one it had.
def _push_call(module: torch.nn.Module, key: int, had: Callable | None) -> None:
    calls = module.__dict__.get("_cdcompile_calls")
    if not calls:
        calls = module._cdcompile_calls = []
        module._cdcompile_had_call = had
    calls.append((key, module._compiled_call_impl))


def _pop_call(module: torch.nn.Module, key: int) -> None:
    calls = [c for c in module.__dict__.get("_cdcompile_calls", []) if c[0] != key]
    module._cdcompile_calls = calls
    if calls:
        module._compiled_call_impl = calls[-1][1]
        return
    had = module.__dict__.pop("_cdcompile_had_call", None)
    del module._cdcompile_calls
    if had is None:
        module.__dict__.pop("_compiled_call_impl", None)
    else:
        module._compiled_call_impl = had
