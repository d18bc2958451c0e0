#!/usr/bin/env bash
# Install the Debian/Ubuntu packages whisperd needs, when missing. As root this runs apt-get;
# otherwise it prints the exact command to run and fails, rather than half-installing.
set -euo pipefail

present() {
  case "$1" in
    ffmpeg) command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null ;;
    python3-venv) python3 -c 'import ensurepip, venv' 2>/dev/null ;;
    systemd) command -v systemd-analyze >/dev/null ;;
    procps) [ -x /bin/kill ] ;;  # `command -v kill` would find the shell builtin
    util-linux) command -v prlimit >/dev/null && command -v ionice >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}

missing=()
for pkg in "$@"; do present "$pkg" || missing+=("$pkg"); done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "whisperd needs these system packages: ${missing[*]}" >&2
  echo "install them with:  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
