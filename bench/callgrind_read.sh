#!/usr/bin/env bash
# Instructions per stored object the apiserver's own transformers spend on a
# read at start-up (BenchmarkApiserverRead), by provider: each provider under
# valgrind's callgrind, counting only inside the transformer's
# TransformFromStorage (so neither the set-up nor other goroutines count),
# divided by the reads. A figure the machine's load does not move.
#
#   bench/callgrind_read.sh [N]      # from the repo root; valgrind installed
set -euo pipefail

n="${1:-8192}"
work="$(mktemp -d /tmp/kkcgr.XXXXXX)"
trap 'rm -rf "$work"' EXIT
go test -c -o "$work/bench.test" ./bench/
for p in identity aescbc aesgcm kms-v2 kms-v2-kubekms kms-v2-kubekms-format2; do
  # Async preemption signals confuse valgrind. The collector is off: its
  # assists would land at random inside the counted calls (allocation itself
  # still counts); what the garbage costs later is not in these figures.
  GOGC=off GODEBUG=asyncpreemptoff=1 valgrind --tool=callgrind --callgrind-out-file="$work/cg.$p" \
    '--toggle-collect=*prefixTransformers*TransformFromStorage*' \
    "$work/bench.test" -test.run '^$' -test.bench "ApiserverRead/$p\$" -test.benchtime "${n}x" >/dev/null 2>&1
  total="$(sed -n 's/^totals: //p' "$work/cg.$p")"
  printf '%-24s %8d instructions per object read\n' "$p" "$((total / n))"
done
