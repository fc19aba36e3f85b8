"""Speed benchmarks. Speed goals live here, not in the tests (see ops/bench/README.md).

From the repository root: ``make bench`` runs the quick goals (``ops.bench.goals``),
``make bench-full`` the goals at full size and then ``ops.bench.run`` (enqueue rate, worker
throughput with DeepCache off/on, the service against DeepCache's recipe); ``bash
ops/bench/gpu.sh`` the GPU benchmark.
"""
