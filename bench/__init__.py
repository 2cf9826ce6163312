"""windowpipe's benchmarks: `python -m bench.run` (or `make bench`); see docs/BENCHMARKS.md.

Every number is a median of several runs, reported as a ratio against a baseline measured in
the same script on the same machine at the same time: the machines are shared and noisy.
"""
