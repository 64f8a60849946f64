"""``python -m simpar zero``: the ledger equals ZeRO §5 and the bytes §7 in every
row it prints, and its figure is the same bytes run to run."""
from simpar.demos import figures, zero


def test_every_row_equals_the_formulas(tmp_path, capsys):
    rows = zero.main(["--out", str(tmp_path)])
    assert len(rows) == 16 and (tmp_path / "zero_memory.png").exists()
    for r in rows:
        assert r["ledger"] == r["formula"], r
        if r["dp"] > 1:
            assert r["sent"] == (1.5 if r["stage"] == 3 else 1.0) * r["dp_sent"], r
    assert "paper: 120, 31.4, 16.6, 1.88 GB" in capsys.readouterr().out


def test_figure_is_byte_identical_run_to_run(tmp_path):
    assert "zero_memory.png" in figures.DETERMINISTIC
    a, = figures.draw(["zero_memory.png"], tmp_path / "a")
    b, = figures.draw(["zero_memory.png"], tmp_path / "b")
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 10_000
