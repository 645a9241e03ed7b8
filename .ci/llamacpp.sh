#!/usr/bin/env bash
# Prints the Python of a venv holding llama-cpp-python built for this CPU, building it once
# (about 7 minutes) with ../shared/llamacpp/setup.sh into ~/.cache/greater, keyed by the
# instruction sets the CPU reports: machines of this kind differ, and a build for a set the
# CPU lacks dies at its first call. Prints nothing when the setup script is not beside the
# project; the Python test that needs it then says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
setup=../shared/llamacpp/setup.sh
[ -f "$setup" ] || exit 0
isa=$(grep -o -w 'avx[a-z0-9_]*\|fma\|f16c\|bmi2' /proc/cpuinfo | sort -u | tr '\n' ' ')
key=$( (sha256sum "$setup"; echo "$isa") | sha256sum | cut -c1-16)
venv=${XDG_CACHE_HOME:-$HOME/.cache}/greater/llamacpp-$key
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null; then
    rm -rf "$venv"
    LLAMACPP_VENV="$venv" bash "$setup" >&2
fi
echo "$venv/bin/python"
