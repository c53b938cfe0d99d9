// Package snapshot reads what kube-apiserver stored in etcd: the latest
// value of every live key under a prefix, either straight from an etcd
// snapshot (a bbolt file, no etcd server needed) or from a live etcd with
// paginated range reads.
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime/debug"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Source yields the latest value of every live key under a prefix.
type Source interface {
	// Len is how many keys Each yields (for live etcd, the count at the
	// revision Each reads).
	Len() int
	// Each calls fn for every key in order; key and value are valid only
	// during the call. A non-nil error from fn stops the scan.
	Each(ctx context.Context, fn func(key, value []byte) error) error
	Close() error
}

// Layout of etcd's backend (server/storage/mvcc): bucket "key" maps a
// revision (8-byte main, '_', 8-byte sub; a 't' appended marks a tombstone)
// to a marshalled mvccpb.KeyValue. Keys sort by revision, so a sequential
// scan sees every version of a key in order and the last one wins.
const (
	revBytesLen       = 8 + 1 + 8
	markedRevBytesLen = revBytesLen + 1
	markTombstone     = 't'
)

var keyBucket = []byte("key")

// Field numbers of mvccpb.KeyValue, from its generated descriptor, and the
// one-byte tags of the fast parser.
var (
	fieldKVKey, fieldKVValue         protowire.Number
	tagKVKey, tagKVValue, tagKVLease byte
	tagsKVRevisions                  [3]byte // create_revision, mod_revision, version
)

func init() {
	fields := (&mvccpb.KeyValue{}).ProtoReflect().Descriptor().Fields()
	byName := func(name string) protowire.Number {
		f := fields.ByName(protoreflect.Name(name))
		if f == nil || f.Number() > 15 {
			panic("mvccpb.KeyValue has no field " + name + " with a one-byte tag") // upstream proto changed: fail at start-up
		}
		return f.Number()
	}
	tag := func(name string, typ protowire.Type) byte { return byte(protowire.EncodeTag(byName(name), typ)) }
	fieldKVKey, fieldKVValue = byName("key"), byName("value")
	tagKVKey, tagKVValue = tag("key", protowire.BytesType), tag("value", protowire.BytesType)
	tagsKVRevisions = [3]byte{tag("create_revision", protowire.VarintType), tag("mod_revision", protowire.VarintType), tag("version", protowire.VarintType)}
	tagKVLease = tag("lease", protowire.VarintType)
}

type fileSource struct {
	path string
	file *boltFile
	live []record // the latest revision of every live key, in revision order
}

// record is a marshalled mvccpb.KeyValue in the mapped file: pointer-free,
// so the index costs the garbage collector nothing to scan.
type record struct {
	off  uint64
	n    uint32
	dead bool // superseded by a later revision, or a deletion
}

func (s *fileSource) kv(r record) []byte { return s.file.data[r.off : r.off+uint64(r.n)] }

// OpenFile reads an etcd snapshot file (or a stopped member's member/snap/db)
// and keeps the latest revision of every key under prefix, without deleted
// keys. It walks the file once and copies no values.
//
// Any file is safe to pass: one that is not a complete, sound etcd snapshot
// (empty, truncated, still being copied, a FIFO or folder, garbage, a cycle
// in its page tree) gives an error, never a crash or a hang (see boltFile).
func OpenFile(ctx context.Context, path string, prefix []byte) (_ Source, err error) {
	file, err := openBoltFile(ctx, path)
	if err != nil {
		return nil, err
	}
	s := &fileSource{path: path, file: file}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	defer s.recoverInto(&err, false)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	if err := s.load(path, prefix); err != nil {
		return nil, err
	}
	return s, nil
}

// recoverInto turns a panic while the file is read (a fault reading the
// mapping of a file that shrank) into an error. With faultsOnly, other
// panics (bugs in a caller's callback) go on.
func (s *fileSource) recoverInto(err *error, faultsOnly bool) {
	r := recover()
	if r == nil {
		return
	}
	_, fault := r.(interface{ Addr() uintptr })
	if faultsOnly && !fault {
		panic(r)
	}
	if fault {
		*err = fmt.Errorf("etcd snapshot %s changed while being read (truncated or overwritten?): %v", s.path, r)
		return
	}
	*err = fmt.Errorf("etcd snapshot %s is damaged: %v", s.path, r)
}

// load walks bucket "key" once and keeps, of the revisions under prefix,
// the latest of each key (as an offset into the mapping), dropping keys
// whose latest revision is a deletion.
func (s *fileSource) load(path string, prefix []byte) error {
	// Size hint: a revision of a kube object takes rarely under 512 bytes
	// of the file, so this seldom regrows (a copy); capacity never used is
	// never touched, so it costs address space, not memory.
	n0 := min(len(s.file.data)/512, 1<<24)
	s.live = make([]record, 0, n0)
	index := newKeyIndex(n0)
	found, err := s.file.bucket(keyBucket, func(rev, kv []byte, off int, flags uint32) error {
		tombstone := false
		switch {
		case flags&bucketLeafFlag != 0:
			return fmt.Errorf("revision %x is a nested bucket, not a value", rev)
		case len(rev) == revBytesLen:
		case len(rev) == markedRevBytesLen && rev[revBytesLen] == markTombstone:
			tombstone = true
		default:
			return fmt.Errorf("bucket %q has a %d-byte revision key, want %d or %d", keyBucket, len(rev), revBytesLen, markedRevBytesLen)
		}
		key, _, err := parseKeyValue(kv)
		if err != nil {
			return fmt.Errorf("revision %x: %w", rev, err)
		}
		if !hasPrefix(key, prefix) {
			return nil
		}
		if len(s.live) == math.MaxUint32-1 {
			return fmt.Errorf("over %d revisions", len(s.live))
		}
		s.live = append(s.live, record{off: uint64(off), n: uint32(len(kv)), dead: tombstone})
		if index.add(key) {
			index.resolve(s.key, s.supersede)
		}
		return nil
	})
	index.resolve(s.key, s.supersede)
	switch {
	case err != nil:
		return fmt.Errorf("etcd snapshot %s is damaged: %w", path, err)
	case !found:
		return fmt.Errorf("%s is not an etcd v3 snapshot: no %q bucket", path, keyBucket)
	}
	// Drop superseded versions so Len and Each agree.
	out := s.live[:0]
	for _, r := range s.live {
		if !r.dead {
			out = append(out, r)
		}
	}
	s.live = out
	return nil
}

// supersede marks record i as superseded (by a later revision or a deletion).
func (s *fileSource) supersede(i int) { s.live[i].dead = true }

// key returns the key of record i (parsed again: only on a hash match).
func (s *fileSource) key(i int) []byte {
	key, _, _ := parseKeyValue(s.kv(s.live[i]))
	return key
}

func hasPrefix(b, prefix []byte) bool {
	return len(b) >= len(prefix) && string(b[:len(prefix)]) == string(prefix)
}

// parseKeyValue returns the key and value fields of a marshalled
// mvccpb.KeyValue without copying them.
func parseKeyValue(b []byte) (key, value []byte, err error) {
	if key, value, ok := fastKeyValue(b); ok {
		return key, value, nil
	}
	return parseKeyValueFields(b)
}

// fastKeyValue parses the layout etcd writes (fields in number order: key,
// three varints, value, an optional lease varint), inlined, at a fifth of the
// generic parser's instructions: it was the scan's largest cost. Anything
// else (another order, unknown fields, a malformed value) is left to
// parseKeyValueFields (ok false).
func fastKeyValue(b []byte) (key, value []byte, ok bool) {
	i := 0
	// bytesField reads the length-prefixed field at i after tag.
	bytesField := func(tag byte) ([]byte, bool) {
		if i >= len(b) || b[i] != tag {
			return nil, false
		}
		n, m := protowire.ConsumeVarint(b[i+1:])
		if m < 0 || n > uint64(len(b)-i-1-m) {
			return nil, false
		}
		start := i + 1 + m
		i = start + int(n)
		return b[start:i:i], true
	}
	skipVarint := func(tag byte) bool {
		if i >= len(b) || b[i] != tag {
			return true // absent (zero) or another field
		}
		for j := i + 1; j < len(b) && j < i+11; j++ {
			if b[j] < 0x80 {
				if j == i+10 && b[j] > 1 {
					return false // over 64 bits
				}
				i = j + 1
				return true
			}
		}
		return false
	}
	if key, ok = bytesField(tagKVKey); !ok || len(key) == 0 {
		return nil, nil, false
	}
	for _, tag := range tagsKVRevisions {
		if !skipVarint(tag) {
			return nil, nil, false
		}
	}
	if i < len(b) && b[i] == tagKVValue {
		if value, ok = bytesField(tagKVValue); !ok {
			return nil, nil, false
		}
	}
	if !skipVarint(tagKVLease) || i != len(b) {
		return nil, nil, false
	}
	return key, value, true
}

func parseKeyValueFields(b []byte) (key, value []byte, err error) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, nil, fmt.Errorf("mvccpb.KeyValue: %w", protowire.ParseError(n))
		}
		b = b[n:]
		if (num == fieldKVKey || num == fieldKVValue) && typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil, nil, fmt.Errorf("mvccpb.KeyValue field %d: %w", num, protowire.ParseError(m))
			}
			if num == fieldKVKey {
				key = v
			} else {
				value = v
			}
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return nil, nil, fmt.Errorf("mvccpb.KeyValue field %d: %w", num, protowire.ParseError(m))
		}
		b = b[m:]
	}
	if len(key) == 0 {
		return nil, nil, errors.New("mvccpb.KeyValue has no key")
	}
	return key, value, nil
}

func (s *fileSource) Len() int { return len(s.live) }

// Each reads values from the file's mapping: a file truncated meanwhile is
// an error, not a crash.
func (s *fileSource) Each(ctx context.Context, fn func(key, value []byte) error) (err error) {
	defer s.recoverInto(&err, true)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	for i, r := range s.live {
		if i%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		key, value, err := parseKeyValue(s.kv(r))
		if err != nil { // parsed when opened: the file was overwritten since
			return fmt.Errorf("etcd snapshot %s changed while being read: %w", s.path, err)
		}
		if err := fn(key, value); err != nil {
			return err
		}
	}
	return nil
}

func (s *fileSource) Close() error {
	if s.file == nil {
		return nil
	}
	err := s.file.Close()
	s.file = nil
	return err
}
