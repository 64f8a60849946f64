"""The closed forms of :mod:`simpar.formulas` against the papers' own numbers and
against each other (the tests of each paradigm check them against the code)."""
import math

import pytest
from hypothesis import assume, given, strategies as st

from simpar import formulas as fm
from simpar import sim


def test_zero_table_1_example():
    """Rajbhandari et al. 2020, Table 1: Ψ = 7.5B, N = 64, K = 12."""
    gb = [fm.zero_memory_bytes(7.5e9, 64, stage) / 1e9 for stage in fm.ZERO_STAGES]
    assert [round(g, 1) for g in gb[:3]] == [120.0, 31.4, 16.6]
    assert round(gb[3], 2) == 1.88


@given(psi=st.integers(1, 10**9), n=st.integers(1, 1024))
def test_zero_memory_shrinks_by_stage_and_equals_base_on_one_rank(psi, n):
    mem = [fm.zero_memory_bytes(psi, n, stage) for stage in fm.ZERO_STAGES]
    assert mem[0] == 16 * psi
    assert all(a >= b for a, b in zip(mem, mem[1:]))
    if n == 1:
        assert mem == pytest.approx([16 * psi] * 4)


def test_zero_communication():
    psi, n = 10**6, 8
    dp = fm.dp_comm_elements(psi, n)
    assert dp == 2 * psi * (n - 1) / n
    assert fm.zero_comm_elements(psi, n, 1) == fm.zero_comm_elements(psi, n, 2) == dp
    assert fm.zero_comm_elements(psi, n, 3) == pytest.approx(1.5 * dp)
    with pytest.raises(ValueError, match="stage"):
        fm.zero_comm_elements(psi, n, 4)
    with pytest.raises(ValueError, match="stage"):
        fm.zero_memory_bytes(psi, n, -1)


@given(p=st.integers(1, 16), m=st.integers(1, 64), v=st.integers(1, 4))
def test_bubble_fraction_is_ratio_over_one_plus_ratio(p, m, v):
    """(p−1)/(m+p−1) of the step is (p−1)/m of ideal, seen from the step."""
    for name, vv in (("gpipe", 1), ("1f1b", 1), ("interleaved", v)):
        r = fm.bubble_over_ideal(p, m, vv)
        assert fm.bubble_fraction(name, p, m, vv) == pytest.approx(r / (1 + r))


@given(p=st.integers(1, 16), m=st.integers(1, 64), tf=st.integers(1, 9),
       tb=st.integers(1, 9), tw=st.integers(1, 9))
def test_zero_bubble_idle(p, m, tf, tb, tw):
    """ZB-H1 saves 2(p−1)T_W of idle time over 1F1B (Qi et al. 2023, Table 2;
    the formula assumes T_W <= T_F + T_B, as the paper's schedule does)."""
    assume(tw <= tf + tb)
    assert fm.one_f_one_b_idle(p, tf, tb, tw) - fm.zb_h1_idle(p, tf, tb, tw) == 2 * (p - 1) * tw
    frac = fm.bubble_fraction("zb-h1", p, m, times={"F": tf, "I": tb, "W": tw})
    bubble = (p - 1) * (tf + tb - tw)
    assert frac == bubble / (m * (tf + tb + tw) + bubble)


def test_bubble_errors_and_naive():
    assert fm.bubble_fraction("naive", 4, 8) == 3 / 4
    with pytest.raises(ValueError, match="dualpipe"):
        fm.bubble_fraction("dualpipe", 4, 8)
    assert fm.micro_batches_in_flight("gpipe", 4, 8) == 8
    assert [fm.micro_batches_in_flight("1f1b", 4, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert fm.micro_batches_in_flight("1f1b", 4, 2, 0) == 2
    with pytest.raises(ValueError):
        fm.micro_batches_in_flight("zb-h1", 4, 8)


@given(b=st.integers(1, 8), s=st.integers(1, 64), h=st.integers(1, 64), t=st.integers(1, 8))
def test_tp_bytes_are_four_ring_all_reduces(b, s, h, t):
    """2 all-reduces forward + 2 backward of the (b, s, h) activation."""
    assert fm.tp_layer_comm_elements(b, s, h, t) == pytest.approx(
        4 * fm.ring_elements("all_reduce", b * s * h, t))
    assert fm.ring_elements("all_gather", 8, 4) == fm.ring_elements("reduce_scatter", 8, 4) == 6
    with pytest.raises(ValueError):
        fm.ring_elements("gossip", 8, 4)


@given(b=st.integers(1, 8), s=st.integers(1, 512), h=st.integers(1, 256),
       a=st.integers(1, 16), t=st.integers(1, 8))
def test_korthikanti_table_2(b, s, h, a, t):
    base = s * b * h * (34 + 5 * a * s / h)
    assert fm.activation_bytes_per_layer(s, b, h, a) == pytest.approx(base)
    assert fm.activation_bytes_per_layer(s, b, h, a, t, sequence_parallel=True) == \
        pytest.approx(base / t)
    tp = fm.activation_bytes_per_layer(s, b, h, a, t)
    assert tp == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    assert base / t <= tp * (1 + 1e-12) <= base * (1 + 1e-12)
    assert fm.recompute_activation_bytes_per_layer(s, b, h) == 2 * s * b * h
    assert fm.recompute_activation_bytes_per_layer(s, b, h, t, selective=True) == \
        pytest.approx(34 * s * b * h / t)


def test_flops_per_layer():
    b, s, h = 2, 16, 32
    assert fm.layer_forward_flops(b, s, h) == 24 * b * s * h * h + 4 * b * s * s * h
    assert fm.layer_backward_flops(b, s, h) == 2 * fm.layer_forward_flops(b, s, h)


def test_alpha_beta_one_definition():
    """sim re-exports the cost model; there is one definition."""
    assert sim.collective_time is fm.collective_time
    assert sim.p2p_time is fm.p2p_time and sim.compute_time is fm.compute_time
    link = sim.LinkSpec("l", 1e-6, 1e-9)
    assert fm.collective_time("broadcast", 100, 5, link) == 3 * (1e-6 + 100e-9)
    assert fm.collective_time("barrier", 0, 4, link) == 2e-6
    assert fm.p2p_time(10, link) == 1e-6 + 10e-9
    assert fm.compute_time(1e12, sim.A100) == pytest.approx(1 / 312)
    assert math.isinf(sim.FREE_LINK.bandwidth)
