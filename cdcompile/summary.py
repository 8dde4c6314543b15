"""``cdcompile.summary(model)``: what the block cache did over the last requests.

Reading the statistics is the only device sync; nothing is read per step. With
``cache_type="dbprune"`` every slot also reports ``pruned_blocks`` (blocks pruned at each step) and
``prune_ratio`` (blocks pruned / blocks of the stack over the slot's calls, cache-dit's definition);
``residual_diffs`` then hold the mean of each call's block diffs.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch

from .report import state_size
from .runtime import cached_states, overflow_advice


@dataclasses.dataclass
class Summary:
    # oldest first, grouped by the state that ran them (the state called last at the end); each
    # names the graph that ran its state last (an index into ``graphs``), the cached hidden
    # stream's shape and dtype, and in a graph with symbolic sizes the call sizes its state serves
    # ({} for static shapes)
    requests: list[dict[str, Any]]
    # the cache each graph that ran a state holds (stack, F/M/B, streams), in compile order
    graphs: list[dict[str, Any]]
    note: str = ""  # with no cache: a likely reason seen on the module (blocks compiled one by one)
    # device memory the model's cache states hold: (all, anchors and residuals), and how many states
    state_bytes: tuple[int, int] = (0, 0)
    states: int = 0

    def as_dict(self) -> dict[str, Any]:
        keep = ("cached_steps", "residual_diffs", "pruned_blocks", "prune_ratio", "overflow_calls")
        return {"requests": [{"steps": r["steps"], "graph": r["graph"], "hidden": r["hidden"],
                              "sizes": r["sizes"], "time_rises": r["time_rises"],
                              "calls_per_step": r["calls_per_step"],
                              "slots": [{k: s[k] for k in keep if k in s} for s in r["slots"]]}
                             for r in self.requests],
                "graphs": self.graphs, "state_bytes": self.state_bytes[0], "states": self.states}

    def __str__(self) -> str:
        if not self.graphs:
            return "cdcompile.summary: no block cache in this model's compiled graphs" + self.note
        lines = []
        for i, g in enumerate(self.graphs):
            lines.append(f"{f'graph {i}: ' if len(self.graphs) > 1 else ''}cache over {g['groups']}: "
                         f"N={g['num_blocks']} F={g['Fn']} M={g['Mn']} B={g['Bn']}, streams {g['streams']}"
                         + (f", state per call size of {', '.join(g['dynamic_sizes'])}" if g.get("dynamic_sizes") else ""))
            if g.get("refresh"):
                hint, policy = g["refresh"]["hint"], g["refresh"]["policy"]
                lines.append(f"  the cache starts afresh at step {hint}" if policy == "once" else
                             f"  the cache starts afresh every {hint} steps")
            if g.get("cache_type") == "dbprune":
                lines.append(f"  dbprune: prunable blocks {g['prunable_blocks']}"
                             + (f", dynamic threshold {g.get('dynamic_rule', '')}" if g["dynamic_threshold"] else ""))
        # several states (one per graph, or per call size of a symbolic graph): say which ran each request
        def state(r):
            sizes = " ".join(f"{k}={v}" for k, v in r["sizes"].items())
            return f"{r['graph']:>5} {r['hidden']:>18} {sizes:>10} "

        where = len({state(r) for r in self.requests}) > 1
        head = f"{'graph':>5} {'hidden':>18} {'sizes':>10} " if where else ""
        if any(r["time_rises"] for r in self.requests):
            lines.append("time rises over a request (the clock learned it from the calls): a smaller "
                         "timestep starts a request")
        # the residual diffs the guard compared (DBPrune: each call's mean block diff), as cache-dit's
        # summary gives them: where a threshold would fall among this request's steps
        lines.append(f"{head}{'request':>7} {'slot':>4} {'steps':>5} {'cached':>6} {'diff p50':>8} {'max':>7}  "
                     f"cached steps")
        for r in self.requests:
            for k, s in enumerate(r["slots"]):
                cached = s["cached_steps"]
                at = state(r) if where else ""
                diffs = sorted(s["residual_diffs"].values())
                p50, top = (f"{statistics.median(diffs):.3g}", f"{diffs[-1]:.3g}") if diffs else ("-", "-")
                lines.append(f"{at}{r['request']:>7} {slot_name(k, s):>4} {r['steps']:>5} {len(cached):>6} "
                             f"{p50:>8} {top:>7}  {cached}")
                if "pruned_blocks" in s:
                    lines.append(f"{'':>{len(at)}}{'':>7} {'':>4} prune ratio {s['prune_ratio']:.3f}, "
                                 f"blocks pruned per step {s['pruned_blocks']}")
        overflow = self._widest_overflow()
        if overflow is not None:
            k, s = overflow
            lines.append(f"slot {slot_name(k, s)}: {overflow_advice(s['overflow_calls'][1] + 1, k)}")
        if self.states:
            slots = self.graphs[0]["slots"]
            lines.append(f"cache state: {state_size(*self.state_bytes, slots)}"
                         + (f", {self.states} states (one per call size or layout)" if self.states > 1 else ""))
        return "\n".join(lines)

    def _widest_overflow(self) -> tuple[int, dict] | None:
        """``(slot, entry)`` of the overflow slot with the most calls per timestep, if any request had one."""
        found = [(k, s) for r in self.requests for k, s in enumerate(r["slots"]) if "overflow_calls" in s]
        return max(found, key=lambda f: f[1]["overflow_calls"][1], default=None)

    def plot(self, path: str | None = None, *, last: int = 4):
        """The residual diff of each step against the threshold, one panel per request (the
        ``last`` ones), one line per CFG slot, the steps served from the cache filled. Returns the
        matplotlib ``Figure``; writes it to ``path`` when given (the format from its suffix).
        Needs matplotlib (``pip install matplotlib``); uses no pyplot state."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError:
            raise ImportError("Summary.plot needs matplotlib: pip install matplotlib") from None
        if not self.requests:
            raise ValueError("cdcompile.summary: nothing to plot: "
                             + (str(self) if not self.graphs else "no request has run yet"))
        if not isinstance(last, int) or last < 1:
            raise ValueError(f"Summary.plot: last must be a positive int, got {last!r}")
        shown = self.requests[-last:]
        fig = Figure(figsize=(7.0, 2.2 * len(shown) + 0.4), layout="constrained")
        axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
        for ax, r in zip(axes, shown):
            g = self.graphs[r["graph"]]
            pruning = g.get("cache_type") == "dbprune"
            for k, s in enumerate(r["slots"]):
                steps = sorted(s["residual_diffs"])
                diffs = [s["residual_diffs"][i] for i in steps]
                name = f"slot {slot_name(k, s)}" + (" (never cached)" if "overflow_calls" in s else "")
                line, = ax.plot(steps, diffs, "-", lw=1, label=name if len(r["slots"]) > 1 else None)
                cached = set(s["cached_steps"])
                for filled, face in ((True, line.get_color()), (False, "white")):
                    xs = [i for i in steps if (i in cached) == filled]
                    ax.plot(xs, [s["residual_diffs"][i] for i in xs], "o", color=line.get_color(), ms=5, mfc=face)
            for k, at in enumerate(refresh_steps(g, r["steps"])):
                ax.axvline(at - 0.5, color="0.4", ls=":", lw=1, label="cache starts afresh" if k == 0 else None)
            threshold = g.get("threshold")
            if threshold is not None:
                ax.axhline(threshold, color="0.4", ls="--", lw=1,
                           label=f"threshold {threshold:g}" + (" (base)" if pruning and g.get("dynamic_threshold")
                                                              else ""))
            counts = [len(s["cached_steps"]) for s in r["slots"]]
            what = "with a block pruned" if pruning else "cached"
            per_slot = (f"{counts[0]}" if len(counts) == 1
                        else ", ".join(f"slot {slot_name(k, s)} {c}"
                                       for k, (s, c) in enumerate(zip(r["slots"], counts))))
            ax.set_title(f"request {r['request']} (graph {r['graph']}, {r['hidden']}): {r['steps']} steps, "
                         f"{what}: {per_slot}", fontsize=9, loc="left")
            ax.set_xlim(-0.5, max(r["steps"] - 0.5, 0.5))
            ax.set_ylim(bottom=0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("mean block diff" if pruning else "residual diff", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
        prunes = {self.graphs[r["graph"]].get("cache_type") == "dbprune" for r in shown}
        axes[-1].set_xlabel("step (filled: " + " / ".join(
            "a block pruned" if p else "served from the cache" for p in sorted(prunes)) + ")", fontsize=8)
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


def refresh_steps(graph: dict, steps: int) -> list[int]:
    """The steps of a request of ``steps`` steps where ``graph``'s cache starts afresh
    (force_refresh_step_hint)."""
    refresh = graph.get("refresh")
    if not refresh:
        return []
    hint = refresh["hint"]
    return list(range(hint, steps, hint)) if refresh["policy"] == "repeat" else [hint] * (hint < steps)


def slot_name(k: int, slot: dict) -> str:
    """A slot's number; the overflow slot's is the range of calls it took (``2-3``)."""
    first, last = slot.get("overflow_calls", (k, k))
    return f"{first}-{last}" if last > first else str(k)


def summary(model: Any) -> Summary:
    """Cache statistics of ``model`` (the module, or what ``torch.compile`` returned)."""
    pairs = cached_states(model)
    # every graph that ran a state of the model, numbered in the order they were compiled
    ran = {id(g): g for _, st in pairs for ref in st.ran_in if (g := ref()) is not None}
    ordered = sorted(ran.values(), key=lambda g: g.created)
    index = {id(g): k for k, g in enumerate(ordered)}
    graphs = [dict(g.report.cache) for g in ordered]
    requests = []
    for graph, state in pairs:
        shape, dtype, _ = state.signature
        hidden = "x".join(map(str, shape)) + " " + str(dtype).removeprefix("torch.")
        rises = bool(state.tensors_by_name["counters"][3])
        for r in state.requests():
            r["graph"], r["hidden"] = index[id(graph)], hidden
            r["sizes"] = dict(state.sizes)
            # the direction of time the clock learned for this state (cdcompile.guard.tick)
            r["time_rises"] = rises
            for s in r["slots"]:
                if "pruned_blocks" in s:  # DBPrune: blocks pruned over blocks run, this slot's calls
                    calls = len(s["cached_steps"]) + len(s["computed_steps"])
                    s["prune_ratio"] = sum(s["pruned_blocks"]) / max(1, calls * graph.plan.num_blocks)
            requests.append(r)
    held = [st.nbytes() for _, st in pairs]
    return Summary(requests=requests, graphs=graphs, note="" if graphs else _regional_note(model) + _hooks_note(model),
                   state_bytes=(sum(h[0] for h in held), sum(h[1] for h in held)), states=len(held))


def _hooks_note(model: Any) -> str:
    """diffusers hooks on the module that keep the block cache out of its graphs."""
    from . import diffusers_hooks

    if not isinstance(model, torch.nn.Module):
        return ""
    found = diffusers_hooks.on_module(getattr(model, "_orig_mod", model))
    if not found:
        return ""
    return "; the model has " + diffusers_hooks.sentence(found)


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
