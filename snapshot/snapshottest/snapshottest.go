// Package snapshottest writes bbolt files laid out like an etcd v3 backend
// (bucket "key": revision -> mvccpb.KeyValue), for tests and benchmarks that
// need large snapshots quickly. Tests that need a real etcd snapshot start
// real etcd instead.
package snapshottest

import (
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
