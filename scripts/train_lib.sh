# Sourced by scripts/train_<set>_checkpoints.sh: `run STEP ARGS...` trains (or resumes) one network of the set unless
# STEP selects another. Needs PY, W (checkpoint folder), STATE (training states) and COMMON (shared train flags).
run() {
  local step=$1; shift
  if [[ -n "${STEP:-}" && "${STEP}" != "$step" ]]; then return; fi
  local state="$STATE/$step" latest
  latest=$(ls -d "$state"/iter-* 2>/dev/null | sort | tail -n 1 || true)
  echo "+ $step${latest:+ (resuming from $latest)}"
  $PY -m autoguidance.cli train --out "$W/$step" "$@" $COMMON --state-dir "$state" ${latest:+--resume "$latest"}
}
