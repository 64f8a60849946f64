"""The hybrid demo: every layout's loss curve equals the one-device run's, and the
figure ``hybrid_loss.png`` is drawn from them."""
import re

import pytest

from simpar.demos import hybrid


@pytest.mark.timeout(120)
def test_layouts_coincide_with_one_device():
    chosen = [hybrid.LAYOUTS[0], hybrid.LAYOUTS[-1]]           # dp2, tied pp2
    out = hybrid.run_layouts(steps=3, layouts=chosen)
    assert set(out["curves"]) == {"1 device", "1 device, tied embeddings"} | \
        {label for label, _, _ in chosen}
    assert all(len(c) == 3 for c in out["curves"].values())
    assert max(out["errors"].values()) <= 1e-10, out["errors"]
    # the tied model is another model: its curve differs from the untied one
    assert out["curves"]["1 device"][-1] != out["curves"]["1 device, tied embeddings"][-1]


@pytest.mark.timeout(240)
def test_main_prints_every_layout_and_writes_the_figure(tmp_path, capsys):
    hybrid.main(["--steps", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    rows = re.findall(r"^(.+?) +(\d) +(\d+\.\d+) +(\S+)$", text, re.M)
    assert len(rows) == len(hybrid.LAYOUTS) + 2, text
    assert all(float(err) <= 1e-10 for *_, err in rows if err != "(reference)"), rows
    assert (tmp_path / hybrid.FIGURE).stat().st_size > 10_000
