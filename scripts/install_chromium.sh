#!/usr/bin/env bash
# Headless Chromium + chromedriver for the end-to-end web test (tests/serve/test_e2e_browser.py).
# Idempotent: does nothing when both are already installed. Debian packages only.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_chromium.sh: chromium is missing and this user cannot run apt-get;" \
             "the browser test will be skipped" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y chromium chromium-driver
