#!/usr/bin/env bash
# Installs SoftHSM2 (the PKCS#11 token the keyservice/pkcs11 tests run against)
# and OpenSC's pkcs11-tool (used by the tests to create and delete token keys).
# Idempotent: does nothing when softhsm2-util, pkcs11-tool and the module exist.
# Debian/Ubuntu only; needs root (or sudo) when something is missing.
set -euo pipefail

MODULE="${KUBEKMS_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}"

log() { printf '[install-softhsm] %s\n' "$*" >&2; }

if command -v softhsm2-util >/dev/null && command -v pkcs11-tool >/dev/null && [ -f "$MODULE" ]; then
  log "softhsm2-util, pkcs11-tool and $MODULE already present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { log "need root or sudo to apt-get install softhsm2 opensc"; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends softhsm2 opensc >/dev/null
[ -f "$MODULE" ] || { log "installed, but $MODULE is missing (set KUBEKMS_PKCS11_MODULE)"; exit 1; }
log "installed: $(softhsm2-util --version 2>/dev/null || echo softhsm2), $(command -v pkcs11-tool)"
