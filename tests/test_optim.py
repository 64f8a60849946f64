"""SGD and AdamW against scalar-loop implementations written independently here."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from simpar import trace
from simpar.optim import SGD, AdamW, clip_grad_norm, grad_norm


# ------------------------------------------------- scalar reference versions
def adamw_scalar(p0, grads_seq, lr, b1, b2, eps, wd):
    """AdamW on a list of Python floats, one element at a time."""
    p = list(p0)
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads_seq, start=1):
        for i in range(len(p)):
            p[i] = p[i] - lr * wd * p[i]
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            mh = m[i] / (1 - b1 ** t)
            vh = v[i] / (1 - b2 ** t)
            p[i] = p[i] - lr * mh / (math.sqrt(vh) + eps)
    return p, m, v


def sgd_scalar(p0, grads_seq, lr, mu, wd):
    p = list(p0)
    buf = [0.0] * len(p)
    for g in grads_seq:
        for i in range(len(p)):
            d = g[i] + wd * p[i]
            buf[i] = mu * buf[i] + d
            p[i] = p[i] - lr * (buf[i] if mu > 0 else d)
    return p


def _problem(seed=0, shapes=((3, 4), (5,)), steps=4):
    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.standard_normal(s) for i, s in enumerate(shapes)}
    grads = [{k: rng.standard_normal(a.shape) for k, a in params.items()} for _ in range(steps)]
    return params, grads


def _flat_seq(grads, key):
    return [g[key].ravel().tolist() for g in grads]


# ----------------------------------------------------------------- AdamW
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_scalar_loop(wd):
    params, grads = _problem()
    start = {k: a.copy() for k, a in params.items()}
    opt = AdamW(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd)
    for g in grads:
        opt.step(g)
    assert opt.t == len(grads)
    for k in params:
        p, m, v = adamw_scalar(start[k].ravel().tolist(), _flat_seq(grads, k),
                               0.01, 0.8, 0.95, 1e-6, wd)
        np.testing.assert_allclose(params[k].ravel(), p, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(opt.m[k].ravel(), m, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(opt.v[k].ravel(), v, rtol=1e-13, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(lr=st.floats(0.0, 0.5), b1=st.floats(0.0, 0.99), b2=st.floats(0.0, 0.9999),
       eps=st.floats(1e-10, 1e-2), wd=st.floats(0.0, 0.5), seed=st.integers(0, 1000))
def test_adamw_matches_scalar_loop_property(lr, b1, b2, eps, wd, seed):
    params, grads = _problem(seed, shapes=((2, 3),), steps=3)
    start = params["p0"].ravel().tolist()
    opt = AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for g in grads:
        opt.step(g)
    p, _, _ = adamw_scalar(start, _flat_seq(grads, "p0"), lr, b1, b2, eps, wd)
    np.testing.assert_allclose(params["p0"].ravel(), p, rtol=1e-10, atol=1e-12)


def test_adamw_first_step_is_lr_times_sign_plus_decay():
    p = np.array([1.0, -2.0, 3.0, 0.5])
    g = np.array([0.3, -1e-3, 50.0, -7.0])
    lr, wd = 0.1, 0.01
    params = {"w": p.copy()}
    AdamW(params, lr=lr, weight_decay=wd).step({"w": g})
    expected = p * (1 - lr * wd) - lr * np.sign(g)
    np.testing.assert_allclose(params["w"], expected, rtol=0, atol=1e-5 * lr)


def test_adamw_updates_in_place_and_keeps_float32():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    params = {"w": w}
    opt = AdamW(params, lr=1e-2)
    before = w.copy()
    for gdtype in (np.float32, np.float64):
        opt.step({"w": rng.standard_normal((8, 8)).astype(gdtype)})
    assert params["w"] is w and w.dtype == np.float32
    assert not np.array_equal(w, before)
    assert opt.m["w"].dtype == opt.v["w"].dtype == np.float32
    # and float32 agrees with a float64 run to float32 precision
    w64 = {"w": before.astype(np.float64)}
    opt64 = AdamW(w64, lr=1e-2)
    rng = np.random.default_rng(1)
    rng.standard_normal((8, 8))
    for gdtype in (np.float32, np.float64):
        opt64.step({"w": rng.standard_normal((8, 8)).astype(gdtype).astype(np.float64)})
    np.testing.assert_allclose(w, w64["w"], rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    params, grads = _problem(steps=6)
    opt = AdamW(params, lr=0.05, weight_decay=0.1)
    for g in grads[:3]:
        opt.step(g)
    sd = opt.state_dict()
    snapshot = {k: a.copy() for k, a in params.items()}
    for g in grads[3:]:
        opt.step(g)
    # the state dict is a copy, not a view of the live state
    assert sd["t"] == 3 and not np.array_equal(sd["m"]["p0"], opt.m["p0"])

    params2 = {k: a.copy() for k, a in snapshot.items()}
    opt2 = AdamW(params2, lr=123.0, betas=(0.5, 0.5), weight_decay=0.0)
    opt2.load_state_dict(sd)
    assert opt2.lr == 0.05 and opt2.betas == (0.9, 0.999) and opt2.t == 3
    for g in grads[3:]:
        opt2.step(g)
    for k in params:
        np.testing.assert_array_equal(params2[k], params[k])
        np.testing.assert_array_equal(opt2.v[k], opt.v[k])


def test_load_state_dict_rejects_mismatches():
    params, _ = _problem()
    opt = AdamW(params)
    sd = opt.state_dict()
    del sd["m"]["p1"]
    with pytest.raises(KeyError, match="p1"):
        AdamW(params).load_state_dict(sd)
    sd = opt.state_dict()
    sd["v"]["p0"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match="p0"):
        AdamW(params).load_state_dict(sd)


# ------------------------------------------------------------------- SGD
@pytest.mark.parametrize("mu,wd", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.05), (0.5, 0.1)])
def test_sgd_matches_scalar_loop(mu, wd):
    params, grads = _problem(3)
    start = {k: a.copy() for k, a in params.items()}
    opt = SGD(params, lr=0.1, momentum=mu, weight_decay=wd)
    for g in grads:
        opt.step(g)
    for k in params:
        p = sgd_scalar(start[k].ravel().tolist(), _flat_seq(grads, k), 0.1, mu, wd)
        np.testing.assert_allclose(params[k].ravel(), p, rtol=1e-13, atol=1e-15)


def test_sgd_plain_step_by_hand():
    w = np.array([1.0, 2.0], dtype=np.float32)
    opt = SGD({"w": w}, lr=0.5)
    opt.step({"w": np.array([2.0, -4.0], dtype=np.float32)})
    np.testing.assert_array_equal(w, np.array([0.0, 4.0], dtype=np.float32))
    assert w.dtype == np.float32


def test_sgd_state_dict_round_trip():
    params, grads = _problem(5, steps=4)
    opt = SGD(params, lr=0.1, momentum=0.9)
    opt.step(grads[0]); opt.step(grads[1])
    sd = opt.state_dict()
    p2 = {k: a.copy() for k, a in params.items()}
    opt.step(grads[2]); opt.step(grads[3])
    opt2 = SGD(p2, lr=0.1, momentum=0.9)
    opt2.load_state_dict(sd)
    opt2.step(grads[2]); opt2.step(grads[3])
    for k in params:
        np.testing.assert_array_equal(p2[k], params[k])


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("kw,needle", [
    (dict(lr=-0.1), "-0.1"),
    (dict(lr=float("nan")), "nan"),
    (dict(betas=(1.0, 0.999)), "1.0"),
    (dict(betas=(0.9, -0.5)), "-0.5"),
    (dict(betas=(0.9,)), "betas"),
    (dict(eps=0.0), "eps=0.0"),
    (dict(eps=-1e-8), "-1e-08"),
    (dict(weight_decay=-0.01), "-0.01"),
])
def test_adamw_rejects_bad_hyperparameters(kw, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        AdamW({"w": np.zeros(3)}, **kw)


@pytest.mark.parametrize("kw,needle", [(dict(lr=-1.0), "-1.0"), (dict(lr=0.1, momentum=1.0), "1.0"),
                                       (dict(lr=0.1, momentum=-0.2), "-0.2"),
                                       (dict(lr=0.1, weight_decay=-3.0), "-3.0")])
def test_sgd_rejects_bad_hyperparameters(kw, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        SGD({"w": np.zeros(3)}, **kw)


def test_step_names_missing_and_misshaped_gradients():
    opt = AdamW({"a": np.zeros(3), "b": np.zeros((2, 2))})
    with pytest.raises(KeyError, match="'b'"):
        opt.step({"a": np.ones(3)})
    with pytest.raises(ValueError, match="'b'.*\\(2, 3\\)"):
        opt.step({"a": np.ones(3), "b": np.ones((2, 3))})
    assert opt.t == 0                                   # a failed step changes nothing
    opt.step({"a": np.ones(3), "b": np.ones((2, 2)), "unused": np.ones(1)})
    assert opt.t == 1


def test_params_must_be_float_arrays():
    with pytest.raises(TypeError, match="'i'"):
        AdamW({"i": np.zeros(3, dtype=np.int64)})
    with pytest.raises(TypeError, match="'l'"):
        AdamW({"l": [1.0, 2.0]})


def test_zero_lr_changes_nothing():
    w = np.arange(4.0)
    AdamW({"w": w}, lr=0.0).step({"w": np.ones(4)})
    np.testing.assert_array_equal(w, np.arange(4.0))


# -------------------------------------------------------- memory ledger
def test_optimizer_state_is_registered_in_the_memory_ledger():
    tr = trace.Tracer(rank=0)
    trace.activate(tr)
    try:
        params = {"a": np.zeros((10, 10), dtype=np.float32), "b": np.zeros(6, dtype=np.float64)}
        nbytes = 400 + 48
        adam = AdamW(params)
        assert tr.memory.current["optimizer"] == 2 * nbytes == adam.state_nbytes()
        SGD(params, lr=0.1, momentum=0.9)
        assert tr.memory.current["optimizer"] == 3 * nbytes
        SGD(params, lr=0.1)                              # no momentum: no state
        assert tr.memory.current["optimizer"] == 3 * nbytes
    finally:
        trace.activate(None)
    AdamW(params)                                        # no tracer: a no-op


# ------------------------------------------------------------- clipping
def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0, 4.0]])}
    assert grad_norm(grads) == pytest.approx(5.0)
    n = clip_grad_norm(grads, 1.0)
    assert n == pytest.approx(5.0)
    assert grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-5)
    small = {"a": np.array([0.1, 0.2])}
    clip_grad_norm(small, 1.0)
    np.testing.assert_array_equal(small["a"], [0.1, 0.2])  # below the limit: untouched
    with pytest.raises(ValueError, match="max_norm=0.0"):
        clip_grad_norm(small, 0.0)
