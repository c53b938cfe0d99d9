#!/usr/bin/env bash
# Instructions per call of `kubekms serve` (default flags) and of the no-op
# plugin, each under valgrind's callgrind, counted over exactly CALLS Decrypt
# calls from 16 callers (bench/floor -connect) after a warm-up: a figure the
# machine's load does not move. Prints the totals per call and leaves the
# profiles (callgrind_annotate them) in OUT.
#
#   bench/floor/callgrind.sh [CALLS] [OUT]      # from the repo root; valgrind installed
#
# SERVE_ENV (e.g. GOGC=100) is added to kubekms's environment, NOOP_ARGS
# (e.g. -tuned) to the no-op plugin's flags. bench/floor/cgclass.py CALLS
# OUT/callgrind.kubekms.1 OUT/callgrind.noop.1 sorts the counts by component.
set -euo pipefail

calls="${1:-20000}"
out="${2:-$(mktemp -d /tmp/kkcg.XXXXXX)}"
mkdir -p "$out"
work="$(mktemp -d /tmp/kkcgw.XXXXXX)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

go build -trimpath -o "$work/kubekms" ./cmd/kubekms
go build -trimpath -o "$work/noop" ./bench/noop
go build -o "$work/floor" ./bench/floor

# profile NAME CMD...: run CMD under callgrind, counting only the measured calls.
profile() {
  local name="$1" env="$2"; shift 2
  local sock="$work/$name.sock"
  # Async preemption signals confuse callgrind; they are not on the call path.
  # shellcheck disable=SC2086 # env is a list of NAME=value words
  env GODEBUG=asyncpreemptoff=1 ${env} valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$out/callgrind.$name" "$@" >"$out/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { echo "$name: no socket; log:" >&2; tail "$out/$name.log" >&2; exit 1; }
  "$work/floor" -connect "unix://$sock" -calls 2000 -methods decrypt -request "$work/request.json" >/dev/null
  callgrind_control -i on "$pid" >/dev/null
  "$work/floor" -connect "unix://$sock" -calls "$calls" -methods decrypt -request "$work/request.json"
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  local total
  total="$(cat "$out"/callgrind."$name"* | sed -n "s/^totals: //p" | awk '{s+=$1} END {print s}')"
  printf '%s: %d instructions per Decrypt (%d calls)\n' "$name" "$((total / calls))" "$calls"
}

run_kubekms() {
  profile kubekms "${SERVE_ENV:-}" "$work/kubekms" serve --listen "unix://$work/kubekms.sock" \
    --key-uri "softkey://$work/keyring.json" --state-file "$work/state.json" \
    --metrics-addr 127.0.0.1:0 --log-format json
}
run_noop() {
  # shellcheck disable=SC2086 # NOOP_ARGS is a list of flags
  profile noop "" "$work/noop" -listen "unix://$work/noop.sock" ${NOOP_ARGS:-}
}
run_kubekms
run_noop
echo "profiles: $out (callgrind_annotate --inclusive=yes $out/callgrind.kubekms.*)"
