#!/usr/bin/env bash
# The one entrypoint of every tgi image: launcher flags and TGI's environment variables
# (MODEL_ID, PORT, MAX_TOTAL_TOKENS, ...) pass straight to `tgi serve`.
set -euo pipefail
if [[ "${1:-}" == "tgi" ]]; then
    shift
    exec tgi "$@"
fi
exec tgi serve "$@"
