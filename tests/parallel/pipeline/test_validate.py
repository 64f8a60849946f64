"""The validator: every generated schedule is deadlock-free and causal (hypothesis,
p <= 8, m <= 32, v <= 4); broken schedules are caught, never hang; bubble formulas
on the schedule simulator."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpar import formulas
from simpar.parallel.pipeline import (Action, ScheduleError, make_schedule, simulate,
                                      validate)
from simpar.parallel.pipeline.schedules import Schedule

FAST = settings(max_examples=40, deadline=None)
NAMES = ["naive", "gpipe", "1f1b", "interleaved", "zb-h1"]


@st.composite
def schedules(draw, names=NAMES):
    name = draw(st.sampled_from(names))
    p = draw(st.integers(1, 8))
    if name == "interleaved":
        v = draw(st.integers(1, 4))
        m = p * draw(st.integers(1, 32 // p))
    else:
        v, m = 1, draw(st.integers(1, 32))
    return make_schedule(name, p, m, v)


@FAST
@given(sch=schedules())
def test_every_schedule_is_valid(sch):
    res = validate(sch)
    p, m = sch.p, sch.m
    # every (micro-batch, stage) forward and backward once; messages = stage hops
    hops = sum(1 for s in range(sch.n_stages - 1) if sch.rank_of(s) != sch.rank_of(s + 1))
    assert res.messages == 2 * m * hops
    for r in range(p):
        fw = [a for a in sch.compute(r) if a.kind == "F"]
        assert sorted((a.mb, a.stage) for a in fw) == sorted(
            (mb, s) for mb in range(m) for s in sch.stages_of(r))
    # micro-batches held at once (F done, backward not finished)
    if sch.name in ("gpipe", "1f1b"):
        assert res.peak_in_flight == [formulas.micro_batches_in_flight(sch.name, p, m, r)
                                      for r in range(p)]
    if sch.name == "zb-h1":
        assert res.peak_in_flight == [min(p, m)] * p if m >= p else max(res.peak_in_flight) <= m
    if sch.name == "naive":
        assert res.peak_in_flight == [1] * p


@FAST
@given(sch=schedules(["gpipe", "1f1b", "interleaved"]), tf=st.integers(1, 5),
       tb=st.integers(1, 9))
def test_uniform_stage_bubble(sch, tf, tb):
    """Identical stages, free messages: each rank idles (p−1)(t_F + t_B) for a
    chunk's times, i.e. (p−1)/(v·m) of its compute (Narayanan et al. 2021, §2.2)."""
    res = simulate(sch, {"F": tf, "B": tb})
    p, m, v = sch.p, sch.m, sch.v
    for busy, bubble in zip(res.busy, res.bubble):
        assert busy == m * v * (tf + tb)
        assert bubble == pytest.approx(formulas.bubble_over_ideal(p, m, v) * busy, rel=1e-12)
    assert res.bubble_fraction() == pytest.approx(            # (p−1)/(v·m + p − 1) of the step
        formulas.bubble_fraction(sch.name, p, m, v), rel=1e-12)


@FAST
@given(p=st.integers(1, 8), extra=st.integers(0, 24), tf=st.integers(1, 6),
       ti=st.integers(1, 6), tw=st.integers(1, 6))
def test_zb_h1_formula_holds_exactly_under_its_assumptions(p, extra, tf, ti, tw):
    """Qi et al. 2023, Table 2: ZB-H1 idles (p−1)(T_F + T_B − T_W) (T_B = our I)
    when m >= p and T_W <= min(T_F, T_B); 1F1B idles (p−1)(T_F + T_B + T_W)."""
    m = p + extra
    d = {"F": tf, "I": ti, "W": tw, "B": ti + tw}
    one = simulate(make_schedule("1f1b", p, m), d)
    zb = simulate(make_schedule("zb-h1", p, m), d)
    assert one.bubble == [formulas.one_f_one_b_idle(p, tf, ti, tw)] * p
    if tw <= min(tf, ti):
        assert zb.bubble == [formulas.zb_h1_idle(p, tf, ti, tw)] * p
    else:                          # W longer than F or I: W can no longer hide
        assert all(b >= formulas.zb_h1_idle(p, tf, ti, tw) for b in zb.bubble)
    assert max(zb.bubble) <= max(one.bubble)


def test_zb_h1_formula_fails_outside_its_assumptions():
    d = {"F": 1, "I": 1, "W": 3, "B": 4}
    zb = simulate(make_schedule("zb-h1", 4, 8), d)
    assert zb.bubble[0] != 3 * (1 + 1 - 3)


# ------------------------------------------------------------- broken schedules
def _copy(sch):
    return Schedule(sch.name, sch.p, sch.m, sch.v, [list(a) for a in sch.actions])


MUTATIONS = ["drop", "duplicate", "backward_first", "recv_grad_first", "wrong_stage"]


@FAST
@given(sch=schedules(["gpipe", "1f1b", "interleaved", "zb-h1"]),
       how=st.sampled_from(MUTATIONS), seed=st.integers(0, 10**6))
def test_broken_schedules_are_caught(sch, how, seed):
    rnd = random.Random(seed)
    bad = _copy(sch)
    r = rnd.randrange(sch.p)
    acts = bad.actions[r]
    if how == "drop":
        acts.pop(rnd.randrange(len(acts)))
    elif how == "duplicate":
        i = rnd.randrange(len(acts))
        acts.insert(i + 1, acts[i])
    elif how == "backward_first":
        i = rnd.choice([k for k, a in enumerate(acts) if a.kind in ("B", "I")])
        acts.insert(0, acts.pop(i))
    elif how == "recv_grad_first":           # wait for a gradient before sending anything
        recvs = [k for k, a in enumerate(acts) if a.kind == "RECV_B"]
        if not recvs:
            return
        acts.insert(0, acts.pop(rnd.choice(recvs)))
    else:
        i = rnd.randrange(len(acts))
        a = acts[i]
        acts[i] = Action(a.kind, a.mb, (a.stage + 1) % bad.n_stages)
        if bad.n_stages == 1:
            return
    with pytest.raises(ScheduleError) as e:
        validate(bad)
    assert sch.name in str(e.value)


def test_deadlock_message_names_every_waiting_rank():
    sch = make_schedule("1f1b", 3, 4)
    bad = _copy(sch)
    bad.actions[0] = [a for a in bad.actions[0] if a.kind != "SEND_F"]
    with pytest.raises(ScheduleError, match=r"deadlock.*rank 1 waits at action 0 \(1RECV_F0\)"):
        validate(bad)


def test_unreceived_message_and_send_to_self():
    sch = make_schedule("gpipe", 2, 2)
    bad = _copy(sch)
    bad.actions[1] = [a for a in bad.actions[1] if a.kind != "RECV_B"] + \
        [Action("RECV_B", 0, 1), Action("RECV_B", 1, 1)]
    with pytest.raises(ScheduleError):                # gradient never arrives in time
        validate(bad)
    bad = _copy(make_schedule("1f1b", 2, 1))
    bad.actions[0].append(Action("SEND_B", 0, 0))
    with pytest.raises(ScheduleError, match="no stage -1"):
        validate(bad)
    inter = _copy(make_schedule("interleaved", 1, 2, 2))
    inter.actions[0].insert(1, Action("SEND_F", 0, 0))
    with pytest.raises(ScheduleError, match="same rank"):
        validate(inter)
    lost = _copy(make_schedule("gpipe", 2, 1))
    lost.actions[1] = [a for a in lost.actions[1] if a.kind != "SEND_B"]
    lost.actions[0] = [a for a in lost.actions[0] if a.kind != "RECV_B"]
    with pytest.raises(ScheduleError):
        validate(lost)


def test_structure_errors():
    sch = make_schedule("zb-h1", 2, 2)
    bad = _copy(sch)
    bad.actions[0] = [a for a in bad.actions[0] if a.kind != "W"]
    with pytest.raises(ScheduleError, match="I=1 W=0"):
        validate(bad)
    bad = _copy(sch)
    bad.actions[1] = [Action("W", 0, 1) if a == Action("I", 0, 1) else a for a in bad.actions[1]]
    with pytest.raises(ScheduleError):
        validate(bad)
    bad = _copy(sch)
    bad.actions[0].append(Action("F", 5, 0))
    with pytest.raises(ScheduleError, match="micro-batch 5"):
        validate(bad)
    bad = _copy(sch)
    bad.actions[0].append("F0")
    with pytest.raises(ScheduleError, match="not an Action"):
        validate(bad)
    with pytest.raises(ScheduleError, match="loss computed 0 times"):
        validate(Schedule("empty", 1, 1, 1, [[]]))


def test_blocking_sends():
    """Under rendezvous sends (a send waits for its receive), GPipe and the naive
    schedule are still safe, but 1F1B's steady state is not: rank r sends an
    activation while rank r+1 sends a gradient back, each waiting for the other.
    That is why the executor posts its sends (``isend``), as Megatron-LM batches
    its sends and receives."""
    for name in ("naive", "gpipe"):
        validate(make_schedule(name, 4, 8), sends="blocking")
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(make_schedule("1f1b", 4, 8), sends="blocking")
    with pytest.raises(ValueError, match="sends"):
        validate(make_schedule("1f1b", 2, 2), sends="eager")


def test_durations_by_function_and_transfer_time():
    sch = make_schedule("gpipe", 3, 2)
    res = simulate(sch, lambda rank, a: {"F": 1, "B": 2}[a.kind] * (rank + 1), transfer=0.5)
    assert res.busy == [6, 12, 18]
    with pytest.raises(ValueError, match="no duration"):
        simulate(sch, {"F": 1})
