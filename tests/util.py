"""Helpers shared by the equivalence tests."""
from __future__ import annotations

import numpy as np

TOL = 1e-10      # float64 equivalence: max relative error (DESIGN.md §2)


def max_rel_err(got, want) -> float:
    """``max|got - want| / max|want|`` (a scale-aware relative error; 0 for two zeros)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != reference shape {want.shape}")
    scale = np.abs(want).max(initial=0.0)
    diff = np.abs(got - want).max(initial=0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def assert_close(got, want, what: str = "", tol: float = TOL) -> None:
    err = max_rel_err(got, want)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.0e}"
