// Package softkey is the embedded default key service: a keyring file of
// AES-256 key versions, one of them primary. It is meant for development,
// single-node clusters and tests; its protection is the file's mode (0600) and
// whatever protects the disk it lives on.
package softkey

import (
	"crypto/rand"
	"errors"
	"fmt"
	"time"
)

// Format names the keyring file format.
const Format = "kubekms-softkey/v1"

// Keyring is the content of a keyring file.
type Keyring struct {
	Format string `json:"format"`
	// RingID is random per keyring, so a re-created keyring never reuses a
	// key ID.
	RingID   string    `json:"ring_id"`
	Primary  int       `json:"primary"`
	Versions []Version `json:"versions"`
}

// Version is one AES-256 key version.
type Version struct {
	Version  int       `json:"version"`
	Key      []byte    `json:"key"` // 32 bytes, base64 in JSON
	Created  time.Time `json:"created"`
	Disabled bool      `json:"disabled,omitempty"`
}

// KeyID is the key ID of version v of the ring.
func (r *Keyring) KeyID(v int) string { return fmt.Sprintf("softkey:%s:v%d", r.RingID, v) }

// Find returns the version numbered v, or nil.
func (r *Keyring) Find(v int) *Version {
	for i := range r.Versions {
		if r.Versions[i].Version == v {
			return &r.Versions[i]
		}
	}
	return nil
}

// newest returns the highest version number.
func (r *Keyring) newest() int {
	n := 0
	for _, v := range r.Versions {
		n = max(n, v.Version)
	}
	return n
}

func (r *Keyring) validate() error {
	if r.Format != Format {
		return fmt.Errorf("format %q, want %q", r.Format, Format)
	}
	if r.RingID == "" {
		return errors.New("ring_id is empty")
	}
	seen := map[int]bool{}
	for _, v := range r.Versions {
		if len(v.Key) != 32 {
			return fmt.Errorf("version %d: key is %d bytes, want 32", v.Version, len(v.Key))
		}
		if v.Version < 1 || seen[v.Version] {
			return fmt.Errorf("version %d: invalid or duplicate version number", v.Version)
		}
		seen[v.Version] = true
	}
	if r.Find(r.Primary) == nil {
		return fmt.Errorf("primary version %d does not exist", r.Primary)
	}
	return nil
}

func newVersion(n int) (Version, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return Version{}, fmt.Errorf("generate key: %w", err)
	}
	return Version{Version: n, Key: key, Created: time.Now().UTC().Truncate(time.Second)}, nil
}
