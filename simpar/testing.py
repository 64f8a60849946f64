"""The one way simpar compares a result with its reference (tests, demos, notebooks).

Every equivalence check in the project is "build the reference, cut it, run
both, compare" (DESIGN.md §2); this module is the compare.  Its rule: **a NaN
or an infinity anywhere is a failure**, never a value that a later ``max``
can skip.  (Python's ``max(errors)`` keeps a NaN only when it comes first, and
an MPI ``MAX`` reduction may drop it; both once let checks pass with a NaN in
a gradient.)

    >>> import numpy as np
    >>> rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-12])) < 1e-12
    True
    >>> rel_error(np.array([1.0, np.nan]), np.array([1.0, 2.0]))
    inf
    >>> errors = compare({"a": np.ones(2), "b": np.array([1.0, np.nan])},
    ...                  {"a": np.ones(2), "b": np.ones(2)})
    >>> worst(errors), passed(errors)
    (inf, False)
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

TOL = 1e-10      # float64 equivalence: max relative error (DESIGN.md §2)

__all__ = ["TOL", "rel_error", "compare", "worst", "passed", "verdict", "assert_close",
           "assert_all_close", "worst_over_ranks"]


def rel_error(got, want, *, symmetric: bool = False, tiny: float = 0.0,
              scale: float | None = None) -> float:
    """``max|got − want| / max|want|``: a scale-aware relative error.

    * any NaN or infinity in ``got`` or ``want`` gives ``inf`` (a failure for
      every tolerance);
    * different shapes raise ``AssertionError`` (broadcasting would hide a bug);
    * ``symmetric=True`` divides by ``max(max|got|, max|want|)`` instead (for
      finite differences, where neither side is the truth);
    * ``scale`` divides by a given number instead (e.g. the size of a sum whose
      terms cancel);
    * when the scale is ``<= tiny`` (default 0: both sides all zeros) the
      absolute difference is returned.
    """
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    if g.shape != w.shape:
        raise AssertionError(f"shape {g.shape} != reference shape {w.shape}")
    if not (np.isfinite(g).all() and np.isfinite(w).all()):
        return float("inf")
    if scale is None:
        scale = float(np.max(np.abs(w), initial=0.0))
        if symmetric:
            scale = max(scale, float(np.max(np.abs(g), initial=0.0)))
    diff = float(np.max(np.abs(g - w), initial=0.0))
    return diff / scale if scale > tiny else diff


def compare(got: Mapping, want: Mapping) -> dict[str, float]:
    """``{name: rel_error(got[name], want[name])}`` for every name in ``got``
    (``got`` may hold a subset, e.g. one pipeline stage's gradients); a name
    missing from ``want`` raises ``AssertionError``."""
    missing = [k for k in got if k not in want]
    if missing:
        raise AssertionError(f"no reference for {missing}")
    return {k: rel_error(got[k], want[k]) for k in got}


def worst(errors) -> float:
    """The largest error of a dict of errors, an iterable of errors or one error,
    NaN-aware: a NaN (or inf) anywhere makes the result ``inf``.  An empty
    collection raises ``ValueError`` (a check of nothing proves nothing)."""
    if isinstance(errors, Mapping):
        errors = list(errors.values())
    elif not isinstance(errors, np.ndarray) and not np.isscalar(errors):
        errors = list(errors)
    arr = np.asarray(errors, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("worst() of no errors: nothing was compared")
    if not np.isfinite(arr).all():
        return float("inf")
    return float(np.max(arr))


def passed(errors, tol: float = TOL) -> bool:
    """True when every error is finite and ``<= tol``."""
    return worst(errors) <= tol


def verdict(errors, tol: float = TOL) -> str:
    """``"OK"`` or ``"TOO LARGE"``, the word the demos print."""
    return "OK" if passed(errors, tol) else "TOO LARGE"


def assert_close(got, want, what: str = "", tol: float = TOL, **kw) -> float:
    """Assert ``rel_error(got, want) <= tol`` (NaN/inf fail); returns the error."""
    err = rel_error(got, want, **kw)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.0e}"
    return err


def assert_all_close(got: Mapping, want: Mapping, what: str = "", tol: float = TOL
                     ) -> dict[str, float]:
    """Compare every entry of ``got`` with ``want``; the assertion names the worst
    entry.  Returns the errors."""
    errors = compare(got, want)
    if errors and not passed(errors, tol):
        bad = max(errors, key=lambda k: np.nan_to_num(errors[k], nan=np.inf))
        raise AssertionError(f"{what}: {bad} max relative error {errors[bad]:.3e} > {tol:.0e}")
    return errors


def worst_over_ranks(comm, errors) -> float:
    """``worst`` of every rank's errors, the same value on every rank.  Gathers
    the values (a cold-path object exchange) instead of a ``MAX`` all-reduce,
    which some MPI implementations evaluate NaN-blind."""
    mine = worst(errors)
    return worst(np.asarray(comm.gather_objects(mine), dtype=np.float64))
