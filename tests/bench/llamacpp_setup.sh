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
# A CPU can list AMX while the kernel under it (a VM's) does not give processes the tile state: AMX
# code then dies of SIGILL (seen in llama.cpp's prefill). The kernel says which state it supports.
amx_usable="$("$python" - <<'PY'
import ctypes, platform
if platform.machine() != "x86_64" or "amx_tile" not in open("/proc/cpuinfo").read():
    print("n/a")
else:
    supported = ctypes.c_uint64(0)  # arch_prctl(ARCH_GET_XCOMP_SUPP): the XSAVE features usable
    ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(supported))
    print("yes" if supported.value >> 18 & 1 else "no")  # bit 18: XTILEDATA
PY
)"
if [ "$amx_usable" = "no" ]; then
    wheels="$wheels/no-amx"
    export CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
mkdir -p "$wheels"
wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    # GGML_NATIVE: kernels for this machine's CPU (AVX2 / AVX-512 / VNNI), as a local build should be.
    CMAKE_ARGS="-DGGML_NATIVE=ON" "$python" -m pip wheel --no-deps -w "$wheels" "llama-cpp-python==$version"
    wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl | head -n 1)"
fi
"$python" -m pip install "$wheel" "gguf>=0.19,<1"
echo "$wheel"
