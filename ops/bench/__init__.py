"""Speed benchmarks. Speed goals live here, not in the tests (see ops/bench/README.md).

Every benchmark runs in ``harness`` (command line, private servers and models, parts, results
files). The drivers, from the repository root:

- ``make bench`` = ``python -m ops.bench.goals``: the queue-level goals side by side, from five
  parts: ``batching`` (batch fill, lone-job wait), ``scaling`` (1, 2, 4 simulated workers),
  ``submit_scale`` (10k and 100k prompts), ``worker_memory`` (200 batches) and ``service`` (the
  service against DeepCache's recipe at every acceleration level, tiny model);
- ``make bench-full``: the same goals with ``--full`` (16 workers, 1M prompts, 500 batches), then
  ``python -m ops.bench.run``: ``enqueue`` (enqueue rate four ways), ``throughput`` (a worker
  with DeepCache off and on) and ``service`` at level ``off`` (plus ``sd15`` with ``--sd15``);
- ``bash ops/bench/gpu.sh``: the gpu-marked tests, then ``python -m ops.bench.gpu`` (the fork
  check and ``service`` on the SD1.5 and SDXL architectures).

Run on their own: ``drain``, ``export_memory``, ``worker_variants`` and each goals part.
"""
