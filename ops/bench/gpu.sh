#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine with torch but no network (run from anywhere):
#   1. python -m ops.bench.gpu --record "$@" (builds the SD1.5-architecture model unless --model is
#      given; writes results/gpu-latest.*, or into --out DIR), stopped after GPU_BENCH_TIMEOUT_S
#      seconds if set (a lease is short: its partial results still come back),
#   2. the gpu-marked tests (a real `deepqueue worker` serving on CUDA), after GPU_TESTS_TIMEOUT_S.
# Where .gpu/ exists (made on a development machine by shared/gpu-bundle.sh after `make venv`),
# its wheels and redis-server are installed into a temporary folder first. Logs and results also
# go to $OUT when it is set. On a machine without CUDA the tests skip and the benchmark runs on CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
out=${OUT:-}
python=${PYTHON:-python3}
if [ -d .gpu/whl ] && ! "$python" -c "import diffusers, celery" 2>/dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu/whl/*.whl || exit 1
  export PYTHONPATH=$site PATH=$PWD/.gpu/bin:$site/bin:$PATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
status=0
bench_limit=${GPU_BENCH_TIMEOUT_S:+timeout -s INT -k 30 $GPU_BENCH_TIMEOUT_S}
$bench_limit "$python" -m ops.bench.gpu --record "$@" 2>&1 | tee ${out:+"$out/gpu-bench.log"}
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if [ -n "$out" ]; then cp ops/bench/results/gpu-latest* "$out"/ 2>/dev/null; fi
tests_limit=${GPU_TESTS_TIMEOUT_S:+timeout -s INT -k 10 $GPU_TESTS_TIMEOUT_S}
$tests_limit "$python" -m pytest -q -p no:cacheprovider -m gpu tests/integration/test_gpu.py 2>&1 | tee ${out:+"$out/gpu-tests.log"}
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
