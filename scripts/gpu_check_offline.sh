#!/usr/bin/env bash
# The GPU check on a lent machine that reaches no package registry: Python 3.12 with a CUDA build of
# torch, Triton, transformers, peft, safetensors and accelerate preinstalled, the working tree copied
# over with the ignored gpu_bundle/ folder (built beforehand by `make gpu-bundle`).
#
#   bash scripts/gpu_check_offline.sh --report-dir DIR [--dry-run] [--bundle DIR] [--stages a,b]
#
# 1. installs the bundle's wheels into a fresh temporary folder (pip --no-index, the bundled pip) and
#    copies fastgrpo there as pyproject.toml maps it (kernels/ -> fastgrpo.kernels);
# 2. runs `python -m fastgrpo.perf.gpu_check` with that folder on PYTHONPATH: the stages, each with
#    its own time limit, and DIR/report.md (see that module).
# --dry-run (no GPU needed): the same install, then the plan and the import checks, under an import
# guard that admits only the GPU image's packages and the bundle's. PYTHON selects the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

BUNDLE=gpu_bundle
REPORT=""
DRY_RUN=()
PASS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --report-dir) REPORT="$2"; shift 2 ;;
        --bundle) BUNDLE="$2"; shift 2 ;;
        --dry-run) DRY_RUN=(--dry-run); shift ;;
        --stages|--total-limit-s) PASS+=("$1" "$2"); shift 2 ;;
        *) echo "gpu_check_offline.sh: unknown argument '$1'; valid: --report-dir DIR, --bundle DIR, --dry-run, --stages LIST, --total-limit-s S" >&2; exit 2 ;;
    esac
done
if [ -z "$REPORT" ]; then
    echo "gpu_check_offline.sh: --report-dir DIR is required (the report and the logs go there)" >&2
    exit 2
fi
PYTHON="${PYTHON:-python3}"
mkdir -p "$REPORT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastgrpo-offline.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

started=$(date +%s)
echo "gpu_check_offline.sh: installing $BUNDLE into $WORK/site (no index)"
# -P: the repository root must not go on sys.path (kernels/ would pass for Hugging Face's package).
if ! "$PYTHON" -P scripts/gpu_bundle.py install --bundle "$BUNDLE" --target "$WORK/site" --cache "$WORK/cache" \
        > "$REPORT/install.log" 2>&1; then
    tail -n 20 "$REPORT/install.log" >&2
    printf '# fastgrpo GPU check\n\n| stage | result |\n|---|---|\n| install the bundle (%s) | FAILED: see install.log |\n' \
        "$BUNDLE" > "$REPORT/report.md"
    exit 1
fi
cat "$REPORT/install.log"

export PYTHONPATH="$WORK/site" PYTHONSAFEPATH=1 FASTGRPO_CACHE="$WORK/cache" FASTGRPO_GPU_BUNDLE="$BUNDLE"
if [ ${#DRY_RUN[@]} -gt 0 ]; then
    "$PYTHON" -P scripts/gpu_bundle.py guard --out "$WORK/guard" > /dev/null || exit 1
    export PYTHONPATH="$WORK/site:$WORK/guard"
fi
"$PYTHON" -m fastgrpo.perf.gpu_check --report-dir "$REPORT" --spent-s "$(( $(date +%s) - started ))" \
    "${DRY_RUN[@]}" "${PASS[@]}"
