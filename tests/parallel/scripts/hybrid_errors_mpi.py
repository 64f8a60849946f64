"""Bad hybrid layouts under MPI (4 ranks): rank 0 prints, for each rank, ``case <name> rank <r>
ValueError: ...`` for every case — an error on every rank, no hang."""
from simpar.comm import mpi
from simpar.comm.mesh import Mesh, ParallelConfig
from simpar.parallel.hybrid import build_model
from tests.parallel.hybrid_checks import Layout, make_reference

CASES = {
    "tp does not divide heads": (ParallelConfig(dp=1, tp=4), dict(), 4, 8),
    "more stages than layers": (ParallelConfig(pp=4), dict(), 3, 16),
    "bucket size 0": (ParallelConfig(dp=4), dict(bucket_bytes=0), 4, 16),
}


def main() -> None:
    world = mpi.world()
    mpi.abort_on_exception()
    for name, (cfg, opts, n_layer, d_model) in CASES.items():
        lay = Layout(name, cfg, n_layer=n_layer)
        ref = make_reference(lay)
        if d_model != 16:
            from simpar.nn import GPT, GPTConfig
            ref = GPT(GPTConfig(13, 8, n_layer, 6, 12))       # 6 heads over tp=4
        try:
            build_model(ref, Mesh(world, cfg), **opts)
            msg = f"case {name} rank {world.rank} no error"
        except ValueError as e:
            msg = f"case {name} rank {world.rank} ValueError: {e}"
        for line in world.gather_objects(msg):      # one printer: lines do not interleave
            if world.rank == 0:
                print(line, flush=True)


if __name__ == "__main__":
    main()
