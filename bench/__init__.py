"""Benchmarks (`python -m bench.serve_bench`, `python -m bench.train_bench`) and the modules
they share: loadgen, sampling, report, machine. See bench/README.md."""
