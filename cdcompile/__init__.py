"""cdcompile: a torch.compile backend for diffusion transformers.

    transformer = torch.compile(transformer, backend="cachedit", options={"residual_diff_threshold": 0.08})

Public API: the ``cachedit`` backend, :class:`CacheConfig` (its options), :func:`explain`,
:func:`summary`, :func:`new_request`, :func:`enable` and :func:`disable` (diffusers pipelines),
:func:`export` and :func:`load` (AOTInductor packages with the cache inside).
"""

from .backend import cachedit
from .config import CacheConfig, CacheType, Calibrator, Compiler
from .explain import explain
from .export import export, load
from .pipeline import disable, enable
from .runtime import new_request
from .summary import summary

__all__ = ["CacheConfig", "CacheType", "Calibrator", "Compiler", "cachedit", "disable", "enable", "explain", "export",
           "load", "new_request", "summary"]
__version__ = "0.1.0"
