#!/usr/bin/env bash
# One prepared GPU measurement: install the carried peer wheels (.whl, see README.md), then
# run `cli.py bench --compare` on CUDA, one setting at a time, writing JSON lines and logs
# into $OUT (bench.jsonl, bench.log, env.txt). Used with the project's device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=...)
# `bash benchmarks/gpu_run.sh compile` measures the compiled sinusoid meta-step instead, and
# runs benchmarks/compile_check.py on CUDA (compile_check.txt); `bash benchmarks/gpu_run.sh engine`
# the three settings against the peers, bf16, and the CUDA tests (pytest.txt).
set -u
OUT=${OUT:-/tmp/fmaml-gpu-bench}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-}:$PWD
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1;
  python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda)";
  python3 -c "import learn2learn, higher; print('learn2learn', learn2learn.__version__)" 2>&1 | tail -1;
} > "$OUT/env.txt"
cat "$OUT/env.txt"
bench() {  # name, time limit, extra arguments
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" python3 cli.py bench --device "$DEVICE" --json "$@" \
    > "$OUT/$name.part" 2>> "$OUT/bench.log"
  echo "rc=$?"
  python3 - "$OUT/$name.part" "$name" >> "$OUT/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    row["run"] = sys.argv[2]
    print(row["line"], file=sys.stderr)
    print(json.dumps(row))
PY
  rm -f "$OUT/$name.part"
}
if [ "${1:-}" = compile ]; then
  bench sinusoid-compile 300 --settings sinusoid --compare --impls fmaml --impls fmaml-compile \
    --repeats 10 --min-seconds 0.5
  timeout 200 python3 benchmarks/compile_check.py --device cuda > "$OUT/compile_check.txt" 2>&1
  echo "compile_check rc=$?"; cat "$OUT/compile_check.txt" | grep -v Warning | tail -8
  date -u >> "$OUT/env.txt"
  exit 0
fi
if [ "${1:-}" = engine ]; then  # issue 11: the value_and_grad engine; bf16; the CUDA tests
  bench omniglot 150 --settings omniglot --compare --impls fmaml --impls loop --repeats 5 \
    --min-seconds 0.5 --rounds 2
  bench sinusoid 70 --settings sinusoid --compare --impls fmaml --impls loop --repeats 10 \
    --min-seconds 0.5 --rounds 2
  bench miniimagenet 80 --settings miniimagenet --compare --impls fmaml --impls loop \
    --impls fmaml-checkpoint --repeats 5 --min-seconds 0.5
  bench miniimagenet-cudnn 40 --settings miniimagenet --orders second --impls fmaml \
    --impls learn2learn --cudnn-benchmark --no-check --repeats 5 --min-seconds 0.5
  bench bf16 60 --settings omniglot --settings miniimagenet --orders second --impls fmaml \
    --precision bf16 --no-check --repeats 5 --min-seconds 0.5
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_precision.py \
    tests/test_images.py::test_sampler_on_cuda_matches_cpu_with_a_cpu_generator \
    > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$?"; tail -3 "$OUT/pytest.txt"
  date -u >> "$OUT/env.txt"
  exit 0
fi
bench omniglot 90 --settings omniglot --compare --impls fmaml --impls loop \
  --impls fmaml-checkpoint --repeats 5 --min-seconds 0.5
bench sinusoid 40 --settings sinusoid --compare --impls fmaml --impls loop --repeats 10 \
  --min-seconds 0.5
bench miniimagenet 60 --settings miniimagenet --compare --impls fmaml --impls loop \
  --impls fmaml-checkpoint --repeats 5 --min-seconds 0.5
bench omniglot-tuned 30 --settings omniglot --orders second --impls fmaml --impls learn2learn \
  --cudnn-benchmark --no-check --repeats 5 --min-seconds 0.5
bench omniglot-chunk8 25 --settings omniglot --orders second --impls fmaml --chunk-size 8 \
  --no-check --repeats 5 --min-seconds 0.5
date -u >> "$OUT/env.txt"
