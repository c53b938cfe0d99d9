package hostile

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

// snapshotFixture writes an etcd-layout snapshot (a bbolt file) of n
// unencrypted Secrets and returns its bytes and the size bbolt uses (the
// meta page's high-water mark; bbolt grows files beyond it).
func snapshotFixture(t *testing.T, n int) ([]byte, int) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "etcd.db")
	err := snapshottest.Write(p, func(yield func(snapshottest.Op) bool) {
		for i := range n {
			v := fmt.Sprintf(`{"kind":"Secret","apiVersion":"v1","metadata":{"name":"s%d","namespace":"ns"},"data":{"k":"%s"}}`, i, strings.Repeat("A", 200))
			if !yield(snapshottest.Op{Key: fmt.Appendf(nil, "/registry/secrets/ns/s%d", i), Value: []byte(v)}) {
				return
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b, int(binary.LittleEndian.Uint64(b[16+40:])) * int(binary.LittleEndian.Uint32(b[16+8:]))
}

// The snapshot tools on files that are not complete etcd snapshots: exit 1
// (never 2, which inventory and decrypt use for findings) with a message
// that says what is wrong, at once; never a crash, a hang or SIGTERM ignored.
func TestSnapshotFilesHostile(t *testing.T) {
	good, used := snapshotFixture(t, 2000)
	ring := shortDir(t)
	plug := freshServe(t, softkeyURI(ring), nil, nil)
	dir := t.TempDir()
	file := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	flip := func(seed uint64) []byte {
		b := append([]byte(nil), good...)
		r := rand.New(rand.NewPCG(seed, seed))
		for i := 2 * 4096; i < len(b); i++ {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	fifo := filepath.Join(dir, "fifo.db")
	testutil.Mkfifo(t, fifo)
	cases := []struct {
		name, path, msg string
	}{
		{"missing", filepath.Join(dir, "missing.db"), "no such file"},
		{"empty", file("empty.db", nil), "is empty"},
		{"truncated to 100 bytes", file("t100.db", good[:100]), "truncated or still being copied"},
		{"truncated to half", file("half.db", good[:used/2]), "truncated or still being copied"},
		{"one page short", file("short.db", good[:used-4096]), "truncated or still being copied"},
		{"garbage", file("garbage.db", []byte(strings.Repeat("\x17garbage", 9000))), "not an etcd snapshot"},
		{"garbage after the meta pages", file("garbled.db", flip(7)), "is damaged"},
		{"a FIFO", fifo, "is a FIFO (named pipe), not a regular file"},
		{"a folder", t.TempDir(), "is a folder, not a regular file"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			kubekms(t, 20*time.Second, "inventory", "--snapshot", tc.path).check(t, want{1, tc.msg})
			// --fail-on-stale exits 2 when it finds stale objects: an unreadable file is still 1.
			kubekms(t, 20*time.Second, "inventory", "--snapshot", tc.path, "--current-key-id", "k", "--fail-on-stale").check(t, want{1, tc.msg})
			kubekms(t, 20*time.Second, "decrypt", "--snapshot", tc.path, "--plugin", "unix://"+plug.socket,
				"--output-dir", filepath.Join(t.TempDir(), "out")).check(t, want{1, tc.msg})
		})
	}

	// A snapshot still being copied: the tool reads it while a writer is
	// halfway through.
	t.Run("growing", func(t *testing.T) {
		p := filepath.Join(dir, "growing.db")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.Write(good[:used/3]); err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		defer close(stop)
		go func() { // keeps appending slowly, as a copy over a slow link
			for off := used / 3; off < used*2/3; off += 4096 {
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
				_, _ = f.Write(good[off : off+4096])
			}
		}()
		kubekms(t, 20*time.Second, "inventory", "--snapshot", p).check(t, want{1, "truncated or still being copied"})
	})

	t.Run("the good file", func(t *testing.T) {
		kubekms(t, 20*time.Second, "inventory", "--snapshot", file("good.db", good)).check(t, want{0, "secrets"})
	})

	// SIGTERM ends a tool that waits (here: on a plugin that does not answer).
	t.Run("SIGTERM", func(t *testing.T) {
		if err := syscall.Kill(-plug.cmd.Process.Pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = syscall.Kill(-plug.cmd.Process.Pid, syscall.SIGCONT) }()
		cmd := command("inventory", "--snapshot", file("good2.db", good), "--plugin", "unix://"+plug.socket, "--timeout", "1m")
		time.AfterFunc(time.Second, func() { _ = cmd.Process.Signal(syscall.SIGTERM) })
		start := time.Now()
		r := runCmd(t, 20*time.Second, cmd)
		if r.code != 1 || time.Since(start) > 10*time.Second {
			t.Fatalf("inventory waiting on a stopped plugin, SIGTERM: %s after %s", r, time.Since(start))
		}
	})
}
