"""Where Triton can run, how a launcher picks its path, and the shared ``@triton.jit`` helpers.

Every kernel launcher takes ``backend``:

- ``"torch"``: the plain-torch reference (the executable spec) on any device.
- ``"triton"``: the Triton kernel. Needs Triton and either a CUDA tensor on a GPU of compute
  capability 8.9 or newer (Ada, Hopper: the kernels convert to and multiply ``float8e4nv``) or the
  interpreter (``TRITON_INTERPRET=1`` set before this package was imported). Tests use it to
  check the kernel itself on CPU.
- ``"auto"``: Triton on such CUDA tensors when Triton is importable and not interpreting; the
  reference everywhere else (CPU, older GPUs, no Triton).

Rounding. On a GPU the fp32->e4m3 and fp32->bf16 casts round to nearest even. The interpreter's
do not: its fp32->fp8 cast drops exponent carries and does not saturate, and its fp32->bf16 cast
truncates. So the kernels take an ``FP32_ROUNDING`` constexpr, set by ``fp32_rounding()`` (True
exactly when interpreting), and the helpers below then round in fp32 arithmetic first: the value
becomes exactly representable, and every cast of an exact value is exact. The bits are the same
either way; the hardware cast is one instruction where the arithmetic takes about a dozen, which
matters in a memory-bound quantization kernel and in the attention kernel's softmax.
"""

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is not installed

    class _NoTriton:
        """Stands in for ``triton`` and ``triton.language`` so kernel modules still import."""

        constexpr = object  # used in annotations only

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()
    HAS_TRITON = False

# ``triton.jit`` reads TRITON_INTERPRET when a kernel is decorated, i.e. when a kernel module is
# imported; reading it once here keeps the dispatcher consistent with what the decorator saw.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "triton", "torch")
MIN_CUDA_CAPABILITY = (8, 9)  # float8e4nv conversions and FP8 tl.dot


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _why_not_compiled(device: torch.device) -> str:
    """Empty when compiled Triton kernels can run on ``device``, else the reason."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if device.type != "cuda":
        return f"tensors are on {device} and TRITON_INTERPRET=1 was not set before import"
    capability = _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())
    if capability < MIN_CUDA_CAPABILITY:
        return f"GPU compute capability {capability} < {MIN_CUDA_CAPABILITY} (no float8e4nv)"
    return ""


def use_triton(device: torch.device, backend: str) -> bool:
    """Whether a launcher on ``device`` with ``backend`` runs the Triton kernel (True) or the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if INTERPRETING and HAS_TRITON:
        return backend == "triton"  # "auto" keeps CPU (and interpreted) runs on the reference
    why = _why_not_compiled(device)
    if backend == "triton" and why:
        raise ValueError(f"backend='triton' cannot run here: {why}; use backend='auto' or 'torch'")
    return not why


def fp32_rounding() -> bool:
    """The ``FP32_ROUNDING`` a launcher passes: round in fp32 arithmetic only where the casts are wrong."""
    return INTERPRETING


@triton.jit
def round_to_e4m3(y):
    """Round fp32 ``y`` (already clamped to [-448, 448]) to the nearest float8_e4m3fn value, ties to even.

    e4m3 keeps 3 mantissa bits, so the spacing at exponent e is 2**(e - 3); below the smallest normal
    (2**-6) the spacing stays 2**-9. ``(t + 1.5 * 2**23) - 1.5 * 2**23`` rounds ``|t| < 2**22`` to an
    integer, ties to even, in fp32 arithmetic (here |t| < 16). NaN stays NaN.
    """
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 31) << 31  # the sign bit alone; keeps -0.0, which the rounding below would lose
    magnitude = tl.abs(y)
    exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((130 - exponent) << 23).to(tl.float32, bitcast=True)  # 2**(3 - exponent), exact
    t = magnitude * inv_ulp
    t = (t + 12582912.0) - 12582912.0
    rounded = (t * ulp).to(tl.int32, bitcast=True) | sign
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def round_to_bf16(x):
    """Round fp32 ``x`` to the nearest bfloat16 value (ties to even), returned as fp32.

    Adds 0x7FFF plus the lowest kept bit, then clears the 16 dropped bits. inf stays inf and
    NaN is passed through untouched (the carry could wrap a NaN payload into a zero).
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & -65536  # 0xFFFF0000 as a signed int32
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def to_e4m3(y, FP32_ROUNDING: tl.constexpr):
    """fp32 ``y`` (finite, clamped to [-448, 448]) to ``float8e4nv``, round to nearest even on every path."""
    if FP32_ROUNDING:
        y = round_to_e4m3(y)
    return y.to(tl.float8e4nv)


@triton.jit
def cast_out(x, OUT_DTYPE: tl.constexpr, FP32_ROUNDING: tl.constexpr):
    """fp32 ``x`` to ``OUT_DTYPE`` with round-to-nearest-even on every path (see module docstring)."""
    if FP32_ROUNDING and OUT_DTYPE == tl.bfloat16:
        x = round_to_bf16(x)
    return x.to(OUT_DTYPE)


_TL_DTYPES = {}
if HAS_TRITON:
    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def tl_dtype(dtype: torch.dtype):
    """The ``tl`` dtype for a torch floating dtype the kernels write."""
    return _TL_DTYPES[dtype]
