#!/usr/bin/env bash
# Debian packages the full test suite uses (run as root; skipped otherwise):
#   chromium            - the report is opened in a real headless browser
#   g++-aarch64-linux-gnu, qemu-user - cross-compiling for the Raspberry Pi / Jetson host targets
#   openssh-server/client - the ssh-ort backend is tested against a real sshd on 127.0.0.1
#   postgresql          - many workers on one PostgreSQL-backed study
set -euo pipefail
pkgs=(chromium g++-aarch64-linux-gnu qemu-user openssh-server openssh-client postgresql)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install-system-deps: not root or no apt-get; tests needing ${missing[*]} will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
