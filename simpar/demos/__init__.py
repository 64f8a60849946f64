"""One runnable demo per paradigm: ``python -m simpar.demos.<name>``.

* :mod:`.overview` — the main demo (``python -m simpar demo``): mesh, a
  reference step checked across devices, a collective benchmark, timelines.
"""
