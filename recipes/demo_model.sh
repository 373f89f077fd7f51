#!/usr/bin/env bash
# Rebuild the built-in demo chat model (src/chatforge/demo/) from scratch on CPU.
# Installs what the recipe needs (Debian text packages, pyyaml, the chatterbot-corpus wheel),
# then trains: about 10 minutes on 2 idle cores (30-45 on a busy machine). Extra arguments go to
# recipes/demo_model.py (e.g. --work DIR, --no-export).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e . -r recipes/requirements-demo.txt
exec python recipes/demo_model.py "$@"
