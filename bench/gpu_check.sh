#!/usr/bin/env bash
# One pass over the GPU hot paths (issues 18 and 25), within 8 minutes on one GPU, every figure into one file:
#   1. bench/bench_kl.py in bf16 at the Qwen2.5-0.5B head (B=8, T=1024, V=151,936, H=896) and a 7B-like head
#      (H=3584): (a) materialized + TRL, (c) losses.fused_head_loss, (d) TRL chunked, (e) Liger fused linear JSD;
#      peak torch.cuda.max_memory_allocated above the inputs and median time, (c)'s ratios to each;
#   2. bench/bench_gpu_steps.py: 10 steps of token_level.py and of on_policy.py (main() itself, --bf16) on a
#      random-init Qwen2.5-0.5B-shaped student and 1.5B-shaped teacher: tokens/s, time split, peak memory;
#   3. generation.generate against model.generate (batch 8 x 128 and 64 x 256 new tokens), and vLLM when it is
#      installed;
#   4. bench/gpu_targets.py: issue 25's targets as ratios within this run (met / not met / missing).
#
#   bash bench/gpu_check.sh                          # on a CUDA machine: writes bench/results_gpu.txt
#   bash bench/gpu_check.sh --cpu --out /tmp/r.txt   # the same stages at tiny shapes on CPU, in seconds
#   bash bench/gpu_check.sh --fetch-wheels           # here, with pip access: the wheels the GPU machine lacks
#
# Nothing is fetched from the network on the GPU machine. trl and liger-kernel (variants a, d, e) are not part of
# its image, so --fetch-wheels downloads them (and trl's missing dependencies) once into .gpu_wheels/, which
# ignores itself in git (so copy it along explicitly); where it is, the run installs them into a temporary folder.
# Without them those variants are reported as skipped. Each stage has its own time limit and writes its lines
# as they come, so a stage that hangs or fails costs its limit and leaves the others' figures in place.
set -uo pipefail
cd "$(dirname "$0")/.."

CPU=0
OUT=bench/results_gpu.txt
BUDGET=480
WHEELS=.gpu_wheels
WORK=
FETCH=0
usage() {
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    cat <<'EOF'
options:
  --cpu           tiny shapes on CPU (the test suite's smoke run); CUDA is hidden even where there is one
  --out FILE      results file (default bench/results_gpu.txt); overwritten
  --budget S      seconds for the whole run (default 480); each stage also has its own limit
  --wheels DIR    wheels to install on the GPU machine (default .gpu_wheels)
  --work DIR      keep the built models, data and logs in DIR (default: a temporary folder, removed)
  --fetch-wheels  download the wheels into --wheels and exit (needs pip access; run it here, not there)
EOF
}
while (($#)); do
    case $1 in
        --cpu) CPU=1 ;;
        --out) OUT=${2:?--out needs a file}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift ;;
        --work) WORK=${2:?--work needs a folder}; shift ;;
        --fetch-wheels) FETCH=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

if ((FETCH)); then
    # The GPU machine runs Python 3.12 with torch, transformers, accelerate, pyarrow, pandas and xxhash already
    # there; these are what trl 1.16 and Liger need beyond them. Pinned: two versions of one package break pip.
    mkdir -p "$WHEELS" && echo '*' >"$WHEELS/.gitignore"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$WHEELS" trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        liger-kernel==0.8.5
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
START=$(date +%s)
# Stage limits are cut to what is left of the budget, less a margin for timeout's kill grace and the summary.
DEADLINE=$((START + BUDGET - 15))
if [[ -z $WORK ]]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK" "$(dirname "$OUT")"
: >"$OUT"

if ((CPU)); then
    export CUDA_VISIBLE_DEVICES=  # the smoke run must take the CPU path even on a GPU machine
    KL_B=2 KL_T=32 KL_V=512 KL_REPS=1 KL_DEVICE=cpu HEADS=(64 128)
    # The wider head runs the first head's code at another width, so on CPU only (c) runs there; (a) runs in the
    # first head's stage, where trl is imported already (on the GPU it comes last, for the record: it materializes
    # the logits).
    KL1_VARIANTS=cda KL2_VARIANTS=c KL_EXTRA=e
    BUILD=(--student-shape tiny-student --teacher-shape tiny-teacher --rows 4 --completion-tokens 16)
    TRAIN=(--steps 3 --batch-size 2 --max-new-tokens 8)
    DECODE=(--batch 4 --new-tokens 8 --reps 1 --warmup-tokens 2)
    MODE="--cpu smoke run: tiny shapes on CPU, the numbers measure nothing"
else
    KL_B=8 KL_T=1024 KL_V=151936 KL_REPS=3 KL_DEVICE=cuda HEADS=(896 3584) KL1_VARIANTS=cd KL2_VARIANTS=cd
    KL_EXTRA=ae
    BUILD=(--student-shape qwen2.5-0.5b --teacher-shape qwen2.5-1.5b --rows 80 --completion-tokens 256)
    TRAIN=(--steps 10 --batch-size 8 --max-new-tokens 256)
    DECODE=(--batch 8 64 --new-tokens 128 256 --reps 3 --warmup-tokens 16)
    MODE="GPU run: real shapes, random weights, bf16"
    if [[ -d $WHEELS ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
            "$WHEELS"/*.whl 2>"$WORK/wheels.err" && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" \
            || { echo "warning: installing $WHEELS failed:"; tail -n 5 "$WORK/wheels.err"; } | tee -a "$OUT"
    fi
fi

KL=(--batch "$KL_B" --tokens "$KL_T" --vocab "$KL_V" --reps "$KL_REPS" --device "$KL_DEVICE" --dtype bfloat16)
FAILED=()
STAGES=0
# stage NAME LIMIT_SECONDS COMMAND...: stdout into $OUT as it comes, stderr kept for a failure's report.
stage() {
    local name=$1 limit=$2 left=$((DEADLINE - $(date +%s))) err rc t0
    shift 2
    echo | tee -a "$OUT"
    if ((left < 5)); then
        echo "== $name: not run, the ${BUDGET} s budget is spent" | tee -a "$OUT"
        FAILED+=("$name (not run)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name" | tee -a "$OUT"
    STAGES=$((STAGES + 1))
    err="$WORK/stage$STAGES.err"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>"$err" | tee -a "$OUT"
    rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        echo "!! $name: stopped at its ${limit} s limit; the lines above are what it finished" | tee -a "$OUT"
        FAILED+=("$name (time limit)")
    elif ((rc != 0)); then
        { echo "!! $name: failed (exit $rc); the end of its stderr:"; tail -n 25 "$err"; } | tee -a "$OUT"
        FAILED+=("$name (exit $rc)")
    else
        echo "-- $name: $(($(date +%s) - t0)) s" | tee -a "$OUT"
    fi
}

cat >"$WORK/header.py" <<'EOF'
import importlib.metadata as md
import platform
import subprocess
import sys
import time

import torch

print(f"distill GPU check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {sys.argv[1]}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"compute capability {p.major}.{p.minor}")
else:
    print("GPU: none (CPU)")
versions = []
for name in ("torch", "transformers", "accelerate", "trl", "liger-kernel", "vllm"):
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} not installed")
print(f"python {platform.python_version()}, CUDA {torch.version.cuda}; " + ", ".join(versions))
try:
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10)
    print(f"tree: {rev.stdout.strip() or 'not a git checkout'}")
except (OSError, subprocess.TimeoutExpired):
    print("tree: git not available")
if "--cpu" not in sys.argv[1] and not torch.cuda.is_available():
    sys.exit("no CUDA device here: run with --cpu for the smoke run")
EOF

stage "environment" 30 "$PY" "$WORK/header.py" "$MODE"
if ((!CPU)) && [[ ${FAILED[*]-} == *environment* ]]; then
    echo "gpu_check.sh: stopping, see $OUT" >&2
    exit 1
fi
kl_title() { echo "KL loss, $1: B=$KL_B T=$KL_T V=$KL_V H=$2, bf16 on $KL_DEVICE, median of $KL_REPS"; }
# Stage limits from the 0372f06 H200 pass (environment 8 s, build 22 s, token_level 31 s; the KL stages spent most of
# their 60 s on Liger's first call) with room for the new paths; the targets' figures come first, (a) and Liger
# (only for the record) after them, vLLM last with whatever is left. Core stages: 455 s of the 480 s budget.
stage "$(kl_title 'Qwen2.5-0.5B head' "${HEADS[0]}")" 60 "$PY" bench/bench_kl.py "${KL[@]}" --hidden "${HEADS[0]}" \
    --variants "$KL1_VARIANTS"
stage "$(kl_title '7B-like head' "${HEADS[1]}")" 60 "$PY" bench/bench_kl.py "${KL[@]}" --hidden "${HEADS[1]}" \
    --variants "$KL2_VARIANTS"
stage "build random-init models and data" 45 "$PY" bench/bench_gpu_steps.py build --work "$WORK" "${BUILD[@]}"
stage "token_level steps" 60 "$PY" bench/bench_gpu_steps.py train --work "$WORK" --script token_level "${TRAIN[@]}"
stage "on_policy steps" 80 "$PY" bench/bench_gpu_steps.py train --work "$WORK" --script on_policy "${TRAIN[@]}"
stage "decode: generation.generate vs model.generate" 120 "$PY" bench/bench_gpu_steps.py decode --work "$WORK" \
    "${DECODE[@]}"
if [[ -n $KL_EXTRA ]]; then
    stage "$(kl_title 'Qwen2.5-0.5B head, for the record' "${HEADS[0]}")" 60 "$PY" bench/bench_kl.py "${KL[@]}" \
        --hidden "${HEADS[0]}" --variants "$KL_EXTRA"
fi
# vLLM's engine start alone can outlast what is left; it gets the remainder and nothing else waits on it.
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
    stage "decode: vLLM" "$BUDGET" "$PY" bench/bench_gpu_steps.py vllm --work "$WORK" "${DECODE[@]}"
else  # without starting torch for it
    printf '\n== decode: vLLM\nvLLM: not installed here, skipped\n' | tee -a "$OUT"
fi
echo | tee -a "$OUT"
"$PY" bench/gpu_targets.py "$OUT" | tee -a "$OUT"

echo | tee -a "$OUT"
if ((${#FAILED[@]})); then
    missing=$(printf '%s; ' "${FAILED[@]}")
    echo "== done in $(($(date +%s) - START)) s; not complete: ${missing%; }" | tee -a "$OUT"
    exit 1
fi
echo "== done in $(($(date +%s) - START)) s; every stage complete" | tee -a "$OUT"
