"""One home for plots: only simpar/viz.py draws; the figure defects once found in
the committed figures stay fixed."""
import re
from pathlib import Path

import numpy as np

from simpar import launch, viz
from simpar.demos import pipeline_parallel as pp

ROOT = Path(__file__).resolve().parents[1]


def test_only_viz_imports_matplotlib():
    drawers = [p.relative_to(ROOT).as_posix() for p in (ROOT / "simpar").rglob("*.py")
               if re.search(r"^\s*(import matplotlib|from matplotlib)", p.read_text(), re.M)]
    assert drawers == ["simpar/viz.py"]


def _records(names=("naive", "1f1b")):
    cfg, sizes = pp.uniform_config(2)
    xs, ys = pp.corpus_batches(cfg, 4, batch=1)
    return launch(lambda c: {n: pp.pipeline_step(c, n, 4, 1, cfg, sizes, xs, ys)[2]
                             for n in names}, 2)[0]


def test_naive_panel_says_its_time_axis_is_its_own():
    records = _records()
    fig = viz.pipeline_schedules(records, {"naive": 0.5, "1f1b": 0.2}, pp.SCHEDULE_V)
    naive, one_f_one_b = fig.axes[:2]
    assert "own time axis" in naive.get_title()
    assert "own time axis" not in one_f_one_b.get_title()
    assert naive.get_xlim()[1] > one_f_one_b.get_xlim()[1]          # truly its own axis
    viz.plt.close(fig)


def test_bubble_curves_stay_distinguishable_where_they_coincide():
    styles = list(viz.BUBBLE_STYLES.values())
    assert len({s[2] for s in styles}) == len(styles)                 # markers
    assert len({s[3] for s in styles}) == len(styles)                 # line styles
    # 1F1B and ZB-H1 with the same values: their markers must not sit on each other
    sweep = [(n, 1, m, 0.1, 0.1, 1) for n in ("1f1b", "zb-h1") for m in (1, 2, 4)]
    fig = viz.pipeline_bubble(sweep, 4)
    ax = fig.axes[0]
    marks = {ln.get_label(): ln.get_xdata() for ln in ax.get_lines() if "simulated" in ln.get_label()}
    a, b = (np.asarray(v, float) for v in marks.values())
    assert len(marks) == 2 and np.all(a != b)
    viz.plt.close(fig)


def test_png_has_no_version_stamp(tmp_path):
    fig = viz.expert_load({0.0: {"loads": np.ones((4, 1, 3), int)},
                           0.01: {"loads": np.ones((4, 1, 3), int)}})
    path = viz.save(fig, str(tmp_path / "x.png"))
    data = Path(path).read_bytes()
    assert b"matplotlib" not in data and b"Software" not in data
