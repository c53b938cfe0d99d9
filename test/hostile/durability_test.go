package hostile

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testutil"
)

// A power loss must never lose a key or the state: every file that holds
// one is written to a temp file, fsynced, renamed (or linked) into place,
// and then its folder is fsynced, so the rename itself is on disk. strace
// shows the order of the real system calls.
func TestFsyncFileAndFolder(t *testing.T) {
	strace := testutil.Binary(t, "", "strace")
	dir := shortDir(t)
	keyring := filepath.Join(dir, "keyring.json")
	state := filepath.Join(dir, "state.json")

	// First start: the keyring is created (link) and the state saved (rename).
	trace := filepath.Join(t.TempDir(), "serve.trace")
	s := startServe(t, serveArgs(dir, softkeyURI(dir)), nil, func(argv []string) []string {
		return append([]string{strace, "-f", "-qq", "-o", trace, "-e", traceCalls}, argv...)
	})
	s.kill(syscall.SIGTERM)
	ev := parseTrace(t, trace)
	ev.durable(t, keyring)
	ev.durable(t, state)

	// softkey rotate replaces the keyring (rename).
	trace = filepath.Join(t.TempDir(), "rotate.trace")
	cmd := exec.Command(strace, "-f", "-qq", "-o", trace, "-e", traceCalls, bin, "softkey", "rotate", "--key-uri", softkeyURI(dir))
	runCmd(t, 30*time.Second, cmd).check(t, want{0, "primary is now"})
	parseTrace(t, trace).durable(t, keyring)
}

const traceCalls = "trace=openat,close,fsync,fdatasync,rename,renameat,renameat2,link,linkat"

// event is one completed file system call: fsync of a path, or a rename or
// link from one path to another.
type event struct {
	call     string // fsync, rename, link
	from, to string // fsync: to is the path
}

type events []event

var (
	straceLine = regexp.MustCompile(`^(\d+) +(.*)$`)
	openatRE   = regexp.MustCompile(`^openat\(AT_FDCWD, "([^"]+)", [^)]*\) = (\d+)`)
	closeRE    = regexp.MustCompile(`^close\((\d+)\) += 0`)
	fsyncRE    = regexp.MustCompile(`^f(?:data)?sync\((\d+)\) += 0`)
	renameRE   = regexp.MustCompile(`^(rename|renameat2?|link|linkat)\((?:AT_FDCWD, )?"([^"]+)", (?:AT_FDCWD, )?"([^"]+)"[^)]*\) += 0`)
)

// parseTrace reads an `strace -f` log: calls a thread did not finish in one
// line ("<unfinished ...>", "<... resumed>") are joined, and each call counts
// when it returns.
func parseTrace(t *testing.T, path string) events {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	partial := map[string]string{}
	fds := map[string]string{}
	var out events
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		m := straceLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		pid, call := m[1], m[2]
		if i := strings.Index(call, " <unfinished ...>"); i >= 0 {
			partial[pid] = call[:i]
			continue
		}
		if strings.HasPrefix(call, "<... ") {
			_, rest, ok := strings.Cut(call, " resumed>")
			if !ok {
				continue
			}
			call = partial[pid] + rest
			delete(partial, pid)
		}
		switch {
		case openatRE.MatchString(call):
			m := openatRE.FindStringSubmatch(call)
			fds[m[2]] = m[1]
		case closeRE.MatchString(call):
			delete(fds, closeRE.FindStringSubmatch(call)[1])
		case fsyncRE.MatchString(call):
			if p, ok := fds[fsyncRE.FindStringSubmatch(call)[1]]; ok {
				out = append(out, event{call: "fsync", to: p})
			}
		case renameRE.MatchString(call):
			m := renameRE.FindStringSubmatch(call)
			c := "rename"
			if strings.HasPrefix(m[1], "link") {
				c = "link"
			}
			out = append(out, event{call: c, from: m[2], to: m[3]})
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// durable checks that every rename or link onto path came after an fsync of
// its source and was followed by an fsync of path's folder.
func (ev events) durable(t *testing.T, path string) {
	t.Helper()
	found := false
	for i, e := range ev {
		if (e.call != "rename" && e.call != "link") || e.to != path {
			continue
		}
		found = true
		synced := false
		for _, b := range ev[:i] {
			if b.call == "fsync" && b.to == e.from {
				synced = true
			}
		}
		if !synced {
			t.Errorf("%s %s -> %s without an fsync of %s first: a power loss can leave an empty file", e.call, e.from, e.to, e.from)
		}
		dirSynced := false
		for _, a := range ev[i+1:] {
			if a.call == "fsync" && a.to == filepath.Dir(path) {
				dirSynced = true
				break
			}
		}
		if !dirSynced {
			t.Errorf("%s onto %s without an fsync of its folder after: a power loss can undo it", e.call, path)
		}
	}
	if !found {
		t.Errorf("no rename or link onto %s in the trace: %v", path, ev)
	}
}
