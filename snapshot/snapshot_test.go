package snapshot_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kubekms/kubekms/snapshot"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

func ops(list ...snapshottest.Op) func(func(snapshottest.Op) bool) {
	return func(yield func(snapshottest.Op) bool) {
		for _, op := range list {
			if !yield(op) {
				return
			}
		}
	}
}

func put(k, v string) snapshottest.Op { return snapshottest.Op{Key: []byte(k), Value: []byte(v)} }
func del(k string) snapshottest.Op    { return snapshottest.Op{Key: []byte(k), Delete: true} }

func collect(t *testing.T, src snapshot.Source) []string {
	t.Helper()
	var got []string
	if err := src.Each(context.Background(), func(k, v []byte) error {
		got = append(got, string(k)+"="+string(v))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(got) != src.Len() {
		t.Fatalf("Len %d but Each yielded %d", src.Len(), len(got))
	}
	return got
}

// Latest revision per key wins, tombstones drop a key, a re-created key
// comes back, and keys outside the prefix are skipped.
func TestOpenFileLatestRevisions(t *testing.T) {
	path := filepath.Join(t.TempDir(), "etcd.db")
	err := snapshottest.Write(path, ops(
		put("/registry/secrets/a/one", "v1"),
		put("/registry/secrets/a/two", "v1"),
		put("/other/key", "x"),
		put("/registry/secrets/a/one", "v2"),
		del("/registry/secrets/a/two"),
		put("/registry/secrets/a/three", "v1"),
		del("/registry/secrets/a/three"),
		put("/registry/secrets/a/three", "v3"),
		put("/registry/configmaps/b/c", ""),
	))
	if err != nil {
		t.Fatal(err)
	}
	src, err := snapshot.OpenFile(context.Background(), path, []byte("/registry/"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	got := strings.Join(collect(t, src), " ")
	want := "/registry/secrets/a/one=v2 /registry/secrets/a/three=v3 /registry/configmaps/b/c="
	if got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
}

func TestOpenFileErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := snapshot.OpenFile(context.Background(), filepath.Join(dir, "missing.db"), nil); err == nil {
		t.Error("missing file: no error")
	}
	garbage := filepath.Join(dir, "garbage.db")
	if err := os.WriteFile(garbage, []byte(strings.Repeat("not a bolt file ", 1000)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := snapshot.OpenFile(context.Background(), garbage, nil); err == nil {
		t.Error("garbage file: no error")
	}
	// A bbolt file without etcd's "key" bucket.
	empty := filepath.Join(dir, "empty.db")
	if err := snapshottest.Write(empty, ops()); err != nil {
		t.Fatal(err)
	}
	_, err := snapshot.OpenFile(context.Background(), empty, nil)
	if err == nil || !strings.Contains(err.Error(), "not an etcd v3 snapshot") {
		t.Errorf("no key bucket: %v", err)
	}
}

func TestOpenFileCancelled(t *testing.T) {
	path := filepath.Join(t.TempDir(), "etcd.db")
	err := snapshottest.Write(path, func(yield func(snapshottest.Op) bool) {
		for i := range 70000 {
			if !yield(put(fmt.Sprintf("/registry/x/%d", i), "v")) {
				return
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := snapshot.OpenFile(ctx, path, nil); err == nil {
		t.Fatal("cancelled context: no error")
	}
}
