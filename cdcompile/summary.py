"""``cdcompile.summary(model)``: what the block cache did over the last requests.

Reading the statistics is the only device sync; nothing is read per step. With
``cache_type="dbprune"`` every slot also reports ``pruned_blocks`` (blocks pruned at each step) and
``prune_ratio`` (blocks pruned / blocks of the stack over the slot's calls, cache-dit's definition);
``residual_diffs`` then hold the mean of each call's block diffs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .runtime import cached_states


@dataclasses.dataclass
class Summary:
    requests: list[dict[str, Any]]
    graphs: list[dict[str, Any]]  # the cache each compiled graph holds (stack, F/M/B, streams)
    note: str = ""  # with no cache: a likely reason seen on the module (blocks compiled one by one)

    def as_dict(self) -> dict[str, Any]:
        keep = ("cached_steps", "residual_diffs", "pruned_blocks", "prune_ratio")
        return {"requests": [{"steps": r["steps"],
                              "slots": [{k: s[k] for k in keep if k in s} for s in r["slots"]]}
                             for r in self.requests],
                "graphs": self.graphs}

    def __str__(self) -> str:
        if not self.graphs:
            return "cdcompile.summary: no block cache in this model's compiled graphs" + self.note
        lines = []
        for g in self.graphs:
            lines.append(f"cache over {g['groups']}: N={g['num_blocks']} F={g['Fn']} M={g['Mn']} "
                         f"B={g['Bn']}, streams {g['streams']}")
            if g.get("cache_type") == "dbprune":
                lines.append(f"  dbprune: prunable blocks {g['prunable_blocks']}"
                             f"{', dynamic threshold' if g['dynamic_threshold'] else ''}")
        lines.append(f"{'request':>7} {'slot':>4} {'steps':>5} {'cached':>6}  cached steps")
        for r in self.requests:
            for k, s in enumerate(r["slots"]):
                cached = s["cached_steps"]
                lines.append(f"{r['request']:>7} {k:>4} {r['steps']:>5} {len(cached):>6}  {cached}")
                if "pruned_blocks" in s:
                    lines.append(f"{'':>7} {'':>4} prune ratio {s['prune_ratio']:.3f}, "
                                 f"blocks pruned per step {s['pruned_blocks']}")
        return "\n".join(lines)


def summary(model: Any) -> Summary:
    """Cache statistics of ``model`` (the module, or what ``torch.compile`` returned)."""
    requests, graphs = [], []
    for graph, state in cached_states(model):
        graphs.append(dict(graph.report.cache))
        for r in state.requests():
            for s in r["slots"]:
                if "pruned_blocks" in s:  # DBPrune: blocks pruned over blocks run, this slot's calls
                    calls = len(s["cached_steps"]) + len(s["computed_steps"])
                    s["prune_ratio"] = sum(s["pruned_blocks"]) / max(1, calls * graph.plan.num_blocks)
            requests.append(r)
    return Summary(requests=requests, graphs=graphs, note="" if graphs else _regional_note(model))


def _regional_note(model: Any) -> str:
    """Submodules compiled one by one (``Module.compile``, as ``compile_repeated_blocks`` does)."""
    if not isinstance(model, torch.nn.Module):
        return ""
    named = [(n, m) for n, m in model.named_modules()
             if n and getattr(m, "_compiled_call_impl", None) is not None]
    if not named:
        return ""
    shown = ", ".join(n for n, _ in named[:3]) + (", ..." if len(named) > 3 else "")
    return (f": {len(named)} of its submodules are compiled one by one ({shown}), so each graph "
            f"holds one block and there is nothing between blocks to skip; compile the whole model, "
            f'torch.compile(model, backend="cachedit")')
