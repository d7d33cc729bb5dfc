#!/usr/bin/env bash
# GPU smoke test: the zoo tier (tests/zoo: every stage on random-init stand-ins of GPT-NeoX, Llama 2, Qwen2 chat
# and GPT-2, on local files in every supported format) in bfloat16 on CUDA. Run it wherever a GPU is at hand:
#
#     bash scripts/gpu_smoke.sh            # sets up .venv like `make test`, then ~3 minutes
#     bash scripts/gpu_smoke.sh -k qwen2   # extra arguments go to pytest
#
# It fails at once when torch sees no CUDA device (the CPU run of the same tier is part of `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
.venv/bin/python - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_smoke.sh: torch sees no CUDA device; run it on a GPU machine (make test covers the CPU)")
name = torch.cuda.get_device_name(0)
print(f"gpu_smoke: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
PY
ZOO_DTYPE=bfloat16 .venv/bin/python -m pytest -q -ra --durations=10 tests/zoo "$@"
