package inventory

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/snapshot"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

const benchKeys = 100_000

// benchSnapshot writes a bbolt snapshot in etcd's layout with benchKeys
// live keys: 60% KMS v2 secrets under two key_ids (~600-byte values), 30%
// plaintext configmaps, 10% KMS v2 objects of a CRD, plus 10% extra
// superseded versions and a few deletions that the reader must resolve.
func benchSnapshot(b *testing.B) string { return mixedSnapshot(b, benchKeys) }

// mixedSnapshot writes the benchmark's snapshot with n live keys.
func mixedSnapshot(tb testing.TB, n int) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), "bench.db")
	old, cur := sealer(tb, fakeKMS{"key-old"}, "kubekms"), sealer(tb, fakeKMS{"key-new"}, "kubekms")
	payload := make([]byte, 480)
	plain := append([]byte("k8s\x00"), payload...)
	err := snapshottest.Write(path, func(yield func(snapshottest.Op) bool) {
		op := func(key string, s *envelope.Sealer) bool {
			v := plain
			if s != nil {
				var err error
				if v, err = s.Seal(payload, []byte(key)); err != nil {
					tb.Fatal(err)
				}
			}
			return yield(snapshottest.Op{Key: []byte(key), Value: v})
		}
		for i := range n {
			var ok bool
			switch {
			case i%10 < 6:
				s := cur
				if i%3 == 0 {
					s = old
				}
				ok = op(fmt.Sprintf("/registry/secrets/ns-%d/secret-%d", i%100, i), s)
			case i%10 < 9:
				ok = op(fmt.Sprintf("/registry/configmaps/ns-%d/cm-%d", i%100, i), nil)
			default:
				ok = op(fmt.Sprintf("/registry/example.com/widgets/ns-%d/w-%d", i%100, i), cur)
			}
			if !ok {
				return
			}
			if i%10 == 0 { // a superseded version of an earlier key
				j := i / 2 / 10 * 10 // an index already written, also a secret
				if !op(fmt.Sprintf("/registry/secrets/ns-%d/secret-%d", j%100, j), cur) {
					return
				}
			}
			if i%1000 == 999 { // a deletion, and the key written again
				k := fmt.Sprintf("/registry/secrets/ns-%d/secret-%d", (i-9)%100, i-9)
				if !yield(snapshottest.Op{Key: []byte(k), Delete: true}) || !op(k, old) {
					return
				}
			}
			if i%1000 == 500 { // a deleted key
				k := fmt.Sprintf("/registry/deleted/ns/d-%d", i)
				if !op(k, cur) || !yield(snapshottest.Op{Key: []byte(k), Delete: true}) {
					return
				}
			}
		}
	})
	if err != nil {
		tb.Fatal(err)
	}
	return path
}

// BenchmarkInventorySnapshot measures a full inventory of a snapshot:
// opening the bbolt file, resolving the latest revision of every key and
// parsing every envelope header. It reports keys/s.
func BenchmarkInventorySnapshot(b *testing.B) {
	path := benchSnapshot(b)
	st, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.SetBytes(st.Size())
	b.ResetTimer()
	cpu0 := cpuTime(b)
	var objects int
	for b.Loop() {
		src, err := snapshot.OpenFile(ctx, path, []byte(RegistryPrefix))
		if err != nil {
			b.Fatal(err)
		}
		rep, err := Scan(ctx, src, Options{CurrentKeyID: "key-new"})
		src.Close()
		if err != nil {
			b.Fatal(err)
		}
		objects = rep.Totals.Objects
	}
	if objects != benchKeys {
		b.Fatalf("inventory counted %d objects, want %d", objects, benchKeys)
	}
	b.ReportMetric(float64(benchKeys)*float64(b.N)/b.Elapsed().Seconds(), "keys/s")
	// Keys per second of CPU time (user+sys) of this process: what the
	// scan costs, independent of other load on a shared machine.
	b.ReportMetric(float64(benchKeys)*float64(b.N)/(cpuTime(b)-cpu0).Seconds(), "keys/cpu-s")
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
