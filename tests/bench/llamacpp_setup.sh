#!/usr/bin/env bash
# Build llama-cpp-python once (about 15 minutes on 2 cores) for the llama.cpp columns of
# tests/bench/bench_generation.py, cache the wheel outside the repository, and install it into the
# Python environment given (default: .venv). A cached wheel is reused; CI never runs this.
#
#   tests/bench/llamacpp_setup.sh [PYTHON]
set -euo pipefail
python="${1:-.venv/bin/python}"
version="0.3.36"
wheels="${PERSONABOT_WHEEL_CACHE:-$HOME/.cache/personabot/wheels}"
mkdir -p "$wheels"
wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    # GGML_NATIVE: kernels for this machine's CPU (AVX2 / AVX-512 / VNNI), as a local build should be.
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$python" -m pip wheel --no-deps -w "$wheels" "llama-cpp-python==$version"
    wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl | head -n 1)"
fi
"$python" -m pip install "$wheel" "gguf>=0.19,<1"
echo "$wheel"
