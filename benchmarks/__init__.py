"""The benchmark of the README's Performance section (``python -m benchmarks.bench``, ``make bench``).

It lives outside the ``pixelrepa`` package: the package holds the study's one path (one attention, one
guidance path); the reference-style contenders the benchmark races against it are built here
(``benchmarks/reference.py``), as are the peak memory probes (``benchmarks/memory.py``).
"""
