package tpm

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"

	"github.com/google/go-tpm/tpm2"
)

// A wrapped local KEK carries one entry per node of the node set: the KEK
// encrypted to that node's TPM key (ECIES: an ephemeral P-256 key, ECDH
// with the node's key, HKDF-SHA256, AES-256-GCM). Each node unwraps its own
// entry with TPM2_ECDH_ZGen; wrapping needs only the public keys.
//
//	0x01 | count (1) | entries
//	entry: name length (2) | name | handle (4) | PCR mask (4) |
//	       ephemeral point (65, uncompressed) | ciphertext length (2) | ciphertext
const (
	blobV1     byte = 0x01
	pointSize       = 65
	maxNodes        = 64
	maxNameLen      = 2 + 64
	maxPlain        = 64
	gcmTag          = 16
)

// member is one node's key in the node set.
type member struct {
	node   string
	name   []byte // TPM name: nameAlg || digest of the public area
	handle tpm2.TPMHandle
	pcrs   []uint
	pub    *ecdh.PublicKey
	public []byte // marshalled TPM2B_PUBLIC (peers-file lines)
}

// entry is one node's part of a wrapped value.
type entry struct {
	name       []byte
	handle     tpm2.TPMHandle
	pcrMask    uint32
	ephemeral  []byte
	ciphertext []byte
}

// keyIDOf is the key ID of a node set: a hash of its sorted key names, so
// every node computes the same one, and any new key (a rotation on one
// node, a node added or removed) gives a new one.
func keyIDOf(names [][]byte) string {
	sorted := slices.Clone(names)
	slices.SortFunc(sorted, func(a, b []byte) int { return slices.Compare(a, b) })
	h := sha256.New()
	h.Write([]byte("kubekms.io/tpm/v1/key-id\x00"))
	for _, n := range sorted {
		var l [2]byte
		binary.BigEndian.PutUint16(l[:], uint16(len(n)))
		h.Write(l[:])
		h.Write(n)
	}
	return "tpm:" + hex.EncodeToString(h.Sum(nil)[:16])
}

func aad(keyID string, name []byte, cluster string) []byte {
	out := []byte("kubekms.io/tpm/v1/wrap\x00" + keyID + "\x00")
	out = append(out, name...)
	return append(append(out, 0), cluster...)
}

// entryKey derives the AES key of one entry from the ECDH secret.
func entryKey(z, ephemeral []byte, recipient *ecdh.PublicKey) ([]byte, error) {
	salt := append(slices.Clone(ephemeral), recipient.Bytes()...)
	return hkdf.Key(sha256.New, z, salt, "kubekms.io/tpm/v1/entry-key", 32)
}

func gcmOf(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// A fresh ephemeral key per entry makes each entry key single-use, so the
// fixed nonce is safe.
var zeroNonce = make([]byte, 12)

// seal encrypts plaintext to every member.
func seal(set []member, keyID, cluster string, plaintext []byte) ([]byte, error) {
	if len(set) == 0 || len(set) > maxNodes {
		return nil, fmt.Errorf("node set has %d keys, want 1 to %d", len(set), maxNodes)
	}
	out := []byte{blobV1, byte(len(set))}
	for _, m := range set {
		eph, err := ecdh.P256().GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		z, err := eph.ECDH(m.pub)
		if err != nil {
			return nil, fmt.Errorf("ECDH with node %s: %w", m.node, err)
		}
		k, err := entryKey(z, eph.PublicKey().Bytes(), m.pub)
		clear(z)
		if err != nil {
			return nil, err
		}
		g, err := gcmOf(k)
		clear(k)
		if err != nil {
			return nil, err
		}
		ct := g.Seal(nil, zeroNonce, plaintext, aad(keyID, m.name, cluster))
		out = binary.BigEndian.AppendUint16(out, uint16(len(m.name)))
		out = append(out, m.name...)
		out = binary.BigEndian.AppendUint32(out, uint32(m.handle))
		out = binary.BigEndian.AppendUint32(out, pcrMask(m.pcrs))
		out = append(out, eph.PublicKey().Bytes()...)
		out = binary.BigEndian.AppendUint16(out, uint16(len(ct)))
		out = append(out, ct...)
	}
	return out, nil
}

var errMalformed = errors.New("malformed wrapped key")

func parseBlob(b []byte) ([]entry, error) {
	if len(b) < 2 || b[0] != blobV1 {
		return nil, fmt.Errorf("%w: unknown format", errMalformed)
	}
	n := int(b[1])
	if n == 0 || n > maxNodes {
		return nil, fmt.Errorf("%w: %d entries", errMalformed, n)
	}
	rest := b[2:]
	take := func(k int) ([]byte, bool) {
		if len(rest) < k {
			return nil, false
		}
		v := rest[:k]
		rest = rest[k:]
		return v, true
	}
	out := make([]entry, 0, n)
	for range n {
		var e entry
		l, ok := take(2)
		if !ok {
			return nil, fmt.Errorf("%w: truncated", errMalformed)
		}
		nl := int(binary.BigEndian.Uint16(l))
		if nl < 3 || nl > maxNameLen {
			return nil, fmt.Errorf("%w: name of %d bytes", errMalformed, nl)
		}
		var f []byte
		if e.name, ok = take(nl); !ok {
			return nil, fmt.Errorf("%w: truncated", errMalformed)
		}
		if f, ok = take(8); !ok {
			return nil, fmt.Errorf("%w: truncated", errMalformed)
		}
		e.handle = tpm2.TPMHandle(binary.BigEndian.Uint32(f[:4]))
		e.pcrMask = binary.BigEndian.Uint32(f[4:])
		if e.ephemeral, ok = take(pointSize); !ok {
			return nil, fmt.Errorf("%w: truncated", errMalformed)
		}
		if l, ok = take(2); !ok {
			return nil, fmt.Errorf("%w: truncated", errMalformed)
		}
		cl := int(binary.BigEndian.Uint16(l))
		if cl <= gcmTag || cl > maxPlain+gcmTag {
			return nil, fmt.Errorf("%w: ciphertext of %d bytes", errMalformed, cl)
		}
		if e.ciphertext, ok = take(cl); !ok {
			return nil, fmt.Errorf("%w: truncated", errMalformed)
		}
		if e.handle < minPersistent || e.handle > maxPersistent || e.pcrMask >= 1<<24 {
			return nil, fmt.Errorf("%w: bad handle or PCR mask", errMalformed)
		}
		out = append(out, e)
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes", errMalformed, len(rest))
	}
	return out, nil
}

// open decrypts one entry given the ECDH secret the TPM computed.
func (e entry) open(z []byte, recipient *ecdh.PublicKey, keyID, cluster string) ([]byte, error) {
	k, err := entryKey(z, e.ephemeral, recipient)
	if err != nil {
		return nil, err
	}
	g, err := gcmOf(k)
	clear(k)
	if err != nil {
		return nil, err
	}
	return g.Open(nil, zeroNonce, e.ciphertext, aad(keyID, e.name, cluster))
}

func names(entries []entry) [][]byte {
	out := make([][]byte, len(entries))
	for i, e := range entries {
		out[i] = e.name
	}
	return out
}
