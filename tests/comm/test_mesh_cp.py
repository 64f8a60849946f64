"""The cp axis of the mesh: Megatron's order tp-cp-dp-pp, the cp and dp_cp groups,
and cp = 1 leaving every existing layout unchanged."""
from __future__ import annotations

import pytest

import simpar
from simpar.comm.mesh import Mesh, ParallelConfig


def test_rank_layout_tp_cp_dp_pp():
    cfg = ParallelConfig(dp=2, tp=2, pp=2, cp=3)
    assert cfg.world_size == 24
    for r in range(24):
        c = cfg.coords(r)
        assert r == c.tp + 2 * (c.cp + 3 * (c.dp + 2 * c.pp)) == cfg.rank_of(c.dp, c.tp, c.pp, c.cp)
    assert [cfg.coords(r).cp for r in range(6)] == [0, 0, 1, 1, 2, 2]


def test_cp1_is_the_old_layout():
    cfg = ParallelConfig(dp=2, tp=2, pp=2)
    for r in range(8):
        c = cfg.coords(r)
        assert c.cp == 0 and r == c.tp + 2 * (c.dp + 2 * c.pp)
    assert "cp" not in cfg.grid()


def test_groups():
    cfg = ParallelConfig(dp=2, tp=2, cp=2)

    def groups(comm):
        m = Mesh(comm, cfg)
        return m.tp.world_ranks, m.cp.world_ranks, m.dp.world_ranks, m.dp_cp.world_ranks
    out = simpar.launch(groups, 8)
    assert out[0] == ((0, 1), (0, 2), (0, 4), (0, 2, 4, 6))
    assert out[7] == ((6, 7), (5, 7), (3, 7), (1, 3, 5, 7))
    one = simpar.launch(lambda c: Mesh(c, ParallelConfig(dp=2)).dp_cp.name, 2)
    assert one == ["dp", "dp"]                      # cp = 1: dp_cp is dp itself


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_cp(bad):
    with pytest.raises(ValueError, match="cp="):
        ParallelConfig(cp=bad)


def test_world_size_names_cp():
    with pytest.raises(ValueError, match=r"dp\*tp\*pp\*cp = 1\*1\*1\*2 = 2"):
        ParallelConfig(cp=2).validate(3)


def test_ranks_disagreeing_on_cp_fail_on_every_rank():
    def build(comm):
        try:
            Mesh(comm, ParallelConfig(dp=2 // (1 + comm.rank), cp=1 + comm.rank))
        except ValueError as e:
            return str(e)
        return "no error"
    msgs = simpar.launch(build, 2)
    assert all("cp=1" in m and "cp=2" in m for m in msgs), msgs
