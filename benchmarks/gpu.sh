#!/usr/bin/env bash
# One GPU machine's figures for lmkit, as one JSON object on stdout (and in OUT/gpu_check.json); about 8 minutes
# on one H200 (torch compile included): training tokens/s and MFU of the tinystories15m shape and a 110 M llama
# in bf16 with torch.compile, 2-process DDP and FSDP tokens/s where there are 2+ GPUs, and a 3-minute
# `lmkit train tinystories15m` on the text of --data with its val bits per byte. See benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu.sh --data path/to/tinystories_train_head.txt [--out DIR] [--train-minutes 3]
#   bash benchmarks/gpu.sh --dry [--data FILE]     # the same code paths on the CPU, tiny shapes, seconds
#
# The machine needs lmkit's runtime packages beside torch (numpy, typer, rich, safetensors, sentencepiece,
# tomli-w). With no package registry there, put their wheels in .whl/ at the repository root: they are installed
# into a temporary folder first (env "missing_packages" in the JSON names any still missing).
# PYTHON overrides the interpreter (default: .venv/bin/python when there is one, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
if compgen -G "$root/.whl/*.whl" > /dev/null; then
  site="$(mktemp -d)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.whl/*.whl >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$root"
exec "$py" benchmarks/gpu_check.py "$@"
