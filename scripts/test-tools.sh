#!/usr/bin/env bash
# Installs the Debian programs the tests drive: promtool (package prometheus) checks the /metrics exposition;
# headless Chromium and ChromeDriver (packages chromium, chromium-driver) drive the dashboard.
# Needs root (as CI runs) or passwordless sudo; does nothing when they are already there.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y --no-install-recommends "${need[@]}" >&2 \
  || { $sudo apt-get update >&2 && $sudo apt-get install -y --no-install-recommends "${need[@]}" >&2; }
