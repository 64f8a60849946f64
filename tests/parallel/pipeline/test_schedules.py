"""Schedule generators and the "0F1" grid."""
import pytest

from simpar.parallel.pipeline import (Action, format_schedule, gpipe, interleaved_one_f_one_b,
                                      make_schedule, naive, one_f_one_b, zero_bubble_h1)


def test_action_is_small_frozen_data():
    a = Action("F", 1, 0)
    assert str(a) == "0F1" and a.is_compute and not Action("SEND_F", 1, 0).is_compute
    with pytest.raises(Exception):
        a.mb = 2                                    # frozen
    with pytest.raises(ValueError, match="'X'"):
        Action("X", 0, 0)


@pytest.mark.parametrize("p,m", [(4, 8), (4, 2), (3, 3), (1, 3)])
def test_one_f_one_b_phases(p, m):
    """Rank r: p − r − 1 warm-up forwards, then F/B alternating, then the remaining B."""
    sch = one_f_one_b(p, m)
    for r in range(p):
        kinds = "".join(a.kind for a in sch.compute(r))
        warm = min(p - r - 1, m)
        steady = m - warm
        assert kinds == "F" * warm + "FB" * steady + "B" * warm
        assert [a.mb for a in sch.compute(r) if a.kind == "B"] == list(range(m))


def test_gpipe_and_naive_order():
    g = gpipe(3, 4)
    assert all("".join(a.kind for a in g.compute(r)) == "FFFFBBBB" for r in range(3))
    n = naive(3, 2)
    assert [str(a) for a in n.compute(1)] == ["1F0", "1B0", "1F1", "1B1"]
    # messages sit right next to the compute that produces or needs them
    assert [str(a) for a in n.actions[1][:3]] == ["1RECV_F0", "1F0", "1SEND_F0"]
    assert [str(a) for a in n.actions[0][:2]] == ["0F0", "0SEND_F0"]


def test_interleaved_order_and_stage_placement():
    sch = interleaved_one_f_one_b(2, 4, 2)
    assert sch.n_stages == 4 and sch.stages_of(1) == [1, 3] and sch.rank_of(3) == 1
    fw = [str(a) for a in sch.compute(0) if a.kind == "F"]
    # micro-batches in groups of p through chunk 0 (stage 0), then chunk 1 (stage 2)
    assert fw == ["0F0", "0F1", "2F0", "2F1", "0F2", "0F3", "2F2", "2F3"]
    bw = [str(a) for a in sch.compute(0) if a.kind == "B"]
    assert bw == ["2B0", "2B1", "0B0", "0B1", "2B2", "2B3", "0B2", "0B3"]
    # warm-up 2(p − r − 1) + (v − 1)p forwards before the first backward
    for r, warm in ((0, 4), (1, 2)):
        kinds = "".join(a.kind for a in sch.compute(r))
        assert kinds.index("B") == warm + 1


def test_zero_bubble_h1_postpones_r_weight_gradients():
    p, m = 4, 8
    sch = zero_bubble_h1(p, m)
    for r in range(p):
        pending, most = 0, 0
        for a in sch.compute(r):
            pending += {"I": 1, "W": -1}.get(a.kind, 0)
            if a.kind == "F":
                most = max(most, pending)
        assert most == r                        # at most r weight grads wait for a forward
        kinds = "".join(a.kind for a in sch.compute(r))
        assert kinds.endswith("W" * (r + 1)) and kinds.count("W") == m


@pytest.mark.parametrize("bad,match", [
    (lambda: make_schedule("interleaved", 4, 6, 2), "m=6.*multiple.*p=4"),
    (lambda: make_schedule("interleaved", 4, 2, 2), "m=2.*p=4"),
    (lambda: make_schedule("1f1b", 0, 4), "p"),
    (lambda: make_schedule("1f1b", 2, 0), "m"),
    (lambda: make_schedule("1f1b", 2, True), "True"),
    (lambda: make_schedule("gpipe", 2, 2.0), "2.0"),
    (lambda: make_schedule("gpipe", 2, 2, 2), "v=2"),
    (lambda: make_schedule("gpipe-2", 2, 2), "'gpipe-2'"),
    (lambda: interleaved_one_f_one_b(2, 2, 0), "v"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def _grid(text):
    return [line.split()[1:] for line in text.splitlines()[2:]]


def test_format_schedule_grid_by_hand():
    """1F1B, p = 2, m = 2, F = 1 and B = 2 steps, worked out by hand: rank 1 runs
    F0 at 1, B0 at 2-3, F1 at 4, B1 at 5-6; rank 0 waits for each gradient."""
    text = format_schedule(one_f_one_b(2, 2))
    assert text.splitlines()[0].startswith("1f1b: p=2 m=2, 9 steps")
    assert _grid(text) == [["0F0", "."], ["0F1", "1F0"], [".", "1B0"], [".", "1B0"],
                           ["0B0", "1F1"], ["0B0", "1B1"], [".", "1B1"], ["0B1", "."],
                           ["0B1", "."]]
    cols = format_schedule(one_f_one_b(2, 2), time_axis="columns").splitlines()
    assert cols[1].split() == ["r0", "0F0", "0F1", ".", ".", "0B0", "0B0", ".", "0B1", "0B1"]
    with pytest.raises(ValueError, match="time_axis"):
        format_schedule(gpipe(2, 2), time_axis="diagonal")


def test_format_shows_interleaved_stages_and_zb_kinds():
    text = format_schedule(interleaved_one_f_one_b(2, 2, 2))
    assert "v=2" in text and "2F0" in text and "3B1" in text
    text = format_schedule(zero_bubble_h1(2, 3))
    assert "1I0" in text and "0W2" in text and "B" not in "".join(_grid(text)[0])
    assert str(gpipe(2, 1)).splitlines() == [
        "gpipe: p=2 m=1", "r0: 0F0 0SEND_F0 0RECV_B0 0B0", "r1: 1RECV_F0 1F0 1B0 1SEND_B0"]
