package softkey

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
)

// Sharing one keyring between the plugins of several control-plane nodes:
// every node must hold the same key versions, or an object written through
// one apiserver cannot be read through another. The safe order for a
// rotation is Stage (a new version that is not yet primary) on one node,
// Export/Import to every node (Fingerprint to check they match), then
// Promote on every node: while nodes are promoted one by one, each can read
// what the others write.

// fingerprintDomain separates the fingerprint from every other hash of a keyring.
const fingerprintDomain = "kubekms softkey fingerprint v1\x00"

// Fingerprint identifies a keyring's content: its ring ID, primary, and
// every version's number, state, creation time and key. Two nodes whose
// fingerprints are equal hold the same keyring. It is a SHA-256 commitment
// (the keys are 256-bit random values, so it reveals nothing usable about
// them), shown as 32 hex digits.
func Fingerprint(r *Keyring) string {
	h := sha256.New()
	h.Write([]byte(fingerprintDomain))
	var b [8]byte
	u64 := func(v uint64) { binary.BigEndian.PutUint64(b[:], v); h.Write(b[:]) }
	str := func(s string) { u64(uint64(len(s))); h.Write([]byte(s)) }
	str(r.RingID)
	u64(uint64(r.Primary))
	versions := slices.Clone(r.Versions)
	slices.SortFunc(versions, func(a, b Version) int { return a.Version - b.Version })
	u64(uint64(len(versions)))
	for _, v := range versions {
		u64(uint64(v.Version))
		if v.Disabled {
			u64(1)
		} else {
			u64(0)
		}
		u64(uint64(v.Created.Unix()))
		str(string(v.Key))
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// Export returns the keyring file's content, validated: what Import takes
// on another node. It holds the keys: keep it as secret as the keyring.
func Export(path string) ([]byte, error) {
	r, err := Load(path)
	if err != nil {
		return nil, err
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode keyring: %w", err)
	}
	return append(data, '\n'), nil
}

// ImportResult says what an Import changed.
type ImportResult struct {
	Created         bool  // there was no keyring at the path
	Added           []int // versions new to this node
	PrimaryBefore   int   // 0 when Created
	Primary         int
	StateChanged    []int // versions enabled or disabled by the import
	FingerprintFrom string
	Fingerprint     string // of the keyring now at the path (equal to FingerprintFrom)
}

// Import makes the keyring at path equal to the exported one (data, from
// Export on another node). It refuses anything that would lose a key or mix
// two keyrings: another ring ID, or an export that lacks a version this
// node has or has a version with other key material (an older export, or
// two nodes that rotated independently). With no keyring at path, it
// creates one (0600). The change is made under the keyring's lock.
func Import(path string, data []byte) (*ImportResult, error) {
	var in Keyring
	if err := json.Unmarshal(data, &in); err != nil {
		return nil, fmt.Errorf("parse exported keyring: %w", err)
	}
	if err := in.validate(); err != nil {
		return nil, fmt.Errorf("exported keyring: %w", err)
	}
	res := &ImportResult{FingerprintFrom: Fingerprint(&in), Primary: in.Primary}
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		err := locked(context.Background(), path, func() error { return createFrom(path, &in) })
		if errors.Is(err, errExists) {
			return nil, fmt.Errorf("keyring %s appeared during the import; run it again", path)
		}
		if err != nil {
			return nil, err
		}
		res.Created, res.Fingerprint = true, res.FingerprintFrom
		for _, v := range in.Versions {
			res.Added = append(res.Added, v.Version)
		}
		return res, nil
	}
	r, err := update(path, func(r *Keyring) error {
		if err := checkImport(r, &in); err != nil {
			return err
		}
		res.PrimaryBefore = r.Primary
		for _, v := range in.Versions {
			mine := r.Find(v.Version)
			switch {
			case mine == nil:
				res.Added = append(res.Added, v.Version)
			case mine.Disabled != v.Disabled:
				res.StateChanged = append(res.StateChanged, v.Version)
			}
		}
		*r = in
		return nil
	})
	if err != nil {
		return nil, err
	}
	res.Fingerprint = Fingerprint(r)
	return res, nil
}

// checkImport refuses an import that would drop or replace a key of mine.
func checkImport(mine, in *Keyring) error {
	if in.RingID != mine.RingID {
		return fmt.Errorf("the export is keyring %s, this node holds keyring %s: they share no key; "+
			"importing would make everything this node's keyring encrypted unreadable", in.RingID, mine.RingID)
	}
	for _, v := range mine.Versions {
		other := in.Find(v.Version)
		if other == nil {
			return fmt.Errorf("the export lacks version %d, which this node has: it is older than this node's keyring "+
				"(export from the node that made the newest version)", v.Version)
		}
		if subtle.ConstantTimeCompare(other.Key, v.Key) != 1 || !other.Created.Equal(v.Created) {
			return fmt.Errorf("version %d differs between the export and this node: the keyrings were changed "+
				"independently (two rotations); keep the one whose key protects the data", v.Version)
		}
	}
	return nil
}

// Stage adds a new version that is not primary: plugins can unwrap with it
// once they hold it, but nothing is wrapped under it until Promote. It
// returns the new version's number.
func Stage(path string) (*Keyring, int, error) {
	var n int
	r, err := update(path, func(r *Keyring) error {
		v, err := newVersion(r.newest() + 1)
		if err != nil {
			return err
		}
		r.Versions = append(r.Versions, v)
		n = v.Version
		return nil
	})
	return r, n, err
}

// Promote makes an existing, enabled version primary: the plugins wrap new
// local KEKs under it from their next probe.
func Promote(path string, version int) (*Keyring, error) {
	return update(path, func(r *Keyring) error {
		v := r.Find(version)
		switch {
		case v == nil:
			return fmt.Errorf("version %d does not exist", version)
		case v.Disabled:
			return fmt.Errorf("version %d is disabled: enable it first", version)
		}
		r.Primary = version
		return nil
	})
}

// CheckFingerprint parses an export and compares its fingerprint with want.
func CheckFingerprint(data []byte, want string) error {
	var in Keyring
	if err := json.Unmarshal(data, &in); err != nil {
		return fmt.Errorf("parse exported keyring: %w", err)
	}
	if got := Fingerprint(&in); subtle.ConstantTimeCompare([]byte(got), []byte(want)) != 1 {
		return fmt.Errorf("the export's fingerprint is %s, not %s: it is not the keyring you exported (or it was changed in transit)", got, want)
	}
	return nil
}
