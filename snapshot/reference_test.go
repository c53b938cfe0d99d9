package snapshot_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"testing"

	"github.com/kubekms/kubekms/snapshot"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

// randomOps writes n random operations on a pool of keys: puts of values
// from empty to several pages long (overflow pages), deletions,
// re-creations of deleted keys, and keys outside /registry/.
func randomOps(t *testing.T, n, pool int, seed uint64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "etcd.db")
	r := rand.New(rand.NewPCG(seed, seed))
	err := snapshottest.Write(path, func(yield func(snapshottest.Op) bool) {
		for i := range n {
			k := r.IntN(pool)
			key := fmt.Sprintf("/registry/secrets/ns-%d/s-%d", k%7, k)
			if k%13 == 0 {
				key = fmt.Sprintf("/other/%d", k)
			}
			op := snapshottest.Op{Key: []byte(key)}
			switch x := r.IntN(100); {
			case x < 15:
				op.Delete = true
			case x < 18:
				op.Value = bytes.Repeat([]byte{byte(i)}, 4096+r.IntN(9000))
			default:
				op.Value = bytes.Repeat([]byte{byte(i)}, r.IntN(700))
			}
			if !yield(op) {
				return
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// The fast reader (its own walk of the mapped file, fast KeyValue parser,
// hash index) yields exactly what bbolt's cursor, proto.Unmarshal and a map
// of keys yield, in the same order: on an inline key bucket, a one-leaf
// tree, and multi-level trees with overflow pages, deletions and
// re-creations.
func TestOpenFileMatchesReference(t *testing.T) {
	for _, tc := range []struct{ n, pool int }{{3, 3}, {40, 20}, {3000, 1000}, {60000, 20000}} {
		path := randomOps(t, tc.n, tc.pool, uint64(tc.n))
		for _, prefix := range [][]byte{nil, []byte("/registry/"), []byte("/registry/secrets/ns-3/")} {
			t.Run(fmt.Sprintf("%d ops on %d keys, prefix %q", tc.n, tc.pool, prefix), func(t *testing.T) {
				ref, err := snapshottest.Read(path, prefix)
				if err != nil {
					t.Fatal(err)
				}
				want := collect(t, ref)
				src, err := snapshot.OpenFile(context.Background(), path, prefix)
				if err != nil {
					t.Fatal(err)
				}
				defer src.Close()
				got := collect(t, src)
				if !slices.Equal(got, want) {
					t.Fatalf("fast reader: %d keys, reference: %d keys; first difference at %d", len(got), len(want), firstDiff(got, want))
				}
				if tc.n > 100 && prefix == nil && len(want) < tc.pool/3 {
					t.Fatalf("only %d live keys: the fixture does not exercise much", len(want))
				}
			})
		}
	}
}

func firstDiff(a, b []string) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
