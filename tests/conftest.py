"""Test-suite settings: cross-rank shape checking on, one BLAS thread."""
import os

os.environ.setdefault("SIMPAR_CHECK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
