#!/usr/bin/env bash
# The first hour on a GPU, in under 8 minutes: installs lmjax[gpu] into a venv (or uses one),
# then runs `lmjax doctor`, `lmjax smoke --expect-platform gpu`, the attention kernels
# compiled and compared with the XLA path on the device (values and gradients; head_dim 64
# and 128, float32 and bfloat16, causal and packed: python -m lmjax.tools.attention_check),
# and `lmjax bench` of bench_512 and llama_1b in bfloat16 (MFU against the chip's peak in
# lmjax/hardware.py). Everything they print goes into ONE markdown report.
#
#   scripts/device_check.sh [--dry-run] [--venv DIR] [--wheels DIR] [--report FILE]
#                           [--workdir DIR] [--budget-s 480]
#
# --venv DIR    use DIR/bin/python (lmjax installed in it) instead of installing
# --wheels DIR  install from wheels in DIR only, no index (a machine without network); made
#               where there is one: pip wheel -w DIR '.[gpu]' setuptools wheel
# --dry-run     on a CPU machine: the same commands at tiny sizes, the kernels in the Pallas
#               interpreter; the steps that need a GPU are listed as skipped in the report.
#               doctor's and smoke's `devices` check fails there by design (no GPU): a dry
#               step passes when that is its only failed check.
# Each step runs under `timeout` within the budget (default 480 s from the start, install
# included); a step that would start with under 20 s left is skipped and says so.
# Exit 0 when every step passed.
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DRY=0 VENV="" WHEELS="" REPORT="" WORK="" BUDGET=480
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --venv) VENV=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --report) REPORT=$2; shift ;;
    --workdir) WORK=$2; shift ;;
    --budget-s) BUDGET=$2; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
START=$(date +%s)
WORK=${WORK:-$(mktemp -d -t lmjax-device-check-XXXXXX)}
mkdir -p "$WORK"
REPORT=${REPORT:-$WORK/device_check_report.md}
FAILED=() SKIPPED=()

note() { printf '%s\n' "$@" >>"$REPORT"; }

# step NAME LIMIT_S CMD...: runs CMD (stdout and stderr) under `timeout`, appends it to the report.
step() {
  local name=$1 limit=$2 left out code begin; shift 2
  left=$((START + BUDGET - $(date +%s)))
  if ((left < 20)); then
    skip "$name" "out of the ${BUDGET} s budget"
    return
  fi
  ((limit > left)) && limit=$left
  echo "device_check: $name ..." >&2
  out=$WORK/step.out
  begin=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
  code=$?
  note "## $name" "" "\`$*\`" "" "exit $code after $(($(date +%s) - begin)) s (limit $limit s)" ""
  note '```'
  # jax's deprecation warning of the Pallas Triton backend and its source line, once each
  grep -v -e 'DeprecationWarning: The Pallas Triton' -e 'return rule(ctx, \*in_nodes' "$out" >>"$REPORT"
  note '```' ""
  if ((code != 0)) && ((DRY)) && _only_devices_failed "$out"; then
    note "(dry run: only the devices check failed, as it must without a GPU)" ""
  elif ((code != 0)); then
    FAILED+=("$name (exit $code)")
  fi
}

# True when the output's only failed check is `devices`, and it failed for want of a GPU.
_only_devices_failed() {
  [[ $(grep -c '^  \[FAIL\]' "$1") == 1 ]] && grep -q '^  \[FAIL\] devices: .*expected gpu' "$1"
}

skip() {
  note "## $1" "" "SKIPPED: $2" ""
  SKIPPED+=("$1: $2")
}

install() {
  local venv=$WORK/venv spec="$REPO[gpu]"
  if command -v uv >/dev/null; then
    uv venv -q --python 3.12 "$venv" || return 1
    local pip=(uv pip install -q --python "$venv/bin/python")
  else
    python3 -m venv "$venv" || return 1
    local pip=("$venv/bin/pip" install -q)
  fi
  if [[ -n $WHEELS ]]; then
    pip+=(--no-index --find-links "$WHEELS")
  fi
  "${pip[@]}" -e "$spec" || return 1
  VENV=$venv
}

: >"$REPORT"
note "# lmjax device check" ""
note "- started $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); lmjax $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '(no git)')"
if ((DRY)); then
  note "- DRY RUN (no GPU): the real commands at tiny sizes on this machine's devices; the" \
    "  kernels in the Pallas interpreter. Nothing here measures a GPU." ""
fi
if [[ -z $VENV ]]; then
  begin=$(date +%s)
  if install >"$WORK/install.out" 2>&1; then
    note "- installed lmjax[gpu] into $VENV in $(($(date +%s) - begin)) s"
  else
    note "- install FAILED:" '```' "$(tail -20 "$WORK/install.out")" '```'
    echo "device_check: install failed; see $REPORT" >&2
    exit 1
  fi
fi
PY=$VENV/bin/python
note "- python: $PY ($("$PY" --version 2>&1))" ""

if ((DRY)); then
  skip "nvidia-smi" "no GPU (dry run)"
  SMOKE_STEPS=6
  ATTENTION=(--interpret --seq 64 --batch 1 --heads 2 --kv-heads 1 --cases 1)
  TINY=(--set model.n_layers=1 --set data.batch_size=1 --set data.seq_len=128)
  BENCH_512=(--steps 1 "${TINY[@]}")
  # untied: XLA:CPU has no bfloat16 x bfloat16 -> float32 dot for the tied unembedding's
  # backward ("Unsupported element type for DotThunk"); GPUs and TPUs do.
  LLAMA_1B=(--steps 1 "${TINY[@]}" --set model.vocab_size=4096 --set model.d_model=64
    --set model.d_mlp=128 --set model.n_heads=2 --set model.n_kv_heads=1
    --set model.tie_embeddings=false)
else
  step "nvidia-smi" 20 nvidia-smi
  SMOKE_STEPS=20
  ATTENTION=(--seq 1024 --batch 2 --heads 8 --kv-heads 2)
  BENCH_512=(--steps 10)
  # llama_1b's own batch (256 x 8192) does not fit one GPU: 4 rows of its 8192 tokens.
  LLAMA_1B=(--steps 5 --set data.batch_size=4)
fi
export PYTHONUNBUFFERED=1
step "lmjax doctor" 60 "$PY" -m lmjax doctor --workdir "$WORK/smoke" --expect-platform gpu
step "lmjax smoke" 180 "$PY" -m lmjax smoke --steps "$SMOKE_STEPS" --workdir "$WORK/smoke" \
  --expect-platform gpu
step "attention kernels vs XLA" 120 "$PY" -m lmjax.tools.attention_check "${ATTENTION[@]}"
if ((DRY)); then
  skip "attention kernels compiled on the GPU" "no GPU (dry run): ran in the Pallas interpreter, 1 case at seq 64"
fi
# bench_512 under its own remat (save_dots) and full remat, interleaved in one process
step "lmjax bench bench_512 bfloat16" 120 "$PY" -m lmjax bench --experiment bench_512 \
  --set model.dtype=bfloat16 --sweep model.remat=save_dots,full "${BENCH_512[@]}"
step "lmjax bench llama_1b bfloat16" 150 "$PY" -m lmjax bench --experiment llama_1b \
  --set model.dtype=bfloat16 "${LLAMA_1B[@]}"
if ((DRY)); then
  skip "benchmarks at full size" "no GPU (dry run): bench_512 and llama_1b ran with 1 layer, 1 x 128 tokens (llama_1b also at width 64, untied)"
fi

note "## Summary" "" "- finished in $(($(date +%s) - START)) s"
for s in "${SKIPPED[@]}"; do note "- skipped: $s"; done
for f in "${FAILED[@]}"; do note "- FAILED: $f"; done
((${#FAILED[@]})) || note "- every step that ran passed"
echo "device_check: report in $REPORT" >&2
((${#FAILED[@]} == 0))
