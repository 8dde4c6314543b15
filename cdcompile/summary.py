"""``cdcompile.summary(model)``: what the block cache did over the last requests.

Reading the statistics is the only device sync; nothing is read per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .runtime import cached_states


@dataclasses.dataclass
class Summary:
    requests: list[dict[str, Any]]
    graphs: list[dict[str, Any]]  # the cache each compiled graph holds (stack, F/M/B, streams)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": [{"steps": r["steps"],
                              "slots": [{"cached_steps": s["cached_steps"],
                                         "residual_diffs": s["residual_diffs"]} for s in r["slots"]]}
                             for r in self.requests],
                "graphs": self.graphs}

    def __str__(self) -> str:
        if not self.graphs:
            return "cdcompile.summary: no block cache in this model's compiled graphs"
        lines = []
        for g in self.graphs:
            lines.append(f"cache over {g['groups']}: N={g['num_blocks']} F={g['Fn']} M={g['Mn']} "
                         f"B={g['Bn']}, streams {g['streams']}")
        lines.append(f"{'request':>7} {'slot':>4} {'steps':>5} {'cached':>6}  cached steps")
        for r in self.requests:
            for k, s in enumerate(r["slots"]):
                cached = s["cached_steps"]
                lines.append(f"{r['request']:>7} {k:>4} {r['steps']:>5} {len(cached):>6}  {cached}")
        return "\n".join(lines)


def summary(model: Any) -> Summary:
    """Cache statistics of ``model`` (the module, or what ``torch.compile`` returned)."""
    requests, graphs = [], []
    for graph, state in cached_states(model):
        graphs.append(dict(graph.report.cache))
        requests.extend(state.requests())
    return Summary(requests=requests, graphs=graphs)
