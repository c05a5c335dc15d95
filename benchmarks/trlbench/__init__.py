"""posttrain against TRL: the benchmark side of the comparison (config, runs, report).

Outside the `posttrain` package on purpose: the library never imports `trl`. Scripts in
benchmarks/ import it as `trlbench` (their directory is on sys.path); tests get benchmarks/
on sys.path from pytest's `pythonpath` setting; `posttrain bench` adds it in a source checkout.
"""
