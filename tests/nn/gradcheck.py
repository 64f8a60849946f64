"""Finite-difference gradient checking shared by the nn tests (float64 only)."""
from __future__ import annotations

import numpy as np

from simpar import testing

EPS = 1e-4        # step of the central differences
RTOL = 1e-6       # allowed relative error


def numerical_grad(f, arr: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Central differences of the scalar ``f()`` w.r.t. every entry of ``arr``,
    which is perturbed in place and restored.

    Five-point stencil ``(8(f(x+h) − f(x−h)) − (f(x+2h) − f(x−2h))) / 12h``: its
    truncation error is O(h⁴), so a step as large as 1e-4 can be used, which keeps the
    rounding error (≈ 1e-16·|f|/h) small even for parameters whose gradient is tiny
    compared with the loss.
    """
    g = np.zeros(arr.shape, dtype=np.float64)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = arr[i].copy()
        vals = []
        for step in (eps, -eps, 2 * eps, -2 * eps):
            arr[i] = old + step
            vals.append(f())
        arr[i] = old
        g[i] = (8 * (vals[0] - vals[1]) - (vals[2] - vals[3])) / (12 * eps)
    return g


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """``max |a − n| / max(max |n|, max |a|)`` (absolute when both are below 1e-12);
    NaN or inf on either side is ``inf`` (:func:`simpar.testing.rel_error`)."""
    return testing.rel_error(analytic, numeric, symmetric=True, tiny=1e-12)


def assert_grad_close(analytic, numeric, what: str, rtol: float = RTOL) -> None:
    err = rel_error(analytic, numeric)
    assert err <= rtol, f"gradient of {what}: relative error {err:.3g} > {rtol:g}"
    # a check against an all-zero gradient would prove nothing
    assert np.max(np.abs(numeric)) > 1e-9, f"gradient of {what} vanishes: weak test"


def check_module_grads(m, x, rng, check_input: bool = True) -> None:
    """Gradient check of module ``m`` at input ``x`` for the scalar loss
    ``L = Σ w · m(x)`` with a random ``w``: input gradient and every parameter."""
    y = m.forward(x, key="analytic")
    w = rng.standard_normal(y.shape)
    m.zero_grad()
    dx = m.backward(w, key="analytic")
    assert m.saved_keys() == []

    def f() -> float:
        out = m.forward(x, key="fd")
        m.clear_saved("fd")
        return float(np.sum(out * w))

    if check_input:
        assert_grad_close(dx, numerical_grad(f, x), "input")
    for name, p in m.parameters().items():
        assert_grad_close(m.gradients()[name], numerical_grad(f, p), name)
