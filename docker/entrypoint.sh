#!/bin/sh
# Container entrypoint.
#   citeqa-entrypoint [EXTRA SERVE ARGS...]  build the default index if missing, then exec
#                                            `citeqa serve` so that it is PID 1 (gets SIGTERM)
#   citeqa-entrypoint healthcheck            exit 0 when /readyz answers 200 (HEALTHCHECK)
# Settings (environment): CITEQA_INDEX, CITEQA_CORPUS, CITEQA_HOST, CITEQA_PORT, CITEQA_PRESET.
set -eu
# The index lives in a folder of the data volume: it is swapped in by renaming its folder,
# which a mount point itself cannot be.
INDEX="${CITEQA_INDEX:-/app/data/default}"
CORPUS="${CITEQA_CORPUS:-/app/index/corpus}"
HOST="${CITEQA_HOST:-0.0.0.0}"
PORT="${CITEQA_PORT:-8000}"
PRESET="${CITEQA_PRESET:-default}"

if [ "${1:-}" = "healthcheck" ]; then
    exec curl -fsS --max-time 4 -o /dev/null "http://127.0.0.1:${PORT}/readyz"
fi

# --if-missing: an index a crash left mid-swap (its backup beside it) is restored with the
# documents added to it over REST, not rebuilt from the corpus
if [ ! -f "$INDEX/manifest.json" ]; then
    echo "citeqa-entrypoint: no index at $INDEX; restoring it or building it from $CORPUS" >&2
    # in the background, so that this shell (PID 1, which ignores signals it does not trap)
    # hands a `docker stop` to the build instead of waiting to be killed
    citeqa index build "$CORPUS" --out "$INDEX" --preset "$PRESET" --if-missing &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
    status=0
    wait "$child" || status=$?
    if [ "$status" -gt 128 ] && kill -0 "$child" 2>/dev/null; then  # the trap woke us: reap it
        wait "$child" || status=$?
    fi
    trap - TERM INT
    [ "$status" -eq 0 ] || exit "$status"
fi
exec citeqa serve --index "$INDEX" --host "$HOST" --port "$PORT" --preset "$PRESET" "$@"
