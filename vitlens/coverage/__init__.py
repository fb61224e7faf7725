"""Coverage harnesses: which timm names and transformers classes vitlens explains.

They build each model small at random init and capture it, so they sit above the
whole package (``benchmarks/coverage.py`` writes ``docs/COVERAGE.md`` from them);
nothing in the package imports them.
"""
