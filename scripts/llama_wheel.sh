#!/usr/bin/env bash
# llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) for the endpoint tests and
# benchmarks (tests/endpoints/, bench/bench_endpoint.py). PyPI ships it as an sdist that compiles
# llama.cpp; the default native build uses the AVX-512/AMX instructions these VMs' CPUs report and
# segfaults on the first evaluation, so it is built once per machine with a portable instruction
# set, the wheel cached under ~/.cache/rev-farm/wheels and reused (about 7 minutes on 2 cores,
# then seconds). Its server dependencies come from requirements.lock.
#
# Under CI=true a failure is loud and fatal (exit 1); locally it warns and the endpoint tests skip
# with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
PY=${PY:-.venv/bin/python}
WHEELS=${REV_WHEEL_CACHE:-$HOME/.cache/rev-farm/wheels}
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

fail() {
    if [ "${CI:-}" = "true" ]; then
        echo "llama_wheel.sh: ERROR: $*" >&2
        exit 1
    fi
    echo "llama_wheel.sh: warning: $* (the endpoint tests will skip)" >&2
    exit 0
}

# llama.cpp's own HF -> GGUF converter (rev_tasks/testing/ggufs.py), from the same sdist: the
# wheel does not ship it.
SRC=${REV_LLAMA_SRC:-$HOME/.cache/rev-farm/llama-src-$VERSION}
if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
    tmp=$(mktemp -d)
    if "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$VERSION" \
        && tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"; then
        root="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
        mkdir -p "$SRC.tmp" && cp -r "$root/convert_hf_to_gguf.py" "$root/conversion" "$root/gguf-py" "$SRC.tmp/" \
            && rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
    fi
    rm -rf "$tmp"
    [ -f "$SRC/convert_hf_to_gguf.py" ] || fail "could not unpack llama.cpp's convert_hf_to_gguf.py into $SRC"
fi

if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    exit 0
fi

mkdir -p "$WHEELS"
wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1)
if [ -z "$wheel" ]; then
    echo "llama_wheel.sh: building llama-cpp-python $VERSION (portable CPU build, several minutes)"
    nice -n 10 "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python \
        -w "$WHEELS" "llama-cpp-python==$VERSION" || fail "building llama-cpp-python $VERSION failed"
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1)
    [ -n "$wheel" ] || fail "no wheel for llama-cpp-python $VERSION in $WHEELS"
fi

# The wheel itself without resolving (its pins are loose), then its runtime and server
# dependencies at the lock file's versions.
"$PY" -m pip install -q --no-deps "$wheel" || fail "installing $wheel failed"
"$PY" -m pip install -q -c requirements.lock \
    diskcache jinja2 uvicorn fastapi pydantic-settings sse-starlette starlette-context \
    || fail "installing llama-cpp-python's server dependencies failed"
"$PY" -c "import llama_cpp.server.app" || fail "llama_cpp.server does not import"
echo "llama_wheel.sh: llama-cpp-python $VERSION installed from $wheel"
