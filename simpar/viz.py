"""Pictures of a run: per-device timelines on the wall and simulated clocks.

All functions take the events of every rank (``comm.gather_objects(tracer.events)``
flattened, or ``[e for t in tracers for e in t.events]``) and return a
matplotlib figure; ``save`` writes it as a PNG.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from .trace import Event  # noqa: E402

COLORS = {"compute": "#4C72B0", "comm": "#DD8452", "idle": "#CCCCCC"}


def _axis_scale(span: float) -> tuple[float, str]:
    for factor, unit in ((1.0, "s"), (1e3, "ms"), (1e6, "µs")):
        if span * factor >= 1.0:
            return factor, unit
    return 1e9, "ns"


def draw_timeline(ax, events: list[Event], clock: str = "sim", title: str = "") -> None:
    """One row per rank; compute, communication and idle time as coloured bars."""
    if clock not in ("sim", "wall"):
        raise ValueError(f"clock must be 'sim' or 'wall', got {clock!r}")
    if not events:
        ax.set_title(title + " (no events)")
        return
    if clock == "wall":
        t0 = min(e.wall_start for e in events)
        spans = [(e, e.wall_start - t0, e.wall_end - e.wall_start) for e in events]
    else:
        spans = [(e, e.sim_start, e.sim_end - e.sim_start) for e in events]
    end = max(s + d for _, s, d in spans)
    factor, unit = _axis_scale(end)
    ranks = sorted({e.rank for e in events})
    for e, start, dur in spans:
        if dur <= 0:
            continue
        ax.broken_barh([(start * factor, dur * factor)], (e.rank - 0.4, 0.8),
                       facecolors=COLORS.get(e.category, "black"), edgecolor="white",
                       linewidth=0.3)
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_ylim(max(ranks) + 0.6, min(ranks) - 0.6)
    ax.set_xlim(0, end * factor * 1.01 if end > 0 else 1)
    ax.set_xlabel(f"{'simulated' if clock == 'sim' else 'wall-clock'} time ({unit})")
    ax.set_title(title)


def timeline(events: list[Event], title: str = "", clocks=("wall", "sim")):
    """A figure with one timeline per clock (wall clock of this machine and the
    simulated clock of the chosen cluster)."""
    fig, axes = plt.subplots(len(clocks), 1, figsize=(10, 1.2 + 0.9 * len(clocks) *
                                                      max(2, len({e.rank for e in events}))),
                             squeeze=False)
    for ax, clock in zip(axes[:, 0], clocks):
        name = "wall clock (this machine)" if clock == "wall" else "simulated clock"
        draw_timeline(ax, events, clock, f"{title} — {name}" if title else name)
    fig.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
               loc="upper right", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def flatten(per_rank: list[list[Event]]) -> list[Event]:
    return [e for events in per_rank for e in events]
