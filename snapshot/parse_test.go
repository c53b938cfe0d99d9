package snapshot

import (
	"bytes"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/protobuf/proto"
)

func marshalKV(t testing.TB, kv *mvccpb.KeyValue) []byte {
	b, err := proto.Marshal(kv)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestFastKeyValueTakesEtcdLayout: what etcd writes (every field set, or
// the zero ones left out) goes through the fast parser.
func TestFastKeyValueTakesEtcdLayout(t *testing.T) {
	for _, kv := range []*mvccpb.KeyValue{
		{Key: []byte("/registry/secrets/ns/a"), CreateRevision: 5, ModRevision: 1 << 40, Version: 3, Value: bytes.Repeat([]byte{1}, 300), Lease: 7},
		{Key: []byte("/k"), ModRevision: 2},
		{Key: []byte("/k"), Value: []byte("v")},
	} {
		b := marshalKV(t, kv)
		key, value, ok := fastKeyValue(b)
		if !ok || !bytes.Equal(key, kv.Key) || !bytes.Equal(value, kv.Value) {
			t.Errorf("fastKeyValue(%v) = %q, %q, %v", kv, key, value, ok)
		}
	}
}

// FuzzFastKeyValue: whatever the fast parser accepts, the generic one
// parses the same way.
func FuzzFastKeyValue(f *testing.F) {
	f.Add(marshalKV(f, &mvccpb.KeyValue{Key: []byte("/registry/a"), CreateRevision: 1, ModRevision: 2, Version: 1, Value: []byte("xyz"), Lease: 9}))
	f.Add(marshalKV(f, &mvccpb.KeyValue{Key: []byte("/k")}))
	f.Add([]byte{0x0a, 0x01, 'k', 0x2a, 0x80})
	f.Fuzz(func(t *testing.T, b []byte) {
		key, value, ok := fastKeyValue(b)
		if !ok {
			return
		}
		k2, v2, err := parseKeyValueFields(b)
		if err != nil || !bytes.Equal(key, k2) || !bytes.Equal(value, v2) {
			t.Fatalf("fast: %q %q; generic: %q %q %v", key, value, k2, v2, err)
		}
	})
}
