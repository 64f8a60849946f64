"""Every picture simpar draws, in one place.

* **timelines** of traced events, one row per rank, on the wall clock of this
  machine and the simulated clock of a cluster: :func:`timeline`, :func:`timelines`,
  :func:`draw_timeline`, :func:`collective_timeline`, :func:`stream_timelines`
  (compute and communication streams);
* **pipeline steps** from the executor's action records (boxes coloured by
  micro-batch, hatched by kind): :func:`draw_pipeline`, :func:`pipeline_panels`,
  :func:`pipeline_schedules`, :func:`pipeline_timeline`, :func:`pipeline_bubble`,
  :func:`bubble_tradeoff`;
* **tensor parallelism**: bytes per layer (:func:`tp_comm_volume`) and saved
  activations (:func:`tp_memory`) against the formulas;
* **expert parallelism**: tokens per expert while training (:func:`expert_load`,
  :func:`expert_share`);
* **memory**: :func:`memory_breakdown`, :func:`activation_memory`, :func:`zero_memory`,
  :func:`mixed_precision_loss`;
* **context parallelism**: ring attention's overlap and load balance
  (:func:`cp_ring_overlap`), ring against Ulysses (:func:`cp_ring_vs_ulysses`).

Every function returns a matplotlib figure (or draws into an ``ax``); the demos
and notebooks only compute, print and call these; :func:`show` displays a figure
in a notebook as a byte-stable PNG.  :func:`save` writes a PNG without a timestamp or
version stamp, so a figure drawn from the same data (the simulated clock, the
tracer's bytes, the memory ledger) is byte-identical run to run.

Timeline functions take the events of every rank (``comm.gather_objects(tracer.events)``
flattened with :func:`flatten`, or ``[e for t in tracers for e in t.events]``).
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
matplotlib.rcParams["svg.hashsalt"] = "simpar"      # SVG ids, too, the same every run
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from . import formulas  # noqa: E402
from .trace import Event  # noqa: E402

COLORS = {"compute": "#4C72B0", "comm": "#DD8452", "idle": "#CCCCCC"}
CLOCK_NAMES = {"wall": "wall clock (this machine)", "sim": "simulated clock"}
# Written into every PNG instead of matplotlib's defaults: nothing that changes
# from run to run or from one matplotlib version to the next.
PNG_METADATA = {"Software": None}


def _axis_scale(span: float) -> tuple[float, str]:
    for factor, unit in ((1.0, "s"), (1e3, "ms"), (1e6, "µs")):
        if span * factor >= 1.0:
            return factor, unit
    return 1e9, "ns"


def save(fig, path: str) -> str:
    """Write ``fig`` as a PNG (deterministic metadata) and close it; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def show(fig, dpi: int = 80):
    """Show ``fig`` in a notebook as a PNG written like :func:`save` (no version
    stamp: the same data gives the same bytes, so notebooks saved with their
    outputs do not change when re-run) and close it."""
    import io
    from IPython.display import Image, display
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=PNG_METADATA, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


def flatten(per_rank: list[list[Event]]) -> list[Event]:
    return [e for events in per_rank for e in events]


# =================================================================== timelines
def draw_timeline(ax, events: list[Event], clock: str = "sim", title: str = "") -> None:
    """One row per rank; compute, communication and idle time as coloured bars."""
    if clock not in CLOCK_NAMES:
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


def _category_legend(fig) -> None:
    fig.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()],
               loc="upper right", ncol=3, fontsize=8)


def timeline(events: list[Event], title: str = "", clocks=("wall", "sim")):
    """A figure with one timeline per clock (wall clock of this machine and the
    simulated clock of the chosen cluster)."""
    fig, axes = plt.subplots(len(clocks), 1, figsize=(10, 1.2 + 0.9 * len(clocks) *
                                                      max(2, len({e.rank for e in events}))),
                             squeeze=False)
    for ax, clock in zip(axes[:, 0], clocks):
        name = CLOCK_NAMES[clock]
        draw_timeline(ax, events, clock, f"{title} — {name}" if title else name)
    _category_legend(fig)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def collective_timeline(events: list[Event], title: str, labels: dict | None = None):
    """:func:`timeline` on both clocks, with the first rank's collectives named
    on the simulated clock (``labels`` maps an event name to its caption)."""
    labels = labels or {}
    fig, axes = plt.subplots(2, 1, figsize=(11, 2.0 + 1.5 * max(2, len({e.rank for e in events}))))
    for ax, clock in zip(axes, ("wall", "sim")):
        draw_timeline(ax, events, clock, f"{title} — {CLOCK_NAMES[clock]}")
    ax = axes[1]
    factor = _axis_scale(max(e.sim_end for e in events))[0]      # draw_timeline's unit
    first = min(e.rank for e in events)
    for e in events:
        if e.category == "comm" and e.rank == first:
            ax.annotate(labels.get(e.name, e.name),
                        ((e.sim_start + e.sim_end) / 2 * factor, e.rank - 0.45),
                        ha="center", va="bottom", fontsize=7, annotation_clip=False)
    _category_legend(fig)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig



def stream_timelines(panels: dict, unit: float = 1e6, unit_name: str = "µs"):
    """Simulated-clock timelines with two lanes per rank — the compute stream
    (compute, and idle while it waits) and the communication stream, where
    non-blocking collectives (``iall_reduce``) run — one panel per run
    (``{title: events}``); backward regions hatched."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.9 + 1.8 * len(panels)),
                             sharex=True, squeeze=False)
    for ax, (title, events) in zip(axes[:, 0], panels.items()):
        ranks = sorted({e.rank for e in events})
        for e in events:
            if e.sim_end <= e.sim_start:
                continue
            lane = 2 * e.rank + (1 if e.category == "comm" else 0)
            ax.broken_barh([(e.sim_start * unit, (e.sim_end - e.sim_start) * unit)],
                           (lane - 0.4, 0.8), facecolors=COLORS.get(e.category, "black"),
                           hatch="///" if e.name.endswith("backward") else "",
                           edgecolor="white", lw=0.3)
        ax.set_yticks([2 * r + k for r in ranks for k in (0, 1)],
                      [f"rank {r} {lane}" for r in ranks for lane in ("compute", "comm")])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    axes[-1, 0].set_xlabel(f"simulated time ({unit_name})")
    handles = [Patch(facecolor=c, label=k) for k, c in COLORS.items()]
    handles.append(Patch(facecolor=COLORS["compute"], hatch="///", edgecolor="white",
                         label="backward"))
    fig.legend(handles=handles, loc="upper right", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def timelines(panels: dict, clock: str = "sim"):
    """One :func:`draw_timeline` per panel (``{title: events}``) on ``clock``."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.8 + 3.6 * len(panels)),
                             squeeze=False)
    for ax, (title, events) in zip(axes[:, 0], panels.items()):
        draw_timeline(ax, events, clock, title)
    _category_legend(fig)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig

# ============================================================ pipeline steps
KIND_STYLE = {"F": dict(hatch="", alpha=1.0), "B": dict(hatch="///", alpha=0.75),
              "I": dict(hatch="...", alpha=0.75), "W": dict(hatch="xxx", alpha=0.45)}
KIND_NAMES = {"F": "F forward", "B": "B backward", "I": "I input grad", "W": "W weight grad"}
SCHEDULE_LABELS = {"naive": "naive (one micro-batch at a time)", "gpipe": "GPipe",
                   "1f1b": "1F1B (PipeDream-flush)", "interleaved": "interleaved 1F1B",
                   "zb-h1": "ZB-H1 (zero bubble)"}


def _record_times(r, clock: str) -> tuple[float, float]:
    if clock not in CLOCK_NAMES:
        raise ValueError(f"clock must be 'sim' or 'wall', got {clock!r}")
    return (r.sim_start, r.sim_end) if clock == "sim" else (r.wall_start, r.wall_end)


def mb_color(mb: int, m: int):
    cmap = plt.get_cmap("tab10" if m <= 10 else "tab20")
    return cmap(mb % cmap.N)


def pipeline_legend():
    """Legend patches for the hatches of :func:`draw_pipeline`."""
    return [Patch(facecolor="white", edgecolor="black", hatch=KIND_STYLE[k]["hatch"],
                  label=KIND_NAMES[k]) for k in KIND_STYLE]


def draw_pipeline(ax, records, clock: str = "sim", title: str = "", labels: bool = True) -> None:
    """One row per rank; each compute action of a pipeline step (the executor's
    ``ActionRecord``\\ s of every rank) a box coloured by micro-batch, the kind
    shown by the hatch (F plain, B ///, I ..., W xxx) and a label ``F3`` (with
    the chunk, ``F3.1``, for interleaved schedules)."""
    comp = [r for r in records if r.action.is_compute]
    if not comp:
        ax.set_title(title + " (no actions)")
        return
    t0 = min(_record_times(r, clock)[0] for r in records)
    end = max(_record_times(r, clock)[1] for r in records) - t0
    factor, unit = _axis_scale(end)
    m = max(r.action.mb for r in comp) + 1
    p = max(r.rank for r in records) + 1
    chunks = max(r.action.stage // p for r in comp) + 1
    for r in comp:
        s, e = _record_times(r, clock)
        x, w = (s - t0) * factor, (e - s) * factor
        a = r.action
        st = KIND_STYLE[a.kind]
        ax.broken_barh([(x, w)], (r.rank - 0.42, 0.84), facecolors=mb_color(a.mb, m),
                       alpha=st["alpha"], hatch=st["hatch"], edgecolor="black", linewidth=0.4)
        text = f"{a.kind}{a.mb}" + (f".{a.stage // p}" if chunks > 1 else "")
        if labels and w > end * factor * len(text) / 110:
            ax.text(x + w / 2, r.rank, text, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(p), [f"rank {r}" for r in range(p)])
    ax.set_ylim(p - 0.5, -0.5)
    ax.set_xlim(0, end * factor * 1.01)
    ax.set_xlabel(f"{'simulated' if clock == 'sim' else 'wall-clock'} time ({unit})")
    ax.set_title(title, fontsize=10)


def pipeline_schedules(records: dict, bubbles: dict, vs: dict):
    """One panel per schedule (``records[name]``: every rank's records of one
    step) on the simulated clock, like the papers' schedule figures.  The
    pipelined schedules share one time axis; the naive schedule, several times
    longer, has its own, and its title says so."""
    names = list(records)
    p = max(r.rank for recs in records.values() for r in recs) + 1
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 1.1 + 1.15 * len(names) * p / 4 * 1.6),
                             squeeze=False)
    axes = axes[:, 0]
    shared = [n for n in names if n != "naive"]
    end = max((r.sim_end for n in shared for r in records[n]), default=0.0)
    for ax, name in zip(axes, names):
        recs = records[name]
        label = SCHEDULE_LABELS.get(name, name)
        if name == "interleaved":
            label += f", v={vs[name]}"
        m = max(r.action.mb for r in recs) + 1
        own = " — own time axis, not to scale with the others" if name == "naive" and shared \
            else ""
        draw_pipeline(ax, recs, "sim", f"{label}: p={p}, m={m}, bubble {bubbles[name]:.0%} of "
                      f"the step{own}")
        if name != "naive" and end > 0:
            ax.set_xlim(0, end * _axis_scale(end)[0] * 1.01)
    fig.legend(handles=pipeline_legend(), loc="upper right", ncol=4, fontsize=8)
    fig.suptitle("Pipeline schedules on the simulated clock (colour = micro-batch)", x=0.3,
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def pipeline_timeline(records, title: str = "1F1B step"):
    """One pipeline step on the wall clock and the simulated clock."""
    p = max(r.rank for r in records) + 1
    fig, axes = plt.subplots(2, 1, figsize=(12, 1.5 + 1.4 * p))
    for ax, clock in zip(axes, ("wall", "sim")):
        draw_pipeline(ax, records, clock, f"{title} — {CLOCK_NAMES[clock]}", labels=False)
    fig.legend(handles=pipeline_legend()[:2], loc="upper right", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig



def pipeline_panels(panels: dict, clock: str = "sim"):
    """One pipeline step per panel (``{title: every rank's records}``), stacked on
    one time axis; boxes coloured by micro-batch, hatched by kind."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.6 + 2.0 * len(panels)),
                             sharex=True, squeeze=False)
    for ax, (title, records) in zip(axes[:, 0], panels.items()):
        draw_pipeline(ax, records, clock, title)
    fig.legend(handles=pipeline_legend(), loc="upper right", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if len(panels) == 1 else 0.96))
    return fig


def bubble_tradeoff(points: dict, interleaved: list, p: int, m: int):
    """Left: each schedule's bubble against the micro-batches rank 0 holds
    (``points``: ``{name: (peak held, bubble)}``).  Right: interleaved 1F1B's
    bubble over ``m`` for several ``v`` (``interleaved``: rows ``(v, m, schedule
    simulator's bubble)``), markers, on Narayanan et al.'s formula, lines."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.6))
    for name, (held, bubble) in points.items():
        ax0.scatter(held, bubble, s=60, label=name)
    ax0.set_xlabel("micro-batches held by rank 0 (peak)")
    ax0.set_ylabel("bubble fraction")
    ax0.set_title(f"p={p}, m={m}")
    ax0.legend()
    for i, v in enumerate(sorted({v for v, _, _ in interleaved})):
        ms = [mm for vv, mm, _ in interleaved if vv == v]
        ax1.plot(ms, [b for vv, _, b in interleaved if vv == v], "o", color=f"C{i}",
                 label=f"v={v} (schedule simulator)")
        ax1.plot(ms, [formulas.bubble_fraction("interleaved", p, mm, v) for mm in ms], "-",
                 color=f"C{i}", alpha=0.5)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("m")
    ax1.set_title("bubble (lines: formula)")
    ax1.legend()
    fig.tight_layout()
    return fig

# (schedule, v) -> label, colour, marker, line style; distinct markers and
# dashes so that curves that coincide (1F1B and ZB-H1 at large m) stay visible.
BUBBLE_STYLES = {("1f1b", 1): ("1F1B / GPipe", "C0", "o", "-"),
                 ("interleaved", 2): ("interleaved v=2", "C1", "s", "--"),
                 ("interleaved", 4): ("interleaved v=4", "C2", "^", "-."),
                 ("zb-h1", 1): ("ZB-H1", "C3", "D", ":")}


def pipeline_bubble(sweep: list, p: int):
    """Left: bubble fraction over m and v, simulated (markers) against the
    formulas (lines).  Right: micro-batches held by rank 0.  ``sweep`` rows:
    ``(schedule, v, m, simulated bubble, formula, peak micro-batches held)``."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    n = len(BUBBLE_STYLES)
    for i, ((name, v), (label, color, marker, ls)) in enumerate(BUBBLE_STYLES.items()):
        pts = [(mm, f, fo) for nm, vv, mm, f, fo, _ in sweep if nm == name and vv == v]
        if not pts:
            continue
        ms, fs, fos = (np.array(c, dtype=float) for c in zip(*pts))
        shift = 2.0 ** (0.06 * (i - (n - 1) / 2))       # side by side on the log axis
        ax.plot(ms * shift, fs, marker, color=color, mfc="none", mew=1.5, ms=7,
                label=f"{label} (simulated clock)")
        ax.plot(ms, fos, ls, color=color, alpha=0.8, lw=1.5, label=f"{label} (formula)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m (markers side by side)")
    ax.set_ylabel("bubble fraction of the step")
    ax.set_title(f"Bubble over m and v (p={p}; lines: (p−1)/(v·m+p−1), ZB-H1: Qi et al.)",
                 fontsize=10)
    ax.legend(fontsize=7)
    for name, color, marker, ls in (("gpipe", "C4", "s", "--"), ("1f1b", "C0", "o", "-"),
                                    ("zb-h1", "C3", "D", ":")):
        pts = [(mm, pk) for nm, vv, mm, _, _, pk in sweep if nm == name]
        if pts:
            ms, pk = zip(*pts)
            ax2.plot(ms, pk, marker=marker, ls=ls, color=color, mfc="none", label=name)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("micro-batches m")
    ax2.set_ylabel("peak micro-batches held (rank 0, memory ledger)")
    ax2.set_title("Memory: GPipe holds m, 1F1B at most p", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ======================================================== tensor parallelism
def tp_comm_volume(rows: list[dict], b: int, s: int, h: int, itemsize: int = 8):
    """Bytes per layer per device (ring model): formulas as lines, traced as
    markers.  ``rows``: ``{"t", "mlp bytes", "naive mlp bytes", "tp bytes",
    "tp+sp bytes"}`` per tensor-parallel size."""
    from .parallel.tensor import mlp_comm_elements
    ts = np.arange(1, 9)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    kib = itemsize / 1024
    tr = [r["t"] for r in rows]
    ax1.plot(ts, [mlp_comm_elements(b, s, h, 4 * h, t, naive=True) * kib for t in ts],
             color="#C44E52", label="naive: all-gather after each layer, 3bs(d_ff+h)(t−1)/t")
    ax1.plot(ts, [mlp_comm_elements(b, s, h, 4 * h, t) * kib for t in ts],
             color="#4C72B0", label="Megatron: column → row, 4bsh(t−1)/t")
    ax1.plot(tr, [r["naive mlp bytes"] / 1024 for r in rows], "o", color="#C44E52",
             label="traced, naive")
    ax1.plot(tr, [r["mlp bytes"] / 1024 for r in rows], "o", color="#4C72B0",
             label="traced, Megatron")
    ax1.set_title("MLP, forward + backward")
    ax2.plot(ts, [formulas.tp_layer_comm_elements(b, s, h, t) * kib for t in ts],
             color="#4C72B0", label="8bsh(t−1)/t")
    ax2.plot(tr, [r["tp bytes"] / 1024 for r in rows], "o", color="#4C72B0",
             label="traced: 4 all-reduces")
    ax2.plot(tr, [r["tp+sp bytes"] / 1024 for r in rows], "x", color="#DD8452", ms=10,
             label="traced, sequence parallel:\n4 all-gathers + 4 reduce-scatters")
    ax2.set_title("transformer layer, forward + backward")
    for ax in (ax1, ax2):
        ax.set_xlabel("tensor-parallel size t")
        ax.set_ylabel("KiB sent per device (ring model)")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.45)
    fig.suptitle(f"communication per device, b={b} s={s} h={h} float{8 * itemsize}", fontsize=10)
    fig.tight_layout()
    return fig


def tp_memory(rows: list[dict], b: int, s: int, h: int, a: int):
    """Left: the memory ledger against simpar's formula (float64, the demo
    layer; ``rows``: ``{"t", "tp saved", "tp+sp saved"}``).  Right: simpar's
    formula in 16-bit bytes against Korthikanti et al. Table 2, GPT-3 175B layer."""
    from .parallel.tensor import activation_elements
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ts = np.arange(1, 9)
    for sp, color, name in ((False, "#4C72B0", "tp"), (True, "#DD8452", "tp+sp")):
        ax1.plot(ts, [8 * activation_elements(b, s, h, a, t, sequence_parallel=sp) / 1024
                      for t in ts], color=color, label=f"formula, {name}")
        ax1.plot([r["t"] for r in rows], [r[f"{name} saved"] / 1024 for r in rows], "o",
                 color=color, label=f"memory ledger, {name}")
    ax1.set_title(f"simpar, this demo's layer (b={b} s={s} h={h} a={a}, float64)")
    ax1.set_ylabel("KiB saved per layer per device")
    B, S, H, A = 1, 2048, 12288, 96                      # GPT-3 175B, one sequence
    for sp, color, name in ((False, "#4C72B0", "tp"), (True, "#DD8452", "tp+sp")):
        ax2.plot(ts, [formulas.activation_bytes_per_layer(S, B, H, A, t, sp) / 2**30 for t in ts],
                 "--", color=color, label=f"Korthikanti Table 2, {name}")
        ax2.plot(ts, [2 * activation_elements(B, S, H, A, t, sequence_parallel=sp) / 2**30
                      for t in ts], color=color, label=f"simpar (16-bit), {name}")
    ax2.set_title("GPT-3 175B layer (s=2048 h=12288 a=96, b=1)")
    ax2.set_ylabel("GiB saved per layer per device")
    for ax in (ax1, ax2):
        ax.set_xlabel("tensor-parallel size t")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


# ======================================================== expert parallelism
def load_ratio(loads: np.ndarray, last_fraction: float = 0.5) -> float:
    """max/mean tokens per expert, per step and layer, averaged over the last
    ``last_fraction`` of the steps and over the layers (1 = perfectly balanced).
    ``loads``: ``(steps, layers, experts)`` token counts."""
    tail = loads[int(len(loads) * (1 - last_fraction)):].astype(np.float64)
    return float((tail.max(axis=-1) / tail.mean(axis=-1)).mean())


def expert_load(runs: dict, layer: int = 0):
    """Share of tokens per expert per step (stacked) for each run
    (``runs[alpha]["loads"]``: ``(steps, layers, experts)``), and the max/mean
    load ratio per step of every run."""
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(5 * (len(runs) + 1), 4.2))
    for ax, (alpha, r) in zip(axes[:-1], sorted(runs.items())):
        loads = r["loads"][:, layer, :].astype(float)
        steps = np.arange(len(loads))
        ax.stackplot(steps, (loads / loads.sum(axis=1, keepdims=True)).T,
                     labels=[f"expert {e}" for e in range(loads.shape[1])])
        name = ("without load-balancing loss" if alpha == 0
                else f"with load-balancing loss (α={alpha})")
        ax.set_title(f"{name}\nmax/mean load {load_ratio(r['loads']):.2f}", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(f"share of tokens per expert (layer {layer})")
        ax.set_xlim(0, max(1, len(loads) - 1))
        ax.set_ylim(0, 1)
    axes[-2].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    ax = axes[-1]
    for alpha, r in sorted(runs.items()):
        loads = r["loads"].astype(float)
        ratio = (loads.max(axis=-1) / loads.mean(axis=-1)).mean(axis=1)
        w = max(1, len(ratio) // 20)
        smooth = np.convolve(ratio, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w - 1, smooth,
                label="α = 0 (no balancing)" if alpha == 0 else f"α = {alpha}")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_title("max/mean tokens per expert (mean over layers, smoothed)", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig



def expert_share(runs: dict):
    """Share of the tokens each expert of layer 0 is routed per step, one panel
    per run (``{alpha: (loads, final loss)}``, ``loads``: steps × layers ×
    experts), titled with the max/mean load over the last half (:func:`load_ratio`)."""
    fig, axes = plt.subplots(1, len(runs), figsize=(12, 3.5), sharey=True, squeeze=False)
    for ax, (alpha, (loads, loss)) in zip(axes[0], runs.items()):
        loads = np.asarray(loads, dtype=float)
        share = loads[:, 0] / loads[:, 0].sum(-1, keepdims=True)
        ax.stackplot(np.arange(len(loads)), share.T)
        ax.set_title(f"α = {alpha}: max/mean load {load_ratio(loads):.2f} (last half), "
                     f"loss {loss:.2f}", fontsize=10)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("share of tokens per expert (layer 0)")
    fig.tight_layout()
    return fig

def loss_curves(curves: dict, title: str = "training loss"):
    """Loss per step of several runs on one plot (``{label: [loss, ...]}``); runs
    that train the same model on the same data lie on top of each other, so
    each gets its own marker and line style."""
    fig, ax = plt.subplots(figsize=(7, 4) if len(curves) <= 12 else (9, 5.5))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x", "+", "*", "P", "h"]
    for i, (label, losses) in enumerate(curves.items()):
        ax.plot(range(len(losses)), losses, styles[i % len(styles)],
                marker=markers[i % len(markers)], markevery=max(1, len(losses) // 8) + i % 3,
                label=label, lw=1.2, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def zero_memory(rows: list[dict], example: dict | None = None):
    """ZeRO's Table 1 in the shape of a figure (Rajbhandari et al. 2020, §5):
    model-state bytes per device against the data-parallel degree, one line per
    stage — measured from the memory ledger (filled markers) on the formula
    (hollow) — and, beside it, the paper's 7.5B-parameter example at N = 64.

    ``rows``: ``{"stage", "dp", "ledger", "formula"}`` (bytes per rank);
    ``example``: ``{"psi", "n", "gb": {stage: GB}, "paper": {stage: GB}}``."""
    fig, axes = plt.subplots(1, 2 if example else 1, figsize=(11 if example else 6.5, 4.2),
                             squeeze=False)
    ax = axes[0][0]
    names = {0: "DP (stage 0)", 1: "ZeRO-1  P_os", 2: "ZeRO-2  P_os+g", 3: "ZeRO-3  P_os+g+p"}
    colors = ["#555555", "#4C72B0", "#DD8452", "#55A868"]
    for stage in sorted({r["stage"] for r in rows}):
        rs = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["dp"])
        dps = [r["dp"] for r in rs]
        ax.plot(dps, [r["formula"] / 1024 for r in rs], "o", mfc="none", ms=11,
                color=colors[stage])
        ax.plot(dps, [r["ledger"] / 1024 for r in rs], "-o", ms=5, color=colors[stage],
                label=names[stage])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(sorted({r["dp"] for r in rows}))
    ax.set_xticklabels([str(d) for d in sorted({r["dp"] for r in rows})])
    ticks = [2 ** k for k in range(20) if min(r["ledger"] for r in rows) / 1024 / 2 <= 2 ** k
             <= max(r["ledger"] for r in rows) / 1024 * 2]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("data-parallel degree N")
    ax.set_ylabel("params + grads + optimizer per rank (KiB)")
    ax.set_title("small GPT: memory ledger (dots) on the ZeRO §5 formula (rings)", fontsize=9)
    ax.legend(fontsize=8)
    if example:
        ax = axes[0][1]
        stages = sorted(example["gb"])
        bars = ax.bar([names[s].split("  ")[-1] for s in stages],
                      [example["gb"][s] for s in stages], color=[colors[s] for s in stages])
        for b, s in zip(bars, stages):
            ax.annotate(f"{example['gb'][s]:.3g} GB\n(paper {example['paper'][s]} GB)",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                        va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(1, 600)
        ax.set_ylabel("GB per device")
        ax.set_title(f"ZeRO Table 1: Ψ = {example['psi'] / 1e9:g}B, N = {example['n']}, "
                     "mixed-precision Adam", fontsize=9)
    fig.tight_layout()
    return fig


# ======================================================== context parallelism
def cp_ring_overlap(balanced: list[Event], naive: list[Event], tiles: dict, info: str = ""):
    """Ring attention on the simulated clock: the load-balanced ring (top) with its
    K/V transfers hidden behind block compute, the naive contiguous split (middle)
    where the ranks holding early tokens idle, and the causal tiles per rank of
    both (bottom, from the tracer's FLOPs; rings: the closed form)."""
    fig = plt.figure(figsize=(10, 7.8))
    grid = fig.add_gridspec(3, 1, height_ratios=[1.0, 1.0, 0.8])
    for row, (events, name) in enumerate(((balanced, "load-balanced (chunks i, 2cp−1−i)"),
                                          (naive, "naive contiguous split"))):
        ax = fig.add_subplot(grid[row])
        draw_timeline(ax, events, "sim", f"ring attention, forward + backward: {name}")
    ax = fig.add_subplot(grid[2])
    ranks = sorted(tiles["naive"])
    w = 0.38
    for k, (key, color) in enumerate((("naive", "#C44E52"), ("balanced", "#4C72B0"))):
        xs = [r + (k - 0.5) * w for r in ranks]
        ax.bar(xs, [tiles[key][r] for r in ranks], w, color=color, label=key)
        ax.plot(xs, [tiles[key + "_formula"][r] for r in ranks], "o", mfc="none", ms=10,
                color="black")
    ax.set_xticks(ranks, [f"rank {r}" for r in ranks])
    ax.set_ylabel("causal tiles computed")
    ax.set_title("work per rank (bars: tracer FLOPs / tile; rings: formulas.ring_attention_tiles)",
                 fontsize=9)
    ax.legend(fontsize=8)
    _category_legend(fig)
    if info:
        fig.text(0.01, 0.005, info, fontsize=7.5, va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    return fig


def cp_ring_vs_ulysses(rows: list[dict], title: str = ""):
    """Simulated attention time (forward + backward, one layer) of ring attention
    and Ulysses against sequence length (left: absolute, per cp; right: the ratio
    Ulysses / ring — above 1 the ring wins).  ``rows``: ``{"cp", "s", "ring",
    "ulysses", "compute", "link"}`` from :mod:`simpar.formulas`."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    cps = sorted({r["cp"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for i, cp in enumerate(cps):
        rs = sorted((r for r in rows if r["cp"] == cp), key=lambda r: r["s"])
        c = cmap(i / max(1, len(cps) - 1))
        s = [r["s"] for r in rs]
        a1.plot(s, [r["ring"] * 1e3 for r in rs], "-o", ms=3, color=c, label=f"ring, cp={cp}")
        a1.plot(s, [r["ulysses"] * 1e3 for r in rs], "--s", ms=3, color=c,
                label=f"Ulysses, cp={cp}")
        link = rs[0]["link"].split(" (")[0]
        a2.plot(s, [r["ulysses"] / r["ring"] for r in rs], "-o", ms=3, color=c,
                label=f"cp={cp} ({link})")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length s")
    a1.set_yscale("log")
    a1.set_ylabel("simulated time per layer (ms)")
    a1.set_title("attention core, forward + backward", fontsize=9)
    a1.legend(fontsize=6.5, ncol=2)
    a2.axhline(1.0, color="black", lw=0.8)
    a2.set_yscale("log", base=2)
    a2.set_ylabel("Ulysses time / ring time")
    a2.set_title("> 1: ring wins (transfers hidden); < 1: Ulysses wins", fontsize=9)
    a2.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ======================================================== memory: recompute, precision
def activation_memory(rows: list[dict], b: int, s: int, h: int, a: int):
    """Activation bytes per layer per device against the tensor-parallel size
    (Korthikanti et al. 2022, Table 2 and §5).  Left: the memory ledger of this
    demo's float64 layer (markers) on simpar's formula (lines), recompute none /
    selective / full, with and without sequence parallelism; ``rows``:
    ``{"t", "sp", "recompute", "ledger"}``.  Right: simpar's formula in 16-bit
    bytes (solid) and the paper's five rows (dashed) for a GPT-3 175B layer."""
    from .parallel.tensor import activation_elements
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ts = np.array([1, 2, 4, 8])
    colors = {"none": "#4C72B0", "selective": "#55A868", "full": "#C44E52"}
    for mode, color in colors.items():
        for sp, style in ((False, "-"), (True, "--")):
            name = f"{mode}{', SP' if sp else ''}"
            ax1.plot(ts, [8 * activation_elements(b, s, h, a, t, sequence_parallel=sp,
                                                  recompute=mode) / 1024 for t in ts],
                     style, color=color, label=f"formula, {name}")
            got = [r for r in rows if r["sp"] == sp and r["recompute"] == mode]
            ax1.plot([r["t"] for r in got], [r["ledger"] / 1024 for r in got],
                     "o" if not sp else "s", color=color, mfc="none" if sp else color, ms=5)
    ax1.set_title(f"ledger (markers) = formula, this demo's layer\n"
                  f"(b={b} s={s} h={h} a={a}, float64)", fontsize=9)
    ax1.set_ylabel("KiB saved per layer per device")
    B, S, H, A = 1, 2048, 12288, 96
    paper = {"none, TP": lambda t: formulas.activation_bytes_per_layer(S, B, H, A, t),
             "none, TP+SP": lambda t: formulas.activation_bytes_per_layer(S, B, H, A, t, True),
             "selective, TP+SP": lambda t: formulas.recompute_activation_bytes_per_layer(
                 S, B, H, t, selective=True),
             "full": lambda t: formulas.recompute_activation_bytes_per_layer(S, B, H)}
    ours = {"none, TP": ("none", False), "none, TP+SP": ("none", True),
            "selective, TP+SP": ("selective", True), "full": ("full", False)}
    for name, f in paper.items():
        mode, sp = ours[name]
        color = colors[mode]
        ax2.plot(ts, [f(t) / 2**30 for t in ts], "--", color=color,
                 marker="x" if sp else "+", label=f"Korthikanti Table 2: {name}")
        ax2.plot(ts, [2 * activation_elements(B, S, H, A, t, sequence_parallel=sp,
                                              recompute=mode) / 2**30 for t in ts],
                 "-", color=color, alpha=0.7, label=f"simpar (16-bit): {name}")
    ax2.set_title("GPT-3 175B layer (s=2048 h=12288 a=96, b=1), 16-bit", fontsize=9)
    ax2.set_ylabel("GiB saved per layer per device")
    for ax in (ax1, ax2):
        ax.set_xlabel("tensor-parallel size t")
        ax.set_xticks(ts)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    return fig



MEMORY_COLORS = {"weights": "#4C72B0", "gradients": "#DD8452", "optimizer": "#55A868",
                 "activations": "#C44E52"}


def memory_breakdown(cases: dict, capacity: float, capacity_label: str, xlabel: str):
    """Bytes per device of several set-ups as stacked bars (``{label: {"weights",
    "gradients", "optimizer", "activations": bytes}}``, drawn in GB on a log axis)
    against the device's memory (``capacity`` bytes, a dashed line)."""
    fig, ax = plt.subplots(figsize=(9, 3.6))
    left = np.zeros(len(cases))
    for kind, color in MEMORY_COLORS.items():
        vals = np.array([c[kind] / 1e9 for c in cases.values()])
        ax.barh(list(cases), vals, left=left, color=color, label=kind)
        left += vals
    ax.axvline(capacity / 1e9, color="k", ls="--", lw=1, label=capacity_label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

def mixed_precision_loss(curves: dict, below: dict, title: str):
    """Left: the loss per step of float32, bfloat16 and float16 runs (same model,
    data and seed).  Right: per step, the fraction of gradient elements below the
    dtype's normal range (float16: 2⁻¹⁴) — without loss scaling many float16
    gradients lose precision or flush to zero (Micikevicius et al. 2018, Fig. 3)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", ":", "-."]
    for i, (label, losses) in enumerate(curves.items()):
        ax1.plot(range(len(losses)), losses, styles[i % 4], lw=1.2, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats)")
    ax1.set_title(title, fontsize=9)
    ax1.legend(fontsize=7)
    for i, (label, frac) in enumerate(below.items()):
        ax2.plot(range(len(frac)), 100 * np.asarray(frac), styles[i % 4], lw=1.2, label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("% of gradient elements below the normal range")
    ax2.set_title("gradient underflow (zero or subnormal in their dtype)", fontsize=9)
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
