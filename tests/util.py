"""Helpers shared by the equivalence tests: a thin re-export of
:mod:`simpar.testing`, the one NaN-aware comparison of the project."""
from simpar.testing import (TOL, assert_all_close, assert_close, compare, passed, rel_error,
                            worst)

max_rel_err = rel_error          # the name older tests use

__all__ = ["TOL", "assert_close", "assert_all_close", "compare", "passed", "rel_error", "worst",
           "max_rel_err"]
