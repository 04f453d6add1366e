#!/usr/bin/env bash
# One-GPU check: ViT-B/16 @224, bf16, batch 256, training and inference images/s,
# MFU against the device's bf16 peak and peak device memory, for ours (XLA and
# cuDNN attention, the default remat policy) and timm (eager and torch.compile),
# all from one run of benchmarks/benchmark.py, printed as one table.
# Needs no TensorFlow. About 5 minutes on an H100-class GPU.
#
#   bash benchmarks/gpu_check.sh             # run it (writes gpu_check.json)
#   bash benchmarks/gpu_check.sh --dry-run   # print the command only
set -euo pipefail
cd "$(dirname "$0")/.."

json=gpu_check.json
dry_run=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --json=*) json="${arg#--json=}" ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (use --dry-run, --json=FILE)" >&2; exit 2 ;;
  esac
done

cmd=(python benchmarks/benchmark.py --models ViT-B_16@224 --batch-size 256 --dtypes bf16
     --modes infer,train --no-scaling --repeats 5 --min-repeat-seconds 2
     --attention xla --xla-variants "attention=cudnn"
     --timm-variants eager,compiled --table contenders --json "$json")

if [[ $dry_run == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
