package snapshot

import "hash/maphash"

// keyIndex finds, among records added in revision order (etcd's key bucket
// sorts by revision, not by key), the records a later one of the same key
// supersedes. It is an open-addressing table of 8-byte slots, at most half
// full, each the top 32 bits of a key's hash and its latest record's index +
// 1, next to the full hash of every record: no pointers for the garbage
// collector to scan and no allocation per key. A hash match is confirmed on
// the key bytes, so a 64-bit collision only costs a probe.
//
// Records are hashed as they come but put into the table in batches
// (resolve): a tight loop of independent probes lets the CPU overlap their
// cache misses, which one probe between two records' parsing does not (the
// table is megabytes: a probe is a miss). A batch is small enough that its
// keys are still in the cache when a match is confirmed.
type keyIndex struct {
	seed    maphash.Seed
	hashes  []uint64 // by record index
	table   []uint64
	indexed int // records [0, indexed) are in the table
}

// resolveBatch is how many records add collects before resolve is due.
const resolveBatch = 1024

// newKeyIndex makes an index for about sizeHint records; its table starts
// at half that (it is zeroed and probed at random: a table too big costs
// cache misses) and grows as needed.
func newKeyIndex(sizeHint int) *keyIndex {
	return &keyIndex{seed: maphash.MakeSeed(), hashes: make([]uint64, 0, sizeHint), table: make([]uint64, tableSize(sizeHint/2))}
}

func tableSize(n int) int {
	size := 1024
	for size < 2*n {
		size <<= 1
	}
	return size
}

// add hashes the key of the next record; it reports whether a batch is
// due for resolve.
func (x *keyIndex) add(key []byte) bool {
	x.hashes = append(x.hashes, maphash.Bytes(x.seed, key))
	return len(x.hashes)-x.indexed >= resolveBatch
}

// resolve puts the records added since the last call into the table, in
// order, and calls superseded with the index of every record a later one
// of the same key follows. keyOf returns the key of a record.
func (x *keyIndex) resolve(keyOf func(int) []byte, superseded func(int)) {
	if n := len(x.hashes); 2*n > len(x.table) {
		x.grow(tableSize(n))
	}
	mask := uint64(len(x.table) - 1)
	for i := x.indexed; i < len(x.hashes); i++ {
		h := x.hashes[i]
		slot := h>>32<<32 | uint64(i+1)
		for j := h & mask; ; j = (j + 1) & mask {
			t := x.table[j]
			if t == 0 {
				x.table[j] = slot
				break
			}
			if t>>32 != h>>32 {
				continue
			}
			if k := int(uint32(t)) - 1; x.hashes[k] == h && string(keyOf(k)) == string(keyOf(i)) {
				x.table[j] = slot
				superseded(k)
				break
			}
		}
	}
	x.indexed = len(x.hashes)
}

// grow makes the table size slots and puts the latest record of every key
// back.
func (x *keyIndex) grow(size int) {
	old := x.table
	x.table = make([]uint64, size)
	mask := uint64(size - 1)
	for _, t := range old {
		if t == 0 {
			continue
		}
		h := x.hashes[uint32(t)-1]
		j := h & mask
		for x.table[j] != 0 {
			j = (j + 1) & mask
		}
		x.table[j] = t
	}
}
