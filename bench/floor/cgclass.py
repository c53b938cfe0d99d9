#!/usr/bin/env python3
"""Instructions per call by component, from callgrind profiles
(bench/floor/callgrind.sh): each function's exclusive cost, put in a bucket
by its name, divided by the number of calls.

    bench/floor/cgclass.py CALLS callgrind.kubekms.1 [callgrind.noop.1 ...]
"""
import re
import subprocess
import sys

# First match wins: (bucket, regular expression on "package.function").
BUCKETS = [
    ("stack growth (morestack/copystack)", r"^runtime\.(morestack|newstack|copystack|adjust|gentraceback|.*[Ff]rame|pcvalue|pcdatavalue|funcspdelta|funcMaxSPDelta|step|findfunc|stackalloc|stackfree|stackcache|\(\*unwinder\)|\(\*moduledata\)\.textAddr)"),
    ("GC (mark, sweep, assist)", r"^runtime\.(gc|scan|mark|greyobject|findObject|tryDeferToSpan|wbBuf|bulkBarrier|sweep|.*[Ss]weep|spanOf|typePointers|heapBits|(\(\*mspan\)\.(typePointers|nextFreeIndex|init|moveInlineMarks|scan|heapBits|initHeapBits|refillAllocCache))|(\(\*gcWork\))|(\(\*spanInlineMarkBits\))|scanSpan|scanblock|pallocBits|\(\*pallocBits\)|\(\*pageAlloc\)|\(\*mheap\)|\(\*mcentral\)|\(\*mcache\)\.refill|memclrNoHeapPointersChunked|nextMarkBitArrayIndex|gcmarknewobject|(\(\*gcControllerState\)))"),
    ("allocation (malloc)", r"^runtime\.(mallocgc|newobject|makeslice|growslice|makemap|newarray|nextFreeFast|memclrNoHeapPointers|(\(\*mspan\)\.writeHeapBits)|rawbyteslice|rawstring|concatstring|slicebytetostring|mapassign|(\(\*mcache\)))"),
    ("scheduler, locks, timers", r"^(runtime\.(schedule|findRunnable|park|gopark|goready|ready|runqget|runqput|runqsteal|runqgrab|stealWork|wakep|startm|stopm|notesleep|notewakeup|futex|lock|unlock|mcall|gosched|execute|casgstatus|netpoll|checkTimers|.*[Tt]imer|selectgo|chan|send|recv|acquire|release|semacquire|semrelease|goexit|newproc|gfget|gfput|resetspinning|nanotime|procyield|osyield|sellock|selunlock|entersyscall|exitsyscall|reentersyscall|.*[Ss]pin|save|gogo|systemstack|mPark|handoff|injectglist|readyWithTime|fastrand|cheaprand|nilinterhash|memhash|strhash|aeshash|mapaccess|efaceeq|ifaceeq|assertE2I|typeAssert|getitab|(\(\*waitq\))|(\(\*hchan\)))|sync\.|internal/sync\.|sync/atomic\.|internal/runtime/(atomic|maps|syscall)\.|syscall\.|internal/poll\.|os\.|net\.|time\.|context\.)"),
    ("memory copy", r"^(runtime\.(memmove|memeqbody|memequal|cmpbody)|aeshashbody|indexbytebody|bytes\.|strings\.)"),
    ("gRPC server and HTTP/2 framing (transport, hpack)", r"^(google\.golang\.org/grpc|golang\.org/x/net/http2)"),
    ("protobuf encode/decode", r"^google\.golang\.org/protobuf"),
    ("kubekms: seed open (AES-GCM), checks, cache", r"^(crypto/|github\.com/kubekms/kubekms/(hierarchy|envelope|keyservice))"),
    ("kubekms: observer (metrics, sampling, log)", r"^(github\.com/kubekms/kubekms/(plugin\.\(\*call\)|plugin\.\(\*observer\)|internal/metrics)|github\.com/prometheus|golang\.org/x/time|log/slog|go\.opentelemetry)"),
    ("kubekms: plugin (validation, key_id)", r"^github\.com/kubekms/kubekms/plugin"),
    ("no-op plugin", r"^github\.com/kubekms/kubekms/bench"),
    ("other runtime", r"^runtime\."),
]


def classify(fn):
    for name, rx in BUCKETS:
        if re.search(rx, fn):
            return name
    return "other"


def profile(path):
    out = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", path],
                         capture_output=True, text=True, check=True).stdout
    costs = {}
    for line in out.splitlines():
        m = re.match(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*)$", line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        fn = re.sub(r"\s+\[.*$", "", m.group(2))
        fn = re.sub(r"^[^:]*:", "", fn, count=1) if ":" in fn else fn
        fn = re.sub(r"'\d+$", "", fn)
        costs[fn] = costs.get(fn, 0) + int(m.group(1).replace(",", ""))
    return costs


def main():
    calls = int(sys.argv[1])
    paths = sys.argv[2:]
    tables = []
    for p in paths:
        b = {}
        for fn, c in profile(p).items():
            k = classify(fn)
            b[k] = b.get(k, 0) + c
        tables.append(b)
    names = [n for n, _ in BUCKETS] + ["other"]
    print("| component | " + " | ".join(p.rsplit("/", 1)[-1] for p in paths) + " |")
    print("|---|" + "---:|" * len(paths))
    for n in names:
        if any(t.get(n, 0) for t in tables):
            print(f"| {n} | " + " | ".join(f"{t.get(n, 0) / calls:,.0f}" for t in tables) + " |")
    print("| **total instructions per call** | " + " | ".join(f"**{sum(t.values()) / calls:,.0f}**" for t in tables) + " |")


if __name__ == "__main__":
    main()
