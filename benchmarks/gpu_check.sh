#!/usr/bin/env bash
# The CUDA checks and GPU-machine benchmarks, run in one go on a lent GPU machine (its own python3
# with torch; nothing is downloaded there), within about 8 minutes. From the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Stages, in order of priority; each has a time box (timeout), a failing or timed-out stage does
# not stop the others, and the whole run ends by DEADLINE seconds (460 unless set):
#  1. tests/test_cuda.py, test_kernels.py and test_custom_ops.py (4 workers): every quantizer,
#     observer and workflow on the GPU against the CPU, host-sync and CUDA-graph checks of the QAT
#     path, the Triton kernels and the custom ops' CUDA implementations against the CPU value for
#     value;                                                             test_cuda.log
#     at the same time, pinned to one core the tests leave free:
#     benchmarks/deploy.py, onnxruntime int8 vs float32 on the host CPU;  deploy.txt
#  2. benchmarks/fake_quant.py --device cuda: the fake-quantization table, then
#     benchmarks/launch_overhead.py: host microseconds per call, layer by layer; fake_quant_cuda.txt
#  3. benchmarks/qat_step.py --device cuda --arch resnet50 --batch 64 --no-compile: eager QAT
#     step time and peak step memory against float32 and torch.ao;       qat_resnet50_b64.txt
#  4. benchmarks/qat_step.py --device cuda --arch resnet18 --batch 128, compiled float32,
#     quantize_model(fx) and FusedResNet against eager, and a torch.profiler table of one
#     eager step of float32, quantize_model(fx), fx as ao and torch.ao;  qat_resnet18_b128.txt
#  5. the rest of the suite with CUDA available, in the time left;       suite.log (results),
#                                                                        suite_full.log
# summary.txt: the machine, the packages, each stage's exit status and seconds, and the headline
# lines. Optional wheels under .whl/ (pure-Python packages the image lacks: mnist1d,
# efficientnet_pytorch; benchmarks/gpu_wheels.sh builds them here, and the device call carries
# .whl) are installed into /tmp/site first.
set -u -o pipefail
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
summary=$out/summary.txt
: >"$summary"
DEADLINE=${DEADLINE:-460}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
say() { echo "$*" | tee -a "$summary"; }

if compgen -G ".whl/*.whl" >/dev/null; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$summary" 2>&1; then
        export PYTHONPATH=/tmp/site:$PWD
        say "installed into /tmp/site: $(cd .whl && ls ./*.whl | tr '\n' ' ')"
    else
        say "WARNING: installing .whl/*.whl failed; going on without them"
    fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$summary"
say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; int8 flags:" \
    "$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx512_vnni|avx_vnni|amx_int8|amx_tile)$' | tr '\n' ' ')"
python3 - 2>&1 <<'EOF' | tee -a "$summary"
import importlib, torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE VISIBLE")
missing = []
for name in ("torchvision", "triton", "onnx", "onnxruntime", "onnxscript", "timm", "transformers", "sklearn",
             "hypothesis", "xdist", "mnist1d", "efficientnet_pytorch", "matplotlib"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        missing.append(name)
        print(f"  MISSING {name}: {type(e).__name__}: {e}")
if "torchvision" in missing:
    print("MISSING torchvision: qat_step.py and deploy.py cannot run; the resnet CUDA tests skip")
EOF
have() { python3 -c "import $1" >/dev/null 2>&1; }
xdist4=(); have xdist && xdist4=(-n 4)
pin_tests=(); pin_deploy=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 8 ]; then
    last=$(($(nproc) - 1))
    pin_tests=(taskset -c "0-$((last - 1))"); pin_deploy=(taskset -c "$last")
fi

not_ok=()
# stage NAME FILE MAX_S RESERVE_S CMD...: runs CMD for at most MAX_S seconds, and never into the
# RESERVE_S seconds kept for the stages after it; output to FILE and stdout. A non-zero exit or a
# timeout is listed at the end (and the script exits 1), except a timeout with PARTIAL_OK=1.
stage() {
    local name=$1 file=$2 max=$3 reserve=$4
    shift 4
    local left=$((DEADLINE - SECONDS - reserve)) t0=$SECONDS rc
    local t=$((max < left ? max : left))
    if [ "$t" -lt 15 ]; then
        say "== $name: SKIPPED (time box spent: ${SECONDS}s of ${DEADLINE}s)"
        echo "skipped: time box spent" >"$out/$file"
        return 0
    fi
    echo "== $name (at ${SECONDS}s, at most ${t}s): $*"
    timeout -k 10 "$t" "$@" 2>&1 | tee "$out/$file"
    rc=$?
    if { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && [ "${PARTIAL_OK:-0}" = 1 ]; then
        say "== $name: stopped at its time box (${t}s); the results so far are in $file"
        rc=0
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "== $name: TIMED OUT after ${t}s"
    else
        say "== $name: exit $rc, $((SECONDS - t0))s"
    fi
    [ "$rc" -eq 0 ] || not_ok+=("$name")
    return 0
}

# 1. CUDA tests, with deploy.py on the core they leave free
(
    if have torchvision && have onnxruntime; then
        OMP_NUM_THREADS=1 timeout -k 10 150 ${pin_deploy[@]+"${pin_deploy[@]}"} python3 benchmarks/deploy.py --repeats 10 >"$out/deploy.txt" 2>&1
        echo "exit $?" >>"$out/deploy.txt"
    else
        echo "skipped: torchvision or onnxruntime missing" >"$out/deploy.txt"
    fi
) &
deploy_pid=$!
# reserves: each stage keeps the boxes of the stages after it (110 + 100 + 120 s for 2-4)
OMP_NUM_THREADS=3 stage "CUDA tests" test_cuda.log 180 330 ${pin_tests[@]+"${pin_tests[@]}"} python3 -m pytest tests/test_cuda.py \
    tests/test_kernels.py tests/test_custom_ops.py -v \
    ${xdist4[@]+"${xdist4[@]}"} -p no:cacheprovider --durations=10 -rfE
grep -E "passed|failed|error" "$out/test_cuda.log" | tail -1 | tee -a "$summary"
grep -oE "(FAILED|ERROR) tests/[^ ]*" "$out/test_cuda.log" | sort -u | head -40 | tee -a "$summary"
wait "$deploy_pid"
say "== deploy.py (beside the tests, ${pin_deploy[*]:-unpinned}): $(tail -1 "$out/deploy.txt")"
[ "$(tail -1 "$out/deploy.txt")" = "exit 0" ] || not_ok+=("deploy.py")
grep -E "^CPU:|^ +(1|16) |target:|check_parity" "$out/deploy.txt" | tee -a "$summary"

# 2. fake-quantization table
stage "fake_quant.py + launch_overhead.py --device cuda" fake_quant_cuda.txt 110 220 bash -c \
    "python3 benchmarks/fake_quant.py --device cuda && python3 benchmarks/launch_overhead.py --device cuda --calls 1000"
grep -E "^(per-|QAT|  straight)" "$out/fake_quant_cuda.txt" >>"$summary"

# 3. eager QAT step, resnet50 batch 64: time against torch.ao, peak memory
stage "qat_step.py resnet50 b64 eager" qat_resnet50_b64.txt 100 120 python3 benchmarks/qat_step.py --device cuda \
    --arch resnet50 --batch 64 --no-compile
grep -E "^(float32|torchquant|torch\.ao)" "$out/qat_resnet50_b64.txt" >>"$summary"

# 4. compiled QAT step, resnet18 batch 128, and the profile of one eager step. Compiled
#    variants not started within the budget are reported as skipped.
t4=$((DEADLINE - SECONDS < 240 ? DEADLINE - SECONDS : 240))
budget=$((t4 > 120 ? t4 - 120 : 0))  # a compile started by then has about 120 s to finish
stage "qat_step.py resnet18 b128 compiled + profile" qat_resnet18_b128.txt 240 0 python3 benchmarks/qat_step.py \
    --device cuda --arch resnet18 --batch 128 --compiled-variants float32,fx,fused --budget "$budget" \
    --profile --profile-variants float32,fx,fx-ao,ao
grep -E "^(float32|torchquant|torch\.ao)|^profile of" "$out/qat_resnet18_b128.txt" >>"$summary"

# 5. the rest of the suite in the time left. One thread per worker (12 workers with torch's
# default threads oversubscribed the 16 cores); -v prints each result as it comes, so a
# timeout still leaves the results so far in the log.
xdist14=(); have xdist && xdist14=(-n 14)
PARTIAL_OK=1 OMP_NUM_THREADS=1 stage "rest of the suite" suite_full.log 300 0 python3 -m pytest -v ${xdist14[@]+"${xdist14[@]}"} \
    -p no:cacheprovider --ignore=tests/test_cuda.py --ignore=tests/test_kernels.py --ignore=tests/test_custom_ops.py
grep -E "PASSED|FAILED|ERROR|passed|failed" "$out/suite_full.log" >"$out/suite.log"
say "suite: $(grep -c PASSED "$out/suite.log") passed so far; failures:"
grep -E "FAILED|ERROR" "$out/suite.log" | grep -v "^$" | tail -30 | tee -a "$summary"
say "== gpu_check.sh done in ${SECONDS}s; stage outputs in $out"
if [ "${#not_ok[@]}" -gt 0 ]; then
    say "stages that failed or timed out: $(printf '%s; ' "${not_ok[@]}")"
    exit 1
fi
