#!/usr/bin/env bash
# fedclip-lightning launcher.
#
#   ./launch.sh [key=value ...]
#
# Runs on every visible GPU of this machine (one process per GPU, NCCL), or
# one CPU process when there is none; any Hydra override passes through, e.g.
#   ./launch.sh experiment=pacs_paper data.root=/data/PACS
#   ./launch.sh fabric.devices=2            # two CPU processes (gloo)
# A `fabric=...` or `fabric.*` override you give wins over the detection.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if command -v fedclip-lightning >/dev/null 2>&1; then
  cmd=(fedclip-lightning)
else
  cmd=(python3 -m fedclip_lightning)
  export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}"
fi

fabric=()
if ! printf '%s\n' "$@" | grep -q '^fabric[.=]'; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l || echo 0)
  fi
  if [ "$gpus" -gt 0 ]; then
    fabric=(fabric=gpu)
    echo "launch.sh: $gpus GPU(s) visible: one process per GPU" >&2
  else
    fabric=(fabric=cpu)
    echo "launch.sh: no GPU visible: CPU" >&2
  fi
fi

exec "${cmd[@]}" "${fabric[@]}" "$@"
