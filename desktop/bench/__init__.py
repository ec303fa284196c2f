"""Benchmarks: each measures ratios side by side in one run and writes
`bench/results/<name>.json` and a PNG.  Never timed unit tests."""
