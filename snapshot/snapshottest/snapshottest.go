// Package snapshottest writes bbolt files laid out like an etcd v3 backend
// (bucket "key": revision -> mvccpb.KeyValue), for tests and benchmarks that
// need large snapshots quickly. Tests that need a real etcd snapshot start
// real etcd instead.
package snapshottest

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/protobuf/proto"
)

// Op is one write: a put of Value under Key, or a delete.
type Op struct {
	Key, Value []byte
	Delete     bool
}

// Write creates path with ops applied at revisions 2, 3, ... (one op per
// revision, as etcd stores single-key transactions), committing in batches.
func Write(path string, ops func(yield func(Op) bool)) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{NoSync: true, NoFreelistSync: true})
	if err != nil {
		return err
	}
	defer db.Close()
	rev := int64(1)
	var batch []Op
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		err := db.Update(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists([]byte("key"))
			if err != nil {
				return err
			}
			b.FillPercent = 1 // sequential inserts: pack pages like etcd's sequential writer
			for _, op := range batch {
				rev++
				k := make([]byte, 17, 18)
				binary.BigEndian.PutUint64(k, uint64(rev))
				k[8] = '_'
				kv := &mvccpb.KeyValue{Key: op.Key, ModRevision: rev}
				if op.Delete {
					k = append(k, 't')
				} else {
					kv.Value, kv.CreateRevision, kv.Version = op.Value, rev, 1
				}
				v, err := proto.Marshal(kv)
				if err != nil {
					return err
				}
				if err := b.Put(k, v); err != nil {
					return fmt.Errorf("put revision %d: %w", rev, err)
				}
			}
			return nil
		})
		batch = batch[:0]
		return err
	}
	for op := range ops {
		batch = append(batch, op)
		if len(batch) == 10000 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// Reference reads a snapshot the slow, obvious way, to check the fast
// reader against: bbolt's own cursor over bucket "key", proto.Unmarshal of
// every mvccpb.KeyValue, and a map from key to its latest revision. It has
// snapshot.Source's methods and yields in the same order (by the revision of
// each key's latest version). Only for files this package wrote: bbolt
// trusts its file.
type Reference struct {
	kvs []*mvccpb.KeyValue
}

// Read reads the latest revision of every live key under prefix of the
// snapshot at path.
func Read(path string, prefix []byte) (*Reference, error) {
	db, err := bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	defer db.Close()
	latest := map[string]int{} // key -> index in all
	var all []*mvccpb.KeyValue // nil for a deletion
	err = db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("key"))
		if b == nil {
			return fmt.Errorf("%s: no bucket key", path)
		}
		return b.ForEach(func(rev, v []byte) error {
			kv := &mvccpb.KeyValue{}
			if err := proto.Unmarshal(v, kv); err != nil {
				return fmt.Errorf("revision %x: %w", rev, err)
			}
			if !bytes.HasPrefix(kv.Key, prefix) {
				return nil
			}
			if i, ok := latest[string(kv.Key)]; ok {
				all[i] = nil
			}
			latest[string(kv.Key)] = len(all)
			if len(rev) == 18 && rev[17] == 't' {
				kv = nil
			}
			all = append(all, kv)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	r := &Reference{}
	for _, kv := range all {
		if kv != nil {
			r.kvs = append(r.kvs, kv)
		}
	}
	return r, nil
}

func (r *Reference) Len() int { return len(r.kvs) }

func (r *Reference) Each(ctx context.Context, fn func(key, value []byte) error) error {
	for _, kv := range r.kvs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(kv.Key, kv.Value); err != nil {
			return err
		}
	}
	return nil
}

func (r *Reference) Close() error { return nil }
