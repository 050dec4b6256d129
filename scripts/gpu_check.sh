#!/usr/bin/env bash
# GPU acceptance check of siglip2-navit, runnable on a fresh CUDA machine (about 8 minutes on an H100):
#   1. a virtualenv with torch (the one already installed, else torch==$TORCH_VERSION) and `.[dev]`, plus flash-attn
#      when a prebuilt wheel installs (never compiled here: it is skipped otherwise, and every check runs without it)
#   2. `pytest -m gpu`: the tests that need CUDA (varlen kernels, bf16 training step, sync-free layer loop, ...)
#   3. backend equality on CUDA, bf16: flash-attn varlen vs sdpa (torch's varlen kernel) vs eager, same weights and
#      packed batch, each against an fp32 eager forward (min per-token cosine, max abs difference)
#   4. `navit-benchmark --device cuda`: bf16 MFU (fraction of the measured bf16 matmul peak), packed vs the
#      sync-per-layer design (target ≥ 1.3×), flash-attn vs torch's varlen kernel
# Everything it writes goes under $OUT (default: out/gpu_check): gpu_check.md (the summary: one line per step with
# its status and time, then the backend table and the benchmark report), gpu_check.log, pytest_gpu.xml,
# backends.json, benchmark/.
#
#   bash scripts/gpu_check.sh              # run it
#   bash scripts/gpu_check.sh --dry-run    # print the steps and write the summary skeleton; installs and runs nothing
# Environment: OUT, GPU_CHECK_VENV (default .venv-gpu), TORCH_VERSION (default 2.13.0), PYTHON (default python3).
set -uo pipefail

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$ROOT/out/gpu_check}
VENV=${GPU_CHECK_VENV:-$ROOT/.venv-gpu}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/gpu_check.md
: >"$LOG"
printf '# GPU check (%s)\n\n| step | status | seconds |\n|---|---|---|\n' "$(date -u +%Y-%m-%dT%H:%MZ)" >"$SUMMARY"
FAILED=0

# step NAME TIMEOUT_S COMMAND...: run COMMAND (with a time limit), log its output, add its row to the summary.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  if ((DRY_RUN)); then
    echo "| $name | dry run: \`$*\` | 0 |" >>"$SUMMARY"
    return 0
  fi
  local start=$SECONDS status
  timeout "$limit" bash -c '"$@"' step "$@" >>"$LOG" 2>&1  # a child bash: the exported functions below run too
  status=$?
  local took=$((SECONDS - start)) verdict=ok
  if ((status == 124)); then verdict="timed out"; elif ((status != 0)); then verdict="failed (exit $status)"; fi
  echo "| $name | $verdict | $took |" >>"$SUMMARY"
  echo "   -> $verdict in $took s" | tee -a "$LOG"
  [[ $verdict == ok ]] || FAILED=1
  return "$status"
}

make_venv() {
  # Reuse a torch that is already installed (a GPU image ships one built for its CUDA); else install the pinned one.
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages "$VENV" || return
  else
    "$PYTHON" -m venv "$VENV" && "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" || return
  fi
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
}

install_flash_attn() {
  # Prebuilt wheels only: compiling flash-attn takes far longer than this whole check.
  if "$VENV/bin/pip" install -q --only-binary=:all: flash-attn; then
    echo "flash-attn installed"
  else
    echo "no flash-attn wheel for this torch / CUDA / Python: the flash contenders are skipped"
  fi
}

backend_equality() {
  "$VENV/bin/python" - "$OUT_DIR/backends.json" <<'PY'
"""flash-attn varlen vs sdpa vs eager on CUDA in bf16, each against an fp32 eager forward of the same weights."""
import copy, importlib.util, json, sys
import torch, torch.nn.functional as F
from siglip2_navit.tools import benchmark as b

torch.manual_seed(0)  # so400m widths, 4 layers, 2D RoPE (the shipped Ovis2.5 settings), 3 mixed images
fp32 = b.Siglip2NavitModel(b.navit_config(b.SO400M, naflex_equivalent=False, layers=4)).eval().cuda()
half = copy.deepcopy(fp32).to(torch.bfloat16)
pixel_values, grid_thws = b.make_inputs(b.workloads(True)[0])
with torch.inference_mode():
    fp32.config._attn_implementation = "eager"
    reference = fp32(pixel_values.cuda(), grid_thws).last_hidden_state.float()
    backends = ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    outputs, rows = {}, {}
    for name in backends:
        half.config._attn_implementation = name
        outputs[name] = half(pixel_values.cuda().bfloat16(), grid_thws).last_hidden_state.float()
        rows[name] = {"min_token_cosine_vs_fp32": float(F.cosine_similarity(outputs[name], reference, dim=-1).min()),
                      "max_abs_diff_vs_fp32": float((outputs[name] - reference).abs().max()),
                      "max_abs_diff_vs_bf16_eager": float((outputs[name] - outputs["eager"]).abs().max())}
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": int(grid_thws.prod(1).sum()),
           "backends": rows}, open(sys.argv[1], "w"), indent=1)
print(json.dumps(rows, indent=1))
bad = [n for n, r in rows.items() if r["min_token_cosine_vs_fp32"] < 0.999]
sys.exit(f"min per-token cosine vs fp32 below 0.999: {bad}" if bad else 0)
PY
}

export ROOT OUT_DIR VENV TORCH_VERSION PYTHON
export -f make_venv install_flash_attn backend_equality

step "environment: nvidia-smi" 30 nvidia-smi
step "virtualenv: torch + .[dev]" 420 make_venv
step "flash-attn (prebuilt wheel, else skipped)" 120 install_flash_attn
step "pytest -m gpu" 240 "$VENV/bin/python" -m pytest -q -m gpu "$ROOT/tests" --junitxml="$OUT_DIR/pytest_gpu.xml"
step "backend equality: flash varlen vs sdpa vs eager (bf16 vs fp32)" 120 backend_equality
step "navit-benchmark --device cuda (bf16)" 300 "$VENV/bin/navit-benchmark" --device cuda --dtype bf16 --repeats 3 \
  --out "$OUT_DIR/benchmark"

if ((!DRY_RUN)); then
  {
    echo
    [[ -f $OUT_DIR/backends.json ]] && printf '## Backends (bf16 vs fp32 eager)\n\n```json\n%s\n```\n\n' "$(cat "$OUT_DIR/backends.json")"
    [[ -f $OUT_DIR/benchmark/benchmark.md ]] && cat "$OUT_DIR/benchmark/benchmark.md"
  } >>"$SUMMARY"
fi
echo "summary: $SUMMARY"
exit "$FAILED"
