#!/usr/bin/env bash
# GPU check (issue #16): every path (training-free segment with SAM ViT-B, SAM 2.1 tiny and
# EdgeTAM; the FC-CLIP proposer; db build) in fp32 and bf16 autocast (--precision) and at batch
# 1 and 4 (--batch-size), printing images/s and peak GPU memory per stage. Real-size
# random-weight models (bench/models.py), no downloads; the first run builds them under
# ~/.cache/retclip-bench/real (or $RETCLIP_BENCH_MODELS). Under 8 minutes on one GPU. Extra
# arguments go to bench/gpu_check.py (e.g. --images 16, --paths "db build"); --quick is its CPU
# dry run on tiny models and needs no GPU. It runs $PYTHON if set, else the project's .venv
# (what `make test` creates) if there is one, else the python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
if ! "$PYTHON" -c 'import torch, retclip' 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import torch and retclip; install the project (README: make test, or pip install -e '.[all]') or set PYTHON to an interpreter that has them" >&2
    exit 2
fi
quick=0
for argument in "$@"; do
    [[ "$argument" == "--quick" ]] && quick=1
done
if [[ $quick == 0 ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False); run it on a GPU machine (or pass --quick for the CPU dry run)" >&2
    exit 2
fi
exec timeout 480 "$PYTHON" -m bench.gpu_check --repeats 1 "$@"
