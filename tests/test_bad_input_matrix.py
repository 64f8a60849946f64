"""The bad-input matrix: every misuse ends in a clear error, fast, on both
backends, and leaves nothing running.

Each row of ``CASES`` is a :class:`Case`: a function run on every rank, the
error it must produce, words the message must contain, the world sizes where
it applies, and how it runs under MPI.  The threads backend runs every case at
every size it applies to (``launch``, 10 s limit); under MPI the cases whose
error every rank catches are batched into one ``mpiexec`` per world size, 1 to
8 (this file is the MPI script too; sizes 5-7 cost 26 s of CI on 2 cores,
measured), the cases that end the job (a failing rank, a deadlock) get one
``mpiexec`` each, at one size.  Every run
must end within 10 s per case, and no thread or process may be left behind.

To add a case, append a ``Case`` to ``CASES`` (a module-level function, so
the MPI script can find it by name)::

    Case("pp_micro_batches_differ", my_fn, ValueError, ("micro-batch",),
         sizes=(2, 4), mpi="batch", mpi_sizes=(2,))

``raises_on`` says which ranks must raise (default: all; a callable
``(rank, size) -> bool`` otherwise), ``mpi`` is ``"batch"`` (every rank
catches the error: run inside one job with other cases), ``"alone"`` (the error
ends the job: the output must hold ``mpi_needles`` once) or ``None`` (threads
only).  A case with ``expect=None`` must *not* raise; ``verify(results)`` then
checks the per-rank results (no silent wrong answer).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                       # run as the MPI script
    sys.path.insert(0, str(ROOT))

from simpar.comm import DeadlockError  # noqa: E402
from simpar.comm.mesh import Mesh, ParallelConfig  # noqa: E402

LIMIT_S = 10.0
SIZES = tuple(range(1, 9))
MULTI = tuple(range(2, 9))


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[[Any], Any]
    expect: type[BaseException] | None
    needles: tuple[str, ...] = ()
    sizes: tuple[int, ...] = SIZES
    mpi: str | None = "batch"                  # "batch", "alone" or None
    mpi_sizes: tuple[int, ...] = SIZES          # MPI runs those of ``sizes`` (1-8)
    mpi_needles: tuple[str, ...] | None = None  # "alone": in the job's output (default needles)
    mpi_expect: type[BaseException] | None = None   # batch: if not ``expect``
    raises_on: Callable[[int, int], bool] | None = None
    verify: Callable[[list], None] | None = None
    env: dict = field(default_factory=dict)     # "alone" runs: extra environment

    @property
    def ends_job(self) -> bool:
        """The error ends the world (a failing rank, a deadlock): ranks do not catch it."""
        return self.mpi == "alone" or self.expect is DeadlockError

    def must_raise(self, rank: int, size: int) -> bool:
        return self.expect is not None and (self.raises_on is None or self.raises_on(rank, size))


# ------------------------------------------------------------ the cases
def _cfg(**kw):
    return lambda c: ParallelConfig(**kw)


def mesh_wrong_world(c):
    Mesh(c, ParallelConfig(dp=2, tp=2))


def mesh_configs_differ(c):
    Mesh(c, ParallelConfig(dp=c.size) if c.rank == 0 else ParallelConfig(tp=c.size))


def mesh_not_a_config(c):
    Mesh(c, (2, 2))


def op_differs(c):
    c.all_reduce(np.ones(3), op="max" if c.rank == 0 else "sum")


def dtype_differs(c):
    c.all_reduce(np.ones(3, np.float32 if c.rank == c.size - 1 else np.float64))


def shape_differs(c):
    c.all_reduce(np.ones(2 + (c.rank == 1)))


def gather_shape_differs(c):
    c.all_gather(np.zeros((2, 1 + (c.rank == 0))))


def collectives_differ(c):
    if c.rank == 0:
        c.all_reduce(np.zeros(2))
    else:
        c.all_gather(np.zeros(2))


def root_differs(c):
    c.broadcast(np.zeros(2), root=0 if c.rank == 0 else 1)


def a2a_rows_differ(c):
    c.all_to_all(np.zeros((c.size, 2 + (c.rank == 1))), [1] * c.size)


def iall_vs_all(c):
    if c.rank == 0:
        c.iall_reduce(np.zeros(2)).wait()
    else:
        c.all_reduce(np.zeros(2))


def agree_differs(c):
    c.agree("layer split", (2, 2, 2) if c.rank == 0 else (1, 3, 2))


def split_vs_barrier(c):
    if c.rank == 0:
        c.split(0)
    else:
        c.barrier()


def unknown_op(c):
    c.all_reduce(np.ones(3), op="prod")


def complex_dtype(c):
    c.all_reduce(np.ones(3, np.complex128))


def not_an_array(c):
    c.all_reduce([1.0, 2.0])


def nine_dims(c):
    c.all_reduce(np.zeros((1,) * 9))


def bad_root(c):
    c.broadcast(np.zeros(2), root=c.size)


def indivisible_scatter(c):
    c.reduce_scatter(np.zeros((c.size + 1, 2)))


def a2a_counts_length(c):
    c.all_to_all(np.zeros((2, 1)), [2] + [0] * c.size)


def a2a_negative_count(c):
    c.all_to_all(np.zeros((1, 1)), [2, -1] + [0] * (c.size - 2) if c.size > 1 else [-1])


def a2a_counts_sum(c):
    c.all_to_all(np.zeros((3, 1)), [1] * c.size)


def gather_bad_axis(c):
    c.all_gather(np.zeros(2), axis=3)


def out_wrong_shape(c):
    c.all_reduce(np.zeros(2), out=np.zeros(3))


def send_bad_dst(c):
    c.send(np.zeros(1), c.size)


def recv_bad_src(c):
    c.recv((1,), np.float64, -1)


def send_bad_tag(c):
    c.send(np.zeros(1), 0, tag=-3)


def recv_bad_shape(c):
    c.recv((2, -1), np.float64, 0)


def recv_shape_differs(c):
    if c.rank == 0:
        c.send(np.zeros((2, 3)), 1, tag=101)
    elif c.rank == 1:
        c.recv((3, 2), np.float64, 0, tag=101)


def recv_dtype_differs(c):
    if c.rank == 0:
        c.send(np.zeros(2, np.int64), 1, tag=102)
    elif c.rank == 1:
        c.recv((2,), np.float64, 0, tag=102)


def nan_max(c):
    x = np.array([1.0 + c.rank, 2.0])
    if c.rank == c.size - 1:
        x[0] = np.nan
    return c.all_reduce(x, op="max").tolist(), c.all_reduce(x, op="min").tolist()


def _verify_nan(results):
    for mx, mn in results:
        assert np.isnan(mx[0]) and np.isnan(mn[0]) and mx[1] == mn[1] == 2.0, results


def inf_sum(c):
    return c.all_reduce(np.array([np.inf if c.rank == 0 else 1.0, -np.inf])).tolist()


def _verify_inf(results):
    for r in results:
        assert r[0] == np.inf and r[1] == -np.inf, results


def rank_fails(c):
    if c.rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    c.all_reduce(np.ones(2))


def returns_early(c):
    if c.rank == c.size - 1:
        return
    c.all_reduce(np.ones(2))


def recv_never_sent(c):
    if c.rank == 0:
        c.recv((3,), np.float64, src=1, tag=5)
    c.barrier()


def micro_batches_differ(c):
    m = 5 if c.rank == 0 else 4
    for i in range(m):
        if c.rank == 0:
            c.send(np.full(4, float(i)), 1, tag=1)
            c.recv((4,), np.float64, 1, tag=2)
        elif c.rank == 1:
            c.send(c.recv((4,), np.float64, 0, tag=1), 0, tag=2)
    c.all_reduce(np.ones(1))


def crossed_groups(c):
    mesh = Mesh(c, ParallelConfig(dp=2, tp=2))
    first, second = (mesh.tp, mesh.dp) if c.rank in (0, 3) else (mesh.dp, mesh.tp)
    first.all_reduce(np.ones(2))
    second.all_reduce(np.ones(2))


# -- parallel entry points: ranks that disagree, misuse (issue 11)
def _events_before(c, fn):
    """``fn()``'s error with the number of traced messages before it appended
    (``[events 0]``: raised before the first message)."""
    n0 = len(c.tracer.events)
    try:
        return fn()
    except (ValueError, RuntimeError, KeyError) as e:
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise type(e)(f"{text} [events {len(c.tracer.events) - n0}]") from None


def _pipeline(c, m, by=None, n_layer=9):
    from simpar.nn import GPT, GPTConfig
    from simpar.parallel.pipeline import make_schedule, run_schedule, stages_for_rank
    sch = make_schedule("1f1b", c.size, m)
    model = GPT(GPTConfig(vocab_size=11, seq_len=4, n_layer=n_layer, n_head=2, d_model=8))
    stages = stages_for_rank(model, sch, c.rank, by or "layers")
    ids = np.zeros((2, 4), np.int64)
    _events_before(c, lambda: run_schedule(c, sch, stages, [ids] * m, [ids] * m))


def pp_split_differs(c):
    """rank 0 cuts 9 layers [1, …, 1, 10−p], the others [10−p, 1, …, 1]."""
    ones = [1] * (c.size - 1)
    _pipeline(c, 4, ones + [10 - c.size] if c.rank == 0 else [10 - c.size] + ones)


def pp_micro_batches_differ(c):
    """rank 0 runs m=5 micro-batches, the others m=4 (hung under mpiexec before)."""
    _pipeline(c, 5 if c.rank == 0 else 4)


def ep_top_k_differs(c):
    from simpar.nn.moe import MoE
    from simpar.parallel.expert import ExpertParallelMoE
    ref = MoE(8, 2 * c.size, 16, k=1 if c.rank == 0 else 2, rng=0)
    _events_before(c, lambda: ExpertParallelMoE.from_reference(ref, c))


def _tp_gpt(c, sequence_parallel=False):
    from simpar.nn import GPT, GPTConfig
    from simpar.parallel.tensor import ParallelGPT
    cfg = GPTConfig(vocab_size=11, seq_len=2 * c.size if sequence_parallel else 16, n_layer=1,
                    n_head=c.size, d_model=4 * c.size)
    return ParallelGPT.from_reference(GPT(cfg, seed=0), c, sequence_parallel)


def tp_batch_shape_differs(c):
    """the same number of tokens, (2, 6) on rank 0 and (3, 4) on the others."""
    model = _tp_gpt(c)
    ids = np.zeros((2, 6) if c.rank == 0 else (3, 4), np.int64)
    _events_before(c, lambda: model.loss(ids, ids))


def tp_finalize_twice(c):
    """sequence parallelism: finalize_grads() after each of two accumulated losses."""
    model = _tp_gpt(c, sequence_parallel=True)
    ids = np.zeros((2, 2 * c.size), np.int64)
    model.loss(ids, ids)
    model.finalize_grads()
    model.loss(ids, ids)
    _events_before(c, model.finalize_grads)


def _tp_block(c):
    from simpar.nn import TransformerBlock
    from simpar.parallel.tensor import ParallelTransformerBlock
    ref = TransformerBlock(4 * c.size, c.size, rng=np.random.default_rng(0))
    return ParallelTransformerBlock.from_reference(ref, c, sequence_parallel=True)


def tp_backward_without_forward(c):
    block = _tp_block(c)
    dy = np.ones((2, 2, 4 * c.size))                  # this rank's sequence shard
    _events_before(c, lambda: block.backward(dy, key=0))


def tp_forward_twice(c):
    block = _tp_block(c)
    x = np.ones((2, 2, 4 * c.size))
    block.forward(x, key=0)
    _events_before(c, lambda: block.forward(x, key=0))


_ON_1 = lambda r, p: r == 1          # noqa: E731
_ON_NOT_LAST = lambda r, p: r != p - 1   # noqa: E731
_WATCHDOG = {"SIMPAR_WATCHDOG_S": "2"}

CASES: list[Case] = [
    # -- configuration and mesh
    Case("mesh_wrong_world", mesh_wrong_world, ValueError, ("world size", "dp*tp*pp"),
         sizes=(1, 2, 3, 5, 6, 7, 8)),
    Case("config_tp_zero", _cfg(tp=0), ValueError, ("tp=0",)),
    Case("config_dp_negative", _cfg(dp=-2), ValueError, ("dp=-2",)),
    Case("config_pp_float", _cfg(pp=1.5), ValueError, ("pp=1.5",)),
    Case("config_tp_bool", _cfg(tp=True), ValueError, ("tp=True",)),
    Case("config_ep_not_dividing", _cfg(dp=2, ep=3), ValueError, ("ep=3", "dp=2")),
    Case("mesh_configs_differ", mesh_configs_differ, ValueError,
         ("disagree on the ParallelConfig", "rank 0: ParallelConfig(dp="), sizes=MULTI),
    Case("mesh_not_a_config", mesh_not_a_config, TypeError, ("ParallelConfig",)),
    # -- collectives: ranks disagree (checked always, SIMPAR_CHECK or not)
    Case("op_differs", op_differs, ValueError, ("all_reduce op=max", "all_reduce op=sum"),
         sizes=MULTI),
    Case("dtype_differs", dtype_differs, ValueError, ("float32", "float64"), sizes=MULTI),
    Case("shape_differs", shape_differs, ValueError, ("(2,)", "(3,)"), sizes=MULTI),
    Case("gather_shape_differs", gather_shape_differs, ValueError, ("(2, 1)", "(2, 2)"),
         sizes=MULTI),
    Case("collectives_differ", collectives_differ, ValueError, ("all_reduce", "all_gather"),
         sizes=MULTI),
    Case("root_differs", root_differs, ValueError, ("root=0", "root=1"), sizes=MULTI),
    Case("a2a_rows_differ", a2a_rows_differ, ValueError, ("(*, 2)", "(*, 3)"), sizes=MULTI),
    Case("iall_vs_all", iall_vs_all, ValueError, ("iall_reduce", "all_reduce op=sum"),
         sizes=MULTI),
    Case("agree_differs", agree_differs, ValueError, ("layer split", "(2, 2, 2)", "(1, 3, 2)"),
         sizes=MULTI),
    Case("split_vs_barrier", split_vs_barrier, ValueError, ("split", "barrier"), sizes=MULTI),
    # -- collectives: bad arguments (every rank sees them)
    Case("unknown_op", unknown_op, ValueError, ("'prod'",)),
    Case("complex_dtype", complex_dtype, TypeError, ("complex128",)),
    Case("not_an_array", not_an_array, TypeError, ("numpy.ndarray", "list")),
    Case("nine_dims", nine_dims, ValueError, ("more than 8 dimensions",)),
    Case("bad_root", bad_root, ValueError, ("root=",)),
    Case("indivisible_scatter", indivisible_scatter, ValueError, ("not divisible",),
         sizes=MULTI),
    Case("a2a_counts_length", a2a_counts_length, ValueError, ("send_counts must be",)),
    Case("a2a_negative_count", a2a_negative_count, ValueError, ("non-negative",)),
    Case("a2a_counts_sum", a2a_counts_sum, ValueError, ("sum to",), sizes=(1, 2, 4, 5, 6, 7, 8)),
    Case("gather_bad_axis", gather_bad_axis, ValueError, ("axis 3",)),
    Case("out_wrong_shape", out_wrong_shape, ValueError, ("shape (2,)",)),
    # -- point-to-point
    Case("send_bad_dst", send_bad_dst, ValueError, ("dst=",)),
    Case("recv_bad_src", recv_bad_src, ValueError, ("src=-1",)),
    Case("send_bad_tag", send_bad_tag, ValueError, ("tag=-3",)),
    Case("recv_bad_shape", recv_bad_shape, ValueError, ("negative dimension",)),
    Case("recv_shape_differs", recv_shape_differs, ValueError, ("expected (3, 2)", "sent (2, 3)"),
         sizes=MULTI, raises_on=_ON_1),
    Case("recv_dtype_differs", recv_dtype_differs, ValueError, ("float64", "int64"),
         sizes=MULTI, raises_on=_ON_1),
    # -- non-finite inputs: no error, and no silent rank-dependent answer
    Case("nan_max_min", nan_max, None, sizes=SIZES, verify=_verify_nan),
    Case("inf_sum", inf_sum, None, sizes=SIZES, verify=_verify_inf),
    # -- a failing rank, deadlocks: the job ends with one clear message
    Case("rank_fails", rank_fails, RuntimeError, ("rank 1 fails on purpose",), sizes=MULTI,
         raises_on=_ON_1, mpi="alone", mpi_sizes=(3,),
         mpi_needles=("rank 1 fails on purpose", "rank 1 of 3 failed")),
    Case("returns_early", returns_early, DeadlockError,
         ("finished", "all_reduce op=sum float64 (2,) on world"), sizes=MULTI,
         raises_on=_ON_NOT_LAST, mpi="alone", mpi_sizes=(3,),
         mpi_needles=("rank 2: finished", "all_reduce op=sum")),
    Case("recv_never_sent", recv_never_sent, DeadlockError,
         ("rank 0: recv from rank 1 tag 5", "barrier on world"), sizes=MULTI,
         mpi="alone", mpi_sizes=(2,), env=_WATCHDOG,
         mpi_needles=("simpar watchdog", "rank 0: recv from rank 1 tag 5", "rank 1: barrier")),
    Case("micro_batches_differ", micro_batches_differ, DeadlockError,
         ("rank 0: recv from rank 1 tag 2", "rank 1: all_reduce"), sizes=MULTI,
         mpi="alone", mpi_sizes=(2,), env=_WATCHDOG,
         mpi_needles=("simpar watchdog", "rank 0: recv from rank 1 tag 2")),
    Case("crossed_groups", crossed_groups, DeadlockError,
         ("on tp (waiting for rank 1)", "on dp (waiting for rank 0)"), sizes=(4,), mpi=None),
    # -- parallel entry points: disagreement and misuse, before the first message
    Case("pp_split_differs", pp_split_differs, ValueError,
         ("layer split", "rank 0: stage 0 = layers [0, 1)", "[events 0]"), sizes=MULTI),
    Case("pp_micro_batches_differ", pp_micro_batches_differ, ValueError,
         ("pipeline step", "rank 0: ('1f1b', ", "; rank", "[events 0]"), sizes=MULTI),
    Case("ep_top_k_differs", ep_top_k_differs, ValueError,
         ("expert-parallel MoE layer", "top_k", "rank 0: (8, ", ", 16, 1, 1.25", "; rank",
          ", 16, 2, 1.25", "[events 0]"), sizes=MULTI),
    Case("tp_batch_shape_differs", tp_batch_shape_differs, ValueError,
         ("token batch", "(2, 6)", "(3, 4)", "[events 0]"), sizes=MULTI),
    Case("tp_finalize_twice", tp_finalize_twice, RuntimeError,
         ("finalize_grads() called twice", "[events 0]")),
    Case("tp_backward_without_forward", tp_backward_without_forward, KeyError,
         ("no saved activations for key 0", "backward without forward", "[events 0]")),
    Case("tp_forward_twice", tp_forward_twice, RuntimeError,
         ("already saved", "forward called twice", "[events 0]")),
]
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES), "case names must be unique"


# ------------------------------------------------------------ threads
def _threads_left() -> list[str]:
    time.sleep(0)
    return [t.name for t in threading.enumerate() if t.name.startswith("simpar-rank")]


def _threads_params():
    return [(c.name, p) for c in CASES for p in c.sizes]


def run_threads(case: Case, size: int) -> float:
    """Run a case in a threads world; return the seconds to the error."""
    from simpar import launch

    def fn(comm):
        try:
            return ("ok", case.fn(comm))
        except BaseException as e:               # noqa: BLE001 - examined below
            if (not case.ends_job and case.must_raise(comm.rank, comm.size)
                    and isinstance(e, case.expect)):
                return ("raised", e)
            raise
    t0 = time.perf_counter()
    try:
        out = launch(fn, size, timeout=LIMIT_S, watchdog=LIMIT_S)
    except BaseException as e:                    # noqa: BLE001
        # deadlocks and failing ranks end the world: launch re-raises
        took = time.perf_counter() - t0
        assert case.expect is not None and isinstance(e, case.expect), repr(e)
        msg = str(e)
        for n in case.needles:
            assert n in msg, (n, msg)
        return took
    took = time.perf_counter() - t0
    if case.expect is None:
        assert [k for k, _ in out] == ["ok"] * size, out
        case.verify([v for _, v in out])
        return took
    for rank, (kind, v) in enumerate(out):
        assert kind == ("raised" if case.must_raise(rank, size) else "ok"), (rank, kind, v)
        if kind == "raised":
            for n in case.needles:
                assert n in str(v), (n, str(v))
    return took


# ------------------------------------------------------------ MPI
def _batch_params():
    groups: dict[int, list[str]] = {}
    for c in CASES:
        if c.mpi == "batch":
            for p in sorted(set(c.mpi_sizes) & set(c.sizes)):
                groups.setdefault(p, []).append(c.name)
    return sorted(groups.items())


def _alone_params():
    return [(c.name, p) for c in CASES if c.mpi == "alone" for p in c.mpi_sizes]


def _processes_with(token: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if token.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def run_mpi_case(size: int, args: list[str], env: dict | None = None,
                 script: tuple[str, ...] = ("tests/test_bad_input_matrix.py",)):
    """``mpiexec -n size python script args token``; asserts that no process
    holding the unique ``token`` in its command line is left afterwards."""
    from tests.mpi_util import run_mpi
    token = f"simpar-matrix-{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    res = run_mpi(size, *script, *args, token,
                  timeout=LIMIT_S * 4, env={"SIMPAR_CHECK": "0", **(env or {})})
    took = time.perf_counter() - t0
    res.simpar_end = time.time()
    time.sleep(0.2)
    assert _processes_with(token) == [], "processes left behind"
    return res, took


def mpi_batch(names: list[str]) -> None:
    """Under mpiexec: run each case, catch on every rank, print one JSON line per case."""
    import simpar  # noqa: F401
    from simpar.comm import mpi
    comm = mpi.world()
    mpi.abort_on_exception()
    for name in names:
        case = BY_NAME[name]
        comm.barrier()
        t0 = time.perf_counter()
        value = None
        try:
            value = case.fn(comm)
            result = ("ok", "")
        except Exception as e:                    # noqa: BLE001 - reported
            result = ("raised", type(e).__name__, str(e))
        took = time.perf_counter() - t0
        if case.verify is not None and result[0] == "ok":
            try:
                case.verify(comm.gather_objects(value))
                result = ("ok", "verified")
            except AssertionError as e:
                result = ("wrong", str(e))
        rows = comm.gather_objects((result, took))
        if comm.rank == 0:
            print("CASE " + json.dumps({"name": name, "rows": rows}), flush=True)
    comm.barrier()


if __name__ == "__main__":
    if sys.argv[1] == "batch":
        mpi_batch(sys.argv[2].split(","))
    else:                                         # one job-ending case
        import simpar
        from simpar.comm import mpi
        if mpi.world().rank == 0:                 # the clock starts once MPI is up
            print(f"MATRIX-START {time.time()!r}", flush=True)
        simpar.run(BY_NAME[sys.argv[2]].fn)
        print("finished without an error", flush=True)
    sys.exit(0)


# ------------------------------------------------------------ the tests
import pytest  # noqa: E402


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 30
    assert sum(len(c.sizes) for c in CASES) >= 150


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,size", _threads_params())
def test_threads(name, size):
    took = run_threads(BY_NAME[name], size)
    assert took < LIMIT_S, took
    assert _threads_left() == []


@pytest.mark.mpi
@pytest.mark.parametrize("size,names", _batch_params(), ids=lambda v: str(v) if isinstance(v, int) else f"{len(v)}cases")
def test_mpi_batch(size, names):
    res, took = run_mpi_case(size, ["batch", ",".join(names)])
    assert res.returncode == 0, res.stdout + res.stderr
    seen = {}
    for line in res.stdout.splitlines():
        if line.startswith("CASE "):
            d = json.loads(line[5:])
            seen[d["name"]] = d["rows"]
    assert sorted(seen) == sorted(names), res.stdout + res.stderr
    for name, rows in seen.items():
        case = BY_NAME[name]
        expect = case.mpi_expect or case.expect
        for rank, (result, secs) in enumerate(rows):
            assert secs < LIMIT_S, (name, rank, secs)
            if expect is None:
                assert result == ["ok", "verified"], (name, rank, result)
            elif case.must_raise(rank, size):
                assert result[0] == "raised" and result[1] == expect.__name__, (name, rank, result)
                for n in case.needles:
                    assert n in result[2], (name, n, result[2])
            else:
                assert result[0] == "ok", (name, rank, result)
        if expect is not None and case.raises_on is None:     # the same error everywhere
            assert len({tuple(r) for r, _ in rows}) == 1, (name, rows)


@pytest.mark.mpi
@pytest.mark.parametrize("name,size", _alone_params())
def test_mpi_job_ending(name, size):
    case = BY_NAME[name]
    res, took = run_mpi_case(size, ["alone", name], env=case.env)
    out = res.stdout + res.stderr
    start = [float(l.split()[1]) for l in res.stdout.splitlines() if l.startswith("MATRIX-START")]
    assert start, out
    took = res.simpar_end - start[0]              # from MPI up to the job's end
    assert res.returncode != 0, out
    assert "finished without an error" not in out
    for n in case.mpi_needles or case.needles:
        assert n in out, (n, out)
    assert out.count("Traceback") <= 1, out                 # one message per job
    assert took < LIMIT_S, took


@pytest.mark.mpi
def test_mpi_world_size_disagrees_with_launcher():
    res, took = run_mpi_case(2, [], script=(
        "-c", "import simpar; simpar.run(lambda c: None, world_size=5)"))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "world_size=5 but mpiexec started 2 ranks" in out, out
    assert out.count("Traceback") == 1, out
    assert took < 2 * LIMIT_S                     # (including the start of 2 Pythons)
