package snapshot

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
)

// Checks on an etcd snapshot (a bbolt file) before bbolt maps it. bbolt
// trusts its file: a truncated file (or one still being copied) makes it
// read past the end of its mapping (SIGBUS/SIGSEGV), a corrupt page makes it
// panic, and a page tree with a cycle makes its cursor (and its own Check)
// loop forever. So the meta pages are validated as bbolt does, the file must
// hold every page up to the meta's high-water mark, and the page trees the
// scan walks (the root bucket and bucket "key") are followed with pread:
// every page in range, a branch or leaf page that names itself, referenced
// once. What is left (garbage inside a page) makes bbolt panic or fault,
// which the scan turns into an error (see load).
//
// The layout is bbolt's file format, version 2 (go.etcd.io/bbolt/internal/common).

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
)

// meta is the part of a bbolt meta page the checks need.
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

// checkFile validates f (already open) as an etcd snapshot before bbolt
// maps it.
func checkFile(ctx context.Context, f *os.File, path string) error {
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("etcd snapshot: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("etcd snapshot %s is %s, not a regular file", path, describeMode(st.Mode()))
	}
	size := st.Size()
	if size == 0 {
		return fmt.Errorf("etcd snapshot %s is empty", path)
	}
	m, err := readMeta(f, size)
	if err != nil {
		return fmt.Errorf("%s is not an etcd snapshot (a bbolt file): %w", path, err)
	}
	ps := uint64(m.pageSize)
	if need := m.pgid * ps; m.pgid < 2 || uint64(size) < need {
		return fmt.Errorf("etcd snapshot %s is truncated or still being copied: %d bytes, but its meta page says %d (%d pages of %d bytes)",
			path, size, need, m.pgid, ps)
	}
	w := &treeWalk{ctx: ctx, f: f, m: m, seen: make([]byte, (m.pgid+7)/8)}
	if err := w.rootBucket(); err != nil {
		return fmt.Errorf("etcd snapshot %s is damaged: %w", path, err)
	}
	return nil
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

// treeWalk follows the page trees bbolt's cursor will walk.
type treeWalk struct {
	ctx   context.Context
	f     *os.File
	m     meta
	seen  []byte // bitmap of pages already referenced
	pages int
}

type page struct {
	id       uint64
	flags    uint16
	count    uint16
	overflow uint32
	data     []byte // the whole page with its overflow; nil for a leaf read by header only
}

// read reads page id: its header, and all of it when whole.
func (w *treeWalk) read(id uint64, whole bool) (*page, error) {
	if id < 2 || id >= w.m.pgid {
		return nil, fmt.Errorf("page %d is outside the file's %d pages", id, w.m.pgid)
	}
	if w.seen[id/8]&(1<<(id%8)) != 0 {
		return nil, fmt.Errorf("page %d is referenced twice (a cycle in the page tree)", id)
	}
	w.seen[id/8] |= 1 << (id % 8)
	if w.pages++; w.pages%4096 == 0 {
		if err := w.ctx.Err(); err != nil {
			return nil, err
		}
	}
	ps := uint64(w.m.pageSize)
	var hdr [pageHeaderSize]byte
	if _, err := w.f.ReadAt(hdr[:], int64(id*ps)); err != nil {
		return nil, fmt.Errorf("read page %d: %w", id, err)
	}
	p := &page{
		id:       binary.LittleEndian.Uint64(hdr[0:]),
		flags:    binary.LittleEndian.Uint16(hdr[8:]),
		count:    binary.LittleEndian.Uint16(hdr[10:]),
		overflow: binary.LittleEndian.Uint32(hdr[12:]),
	}
	switch {
	case p.id != id:
		return nil, fmt.Errorf("page %d says it is page %d", id, p.id)
	case p.flags&(branchPageFlag|leafPageFlag) == 0 || p.flags&(branchPageFlag|leafPageFlag) == branchPageFlag|leafPageFlag:
		return nil, fmt.Errorf("page %d has flags %#x: neither a branch nor a leaf page", id, p.flags)
	case id+uint64(p.overflow) >= w.m.pgid:
		return nil, fmt.Errorf("page %d overflows past the file's %d pages", id, w.m.pgid)
	}
	for i := uint64(1); i <= uint64(p.overflow); i++ {
		o := id + i
		if w.seen[o/8]&(1<<(o%8)) != 0 {
			return nil, fmt.Errorf("page %d is referenced twice (overflow of page %d)", o, id)
		}
		w.seen[o/8] |= 1 << (o % 8)
	}
	if whole {
		p.data = make([]byte, (1+uint64(p.overflow))*ps)
		if _, err := w.f.ReadAt(p.data, int64(id*ps)); err != nil {
			return nil, fmt.Errorf("read page %d: %w", id, err)
		}
		if pageHeaderSize+int(p.count)*branchElemSize > len(p.data) {
			return nil, fmt.Errorf("page %d claims %d elements, more than fit", id, p.count)
		}
	}
	return p, nil
}

// rootBucket walks the root bucket's tree, and the tree of bucket "key".
func (w *treeWalk) rootBucket() error {
	var keyBucketValue []byte
	err := w.tree(w.m.root, 0, func(p *page) error {
		for i := range int(p.count) {
			e := p.data[pageHeaderSize+i*leafElemSize:]
			flags := binary.LittleEndian.Uint32(e[0:])
			k, v, err := leafKV(p, i)
			if err != nil {
				return err
			}
			if string(k) == string(keyBucket) && flags&bucketLeafFlag != 0 {
				keyBucketValue = v
			}
		}
		return nil
	})
	if err != nil || keyBucketValue == nil {
		return err // no bucket "key": load reports it
	}
	if len(keyBucketValue) < bucketHeaderLen {
		return errors.New(`bucket "key" has a short header`)
	}
	root := binary.LittleEndian.Uint64(keyBucketValue)
	if root == 0 {
		// An inline bucket: a leaf page inside the value.
		inline := keyBucketValue[bucketHeaderLen:]
		if len(inline) < pageHeaderSize || binary.LittleEndian.Uint16(inline[8:])&leafPageFlag == 0 {
			return errors.New(`inline bucket "key" is not a leaf page`)
		}
		return nil
	}
	return w.tree(root, 0, nil)
}

// tree walks the page tree under id. leaf, if set, is called with every
// leaf page read whole; without it, leaf pages are only checked by header.
func (w *treeWalk) tree(id uint64, depth int, leaf func(*page) error) error {
	if depth > maxTreeDepth {
		return fmt.Errorf("page tree deeper than %d levels at page %d", maxTreeDepth, id)
	}
	p, err := w.read(id, true)
	if err != nil {
		return err
	}
	if p.flags&leafPageFlag != 0 {
		if leaf != nil {
			if pageHeaderSize+int(p.count)*leafElemSize > len(p.data) {
				return fmt.Errorf("leaf page %d claims %d elements, more than fit", id, p.count)
			}
			return leaf(p)
		}
		return nil
	}
	if p.count == 0 {
		return fmt.Errorf("branch page %d is empty", id)
	}
	for i := range int(p.count) {
		e := p.data[pageHeaderSize+i*branchElemSize:]
		child := binary.LittleEndian.Uint64(e[8:])
		if leaf == nil {
			// Leaves of the big bucket: check them by header only.
			c, err := w.peekKind(child)
			if err != nil {
				return err
			}
			if c == leafPageFlag {
				continue
			}
		}
		if err := w.tree(child, depth+1, leaf); err != nil {
			return err
		}
	}
	return nil
}

// peekKind checks page id's header without marking branch pages (tree
// marks them when it reads them whole); a leaf is marked here.
func (w *treeWalk) peekKind(id uint64) (uint16, error) {
	if id < 2 || id >= w.m.pgid {
		return 0, fmt.Errorf("page %d is outside the file's %d pages", id, w.m.pgid)
	}
	var hdr [pageHeaderSize]byte
	if _, err := w.f.ReadAt(hdr[:], int64(id*uint64(w.m.pageSize))); err != nil {
		return 0, fmt.Errorf("read page %d: %w", id, err)
	}
	if binary.LittleEndian.Uint16(hdr[8:])&leafPageFlag == 0 {
		return branchPageFlag, nil
	}
	_, err := w.read(id, false)
	return leafPageFlag, err
}

// leafKV returns element i of a leaf page, bounds-checked.
func leafKV(p *page, i int) (k, v []byte, err error) {
	off := pageHeaderSize + i*leafElemSize
	e := p.data[off:]
	pos := uint64(binary.LittleEndian.Uint32(e[4:]))
	ksize := uint64(binary.LittleEndian.Uint32(e[8:]))
	vsize := uint64(binary.LittleEndian.Uint32(e[12:]))
	start := uint64(off) + pos
	if start+ksize+vsize > uint64(len(p.data)) {
		return nil, nil, fmt.Errorf("leaf page %d element %d points past the page", p.id, i)
	}
	return p.data[start : start+ksize], p.data[start+ksize : start+ksize+vsize], nil
}

func describeMode(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "a folder"
	case m&os.ModeNamedPipe != 0:
		return "a FIFO (named pipe)"
	case m&os.ModeSocket != 0:
		return "a socket"
	case m&os.ModeDevice != 0:
		return "a device"
	default:
		return fmt.Sprintf("of type %v", m.Type())
	}
}
