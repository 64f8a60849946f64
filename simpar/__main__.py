"""``python -m simpar <command>``: see :mod:`simpar.cli` (``python -m simpar --help``)."""
from simpar.cli import main

if __name__ == "__main__":
    main()
