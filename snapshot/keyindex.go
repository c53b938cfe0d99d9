package snapshot

import "hash/maphash"

// keyIndex finds the previous record of a key among records added in
// revision order (etcd's key bucket sorts by revision, not by key). It is an
// open-addressing table of 8-byte slots, at most half full, each the top 32
// bits of the key's hash and the record's index + 1, next to the full hash
// of every record: no pointers for the garbage collector to scan and no
// allocation per key. A hash match is confirmed on the key bytes, so a
// 64-bit collision only costs a probe.
type keyIndex struct {
	seed   maphash.Seed
	hashes []uint64 // by record index
	table  []uint64
}

func newKeyIndex(sizeHint int) *keyIndex {
	x := &keyIndex{seed: maphash.MakeSeed(), hashes: make([]uint64, 0, sizeHint)}
	x.table = make([]uint64, tableSize(sizeHint))
	return x
}

func tableSize(n int) int {
	size := 1024
	for size < 2*n {
		size <<= 1
	}
	return size
}

// add indexes the next record, whose key is key, and returns the index of
// the previous record of that key (ok false if there is none). keyOf
// returns the key of an earlier record.
func (x *keyIndex) add(key []byte, keyOf func(int) []byte) (prev int, ok bool) {
	i := len(x.hashes)
	if 2*(i+1) > len(x.table) {
		x.grow()
	}
	h := maphash.Bytes(x.seed, key)
	x.hashes = append(x.hashes, h)
	slot := h>>32<<32 | uint64(i+1)
	mask := uint64(len(x.table) - 1)
	for j := h & mask; ; j = (j + 1) & mask {
		t := x.table[j]
		if t == 0 {
			x.table[j] = slot
			return 0, false
		}
		if t>>32 != h>>32 {
			continue
		}
		if k := int(uint32(t)) - 1; x.hashes[k] == h && string(keyOf(k)) == string(key) {
			x.table[j] = slot
			return k, true
		}
	}
}

// grow doubles the table and puts the latest record of every key back.
func (x *keyIndex) grow() {
	old := x.table
	x.table = make([]uint64, 2*len(old))
	mask := uint64(len(x.table) - 1)
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
