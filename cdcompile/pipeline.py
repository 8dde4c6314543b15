"""``cdcompile.enable(pipe, **options)``: compile a diffusers pipeline's transformer with the cache.

The transformer is compiled with the ``cachedit`` backend, and each ``pipe(...)`` call starts a new
request (and passes its ``num_inference_steps`` to a steps computation mask). Only this pipeline instance changes: its class becomes a one-off subclass whose
``__call__`` resets the cache first (cache-dit patches the pipeline class for every instance).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .config import CacheConfig
from .runtime import new_request


def enable(pipe: Any, *, fullgraph: bool = False, dynamic: bool | None = False,
           guard_filter_fn: Callable | None = None, **options: Any) -> Any:
    """Compile ``pipe.transformer`` with the block cache; returns ``pipe``.

    ``options`` are the backend options (validated now: a bad key raises ValueError here).
    ``fullgraph`` and ``dynamic`` go to ``torch.compile``: ``dynamic=False`` compiles one graph per
    resolution; ``None`` one graph with symbolic sizes from the second resolution on (cached as well).
    ``guard_filter_fn`` goes to ``torch.compile`` (e.g.
    ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``: no per-call guards on the weights and
    modules, which the block cache's single graph otherwise checks on every step, cached or not;
    safe while they do not change between calls).
    """
    cfg = CacheConfig.from_options(options)
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"cdcompile.enable: {type(pipe).__name__} has no `transformer` module to compile")
    if getattr(pipe, "_cdcompile_enabled", False):
        raise ValueError("cdcompile.enable: this pipeline is already enabled")
    original = getattr(transformer, "_orig_mod", transformer)
    compile_options = cfg.as_dict() | ({"guard_filter_fn": guard_filter_fn} if guard_filter_fn is not None else {})
    compiled = torch.compile(original, backend="cachedit", options=compile_options,
                             fullgraph=fullgraph, dynamic=dynamic)
    pipe.transformer = compiled
    base = type(pipe)

    steps_default = inspect.signature(base.__call__).parameters.get("num_inference_steps")
    steps_default = getattr(steps_default, "default", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        steps = kwargs.get("num_inference_steps", steps_default)
        new_request(original, num_inference_steps=steps if isinstance(steps, int) else None)
        return base.__call__(self, *args, **kwargs)

    pipe.__class__ = type(base.__name__, (base,), {"__call__": __call__, "_cdcompile_enabled": True})
    return pipe
