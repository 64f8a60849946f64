"""simpar: simulated parallelism.  Learn how large language models are trained
on many devices, in pure NumPy: every rank plays one device.

Reading order: :mod:`simpar.nn` (what is computed), :mod:`simpar.comm` (how
devices talk), :mod:`simpar.parallel` (how the computation is cut), then
:mod:`simpar.trace`, :mod:`simpar.sim` and :mod:`simpar.viz` (how it is seen).
:mod:`simpar.formulas` holds every closed form the project checks itself against.
"""
from . import runtime as _runtime
from .comm import Comm, launch, run
from .comm.mesh import Mesh, ParallelConfig

__version__ = "0.1.0"

_runtime.apply_defaults()      # keep freed memory for reuse (see simpar.runtime)
__all__ = ["Comm", "launch", "run", "Mesh", "ParallelConfig", "__version__"]
