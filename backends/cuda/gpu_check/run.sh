#!/usr/bin/env bash
# The staged GPU check: one command for a session lent a GPU (README.md beside this file).
#
#   bash backends/cuda/gpu_check/run.sh             # on the GPU machine (make gpu-check)
#   bash backends/cuda/gpu_check/run.sh --dry-run   # stages 2-4 on the CPU, tiny shapes
#
# Stage 1 installs the carried wheels (.cache/gpu-wheels, from fetch_wheels.sh) into the
# image's python; stages 2-4 are `python -m tgi_backend_cuda.gpu_check --stage N`, each in
# its own process under its own time limit, so a stage that fails or overruns is recorded
# and the next one still runs. Every stage writes to $OUT as it goes. The limits add up to
# 290 s, inside a 5-minute device call. Exit status 1 when any stage failed.
#
# Environment: OUT (default .cache/gpu-check-out), PYTHON (default python3; the repo's
# .venv in a dry run), WHEELS (default .cache/gpu-wheels), STAGE1_S .. STAGE4_S (limits),
# BENCH_ARGS (extra options of stage 4).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$ROOT" || exit 2

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help)
            sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "unknown argument: $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

OUT="${OUT:-$ROOT/.cache/gpu-check-out}"
WHEELS="${WHEELS:-$ROOT/.cache/gpu-wheels}"
if [[ $DRY_RUN == 1 && -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
fi
PYTHON="${PYTHON:-python3}"
STAGE1_S="${STAGE1_S:-20}"
STAGE2_S="${STAGE2_S:-60}"
STAGE3_S="${STAGE3_S:-70}"
STAGE4_S="${STAGE4_S:-140}"

# A device call returns at most 8 files from $OUT: these are the eight.
mkdir -p "$OUT"
rm -f "$OUT"/summary.txt "$OUT"/log.txt "$OUT"/stage[1-4]-* "$OUT"/.*.tmp
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!

# The working tree's code runs, never an installed copy: the carried tgi-server and
# tgi-backend-cuda wheels only give the metadata (the tgi.backends entry point).
export PYTHONPATH="$ROOT/backends/cuda:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the kernels run compiled on the GPU; the dry run asks for the interpreter where it wants it
unset TRITON_INTERPRET
FAILED=0

summary() {
    echo "$*" | tee -a "$OUT/summary.txt"
}

# run_stage N LIMIT_S COMMAND...: the command under `timeout`, its outcome in summary.txt
run_stage() {
    local stage="$1" limit="$2" started="$SECONDS" rc status
    shift 2
    echo "=== stage $stage (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@"
    rc=$?
    case "$rc" in
        0) status="passed" ;;
        124 | 137) status="timeout" ;;
        *) status="failed" ;;
    esac
    [[ $status == passed ]] || FAILED=1
    summary "stage $stage: $status (exit $rc, $((SECONDS - started)) s of $limit s)"
}

stage1() {
    local env_file="$OUT/stage1-env.txt" wheels
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    {
        echo "# nvidia-smi"
        timeout 15 nvidia-smi || echo "nvidia-smi failed"
        echo "# python"
        "$PYTHON" -c 'import sys, torch; print(sys.executable, sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    } >"$env_file" 2>&1
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in $WHEELS: run make gpu-wheels here and carry .cache/gpu-wheels" | tee -a "$env_file"
        return 1
    fi
    local rc=0
    {
        echo "# pip install ${#wheels[@]} wheels from $WHEELS"
        # --no-deps: everything else comes with the image; fetch_wheels.sh checked that
        "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
            --force-reinstall --disable-pip-version-check "${wheels[@]}" ||
            "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
                --force-reinstall --disable-pip-version-check --break-system-packages "${wheels[@]}"
    } >>"$env_file" 2>&1 || rc=1
    {
        echo "# imports"
        "$PYTHON" -c 'import fastapi, pydantic, uvicorn, msgspec, llguidance, gguf, tgi.server.app, tgi_backend_cuda.backend, tgi_backend_cuda.attention as a; from importlib.metadata import entry_points; print("tgi.backends:", sorted(e.name for e in entry_points(group="tgi.backends"))); print("attention here:", a.available_attention("cuda"))'
    } >>"$env_file" 2>&1 || rc=1
    {
        echo "# pip list"
        "$PYTHON" -m pip list --disable-pip-version-check
    } >>"$env_file" 2>&1
    grep -A3 -E "^# (python|imports)" "$env_file"
    return "$rc"
}

echo "gpu-check: dry run $DRY_RUN, python $PYTHON, results in $OUT"
if [[ $DRY_RUN == 1 ]]; then
    summary "stage 1: skipped (dry run)"
else
    export -f stage1
    export OUT WHEELS PYTHON
    run_stage 1 "$STAGE1_S" bash -c stage1
fi

CHECK=("$PYTHON" -m tgi_backend_cuda.gpu_check --out "$OUT")
INTERPRET=()
if [[ $DRY_RUN == 1 ]]; then
    CHECK+=(--dry-run)
    # parity runs the Triton kernels too, in the interpreter (the CPU test mode)
    INTERPRET=(env TRITON_INTERPRET=1)
fi
# pytest gets the stage's limit less the time to start and to write the summary
run_stage 2 "$STAGE2_S" "${CHECK[@]}" --stage 2 --budget-s "$((STAGE2_S > 20 ? STAGE2_S - 10 : STAGE2_S))"
run_stage 3 "$STAGE3_S" "${INTERPRET[@]}" "${CHECK[@]}" --stage 3
# BENCH_ARGS narrows stage 4, e.g. "--shapes 1b --streams 1,32" (python -m ... --help)
read -r -a BENCH <<<"${BENCH_ARGS:-}"
run_stage 4 "$STAGE4_S" "${CHECK[@]}" --stage 4 "${BENCH[@]}"

rm -f "$OUT"/.*.tmp
echo "=== summary"
cat "$OUT/summary.txt"
[[ -f "$OUT/stage4-bench.md" ]] && cat "$OUT/stage4-bench.md"
# let tee write the last lines to log.txt before the call collects $OUT
exec >&- 2>&-
wait "$TEE_PID"
exit "$FAILED"
