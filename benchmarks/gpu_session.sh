#!/usr/bin/env bash
# What a session with a lent GPU runs, one stage per device command (each must end within
# the 10-minute limit of one command), from the repository root:
#
#   bash benchmarks/gpu_session.sh test            # install, versions, the whole suite on real kernels
#   bash benchmarks/gpu_session.sh bench dino      # one benchmark's target preset (dino, ema, multicrop, paws,
#                                                  # train_step)
#   bash benchmarks/gpu_session.sh bench dino full K=65536   # another preset, cases filtered by label tokens
#
# Logs and results are copied under $OUT when it is set (the device tool brings them back);
# commit benchmarks/results/<gpu>/ afterwards, as the README says.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/fastssl-gpu}"
mkdir -p "$out"
stage="${1:-test}"

# The GPU machine has no package registry. What its image lacks (kornia, a contender of the
# multicrop benchmark) travels as wheels in .whl/ (gitignored; name it in the device call's carry):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl kornia==0.9.0 kornia_rs==0.2.0
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$out/wheels.log" 2>&1 || { tail -20 "$out/wheels.log"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Then the package, without dependencies or build isolation (torch, triton, numpy, pytest, timm,
# scikit-learn are there). This also compiles fastssl._C with nvcc.
python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 \
  || { tail -40 "$out/install.log"; exit 1; }

case "$stage" in
  test)
    python3 -m fastssl.info | tee "$out/info.txt"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$out/info.txt"
    # No TRITON_INTERPRET: the tests put their tensors on the GPU and run the real kernels.
    python3 -m pytest -q -x --junitxml="$out/pytest.xml" 2>&1 | tee "$out/pytest.log" | tail -40
    rc=${PIPESTATUS[0]}
    python3 -m fastssl.kernels.aot --arch 90 >"$out/aot.log" 2>&1 || rc=1
    exit "$rc"
    ;;
  bench)
    name="${2:?which benchmark: dino, ema, multicrop, paws or train_step}"
    preset="${3:-target}"
    shift $(( $# < 3 ? $# : 3 ))
    args=(--preset "$preset")
    [ $# -gt 0 ] && args+=(--filter "$@")
    python3 -m "benchmarks.$name" "${args[@]}" 2>"$out/bench-$name.err" | tee "$out/bench-$name.md"
    rc=${PIPESTATUS[0]}
    tail -5 "$out/bench-$name.err"
    # At most 8 files come back from $OUT: this run's json/md/png only.
    for f in benchmarks/results/*/"$name-$preset".*; do [ -e "$f" ] && cp "$f" "$out/"; done
    exit "$rc"
    ;;
  *)
    echo "unknown stage $stage (test or bench)" >&2
    exit 2
    ;;
esac
