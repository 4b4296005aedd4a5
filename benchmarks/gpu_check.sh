#!/usr/bin/env bash
# The GPU checks of docs/PERFORMANCE.md, under 10 minutes, for a session lent a GPU:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=["data/processed/yahoo"], timeout_s=600)
#
# It installs nothing beyond ubo_core's own dependencies (torch, numpy, pandas, pyyaml, tqdm,
# rich), uses the processed Yahoo! R3 set carried with the working tree, and writes
# gpu_check.json (into $OUT when the device tool sets it). Then copy its lines into
# PERFORMANCE.md's GPU rows, and run the full study on the GPU if time is left.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import torch, numpy, pandas, yaml, tqdm, rich' 2>/dev/null ||
  python3 -m pip install --quiet torch==2.13.0 numpy pandas pyyaml tqdm rich
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
test -f data/processed/yahoo/dataset.npz || {
  echo "error: data/processed/yahoo/dataset.npz missing: carry data/processed/yahoo" >&2
  exit 1
}
out="${OUT:-.}/gpu_check.json"
timeout 540 python3 benchmarks/gpu_check.py --out "$out" "$@"
echo "wrote $out"
