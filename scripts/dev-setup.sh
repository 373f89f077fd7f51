#!/usr/bin/env bash
# Everything the test suite needs: the package with its dev extras, and Debian's Chromium for the
# web page's browser test (Playwright drives /usr/bin/chromium; no browser download).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    if command -v apt-get >/dev/null 2>&1; then
        echo "dev-setup: installing Debian's chromium for the browser test" >&2
        $SUDO apt-get update -qq >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || echo "dev-setup: could not install chromium; the browser test will be skipped" >&2
    else
        echo "dev-setup: no apt-get here; install Chromium yourself to run the browser test" >&2
    fi
fi
pip install -q -e '.[dev]'
