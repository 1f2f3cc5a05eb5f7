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
cmake_args="-DGGML_NATIVE=ON"
if [ "$amx_usable" = "no" ]; then
    wheels="$wheels/no-amx"
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # explicit -mno- flags outrank -march=native
    cmake_args="$cmake_args -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
fi
mkdir -p "$wheels"
wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    # GGML_NATIVE: kernels for this machine's CPU (AVX2 / AVX-512 / VNNI), as a local build should be.
    # --no-cache-dir: pip would otherwise reuse a wheel it built from the same sdist with other flags.
    CMAKE_ARGS="$cmake_args" "$python" -m pip wheel --no-cache-dir --no-deps -w "$wheels" "llama-cpp-python==$version"
    wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl | head -n 1)"
fi
# --force-reinstall: an installed build of the same version may be the other one (with or without AMX)
"$python" -m pip install --force-reinstall --no-deps "$wheel"
# and its dependencies (diskcache, jinja2, numpy), which --no-deps left out
"$python" -m pip install "$wheel" "gguf>=0.19,<1"
echo "$wheel"
