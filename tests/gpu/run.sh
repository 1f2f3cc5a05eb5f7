#!/usr/bin/env bash
# The generation benchmark on a machine with an NVIDIA GPU: vLLM (the CUDA build) against the worker's
# local engine on CUDA, both in bf16, plus sequential peft, at 64 channels x 8 personas with adapters.
#
#   tests/gpu/run.sh [MODEL_DIR]
#
# MODEL_DIR: a Hugging Face model folder (default: $PERSONABOT_MODEL__PATH, else the pulled default model
# under ./.personabot, pulled now when missing). What it does, in order:
#   1. checks that nvidia-smi sees a GPU;
#   2. creates .venv (personabot with the CUDA torch build) when it has no CUDA torch;
#   3. creates a separate environment with the CUDA vllm build (~/.cache/personabot/vllm-cuda-venv),
#      since vllm pins its own torch;
#   4. runs tests/bench/bench_generation.py --only serving: 8 random LoRA adapters (rank 16) are made,
#      vLLM serves the base model with all 8 (--max-loras 8, runtime loading, as the worker loads them),
#      64 greedy jobs of 64 new tokens go through the local engine, vLLM and sequential peft; one table
#      (tokens/s, x vs sequential, median time to first token, replies equal to peft's) and a JSON file.
# Nothing is left running: the bench starts the vLLM server and kills its process group when done.
set -euo pipefail
cd "$(dirname "$0")/../.."

JOBS=${JOBS:-64}
PERSONAS=${PERSONAS:-8}
NEW_TOKENS=${NEW_TOKENS:-64}
ROUNDS=${ROUNDS:-3}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
VLLM_VENV=${VLLM_VENV:-$HOME/.cache/personabot/vllm-cuda-venv}
OUT=${OUT:-tests/bench/results/bench_generation_gpu.json}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L | grep -q GPU; then
    echo "tests/gpu/run.sh: no NVIDIA GPU here (nvidia-smi sees none)" >&2
    exit 2
fi
nvidia-smi -L

# 2. personabot with a CUDA torch.
if ! .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch   # the default PyPI wheel is the CUDA build on Linux x86_64
    .venv/bin/pip install -q -e '.[dev]'
fi
.venv/bin/python -c 'import torch; print("personabot torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

# 3. vLLM (CUDA) in its own environment.
if ! "$VLLM_VENV/bin/python" -c 'import vllm' 2>/dev/null; then
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q --upgrade pip
    "$VLLM_VENV/bin/pip" install -q "vllm==$VLLM_VERSION"
fi
"$VLLM_VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)'

# The base model.
MODEL=${1:-${PERSONABOT_MODEL__PATH:-}}
if [ -z "$MODEL" ]; then
    MODEL=.personabot/models/SmolLM2-135M-Instruct
    [ -f "$MODEL/config.json" ] || .venv/bin/personabot model pull
fi
echo "model: $MODEL"

# 4. One run, one table.
.venv/bin/python tests/bench/bench_generation.py --only serving \
    --model "$MODEL" --device cuda --dtype bfloat16 \
    --jobs "$JOBS" --personas "$PERSONAS" --new-tokens "$NEW_TOKENS" --rounds "$ROUNDS" \
    --vllm-venv "$VLLM_VENV" --json "$OUT"
