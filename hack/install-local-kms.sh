#!/usr/bin/env bash
# Builds local-kms (github.com/nsmithuk/local-kms, a local AWS KMS server) from
# the Go module proxy for the keyservice/awskms tests.
# Output: ${KUBEKMS_CACHE:-$HOME/.cache/kubekms}/bin/local-kms.
# Idempotent: builds once per version into $CACHE/build/local-kms-<version>/
# with a stamp file; a second run only re-links bin/local-kms. A prebuilt binary
# given in LOCAL_KMS= is linked instead of building. Pure Go (CGO_ENABLED=0),
# about 45 s cold on 2 cores.
#
# The tests also need `unshare` and `ip` (util-linux, iproute2): local-kms binds
# all interfaces, so the tests run it in a private network namespace.
set -euo pipefail

LOCAL_KMS_VERSION="${LOCAL_KMS_VERSION:-v0.0.0-20260228092603-2a5e92d09ab6}"
CACHE="${KUBEKMS_CACHE:-$HOME/.cache/kubekms}"
BIN="$CACHE/bin"
DIR="$CACHE/build/local-kms-$LOCAL_KMS_VERSION"
mkdir -p "$BIN" "$DIR"

log() { printf '[local-kms] %s\n' "$*" >&2; }

link() {
  ln -sfn "$1" "$BIN/local-kms.tmp.$$" && mv -Tf "$BIN/local-kms.tmp.$$" "$BIN/local-kms"
  log "local-kms -> $1"
}

if [ -n "${LOCAL_KMS:-}" ]; then
  [ -x "$LOCAL_KMS" ] || { log "LOCAL_KMS=$LOCAL_KMS is not an executable file"; exit 1; }
  link "$(readlink -f "$LOCAL_KMS")"
  exit 0
fi

if [ -f "$DIR/.stamp" ] && [ -x "$DIR/local-kms" ]; then
  link "$DIR/local-kms"
  exit 0
fi

for tool in unshare ip; do
  command -v "$tool" >/dev/null || log "warning: $tool not found (apt-get install util-linux iproute2); the tests need it"
done

log "building github.com/nsmithuk/local-kms@$LOCAL_KMS_VERSION"
start=$(date +%s)
# Build outside the repo so its go.mod and workspace settings do not apply.
(
  cd "$DIR"
  GOWORK=off GOFLAGS="${GOFLAGS:-} -mod=mod" CGO_ENABLED=0 GOBIN="$DIR" \
    go install -trimpath -ldflags="-s -w" "github.com/nsmithuk/local-kms@$LOCAL_KMS_VERSION"
)
log "built local-kms in $(($(date +%s) - start))s"
date -u +%FT%TZ >"$DIR/.stamp"
link "$DIR/local-kms"
