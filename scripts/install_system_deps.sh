#!/usr/bin/env bash
# Install the Debian packages the tests need: bash scripts/install_system_deps.sh
# git + git-lfs (model repos over file://, as OpenXLab serves them over https), Chromium for the browser test and
# CJK fonts so Chinese renders in screenshots, curl for the /v1 API test. Skips what is already there; needs root
# (or sudo).
set -euo pipefail
need=()
command -v git >/dev/null || need+=(git)
git lfs version >/dev/null 2>&1 || need+=(git-lfs)
[ -x /usr/bin/chromium ] || need+=(chromium)
fc-list 2>/dev/null | grep -qi "Noto Sans CJK" || need+=(fonts-noto-cjk)
command -v curl >/dev/null || need+=(curl)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${need[*]}"
# Retries: a mirror that drops one download must not fail the whole install (apt's default is none).
apt=(apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=5)
$sudo "${apt[@]}" update -qq
DEBIAN_FRONTEND=noninteractive $sudo "${apt[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
