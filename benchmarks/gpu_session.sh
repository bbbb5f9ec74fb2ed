#!/usr/bin/env bash
# What a session with a lent GPU runs, from the repository root. First, always:
#
#   bash benchmarks/gpu_session.sh lease [--budget SECONDS]   # every target line in one short window
#                                                  # (benchmarks/lease.py: install, the extension built in the
#                                                  # background, the Triton variants precompiled, kernel checks,
#                                                  # GPU tests, the headline benchmarks, sweeps; default 300 s)
#
# Then, in later windows, one stage per device command (each must end within the 10-minute limit):
#
#   bash benchmarks/gpu_session.sh test            # install, versions, the tests that use the GPU (kernels, ops)
#   bash benchmarks/gpu_session.sh test-train      # the trainers on CUDA (tests/test_train_gpu.py)
#   bash benchmarks/gpu_session.sh test-rest       # the CPU-side tests (gloo, packaging, benchmarks' smoke) and
#                                                  # the AOT build: CI runs them too, so only if time is left
#   bash benchmarks/gpu_session.sh bench dino      # one benchmark's target preset (dino, dinov3, dinov3_step,
#                                                  # ema, gram, koleo, multicrop, paws, train_step)
#   bash benchmarks/gpu_session.sh bench dino full K=65536   # another preset, cases filtered by label tokens
#   bash benchmarks/gpu_session.sh tune dino       # the launch-configuration sweep of a kernel family (dino,
#                                                  # paws, ema): commit a winner after its AOT build is spill-free
#   bash benchmarks/gpu_session.sh profile         # ncu's counters of the crop kernels at the target batch,
#                                                  # beside the static model's prediction (benchmarks/gpu_checks.py)
#   bash benchmarks/gpu_session.sh sanitize        # compute-sanitizer: memcheck of every fused op, racecheck of
#                                                  # the crop programs' shared memory
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
# The lease command installs, builds and budgets everything itself.
if [ "$stage" = lease ]; then
  shift
  exec python3 -m benchmarks.lease --out "$out" "$@"
fi
# Then the package, without dependencies or build isolation (torch, triton, numpy, pytest, timm,
# scikit-learn are there). This also compiles fastssl._C with nvcc, for this GPU's architecture
# only (about a minute per architecture).
if [ -z "${FASTSSL_CUDA_ARCHS:-}" ]; then
  FASTSSL_CUDA_ARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
  export FASTSSL_CUDA_ARCHS
fi
# Each stage is its own device call; a warm machine keeps the build (ignored files stay there), so the
# install runs again only when the C++/CUDA sources or the build files changed.
stamp=$(cat csrc/* setup.py pyproject.toml | sha256sum | cut -c1-16)-$FASTSSL_CUDA_ARCHS
if [ "$(cat .gpu_build_stamp 2>/dev/null)" = "$stamp" ] && python3 -c "import fastssl" 2>/dev/null; then
  echo "fastssl already built for these sources"
else
  python3 -m pip install --no-build-isolation --no-deps -e . >"$out/install.log" 2>&1 \
    || { tail -40 "$out/install.log"; exit 1; }
  echo "$stamp" >.gpu_build_stamp
fi
# A build that fell back to CPU kernels would fail every CUDA crop test: stop here instead.
python3 -c "import fastssl._ext as e; e.load_extension(); assert e.has_cuda_kernels(), 'fastssl._C has no CUDA kernels'" \
  || { grep -i -m5 "nvcc\|cuda\|cpu kernels" "$out/install.log"; exit 1; }
# Keep going past failures (all of them are worth seeing in one run), but not forever.
pytest_args=(-q --maxfail=25 --durations=15 -p no:cacheprovider)
python3 -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout=300)
# What only a GPU runs; the rest (gloo runs on CPU, packaging, the benchmarks' CPU smoke) is CI's.
gpu_tests=(tests/test_dino_loss.py tests/test_dino_distributed.py tests/test_ema.py tests/test_paws.py
           tests/test_paws_distributed.py tests/test_resized_crops.py tests/test_crop_programs.py tests/test_multicrop.py
           tests/test_dino_augment.py tests/test_launch.py tests/test_crop_pairs.py tests/test_teacher_targets.py
           tests/test_dinov2_dinov3_losses.py tests/test_gram.py tests/test_koleo.py)
train_tests=(tests/test_train_gpu.py)
# A command has 10 minutes: pytest gets what the install left of 9.5 of them, so that a hung test
# still leaves its log behind.
run_pytest() { timeout $((570 - SECONDS)) python3 -m pytest "${pytest_args[@]}" "$@"; }

case "$stage" in
  test)
    python3 -m fastssl.info | tee "$out/info.txt"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$out/info.txt"
    # No TRITON_INTERPRET: the tests put their tensors on the GPU and run the real kernels.
    run_pytest --junitxml="$out/pytest.xml" "${gpu_tests[@]}" 2>&1 | tee "$out/pytest.log" | tail -60
    exit "${PIPESTATUS[0]}"
    ;;
  test-train)
    run_pytest --junitxml="$out/pytest-train.xml" "${train_tests[@]}" 2>&1 | tee "$out/pytest-train.log" | tail -40
    exit "${PIPESTATUS[0]}"
    ;;
  test-rest)
    rest=()
    for f in tests/test_*.py; do [[ " ${gpu_tests[*]} ${train_tests[*]} " == *" $f "* ]] || rest+=("$f"); done
    run_pytest --junitxml="$out/pytest-rest.xml" "${rest[@]}" 2>&1 | tee "$out/pytest-rest.log" | tail -40
    rc=${PIPESTATUS[0]}
    python3 -m fastssl.kernels.aot --arch 90 >"$out/aot.log" 2>&1 || rc=1
    tail -3 "$out/aot.log"
    exit "$rc"
    ;;
  bench)
    name="${2:?which benchmark: dino, dinov3, dinov3_step, ema, gram, koleo, multicrop, paws or train_step}"
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
  tune)
    name="${2:?which kernels: dino, paws or ema}"
    python3 -m benchmarks.tune "$name" 2>"$out/tune-$name.err" | tee "$out/tune-$name.md"
    rc=${PIPESTATUS[0]}
    tail -5 "$out/tune-$name.err"
    for f in benchmarks/results/*/"tune-$name".*; do [ -e "$f" ] && cp "$f" "$out/"; done
    exit "$rc"
    ;;
  profile)
    # Counters need the Firecracker runtime (device tool's KINDS.md); clocks are left alone (METHOD.md).
    # The workload runs each program's two launches (224 and 96 crops) once as a warm-up, then once more:
    # those last four launches are profiled.
    timeout 560 ncu --clock-control none --kernel-name regex:'tiled_kernel|pixel_kernel' --launch-skip 4 \
      --launch-count 4 --section SpeedOfLight --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section LaunchStats --section Occupancy \
      --section InstructionStats --csv --page details python3 -m benchmarks.gpu_checks counters --reps 1 \
      >"$out/ncu-multicrop.csv" 2>"$out/ncu-multicrop.err"
    rc=$?
    grep -E "model|warp instructions|Duration|Executed Instructions\"|Shared|Bank|Issue Slots|Registers Per|Achieved Occ" \
      "$out/ncu-multicrop.csv" | head -80
    tail -5 "$out/ncu-multicrop.err"
    exit "$rc"
    ;;
  sanitize)
    # Without the caching allocator every tensor is its own allocation, so an access past one is seen.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    rc=0
    timeout 400 compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m benchmarks.gpu_checks sanitize \
      >"$out/memcheck.log" 2>&1 || rc=1
    timeout 180 compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m benchmarks.gpu_checks sanitize \
      --only crops >"$out/racecheck.log" 2>&1 || rc=1
    tail -12 "$out/memcheck.log" "$out/racecheck.log"
    exit "$rc"
    ;;
  *)
    echo "unknown stage $stage (lease, test, test-train, test-rest, bench, tune, profile or sanitize)" >&2
    exit 2
    ;;
esac
