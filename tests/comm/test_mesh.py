"""ParallelConfig / Mesh: every factorisation of 8 ranks, on both backends."""
import pytest

from simpar import launch
from simpar.comm.mesh import ParallelConfig
from tests.comm.mesh_checks import check_mesh, factorisations
from tests.mpi_util import run_mpi

CONFIGS_8 = list(factorisations(8))


def test_factorisations_cover_all():
    # (dp, tp, pp) with dp*tp*pp = 8: 10 triples; plus ep | dp
    triples = {(c.dp, c.tp, c.pp) for c in CONFIGS_8}
    assert len(triples) == 10
    assert len(CONFIGS_8) == 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cfg", CONFIGS_8, ids=str)
def test_mesh_threads(cfg):
    launch(lambda comm: check_mesh(comm, cfg), 8, timeout=30)


@pytest.mark.mpi
def test_mesh_mpi():
    res = run_mpi(8, "tests/comm/mesh_checks.py", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"ok {len(CONFIGS_8)} meshes" in res.stdout


def test_layout_is_tp_innermost():
    cfg = ParallelConfig(dp=2, tp=2, pp=2)
    assert [cfg.rank_of(0, t, 0) for t in range(2)] == [0, 1]      # tp neighbours
    assert cfg.rank_of(1, 0, 0) == 2 and cfg.rank_of(0, 0, 1) == 4
    for r in range(8):
        c = cfg.coords(r)
        assert cfg.rank_of(c.dp, c.tp, c.pp) == r


def test_grid_printout_lists_every_rank():
    cfg = ParallelConfig(dp=2, tp=2, pp=2, ep=2)
    text = cfg.grid()
    assert "pp stage 1" in text and "ep group 0" in text
    body = [l for l in text.splitlines()[1:] if l.strip().startswith("dp")]
    ranks = sorted(int(tok) for l in body for tok in l.split()[-2:])
    assert ranks == list(range(8))
