"""Cases where the ranks of a group disagree: each must raise the same
``ValueError`` on every rank, naming each rank's value, on both backends.

``CASES`` maps a name to ``(fn, needles)``: ``fn(comm)`` must raise on every
rank, and the message must contain every needle.  ``tests/comm/test_agreement.py``
runs them in a threads world; under ``mpiexec`` this file runs them all and
prints ``ok <name>`` on rank 0 per case (``SIMPAR_CHECK`` off: always on)::

    mpiexec -n 3 python tests/comm/agreement_cases.py
"""
from __future__ import annotations

import sys

import numpy as np

from simpar.comm.mesh import Mesh, ParallelConfig


def op_mismatch(c):
    c.all_reduce(np.ones(3), op="max" if c.rank == 0 else "sum")


def dtype_mismatch(c):
    c.all_reduce(np.ones(3, np.float32 if c.rank == 1 else np.float64))


def shape_mismatch(c):
    c.all_reduce(np.ones(3 + c.rank))


def gather_shape_mismatch(c):
    c.all_gather(np.zeros((2, 1 + c.rank)))


def kind_mismatch(c):
    if c.rank == 0:
        c.all_reduce(np.zeros(2))
    else:
        c.all_gather(np.zeros(2))


def root_mismatch(c):
    c.broadcast(np.zeros(2), root=c.rank % 2)


def a2a_row_mismatch(c):
    c.all_to_all(np.zeros((c.size, 2 + (c.rank == 1))), [1] * c.size)


def iall_vs_all(c):
    if c.rank == 0:
        c.iall_reduce(np.zeros(2)).wait()
    else:
        c.all_reduce(np.zeros(2))


def agree_value(c):
    c.agree("layer split", (2, 2, 2) if c.rank == 0 else (1, 3, 2))


def agree_vs_collective(c):
    if c.rank == 0:
        c.agree("micro-batch count", 4)
    else:
        c.barrier()


def agree_array(c):
    c.agree("token batch", np.arange(6).reshape((2, 3) if c.rank else (3, 2)))


def mesh_config(c):
    Mesh(c, ParallelConfig(dp=c.size) if c.rank == 0 else ParallelConfig(tp=c.size))


def split_vs_barrier(c):
    if c.rank == 0:
        c.split(0)
    else:
        c.barrier()


CASES = {
    "op_mismatch": (op_mismatch, ["all_reduce op=max", "all_reduce op=sum", "rank 0:"]),
    "dtype_mismatch": (dtype_mismatch, ["float32", "float64", "rank 1:"]),
    "shape_mismatch": (shape_mismatch, ["(3,)", "(4,)"]),
    "gather_shape_mismatch": (gather_shape_mismatch, ["(2, 1)", "(2, 2)"]),
    "kind_mismatch": (kind_mismatch, ["all_reduce", "all_gather"]),
    "root_mismatch": (root_mismatch, ["root=0", "root=1"]),
    "a2a_row_mismatch": (a2a_row_mismatch, ["all_to_all", "(*, 2)", "(*, 3)"]),
    "iall_vs_all": (iall_vs_all, ["iall_reduce", "rank 0:"]),
    "agree_value": (agree_value, ["disagree on layer split", "rank 0: (2, 2, 2)",
                                  "(1, 3, 2)"]),
    "agree_vs_collective": (agree_vs_collective, ["micro-batch count", "barrier"]),
    "agree_array": (agree_array, ["token batch", "(3, 2)", "(2, 3)"]),
    "mesh_config": (mesh_config, ["ParallelConfig", "rank 0: ParallelConfig(dp="]),
    "split_vs_barrier": (split_vs_barrier, ["split", "barrier"]),
}


def expect_disagreement(comm, name) -> str:
    """Run case ``name``; return its message (raises AssertionError otherwise)."""
    fn, needles = CASES[name]
    try:
        fn(comm)
    except ValueError as e:
        msg = str(e)
    else:
        raise AssertionError(f"{name}: rank {comm.rank} raised nothing")
    for n in needles:
        assert n in msg, f"{name}: {n!r} not in {msg!r}"
    return msg


def main() -> None:
    from simpar.comm import mpi
    comm = mpi.world()
    mpi.abort_on_exception()
    for name in CASES:
        msg = expect_disagreement(comm, name)
        same = comm.gather_objects(msg)
        assert all(m == same[0] for m in same), same          # the same error everywhere
        comm.barrier()                                        # and the group still works
        if comm.rank == 0:
            print(f"ok {name}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
