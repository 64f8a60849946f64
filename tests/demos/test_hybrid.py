"""The hybrid demo: every layout's loss curve (dense and MoE) equals the one-device
run's of the same model, and the figure ``hybrid_loss.png`` is drawn from them."""
import re

import pytest

from simpar.demos import hybrid
from simpar.testing import worst

LABELS = {label: i for i, (label, _, _) in enumerate(hybrid.LAYOUTS)}


@pytest.mark.timeout(180)
def test_layouts_coincide_with_one_device():
    chosen = [hybrid.LAYOUTS[LABELS[k]] for k in ("dp2", "tied pp2 (m=4)", "MoE ep2 (dp2)")]
    out = hybrid.run_layouts(steps=3, layouts=chosen)
    assert set(out["curves"]) == {"1 device", "1 device, tied embeddings",
                                  "1 device, MoE in 2 routing groups"} | \
        {label for label, _, _ in chosen}
    assert all(len(c) == 3 for c in out["curves"].values())
    assert worst(out["errors"]) <= 1e-10, out["errors"]
    # the tied model and the MoE model are other models: their curves differ
    ends = {k: c[-1] for k, c in out["curves"].items() if k.startswith("1 device")}
    assert len(set(ends.values())) == 3, ends


def test_every_moe_layout_of_the_issue_is_drawn():
    moe = [(layout.dp, layout.tp, layout.pp, layout.ep, opts.get("micro_batches", 1))
           for label, layout, opts in hybrid.LAYOUTS if opts.get("moe_experts")]
    assert sorted(moe) == sorted([(2, 1, 1, 2, 1), (4, 1, 1, 2, 1), (2, 2, 1, 2, 1),
                                  (2, 1, 2, 2, 4)])


@pytest.mark.timeout(300)
def test_main_prints_every_layout_and_writes_the_figure(tmp_path, capsys):
    hybrid.main(["--steps", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    rows = re.findall(r"^(.+?) +(\d) +(\d+\.\d+) +(\S+)$", text, re.M)
    refs = [r for r in rows if r[-1] == "(reference)"]
    assert len(rows) - len(refs) == len(hybrid.LAYOUTS) and len(refs) == 5, text
    assert all(float(err) <= 1e-10 for *_, err in rows if err != "(reference)"), rows
    assert (tmp_path / hybrid.FIGURE).stat().st_size > 10_000
