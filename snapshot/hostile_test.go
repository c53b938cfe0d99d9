package snapshot_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/snapshot"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

// fixture writes a snapshot with n keys (a multi-level page tree) and
// returns its bytes.
func fixture(t testing.TB, n int) []byte { return fixtureV(t, n, 100) }

func fixtureV(t testing.TB, n, vlen int) []byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "etcd.db")
	err := snapshottest.Write(path, func(yield func(snapshottest.Op) bool) {
		for i := range n {
			if !yield(put(fmt.Sprintf("/registry/secrets/ns/s%05d", i), strings.Repeat("v", vlen))) {
				return
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// open runs OpenFile and Each on path; it fails the test if they take more
// than 10 s (a hang).
func open(t *testing.T, path string) (int, error) {
	t.Helper()
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		src, err := snapshot.OpenFile(context.Background(), path, []byte("/registry/"))
		if err != nil {
			done <- result{0, err}
			return
		}
		defer src.Close()
		n := 0
		err = src.Each(context.Background(), func(k, v []byte) error { n++; return nil })
		done <- result{n, err}
	}()
	select {
	case r := <-done:
		return r.n, r.err
	case <-time.After(10 * time.Second):
		t.Fatalf("OpenFile/Each on %s hangs", path)
		return 0, nil
	}
}

func writeFile(t *testing.T, b []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "snap.db")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Files that are not complete etcd snapshots give a clear error.
func TestOpenFileHostile(t *testing.T) {
	good := fixture(t, 3000)
	const ps = 4096
	keyRoot := keyBucketRoot(t, good)
	used := int(binary.LittleEndian.Uint64(good[16+40:])) * ps // meta 0's high-water mark; bbolt grows files beyond it
	for _, tc := range []struct {
		name string
		path func(t *testing.T) string
		want string
	}{
		{"empty", func(t *testing.T) string { return writeFile(t, nil) }, "is empty"},
		{"100 bytes", func(t *testing.T) string { return writeFile(t, good[:100]) }, "truncated"},
		{"40 bytes", func(t *testing.T) string { return writeFile(t, good[:40]) }, "not an etcd snapshot"},
		{"one page", func(t *testing.T) string { return writeFile(t, good[:ps]) }, "truncated"},
		{"half (still being copied)", func(t *testing.T) string { return writeFile(t, good[:len(good)/2]) }, "truncated or still being copied"},
		{"all but one page", func(t *testing.T) string { return writeFile(t, good[:used-ps]) }, "truncated"},
		{"all but one byte", func(t *testing.T) string { return writeFile(t, good[:used-1]) }, "truncated"},
		{"garbage", func(t *testing.T) string {
			b := make([]byte, 64*1024)
			fill(b, 1)
			return writeFile(t, b)
		}, "not an etcd snapshot"},
		{"garbage after good meta pages", func(t *testing.T) string {
			b := bytes.Clone(good)
			fill(b[2*ps:], 3)
			return writeFile(t, b)
		}, "damaged"},
		{"FIFO", func(t *testing.T) string {
			p := filepath.Join(t.TempDir(), "fifo.db")
			if err := syscall.Mkfifo(p, 0o600); err != nil {
				t.Fatal(err)
			}
			return p
		}, "FIFO"},
		{"folder", func(t *testing.T) string { return t.TempDir() }, "a folder, not a regular file"},
		{"page tree with a cycle", func(t *testing.T) string {
			b := bytes.Clone(good)
			// Point the first child of the key bucket's root branch at the root itself.
			binary.LittleEndian.PutUint64(b[keyRoot*ps+16+8:], keyRoot)
			return writeFile(t, b)
		}, "referenced twice"},
		{"child outside the file", func(t *testing.T) string {
			b := bytes.Clone(good)
			binary.LittleEndian.PutUint64(b[keyRoot*ps+16+8:], 1<<40)
			return writeFile(t, b)
		}, "outside the file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := open(t, tc.path(t))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v; want an error saying %q", err, tc.want)
			}
		})
	}
	if n, err := open(t, writeFile(t, good)); err != nil || n != 3000 {
		t.Fatalf("the good file: %d keys, %v", n, err)
	}
}

// Random damage anywhere in the file: every outcome is an answer (data or
// an error), never a crash or a hang.
func TestOpenFileRandomDamage(t *testing.T) {
	good := fixture(t, 2000)
	r := rand.New(rand.NewPCG(5, 6))
	p := filepath.Join(t.TempDir(), "snap.db")
	errs := 0
	for i := range 300 {
		b := bytes.Clone(good)
		for range 1 + r.IntN(8) {
			b[r.IntN(len(b))] ^= byte(1 + r.IntN(255))
		}
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := open(t, p); err != nil {
			errs++
		}
		_ = i
	}
	t.Logf("300 damaged files: %d refused, the rest read", errs)
}

// A file that shrinks after it was opened (overwritten by a new copy) is an
// error from Each, not a SIGBUS.
func TestEachOnShrunkFile(t *testing.T) {
	p := writeFile(t, fixture(t, 3000))
	src, err := snapshot.OpenFile(context.Background(), p, []byte("/registry/"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := os.Truncate(p, 8192); err != nil {
		t.Fatal(err)
	}
	err = src.Each(context.Background(), func(k, v []byte) error {
		_ = bytes.Count(v, []byte("v")) // touch the mapped value
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "changed while being read") {
		t.Fatalf("Each on a truncated file: %v", err)
	}
}

// keyBucketRoot finds the root page of bucket "key" (a branch page in a
// file this big) by reading the root bucket's leaf page.
func keyBucketRoot(t *testing.T, b []byte) uint64 {
	t.Helper()
	const ps = 4096
	root := binary.LittleEndian.Uint64(b[16+16:]) // meta 0: root bucket's page
	page := b[root*ps:]
	if binary.LittleEndian.Uint16(page[8:])&0x02 == 0 {
		t.Fatal("root bucket is not a single leaf page")
	}
	for i := range int(binary.LittleEndian.Uint16(page[10:])) {
		e := page[16+i*16:]
		pos, ksize := binary.LittleEndian.Uint32(e[4:]), binary.LittleEndian.Uint32(e[8:])
		k := page[16+i*16+int(pos):][:ksize]
		if string(k) == "key" {
			v := page[16+i*16+int(pos)+int(ksize):]
			id := binary.LittleEndian.Uint64(v)
			if binary.LittleEndian.Uint16(b[id*ps+8:])&0x01 == 0 {
				t.Fatal("bucket key's root is not a branch page: make the fixture bigger")
			}
			return id
		}
	}
	t.Fatal("no bucket key")
	return 0
}

// fill fills b with reproducible random bytes.
func fill(b []byte, seed uint64) {
	r := rand.New(rand.NewPCG(seed, seed+1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
}

// FuzzOpenFile: any file content is read or refused, never a crash (a hang
// shows as the fuzz run stalling).
func FuzzOpenFile(f *testing.F) {
	good := fixtureV(f, 200, 8) // a root branch over a few leaves: small, so minimizing stays quick
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte{})
	p := filepath.Join(f.TempDir(), "snap.db")
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		src, err := snapshot.OpenFile(context.Background(), p, nil)
		if err != nil {
			return
		}
		defer src.Close()
		_ = src.Each(context.Background(), func(k, v []byte) error { return nil })
	})
}

// A member file a running etcd holds (an exclusive flock) is refused after
// the lock timeout, as bbolt's read-only open refuses it.
func TestOpenFileLocked(t *testing.T) {
	p := writeFile(t, fixture(t, 10))
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	_, err = open(t, p)
	if err == nil || !strings.Contains(err.Error(), "is locked (is an etcd server using it?)") {
		t.Fatalf("OpenFile on a locked file: %v", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_UN); err != nil {
		t.Fatal(err)
	}
	if n, err := open(t, p); err != nil || n != 10 {
		t.Fatalf("after the lock is released: %d keys, %v", n, err)
	}
}
