"""Speed benchmarks: enqueue rate, worker throughput with DeepCache off/on, optional SD1.5.

Run all of them with one command from the repository root: ``python -m ops.bench.run``
(see ops/bench/README.md). Speed goals live here, not in the tests.
"""
