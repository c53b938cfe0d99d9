#!/usr/bin/env bash
# Installs what `go test ./test/hostile/` uses besides the other real parts:
# strace (to check that the keyring and the state file are fsynced, file and
# folder) and util-linux's setpriv and unshare (a second user, a private
# network namespace). Idempotent; Debian/Ubuntu; run as root.
set -euo pipefail
missing=()
command -v strace >/dev/null || missing+=(strace)
{ command -v setpriv >/dev/null && command -v unshare >/dev/null; } || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
strace -V | sed -n 1p  # sed reads all: head would SIGPIPE the writer under pipefail
