#!/usr/bin/env bash
# Instructions per stored object the apiserver's own transformers spend on a
# read at start-up (BenchmarkApiserverRead), by provider: each provider under
# valgrind's callgrind at N and 2N reads, the difference divided by N (so the
# set-up cancels out). A figure the machine's load does not move.
#
#   bench/callgrind_read.sh [N]      # from the repo root; valgrind installed
set -euo pipefail

n="${1:-8192}"
work="$(mktemp -d /tmp/kkcgr.XXXXXX)"
trap 'rm -rf "$work"' EXIT
go test -c -o "$work/bench.test" ./bench/
for p in identity aescbc aesgcm kms-v2 kms-v2-kubekms kms-v2-kubekms-format2; do
  totals=()
  for reads in "$n" "$((2 * n))"; do
    # Async preemption signals confuse valgrind; they are not on the measured path.
    GODEBUG=asyncpreemptoff=1 valgrind --tool=callgrind --callgrind-out-file="$work/cg.$p.$reads" \
      "$work/bench.test" -test.run '^$' -test.bench "ApiserverRead/$p\$" -test.benchtime "${reads}x" >/dev/null 2>&1
    totals+=("$(sed -n 's/^totals: //p' "$work/cg.$p.$reads")")
  done
  printf '%-22s %8d instructions per object read\n' "$p" "$(((totals[1] - totals[0]) / n))"
done
