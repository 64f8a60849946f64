"""simpar.testing, the one comparison helper: a NaN or inf anywhere is a failure.
Negative controls: a NaN or inf injected into one gradient that is *not* the
first key must fail every check and every demo verdict."""
import math

import numpy as np
import pytest

from simpar import launch, testing
from simpar.demos import overview
from tests.mpi_util import run_mpi
from tests.parallel.pipeline import checks


def test_rel_error_scale_aware_and_exact_for_zeros():
    want = np.array([1.0, -4.0, 2.0])
    assert testing.rel_error(want, want) == 0.0
    assert testing.rel_error(want + [0, 1e-9, 0], want) == pytest.approx(1e-9 / 4)
    assert testing.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert testing.rel_error(np.full(3, 1e-3), np.zeros(3)) == pytest.approx(1e-3)  # absolute
    assert testing.rel_error(2.0, 1.0) == 1.0                                        # scalars


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("side", ["got", "want"])
def test_rel_error_nonfinite_is_inf(bad, side):
    a, b = np.arange(6.0), np.arange(6.0)
    (a if side == "got" else b)[4] = bad
    assert testing.rel_error(a, b) == math.inf
    assert not testing.passed(testing.rel_error(a, b), tol=1e300)
    with pytest.raises(AssertionError, match="inf"):
        testing.assert_close(a, b, "x")


def test_shapes_must_match():
    with pytest.raises(AssertionError, match="shape"):
        testing.rel_error(np.zeros((2, 3)), np.zeros(3))           # would broadcast


def test_worst_is_nan_aware_wherever_the_nan_is():
    assert max([1e-16, float("nan")]) == 1e-16                      # the trap: Python max
    for errors in ([1e-16, float("nan")], [float("nan"), 1e-16], {"a": 0.0, "b": float("nan")},
                   np.array([0.0, np.nan, 1e-15]), [0.0, float("inf")]):
        assert testing.worst(errors) == math.inf
        assert not testing.passed(errors)
        assert testing.verdict(errors) == "TOO LARGE"
    assert testing.worst({"a": 1e-16, "b": 3e-16}) == 3e-16
    assert testing.verdict([1e-16, 3e-16]) == "OK"
    assert testing.worst(2e-16) == 2e-16
    assert testing.worst(e for e in [0.0, float("nan")]) == math.inf        # any iterable
    with pytest.raises(ValueError, match="nothing was compared"):
        testing.worst([])


def test_compare_and_assert_all_close_name_the_bad_entry():
    want = {"wte": np.ones(3), "blocks.0.attn.qkv.W": np.ones((2, 2)), "ln_f.beta": np.ones(2)}
    got = {k: v.copy() for k, v in want.items()}
    got["blocks.0.attn.qkv.W"][1, 0] = np.nan
    errors = testing.compare(got, want)
    assert list(errors) == list(got) and errors["wte"] == 0.0
    assert errors["blocks.0.attn.qkv.W"] == math.inf
    with pytest.raises(AssertionError, match=r"blocks\.0\.attn\.qkv\.W"):
        testing.assert_all_close(got, want, "grads")
    with pytest.raises(AssertionError, match="no reference"):
        testing.compare({"extra": np.ones(1)}, want)


def test_worst_over_ranks_sees_a_nan_on_any_rank():
    for bad_rank in range(3):
        out = launch(lambda c: testing.worst_over_ranks(
            c, [0.0, float("nan") if c.rank == bad_rank else 1e-16]), 3)
        assert out == [math.inf] * 3


# ------------------------------------------------------------- negative controls
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("name", ["1f1b", "zb-h1"])
def test_pipeline_check_fails_on_a_bad_value_in_a_non_first_gradient(name, value):
    """The NaN-filled receive buffers prove something only if a NaN that reaches
    a gradient fails the check, whichever gradient it is."""
    launch(lambda c: checks.check_equivalence(c, name, 4, 3), 2)        # passes untouched
    for key in ("blocks.0.attn.qkv.W", "ln_f.gamma"):                   # rank 0 / rank 1
        with pytest.raises(AssertionError, match=key.replace(".", r"\.")):
            launch(lambda c: checks.check_equivalence(c, name, 4, 3, inject=(key, value)), 2)


def test_demo_verdict_fails_on_a_nan_in_one_gradient_on_one_rank(monkeypatch, capsys, tmp_path):
    """``python -m simpar demo`` once printed OK with a NaN in one gradient's error
    on one rank (Python ``max`` over the ranks' errors skipped it)."""
    real = overview.gradient_errors

    def poisoned(comm, *args, **kwargs):
        errors = real(comm, *args, **kwargs)
        if comm.rank == 1:                                # one rank, the 4th parameter
            errors[list(errors)[3]] = float("nan")
        return errors

    monkeypatch.setattr(overview, "gradient_errors", poisoned)
    overview.main(["--world-size", "3", "--backend", "threads", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "max relative gradient error inf (TOO LARGE" in text, text


@pytest.mark.mpi
@pytest.mark.timeout(200)
def test_expert_demo_verdict_under_mpi_sees_nan_on_three_of_four_ranks(tmp_path):
    """Ranks 0-2 get a NaN in their output, rank 3 none: every check says TOO LARGE."""
    res = run_mpi(4, "tests/demos/scripts/expert_nan_verdict.py", str(tmp_path), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.lstrip().startswith("k=")]
    assert len(lines) == 3 and all("output inf" in ln and "(TOO LARGE)" in ln for ln in lines), \
        res.stdout


def test_explicit_scale():
    assert testing.rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.5]), scale=10.0) == 0.05
    assert testing.rel_error(np.array([np.nan]), np.array([1.0]), scale=10.0) == math.inf
