package snapshot

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"os"
	"syscall"
	"time"

	"github.com/kubekms/kubekms/internal/flock"
	"github.com/kubekms/kubekms/internal/safefile"
)

// A reader of bbolt's file format for one job: walk one top-level bucket of
// a file that may be hostile, in key order, once. bbolt itself trusts its
// file: a truncated file (or one still being copied) makes it read past the
// end of its mapping (SIGBUS/SIGSEGV), a corrupt page makes it panic, and a
// page tree with a cycle makes its cursor (and its own Check) loop forever;
// so it could only be used after a separate validating pass over the same
// pages (what this reader did before: one pread per page). Here the checks
// are the walk: the meta pages are validated as bbolt does, the file must
// hold every page up to the meta's high-water mark before it is mapped, and
// every page the walk reaches must be in range, name itself, be a branch or
// a leaf page, be referenced once (no cycles) and hold its elements. A file
// that shrinks after it was mapped faults on access: the walk and Each run
// under debug.SetPanicOnFault and turn the fault into an error.
//
// The layout is bbolt's file format, version 2 (go.etcd.io/bbolt/internal/common);
// the snapshot tests compare this reader with bbolt's own cursor.

const (
	boltMagic   = 0xED0CDAED
	boltVersion = 2

	pageHeaderSize  = 16 // id u64, flags u16, count u16, overflow u32
	branchElemSize  = 16 // pos u32, ksize u32, pgid u64
	leafElemSize    = 16 // flags u32, pos u32, ksize u32, vsize u32
	bucketHeaderLen = 16 // root u64, sequence u64
	metaSize        = 64 // magic, version, pageSize, flags u32; root bucket 16; freelist, pgid, txid, checksum u64

	branchPageFlag = 0x01
	leafPageFlag   = 0x02
	metaPageFlag   = 0x04
	bucketLeafFlag = 0x01

	maxTreeDepth = 64

	// lockTimeout is how long opening waits for a running etcd's lock on
	// its member file (bbolt's read-only Open takes a shared flock too).
	lockTimeout = 2 * time.Second
)

// meta is the part of a bbolt meta page the reader needs.
type meta struct {
	pageSize uint32
	root     uint64
	pgid     uint64 // high-water mark: pages [0, pgid) are in use
	txid     uint64
}

// parseMeta parses and validates one meta page (b starts at the page).
func parseMeta(b []byte) (meta, error) {
	if len(b) < pageHeaderSize+metaSize {
		return meta{}, errors.New("too short for a meta page")
	}
	if flags := binary.LittleEndian.Uint16(b[8:]); flags&metaPageFlag == 0 {
		return meta{}, fmt.Errorf("page flags %#x, not a meta page", flags)
	}
	m := b[pageHeaderSize : pageHeaderSize+metaSize]
	if binary.LittleEndian.Uint32(m[0:]) != boltMagic {
		return meta{}, errors.New("no bbolt magic number")
	}
	if v := binary.LittleEndian.Uint32(m[4:]); v != boltVersion {
		return meta{}, fmt.Errorf("bbolt format version %d, want %d", v, boltVersion)
	}
	h := fnv.New64a()
	h.Write(m[:56])
	if h.Sum64() != binary.LittleEndian.Uint64(m[56:]) {
		return meta{}, errors.New("meta page checksum mismatch")
	}
	return meta{
		pageSize: binary.LittleEndian.Uint32(m[8:]),
		root:     binary.LittleEndian.Uint64(m[16:]),
		pgid:     binary.LittleEndian.Uint64(m[40:]),
		txid:     binary.LittleEndian.Uint64(m[48:]),
	}, nil
}

// boltFile is an open, locked, read-only mapped bbolt file.
type boltFile struct {
	ctx   context.Context
	f     *os.File
	data  []byte // pages [0, m.pgid), mapped read-only
	m     meta
	seen  []byte // bitmap of pages already reached
	pages int
}

// openBoltFile opens path as a bbolt file: a regular file with a valid meta
// page that holds every page the meta page counts. It takes a shared lock
// (refused while an etcd server holds its member file) and maps the pages.
func openBoltFile(ctx context.Context, path string) (_ *boltFile, err error) {
	// O_NONBLOCK: opening a FIFO must not wait for a writer.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("etcd snapshot: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("etcd snapshot: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("etcd snapshot %s is %s, not a regular file", path, safefile.DescribeMode(st.Mode()))
	}
	size := st.Size()
	if size == 0 {
		return nil, fmt.Errorf("etcd snapshot %s is empty", path)
	}
	m, err := readMeta(f, size)
	if err != nil {
		return nil, fmt.Errorf("%s is not an etcd snapshot (a bbolt file): %w", path, err)
	}
	ps := uint64(m.pageSize)
	need := m.pgid * ps
	if m.pgid < 2 || need/ps != m.pgid || uint64(size) < need {
		return nil, fmt.Errorf("etcd snapshot %s is truncated or still being copied: %d bytes, but its meta page says %d (%d pages of %d bytes)",
			path, size, need, m.pgid, ps)
	}
	if need > math.MaxInt {
		return nil, fmt.Errorf("etcd snapshot %s: %d bytes is too big to map", path, need)
	}
	// A shared lock, as bbolt's read-only Open takes, waiting for an
	// exclusive holder (a running etcd) for lockTimeout.
	switch err := flock.Wait(ctx, f, syscall.LOCK_SH, lockTimeout); {
	case errors.Is(err, flock.ErrHeld):
		return nil, fmt.Errorf("etcd snapshot %s: is locked (is an etcd server using it?): waited %s", path, lockTimeout)
	case err != nil && ctx.Err() != nil:
		return nil, ctx.Err()
	case err != nil:
		return nil, fmt.Errorf("etcd snapshot %s: lock: %w", path, err)
	}
	data, err := syscall.Mmap(int(f.Fd()), 0, int(need), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map etcd snapshot %s: %w", path, err)
	}
	return &boltFile{ctx: ctx, f: f, data: data, m: m, seen: make([]byte, (m.pgid+7)/8)}, nil
}

func (b *boltFile) Close() error {
	var errs []error
	if b.data != nil {
		errs = append(errs, syscall.Munmap(b.data))
		b.data = nil
	}
	if b.f != nil {
		errs = append(errs, b.f.Close()) // releases the lock
		b.f = nil
	}
	return errors.Join(errs...)
}

// readMeta returns the meta page bbolt would use: the valid one of the two
// with the higher transaction id.
func readMeta(f *os.File, size int64) (meta, error) {
	buf := make([]byte, pageHeaderSize+metaSize)
	read := func(off int64) (meta, error) {
		if _, err := f.ReadAt(buf, off); err != nil {
			if errors.Is(err, io.EOF) {
				return meta{}, fmt.Errorf("%d bytes: too short", size)
			}
			return meta{}, err
		}
		m, err := parseMeta(buf)
		if err == nil && (m.pageSize < 512 || m.pageSize > 1<<24 || m.pageSize&(m.pageSize-1) != 0) {
			err = fmt.Errorf("page size %d", m.pageSize)
		}
		return m, err
	}
	m0, err0 := read(0)
	if err0 != nil {
		// Page 0 is unreadable: find page 1 by trying the page sizes, as bbolt does.
		for ps := int64(1024); ps <= 1<<24 && ps < size; ps <<= 1 {
			if m1, err := read(ps); err == nil && int64(m1.pageSize) == ps {
				return m1, nil
			}
		}
		return meta{}, fmt.Errorf("meta page 0: %w", err0)
	}
	m1, err1 := read(int64(m0.pageSize))
	if err1 == nil && m1.pageSize == m0.pageSize && m1.txid > m0.txid {
		return m1, nil
	}
	return m0, nil
}

// page returns page id with its overflow pages, after checking that it is
// in the file, reached for the first time, a branch or leaf page that names
// itself, and big enough for the elements it claims.
func (b *boltFile) page(id uint64) (p []byte, leaf bool, count int, err error) {
	if id < 2 || id >= b.m.pgid {
		return nil, false, 0, fmt.Errorf("page %d is outside the file's %d pages", id, b.m.pgid)
	}
	if b.pages++; b.pages%4096 == 1 { // the first page, then every 4096th
		if err := b.ctx.Err(); err != nil {
			return nil, false, 0, err
		}
	}
	ps := uint64(b.m.pageSize)
	hdr := b.data[id*ps : id*ps+pageHeaderSize]
	flags := binary.LittleEndian.Uint16(hdr[8:])
	overflow := uint64(binary.LittleEndian.Uint32(hdr[12:]))
	switch kind := flags & (branchPageFlag | leafPageFlag); {
	case binary.LittleEndian.Uint64(hdr) != id:
		return nil, false, 0, fmt.Errorf("page %d says it is page %d", id, binary.LittleEndian.Uint64(hdr))
	case kind == 0 || kind == branchPageFlag|leafPageFlag:
		return nil, false, 0, fmt.Errorf("page %d has flags %#x: neither a branch nor a leaf page", id, flags)
	case id+overflow >= b.m.pgid:
		return nil, false, 0, fmt.Errorf("page %d overflows past the file's %d pages", id, b.m.pgid)
	}
	for o := id; o <= id+overflow; o++ {
		if b.seen[o/8]&(1<<(o%8)) != 0 {
			if o == id {
				return nil, false, 0, fmt.Errorf("page %d is referenced twice (a cycle in the page tree)", id)
			}
			return nil, false, 0, fmt.Errorf("page %d is referenced twice (overflow of page %d)", o, id)
		}
		b.seen[o/8] |= 1 << (o % 8)
	}
	p = b.data[id*ps : (id+1+overflow)*ps]
	count = int(binary.LittleEndian.Uint16(hdr[10:]))
	if pageHeaderSize+count*leafElemSize > len(p) { // branch elements are as big
		return nil, false, 0, fmt.Errorf("page %d claims %d elements, more than fit", id, count)
	}
	return p, flags&leafPageFlag != 0, count, nil
}

// elemFunc receives a leaf element: its key, its value, where the value
// starts in the mapping, and the element's flags.
type elemFunc func(k, v []byte, vOff int, flags uint32) error

// tree walks the page tree under id in key order, calling fn for every
// element of every leaf page.
func (b *boltFile) tree(id uint64, depth int, fn elemFunc) error {
	if depth > maxTreeDepth {
		return fmt.Errorf("page tree deeper than %d levels at page %d", maxTreeDepth, id)
	}
	p, leaf, count, err := b.page(id)
	if err != nil {
		return err
	}
	if leaf {
		return b.leaf(p, int(id*uint64(b.m.pageSize)), count, fn)
	}
	if count == 0 {
		return fmt.Errorf("branch page %d is empty", id)
	}
	for i := range count {
		child := binary.LittleEndian.Uint64(p[pageHeaderSize+i*branchElemSize+8:])
		if err := b.tree(child, depth+1, fn); err != nil {
			return err
		}
	}
	return nil
}

// leaf calls fn for the count elements of leaf page p, which starts at off
// in the mapping.
func (b *boltFile) leaf(p []byte, off, count int, fn elemFunc) error {
	for i := range count {
		e := pageHeaderSize + i*leafElemSize
		flags := binary.LittleEndian.Uint32(p[e:])
		start := uint64(e) + uint64(binary.LittleEndian.Uint32(p[e+4:]))
		ksize := uint64(binary.LittleEndian.Uint32(p[e+8:]))
		vsize := uint64(binary.LittleEndian.Uint32(p[e+12:]))
		if start+ksize+vsize > uint64(len(p)) {
			return fmt.Errorf("leaf page %d element %d points past the page", binary.LittleEndian.Uint64(p), i)
		}
		v0 := int(start + ksize)
		if err := fn(p[start:v0], p[v0:v0+int(vsize)], off+v0, flags); err != nil {
			return err
		}
	}
	return nil
}

// bucket walks the top-level bucket name in key order, calling fn for each
// element; found is false when the file has no such bucket.
func (b *boltFile) bucket(name []byte, fn elemFunc) (found bool, err error) {
	var value []byte
	var valueOff int
	err = b.tree(b.m.root, 0, func(k, v []byte, vOff int, flags uint32) error {
		if string(k) == string(name) && flags&bucketLeafFlag != 0 {
			value, valueOff = v, vOff
		}
		return nil
	})
	if err != nil || value == nil {
		return false, err
	}
	if len(value) < bucketHeaderLen {
		return true, fmt.Errorf("bucket %q has a short header", name)
	}
	root := binary.LittleEndian.Uint64(value)
	if root != 0 {
		return true, b.tree(root, 0, fn)
	}
	// An inline bucket: a leaf page inside the value.
	inline := value[bucketHeaderLen:]
	if len(inline) < pageHeaderSize || binary.LittleEndian.Uint16(inline[8:])&leafPageFlag == 0 {
		return true, fmt.Errorf("inline bucket %q is not a leaf page", name)
	}
	count := int(binary.LittleEndian.Uint16(inline[10:]))
	if pageHeaderSize+count*leafElemSize > len(inline) {
		return true, fmt.Errorf("inline bucket %q claims %d elements, more than fit", name, count)
	}
	return true, b.leaf(inline, valueOff+bucketHeaderLen, count, fn)
}
