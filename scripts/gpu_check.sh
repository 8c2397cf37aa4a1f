#!/usr/bin/env bash
# The GPU checks of this project, as one prepared script for a GPU machine lent for a few minutes.
#
#     bash scripts/gpu_wheels.sh                 # first, where pip reaches PyPI: .whl/ (must stay ignored by git)
#     bash scripts/gpu_check.sh                  # on the GPU machine, from a copy of the working tree with .whl/
#     bash scripts/gpu_check.sh --dry-run        # the same steps at tiny sizes on this CPU, but the
#                                                # noise_device=device run (the CPU's streams there); about a minute
#
# The GPU machine has python3 with torch, lightning, torchmetrics and transformers but no internet;
# the packages it lacks (hydra-core, omegaconf, diffusers, wandb, prdc, ...) come as wheels in .whl/,
# installed into /tmp/site; the project itself is not installed: PYTHONPATH=src.
#
# Steps, in order (each with a timeout; all of them within 7.5 minutes, so the script ends in under 8):
#   wheels            install .whl/*.whl into /tmp/site (skipped in --dry-run: the local env has them)
#   pytest_gpu        python3 -m pytest -m gpu -q (the tests that need CUDA)
#   bench_gpu         scripts/bench_gpu.py, every model: the table of docs/performance.md
#   run_default       python3 run.py trainer=gpu: the default run (digits, DDIM, FID, W&B offline) on CUDA
#   run_noise_device  the same with data.noise_device=device (per-sample generators on the GPU), and
#                     logger=csv: a run that does not depend on the carried wandb
#   parity            the default run on 2 ranks (trainer=ddp trainer.devices=2) against run_default's
#                     1 rank: the same images; only where there are >= 2 GPUs, else skipped
# --dry-run: pytest -m gpu (its tests skip without CUDA), bench_gpu --small on the CPU (cat256 only),
# the runs at 8 samples and 2 steps without FID on trainer=cpu, parity with trainer=ddp_sim (2 CPU ranks).
# A failed step does not stop the next. Everything goes under $OUT (default ./gpu_check_out), as it
# happens, in a few files (a lent machine may send back only a handful):
#   gpu_check.log     every step's output
#   summary.md        | step | status | seconds | (also printed at the end); summary.json: the same rows
#   bench_gpu.md      bench_gpu's table, row by row (bench_gpu.md.json: the rows)
#   runs.json         results.json of each run, and the parity comparison
# The runs write under a temporary folder in /tmp (removed at the end; KEEP_WORK=1 keeps it), never
# into the tree. The exit status is 0 when no step failed, timed out or was left out for lack of time.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DRY_RUN=0
[[ ${1:-} == --dry-run ]] && DRY_RUN=1
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
BUDGET=${GPU_CHECK_BUDGET:-450}  # seconds for every step together: the lease's 8 minutes, less a margin
STEPS=()  # "name|status|seconds" rows of the summary
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_DIR=$WORK WANDB_CACHE_DIR=$WORK/wandb_cache \
    WANDB_CONFIG_DIR=$WORK/wandb_config HF_HUB_OFFLINE=1 PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
: >"$LOG"
: >"$OUT/runs.json.tmp"

cleanup() {
    rm -f "$OUT/runs.json.tmp"
    [[ ${KEEP_WORK:-0} == 1 ]] || rm -rf "$WORK"
}
trap cleanup EXIT

say() {
    echo "$*" | tee -a "$LOG"
}

# the rows so far, as summary.md and summary.json: a run killed midway still leaves its summary
write_summary() {
    "$PY" - "$OUT" "$DRY_RUN" "${STEPS[@]}" <<'EOF'
import json, sys
out, dry, rows = sys.argv[1], sys.argv[2] == "1", [r.split("|", 2) for r in sys.argv[3:]]
steps = [{"step": n, "status": s, "seconds": int(t)} for n, s, t in rows]
json.dump({"dry_run": dry, "steps": steps}, open(f"{out}/summary.json", "w"), indent=2)
lines = ["| step | status | seconds |", "|---|---|---|"] + [f"| {n} | {s} | {t} |" for n, s, t in rows]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
EOF
}

record() {  # record NAME STATUS SECONDS
    STEPS+=("$1|$2|$3")
    say "=== $1: $2 (${3}s)"
    write_summary
}

# run_step NAME CAP_SECONDS COMMAND...: COMMAND under a timeout of CAP_SECONDS, or what the budget has left
run_step() {
    local name=$1 cap=$2 left limit start rc=0
    shift 2
    left=$((BUDGET - SECONDS))
    if ((left < 20)); then
        record "$name" "skipped: no time left" 0
        return
    fi
    limit=$((cap < left - 5 ? cap : left - 5))
    say "=== $name (timeout ${limit}s): $*"
    start=$SECONDS
    # timeout runs programs: a function of this script runs in a child bash (export -f)
    declare -F "$1" >/dev/null && set -- bash -c '"$@"' "$name" "$@"
    { timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"; } || rc=$?
    case $rc in
        0) record "$name" passed $((SECONDS - start)) ;;
        124 | 137) record "$name" "timed out (${limit}s)" $((SECONDS - start)) ;;
        *) record "$name" "failed (exit $rc)" $((SECONDS - start)) ;;
    esac
}

install_wheels() {
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

gpu_count() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        "$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
    fi
}

# run_sampling NAME ARGS...: python3 run.py ARGS into $WORK/NAME; its results.json goes into runs.json
run_sampling() {
    local name=$1
    shift
    "$PY" run.py "$@" "hydra.run.dir=$WORK/$name" "paths.cache_dir=$WORK/cache" || return
    "$PY" -c 'import json, sys; print(json.dumps({sys.argv[1]: json.load(open(sys.argv[2]))}))' \
        "$name" "$WORK/$name/results.json" >>"$OUT/runs.json.tmp"
}

# parity ARGS...: a 2-rank run ($TWO_RANKS ARGS) against the 1-rank one ($ONE_RANK ARGS: run_default's,
# reused where it ran): every sample's PNG the same
parity() {
    local one=$WORK/run_default two
    read -ra two <<<"$TWO_RANKS"
    if [[ ! -f $one/results.json ]]; then
        run_sampling parity_one "$ONE_RANK" "$@" || return
        one=$WORK/parity_one
    fi
    run_sampling parity_two "${two[@]}" "$@" || return
    "$PY" - "$one" "$WORK/parity_two" >>"$OUT/runs.json.tmp" <<'EOF'
import json, pathlib, sys
import numpy as np
from PIL import Image
one, two = (pathlib.Path(p) for p in sys.argv[1:3])
names = sorted(p.name for p in (one / "samples").glob("*.png"))
assert names == sorted(p.name for p in (two / "samples").glob("*.png")), "different sets of samples"
read = lambda d, n: np.asarray(Image.open(d / "samples" / n), dtype=np.int16)
diffs = [np.abs(read(one, n) - read(two, n)) for n in names]
results = [json.load(open(d / "results.json")) for d in (one, two)]
report = {"samples": len(names), "identical": sum(int(d.max() == 0) for d in diffs),
          "max_abs_diff": int(max(d.max() for d in diffs)), "devices": [r["devices"] for r in results],
          "metrics": [r["metrics"] for r in results]}
print(json.dumps({"parity": report}))
# GPU kernels may round differently across batch compositions: allow 2 levels of 255, no more
sys.exit(0 if names and report["devices"] == [1, 2] and report["max_abs_diff"] <= 2 else 1)
EOF
}

plan_sizes() {
    if ((DRY_RUN)); then
        BENCH_ARGS=(--small --device cpu --repeats 1 --steps 2 --models cat256)
        RUN_ARGS=(data.num_samples=8 data.batch_size=2 sampler.steps=2 metrics.fid.enabled=false logger=none)
        ONE_RANK=trainer=cpu TWO_RANKS=trainer=ddp_sim
        export OMP_NUM_THREADS=1  # 2 busy cores: spinning OpenMP threads would slow every step many-fold
    else
        BENCH_ARGS=(--models cat256 cifar10 sd21)  # the paper's pixel-space case first
        RUN_ARGS=()  # the default run: digits, DDIM 20 steps, 1000 samples, FID, W&B offline
        ONE_RANK=trainer=gpu TWO_RANKS="trainer=ddp trainer.devices=2"
    fi
}

main() {
    plan_sizes
    export PY WORK OUT ONE_RANK TWO_RANKS
    export -f install_wheels run_sampling parity
    local gpus
    gpus=$(gpu_count)
    say "gpu_check: $( ((DRY_RUN)) && echo 'dry run (CPU, tiny sizes)' || echo 'full') on ${HOSTNAME:-this machine}, $gpus GPU(s); \
OUT=$OUT; budget ${BUDGET}s; $(date -u +%FT%TZ)"
    if ((DRY_RUN)); then
        record wheels "skipped: dry run (the local environment's packages)" 0
    elif compgen -G ".whl/*.whl" >/dev/null; then
        run_step wheels 90 install_wheels
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    else
        record wheels "skipped: no .whl/*.whl" 0
    fi
    "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee -a "$LOG" || true
    run_step pytest_gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider
    run_step bench_gpu 270 "$PY" scripts/bench_gpu.py "${BENCH_ARGS[@]}" --out "$OUT/bench_gpu.md"
    run_step run_default 120 run_sampling run_default "$ONE_RANK" "${RUN_ARGS[@]}"
    if ((DRY_RUN)); then
        record run_noise_device "skipped: dry run (on the CPU the device's streams are the CPU's)" 0
    else
        run_step run_noise_device 90 run_sampling run_noise_device "$ONE_RANK" "${RUN_ARGS[@]}" data.noise_device=device \
            logger=csv
    fi
    if ((DRY_RUN || gpus >= 2)); then
        run_step parity 150 parity "${RUN_ARGS[@]}"
    else
        record parity "skipped: $gpus GPU(s), parity needs 2" 0
    fi
    "$PY" -c 'import json, sys; print(json.dumps({k: v for l in open(sys.argv[1]) for k, v in json.loads(l).items()}, indent=2))' \
        "$OUT/runs.json.tmp" >"$OUT/runs.json"
    say ""
    tee -a "$LOG" <"$OUT/summary.md"
    ! grep -q -E '\| (failed|timed out|skipped: no time)' "$OUT/summary.md"
}

main
