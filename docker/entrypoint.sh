#!/bin/sh
# Container entrypoint: build the embedded default index if missing, then exec the server as PID 1.
set -eu
INDEX="${CITEQA_INDEX:-/app/index/default}"
if [ ! -f "$INDEX/manifest.json" ]; then
    citeqa index build /app/index/corpus --out "$INDEX"
fi
exec citeqa serve --index "$INDEX" --host "${CITEQA_HOST:-0.0.0.0}" --port "${CITEQA_PORT:-8000}"
