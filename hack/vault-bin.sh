#!/usr/bin/env bash
# Builds HashiCorp Vault (the real Transit server the Vault tests run against)
# from the Go module proxy.
# Output: ${KUBEKMS_CACHE:-$HOME/.cache/kubekms}/bin/vault.
# Idempotent: built once per version into $CACHE/build/vault-<version>/ with a
# stamp file; a second run only re-links bin/vault. A prebuilt binary given in
# VAULT_BIN= is linked instead of building.
#
# Vault is under the BSL: it is built at test time into the cache and never
# committed (neither the binary nor the wrapper module, which lives under the
# cache dir). v1.21.0 builds from published modules with two replaces (modules
# that moved); v1.21.4 does not. Cold build: ~8 min on 2 cores, ~4 GB of Go
# build cache, a ~340 MiB binary.
set -euo pipefail

VAULT_VERSION="${VAULT_VERSION:-v1.21.0}"
CACHE="${KUBEKMS_CACHE:-$HOME/.cache/kubekms}"
BIN="$CACHE/bin"
BUILD="$CACHE/build"
mkdir -p "$BIN" "$BUILD"

# The wrapper module must not inherit the repo's workspace or vendor settings.
export GOWORK=off GOFLAGS="${GOFLAGS:-} -mod=mod" CGO_ENABLED=0

log() { printf '[vault-bin] %s\n' "$*" >&2; }

link() {
  ln -sfn "$1" "$BIN/vault.tmp.$$" && mv -Tf "$BIN/vault.tmp.$$" "$BIN/vault"
  log "vault -> $1"
}

if [ -n "${VAULT_BIN:-}" ]; then
  [ -x "$VAULT_BIN" ] || { log "VAULT_BIN=$VAULT_BIN is not an executable file"; exit 1; }
  link "$(readlink -f "$VAULT_BIN")"
  "$BIN/vault" version
  exit 0
fi

dir="$BUILD/vault-$VAULT_VERSION"
stamp="$dir/.stamp"
if [ -f "$stamp" ] && [ -x "$dir/vault" ]; then
  link "$dir/vault"
  "$BIN/vault" version
  exit 0
fi

mkdir -p "$dir/src"
log "building vault $VAULT_VERSION (cold build: ~8 min on 2 cores, ~4 GB Go build cache)"
start=$(date +%s)
(
  cd "$dir/src"
  cat >go.mod <<MOD
module kubekms.local/vault-build

go 1.25.1

require github.com/hashicorp/vault $VAULT_VERSION

// Modules that moved since Vault's go.mod was written.
replace github.com/99designs/keyring => github.com/Jeffail/keyring v1.2.3

replace github.com/ma314smith/signedxml v1.1.1 => github.com/moov-io/signedxml v1.1.1
MOD
  go mod download github.com/hashicorp/vault
  go build -trimpath -ldflags "-s -w" -o "$dir/vault.tmp" github.com/hashicorp/vault
  mv -f "$dir/vault.tmp" "$dir/vault"
)
log "built vault in $(($(date +%s) - start))s"
date -u +%FT%TZ >"$stamp"
link "$dir/vault"
"$BIN/vault" version
