"""FP8 attention compiled into the graph: SDPA calls become ``cdcompile::sage_attention`` nodes.

With ``fp8_attention=True`` every ``scaled_dot_product_attention`` call of the graph that the
kernel can compute exactly as SDPA would (below) is retargeted in place to the custom op
``torch.ops.cdcompile.sage_attention`` (INT8 Q K^T, FP8 P V; algorithms.md §7,
cdcompile/kernels/sage_attn.py). The op runs the Triton kernel on CUDA GPUs of compute capability
8.9 or newer and its plain-torch reference elsewhere; the reference emulates the kernel's
arithmetic and is slow, so compiling for such a device warns once.

An ``attn_mask`` goes to the kernel as SDPA takes it (bool or additive, any shape that broadcasts
to (batch, heads, q tokens, k tokens); the text padding masks of Qwen-Image, HunyuanVideo, LTX,
...). A call is kept as SDPA, and the report says why, when its mask is of another kind, it has a
nonzero ``dropout_p``, a head dim other than 32, 64 or 128, inputs that are not 4-d (batch, heads,
tokens, head dim), a dtype other than bf16, fp16 or fp32, or a ``scale`` computed in the graph.
Grouped-query attention (``enable_gqa=True`` with fewer K/V heads) gets its K and V heads
repeated first, as SDPA repeats them.

The pass runs after context_parallel (which leaves each attention an SDPA call over the rank's
heads, so the local attention becomes the FP8 kernel) and before block_cache (which moves the
middle blocks, with their attention, into the cond's compute branch). Nodes keep their place
and module stack; no node is removed, so the discovery's blocks stay valid.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
import torch.fx as fx

from . import _fx

log = logging.getLogger("cdcompile")
PASS = "fp8_attention"


@dataclasses.dataclass
class Fp8AttentionRecord:
    """What the pass did to one graph (``GraphReport.fp8_attention``)."""

    replaced: int = 0
    kept: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> SDPA calls left as they were
    runs: str = ""  # "the Triton kernel" or why the op runs its reference on this graph's device

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        total = self.replaced + sum(self.kept.values())
        kept = "; ".join(f"{n} kept: {why}" for why, n in sorted(self.kept.items()))
        return (f"{self.replaced} of {total} SDPA calls -> cdcompile::sage_attention ({self.runs})"
                + (f"; {kept}" if kept else ""))


def _why_not(args: dict[str, Any]) -> str | None:
    """Why this SDPA call cannot become the FP8 kernel, or None if it can."""
    from ..kernels.sage_attn import HEAD_DIMS, IN_DTYPES

    q, k, v = (_fx.fake_value(args[name]) if isinstance(args.get(name), fx.Node) else None
               for name in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "no recorded query/key/value tensors"
    mask = args.get("attn_mask")
    if mask is not None:
        why = _mask_why_not(mask, q, k)
        if why:
            return why
    if args.get("dropout_p", 0.0) != 0.0:
        return "dropout_p > 0"
    scale, causal = args.get("scale"), args.get("is_causal", False)
    if not isinstance(scale, (float, int, type(None))) or not isinstance(causal, bool):
        return "scale or is_causal computed in the graph"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"{q.dim()}-d inputs (the kernel takes (batch, heads, tokens, head_dim))"
    if not q.dtype == k.dtype == v.dtype or q.dtype not in IN_DTYPES:
        return f"dtype {q.dtype}"
    if not q.shape[-1] == k.shape[-1] == v.shape[-1] or q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the kernel takes {', '.join(map(str, HEAD_DIMS))})"
    if not all(_same(a, b) for a, b in ((q.shape[0], k.shape[0]), *zip(k.shape[:3], v.shape[:3]))):
        return "broadcast batch or mismatched key/value shapes"
    if k.shape[1] != q.shape[1] and not (args.get("enable_gqa") and q.shape[1] % k.shape[1] == 0):
        return f"{q.shape[1]} query heads over {k.shape[1]} key/value heads"
    return None


def _mask_why_not(mask: Any, q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the kernel cannot take this ``attn_mask``, or None: the op's own check (SDPA's bool or
    additive masks that broadcast to (b, h, m, n)), which its fake implementation runs anyway."""
    from ..kernels.sage_attn import _check_mask

    t = _fx.fake_value(mask) if isinstance(mask, fx.Node) else None
    if not isinstance(t, torch.Tensor):
        return "attn_mask that is not a tensor of the graph"
    try:
        _check_mask(t, q, k, is_causal=False)
    except ValueError as e:
        return str(e)
    return None


def _interpreting() -> bool:
    from ..kernels import _triton

    return _triton.INTERPRETING and _triton.HAS_TRITON


def _same(a, b) -> bool:
    """Sizes known to be equal (symbolic sizes of a dynamic graph included), without adding a guard."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def _device_path(gm: fx.GraphModule) -> tuple[bool, str]:
    """Whether the op will run the Triton kernel on the graph's device, and what it runs, in words."""
    from ..kernels import _triton

    for n in gm.graph.nodes:
        t = _fx.fake_value(n)
        if n.op == "placeholder" and isinstance(t, torch.Tensor) and t.is_floating_point():
            if _interpreting():
                return False, "the reference: TRITON_INTERPRET=1 keeps backend='auto' on it"
            why = _triton._why_not_compiled(t.device)
            return (False, f"the plain-torch reference, which emulates the kernel and is slow: {why}") if why \
                else (True, "the Triton kernel")
    return False, "no floating-point input to tell the device by"


def run(gm: fx.GraphModule, ctx) -> None:
    """Retarget the eligible SDPA calls of ``gm`` to the FP8 kernel's op (module docstring)."""
    if not ctx.cfg.fp8_attention:
        return
    import cdcompile.kernels  # noqa: F401  registers torch.ops.cdcompile.sage_attention

    op = torch.ops.cdcompile.sage_attention.default
    kernel, runs = _device_path(gm)
    record = Fp8AttentionRecord(runs=runs)
    ctx.report.fp8_attention = record
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or _fx.target_name(n) != "scaled_dot_product_attention":
            continue
        args = _fx.sdpa_args(n)
        why = _why_not(args)
        if why is not None:
            record.kept[why] = record.kept.get(why, 0) + 1
            continue
        q, k, v = args["query"], args["key"], args["value"]
        groups = _fx.fake_value(q).shape[1] // _fx.fake_value(k).shape[1]
        if groups > 1:  # grouped-query attention: query head i reads key/value head i // groups
            with gm.graph.inserting_before(n):
                k, v = (_fx.call_like(gm.graph, n, torch.repeat_interleave, (t, groups), {"dim": 1}, PASS)
                        for t in (k, v))
        n.target = op
        n.args = (q, k, v, args.get("scale"), args.get("is_causal", False), "auto", args.get("attn_mask"))
        n.kwargs = {}
        n.meta["cdcompile_pass"] = PASS
        _fx.set_fake(n)
        record.replaced += 1
    if record.replaced == 0:
        warnings.warn(f"cachedit: fp8_attention=True changed nothing in this graph: {record}", stacklevel=2)
    elif not kernel and not _interpreting():
        warnings.warn(f"cachedit: fp8_attention runs {record.runs}", stacklevel=2)
    log.info("cachedit: fp8 attention: %s", record)
