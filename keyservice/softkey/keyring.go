// Package softkey is the embedded default key service: a keyring file of
// AES-256 key versions, one of them primary. It is meant for development,
// single-node clusters and tests; its protection is the file's mode (0600) and
// whatever protects the disk it lives on.
package softkey

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
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

// Load reads and validates a keyring file.
func Load(path string) (*Keyring, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read keyring: %w", err)
	}
	var r Keyring
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("parse keyring %s: %w", path, err)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("keyring %s: %w", path, err)
	}
	return &r, nil
}

// save writes r atomically: a temp file (0600) in the same folder, fsync, rename.
func save(path string, r *Keyring) error {
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode keyring: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temp keyring: %w", err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("chmod temp keyring: %w", err)
	}
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("write temp keyring: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync temp keyring: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("close temp keyring: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("replace keyring: %w", err)
	}
	return nil
}

// update runs fn on the keyring under an exclusive lock and saves the result,
// so two concurrent `softkey rotate` runs cannot lose a version.
func update(path string, fn func(*Keyring) error) (*Keyring, error) {
	lock, err := os.OpenFile(path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open keyring lock: %w", err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return nil, fmt.Errorf("lock keyring: %w", err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck // closing the file unlocks too
	r, err := Load(path)
	if err != nil {
		return nil, err
	}
	if err := fn(r); err != nil {
		return nil, err
	}
	if err := r.validate(); err != nil {
		return nil, err
	}
	return r, save(path, r)
}

// Create makes a new keyring file with one primary version. It fails if the
// file exists.
func Create(path string) (*Keyring, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create keyring folder: %w", err)
	}
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("generate ring id: %w", err)
	}
	v, err := newVersion(1)
	if err != nil {
		return nil, err
	}
	r := &Keyring{Format: Format, RingID: hex.EncodeToString(id), Primary: 1, Versions: []Version{v}}
	if _, err := os.Stat(path); err == nil {
		return nil, fmt.Errorf("keyring %s already exists", path)
	}
	return r, save(path, r)
}

// LoadOrCreate loads path, creating it with one version if it does not exist.
func LoadOrCreate(path string) (r *Keyring, created bool, err error) {
	r, err = Load(path)
	if errors.Is(err, os.ErrNotExist) {
		r, err = Create(path)
		return r, err == nil, err
	}
	return r, false, err
}

// Rotate adds a new version and makes it primary.
func Rotate(path string) (*Keyring, error) {
	return update(path, func(r *Keyring) error {
		v, err := newVersion(r.newest() + 1)
		if err != nil {
			return err
		}
		r.Versions = append(r.Versions, v)
		r.Primary = v.Version
		return nil
	})
}

// SetDisabled disables or re-enables a version. A disabled version can
// neither wrap nor unwrap: this is how an operator revokes it (the plugin
// then drops the local KEKs it protected). The primary cannot be disabled
// unless all versions are, which revokes the whole key.
func SetDisabled(path string, version int, disabled bool) (*Keyring, error) {
	return update(path, func(r *Keyring) error {
		v := r.Find(version)
		if v == nil {
			return fmt.Errorf("version %d does not exist", version)
		}
		v.Disabled = disabled
		return nil
	})
}
