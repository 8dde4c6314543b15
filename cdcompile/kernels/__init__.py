"""Triton kernels, each with its plain-torch reference and torch.library op.

- ``sage_attention(q, k, v, *, scale=None, is_causal=False, backend="auto")``: SDPA-shaped
  attention with INT8 Q K^T and FP8 P V (``sage_attn.py``); op ``cdcompile::sage_attention``.
- ``quantize_fp8_a2a(x_bshd, *, world_size, split, backend="auto") -> (values_rd, scales_r)`` and
  ``dequantize_fp8_a2a(values_rd, scales_r, *, batch, seq_len, num_heads, world_size, split,
  out_dtype=torch.bfloat16, backend="auto")``: FP8 per-(token, head) quantization fused with the
  Ulysses all-to-all permutation (``fp8_quant.py``); ops ``cdcompile::quantize_fp8_a2a`` and
  ``cdcompile::dequantize_fp8_a2a``. ``seq_split_sizes`` and ``a2a_split_rows`` give the split sizes.

``backend``: "auto" runs Triton on CUDA and the torch reference elsewhere; "triton" forces the
kernel (CPU tensors need ``TRITON_INTERPRET=1`` set before this package is imported); "torch"
forces the reference. Importing this package only registers the ops.
"""

from .fp8_quant import (
    a2a_split_rows,
    dequantize_fp8_a2a,
    dequantize_fp8_a2a_ref,
    quantize_fp8_a2a,
    quantize_fp8_a2a_ref,
    seq_split_sizes,
)
from .sage_attn import sage_attention, sage_attention_ref

__all__ = [
    "a2a_split_rows",
    "dequantize_fp8_a2a",
    "dequantize_fp8_a2a_ref",
    "quantize_fp8_a2a",
    "quantize_fp8_a2a_ref",
    "sage_attention",
    "sage_attention_ref",
    "seq_split_sizes",
]
