// Package snapshot reads what kube-apiserver stored in etcd: the latest
// value of every live key under a prefix, either straight from an etcd
// snapshot (a bbolt file, no etcd server needed) or from a live etcd with
// paginated range reads.
package snapshot

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"os"
	"runtime/debug"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
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
	db   *bolt.DB
	tx   *bolt.Tx
	live []entry
}

type entry struct {
	key, value []byte // alias the read-only mmap; valid while tx is open
	dead       bool
}

// OpenFile reads an etcd snapshot file (or a stopped member's member/snap/db)
// and keeps the latest revision of every key under prefix, without deleted
// keys. It reads the file sequentially once and copies no values.
//
// Any file is safe to pass: one that is not a complete, sound etcd snapshot
// (empty, truncated, still being copied, a FIFO or folder, garbage, a cycle
// in its page tree) gives an error, never a crash or a hang (see checkFile).
func OpenFile(ctx context.Context, path string, prefix []byte) (_ Source, err error) {
	// O_NONBLOCK: opening a FIFO must not wait for a writer.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("etcd snapshot: %w", err)
	}
	if err := checkFile(ctx, f, path); err != nil {
		f.Close()
		return nil, err
	}
	s := &fileSource{path: path}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	defer s.recoverInto(&err, false)
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	// bbolt opens (and closes) the file checked above, so it cannot be swapped.
	opened := false
	db, err := bolt.Open(path, 0o400, &bolt.Options{ReadOnly: true, Timeout: 2 * time.Second,
		OpenFile: func(string, int, os.FileMode) (*os.File, error) {
			if opened {
				return nil, errors.New("opened twice")
			}
			opened = true
			return f, nil
		}})
	if err != nil {
		if !opened {
			f.Close()
		}
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("etcd snapshot %s is locked (is an etcd server using it?): %w", path, err)
		}
		return nil, fmt.Errorf("open etcd snapshot %s: %w", path, err)
	}
	s.db = db
	if s.tx, err = db.Begin(false); err != nil {
		return nil, fmt.Errorf("read etcd snapshot %s: %w", path, err)
	}
	if err := s.load(ctx, path, prefix); err != nil {
		return nil, err
	}
	return s, nil
}

// recoverInto turns a panic while bbolt reads the file (its assertions on a
// damaged page, or a fault reading the mapping of a file that shrank) into
// an error. With faultsOnly, other panics (bugs in a caller's callback) go
// on.
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

func (s *fileSource) load(ctx context.Context, path string, prefix []byte) error {
	b := s.tx.Bucket(keyBucket)
	if b == nil {
		return fmt.Errorf("%s is not an etcd v3 snapshot: no %q bucket", path, keyBucket)
	}
	// Index live keys by a 64-bit hash of the key (cheaper than string keys:
	// no allocation, no long compares); a hit is confirmed against the key
	// bytes and true collisions go to a string-keyed overflow map.
	seed := maphash.MakeSeed()
	// Size hint: etcd values of kube objects are rarely under 256 bytes, so
	// this seldom over-reserves, and saves most regrowing of both.
	n0 := int(min(s.tx.Size()/1024, 1<<24))
	index := make(map[uint64]int32, n0)
	s.live = make([]entry, 0, n0)
	overflow := map[string]int32{}
	lookup := func(key []byte) (uint64, int32, bool) {
		h := maphash.Bytes(seed, key)
		if i, ok := index[h]; ok {
			if string(s.live[i].key) == string(key) {
				return h, i, true
			}
			i, ok := overflow[string(key)]
			return h, i, ok
		}
		return h, 0, false
	}
	set := func(h uint64, key []byte, i int32) {
		if j, ok := index[h]; ok && string(s.live[j].key) != string(key) {
			overflow[string(key)] = i
			return
		}
		index[h] = i
	}
	c := b.Cursor()
	n := 0
	for rev, kv := c.First(); rev != nil; rev, kv = c.Next() {
		if n++; n%65536 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		tombstone := false
		switch {
		case len(rev) == revBytesLen:
		case len(rev) == markedRevBytesLen && rev[revBytesLen] == markTombstone:
			tombstone = true
		default:
			return fmt.Errorf("%s: bucket %q has a %d-byte revision key, want %d or %d", path, keyBucket, len(rev), revBytesLen, markedRevBytesLen)
		}
		key, value, err := parseKeyValue(kv)
		if err != nil {
			return fmt.Errorf("%s: revision %x: %w", path, rev, err)
		}
		if !hasPrefix(key, prefix) {
			continue
		}
		h, i, ok := lookup(key)
		if ok {
			s.live[i].dead = true // superseded or deleted; a dead entry keeps its key for lookups
		}
		if tombstone {
			continue
		}
		set(h, key, int32(len(s.live)))
		s.live = append(s.live, entry{key: key, value: value})
	}
	// Drop superseded versions so Len and Each agree.
	out := s.live[:0]
	for _, e := range s.live {
		if !e.dead {
			out = append(out, e)
		}
	}
	s.live = out
	return nil
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
	for i, e := range s.live {
		if i%4096 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		if err := fn(e.key, e.value); err != nil {
			return err
		}
	}
	return nil
}

func (s *fileSource) Close() error {
	var errs []error
	if s.tx != nil {
		errs = append(errs, s.tx.Rollback())
		s.tx = nil
	}
	if s.db != nil {
		errs = append(errs, s.db.Close())
		s.db = nil
	}
	return errors.Join(errs...)
}
