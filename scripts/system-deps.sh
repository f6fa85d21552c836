#!/usr/bin/env bash
# System packages the tests need: a headless Chromium to render the assessment report as a
# person's browser would. Installed only when missing, and only where we may (root).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "note: chromium is missing and we are not root; the browser rendering test will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
