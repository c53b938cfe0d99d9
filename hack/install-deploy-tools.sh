#!/usr/bin/env bash
# Installs what `go test ./deploy/` uses: systemd-analyze and systemd-tmpfiles
# (Debian's systemd package) and promtool, taken from Debian's prometheus
# package without installing or starting Prometheus, into
# ${KUBEKMS_CACHE:-$HOME/.cache/kubekms}/bin. Idempotent; run as root.
set -euo pipefail
bin="${KUBEKMS_CACHE:-$HOME/.cache/kubekms}/bin"
mkdir -p "$bin"
if ! command -v systemd-analyze >/dev/null || ! command -v systemd-tmpfiles >/dev/null; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
if [ ! -x "$bin/promtool" ]; then
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; })
	dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
	install -m 0755 "$tmp/x/usr/bin/promtool" "$bin/promtool"
fi
"$bin/promtool" --version | sed -n 1p  # sed reads all: head would SIGPIPE the writer under pipefail
