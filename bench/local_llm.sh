#!/usr/bin/env bash
# bench/local_llm.sh - kept for old callers: the local LLM teacher is now part of the package,
#   fusionlog llm start|stop|status [--port N] [--cache-dir DIR]
# (see `fusionlog llm --help`). This passes its arguments through to this checkout's fusionlog.py, run by
# the python3 on PATH (one with numpy and scipy: the project's venv). Same cache folder as before
# ($FUSIONLOG_CACHE or ~/.cache/fusionlog), so a venv and model it built are reused.
set -euo pipefail
exec python3 "$(dirname "$0")/../fusionlog.py" llm "$@"
