"""cdcompile: a torch.compile backend for diffusion transformers.

    transformer = torch.compile(transformer, backend="cachedit", options={"residual_diff_threshold": 0.08})
"""

from .backend import cachedit
from .config import CacheConfig, Compiler
from .explain import explain

__all__ = ["CacheConfig", "Compiler", "cachedit", "explain"]
__version__ = "0.1.0"
