#!/usr/bin/env bash
# Installs swtpm (the software TPM 2.0 the keyservice/tpm tests run against)
# and tpm2-tools (used by the tests and the docs to provision TPM keys).
# Idempotent: does nothing when swtpm, swtpm_setup and tpm2_createprimary exist.
# Debian/Ubuntu only; needs root (or sudo) when something is missing.
set -euo pipefail

log() { printf '[install-swtpm] %s\n' "$*" >&2; }

if command -v swtpm >/dev/null && command -v swtpm_setup >/dev/null && command -v tpm2_createprimary >/dev/null; then
  log "swtpm, swtpm_setup and tpm2-tools already present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { log "need root or sudo to apt-get install swtpm swtpm-tools tpm2-tools"; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends swtpm swtpm-tools tpm2-tools >/dev/null
command -v swtpm >/dev/null || { log "installed, but swtpm is not on PATH"; exit 1; }
log "installed: $(swtpm --version 2>/dev/null | head -1), $(tpm2_createprimary --version 2>/dev/null | head -1)"
