package softkey

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kubekms/kubekms/keyservice"
)

// Scheme is the key-URI scheme: softkey:///absolute/path/keyring.json.
const Scheme = "softkey"

// wrapAAD binds a wrapped value to its purpose and key ID.
const wrapAAD = "kubekms softkey wrap v1\x00"

// ParseURI returns the keyring path of a softkey URI.
func ParseURI(uri string) (string, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return "", fmt.Errorf("parse key URI: %w", err)
	}
	if u.Scheme != Scheme {
		return "", fmt.Errorf("key URI scheme %q, want %q", u.Scheme, Scheme)
	}
	if u.Host != "" || u.Opaque != "" {
		return "", fmt.Errorf("softkey URI must be softkey:///absolute/path (got host %q)", u.Host+u.Opaque)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return "", errors.New("softkey URI takes no query or fragment")
	}
	if !filepath.IsAbs(u.Path) || filepath.Clean(u.Path) != u.Path || strings.HasSuffix(u.Path, "/") {
		return "", fmt.Errorf("softkey URI path %q must be a clean absolute file path", u.Path)
	}
	return u.Path, nil
}

// Service is a keyservice.Service over a keyring file. It re-reads the file
// when it changes, so `kubekms softkey rotate` reaches a running plugin.
type Service struct {
	path string

	mu      sync.Mutex
	ring    *Keyring
	modTime time.Time
	size    int64
}

var _ keyservice.Service = (*Service)(nil)

// Open opens (and, if missing, creates) the keyring that uri names.
func Open(_ context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
	path, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	ring, created, err := LoadOrCreate(path)
	if err != nil {
		return nil, err
	}
	if created {
		opts.LoggerOrDiscard().Info("created softkey keyring", "path", path, "key_id", ring.KeyID(ring.Primary))
	}
	if err := checkMode(path); err != nil {
		return nil, err
	}
	s := &Service{path: path}
	if _, err := s.current(true); err != nil {
		return nil, err
	}
	return s, nil
}

func checkMode(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("stat keyring: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("keyring %s has mode %v: other users can read it; chmod 600 it", path, st.Mode().Perm())
	}
	return nil
}

// current returns the keyring, re-reading the file if it changed (or if force).
func (s *Service) current(force bool) (*Keyring, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := os.Stat(s.path)
	if err != nil {
		return nil, keyservice.Transient("read keyring", err)
	}
	if !force && s.ring != nil && st.ModTime().Equal(s.modTime) && st.Size() == s.size {
		return s.ring, nil
	}
	ring, err := Load(s.path)
	if err != nil {
		return nil, keyservice.Transient("read keyring", err)
	}
	s.ring, s.modTime, s.size = ring, st.ModTime(), st.Size()
	return ring, nil
}

func gcm(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// Wrap seals plaintext with the primary version.
func (s *Service) Wrap(_ context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	ring, err := s.current(false)
	if err != nil {
		return keyservice.WrapResult{}, err
	}
	v := ring.Find(ring.Primary)
	keyID := ring.KeyID(v.Version)
	if v.Disabled {
		return keyservice.WrapResult{}, keyservice.Revoked("wrap", fmt.Errorf("key %s is disabled", keyID))
	}
	aead, err := gcm(v.Key)
	if err != nil {
		return keyservice.WrapResult{}, fmt.Errorf("wrap: %w", err)
	}
	nonce := make([]byte, aead.NonceSize(), aead.NonceSize()+len(plaintext)+aead.Overhead())
	if _, err := rand.Read(nonce); err != nil {
		return keyservice.WrapResult{}, fmt.Errorf("wrap: nonce: %w", err)
	}
	out := aead.Seal(nonce, nonce, plaintext, []byte(wrapAAD+keyID))
	return keyservice.WrapResult{Wrapped: out, KeyID: keyID}, nil
}

// Unwrap opens a value that Wrap made with the version keyID names.
func (s *Service) Unwrap(_ context.Context, keyID string, wrapped []byte) ([]byte, error) {
	ring, err := s.current(false)
	if err != nil {
		return nil, err
	}
	ringID, version, err := parseKeyID(keyID)
	if err != nil {
		return nil, keyservice.Invalid("unwrap", err)
	}
	if ringID != ring.RingID {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("key %s belongs to another keyring (this is %s)", keyID, ring.RingID))
	}
	v := ring.Find(version)
	if v == nil {
		// Versions are only ever added, so a version below the newest that is
		// missing was destroyed (revoked); one above it never existed (bad input).
		if version < ring.newest() {
			return nil, keyservice.Revoked("unwrap", fmt.Errorf("key version %d was removed from the keyring", version))
		}
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("key version %d does not exist in the keyring", version))
	}
	if v.Disabled {
		return nil, keyservice.Revoked("unwrap", fmt.Errorf("key %s is disabled", keyID))
	}
	aead, err := gcm(v.Key)
	if err != nil {
		return nil, fmt.Errorf("unwrap: %w", err)
	}
	if len(wrapped) < aead.NonceSize()+aead.Overhead() {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("wrapped value is %d bytes, too short", len(wrapped)))
	}
	nonce, sealed := wrapped[:aead.NonceSize()], wrapped[aead.NonceSize():]
	out, err := aead.Open(nil, nonce, sealed, []byte(wrapAAD+keyID))
	if err != nil {
		return nil, keyservice.Invalid("unwrap", errors.New("wrapped value failed authentication"))
	}
	return out, nil
}

// Probe re-reads the keyring if it changed and returns the primary's key ID.
// It makes no cryptographic call.
func (s *Service) Probe(context.Context) (string, error) {
	ring, err := s.current(false)
	if err != nil {
		return "", err
	}
	v := ring.Find(ring.Primary)
	keyID := ring.KeyID(v.Version)
	if v.Disabled {
		return "", keyservice.Revoked("probe", fmt.Errorf("primary key %s is disabled", keyID))
	}
	return keyID, nil
}

// Close does nothing: the keyring holds no connections.
func (s *Service) Close() error { return nil }

func parseKeyID(keyID string) (ring string, version int, err error) {
	rest, ok := strings.CutPrefix(keyID, Scheme+":")
	if !ok {
		return "", 0, fmt.Errorf("key ID %q is not a softkey key ID", keyID)
	}
	ring, v, ok := strings.Cut(rest, ":v")
	if !ok || ring == "" {
		return "", 0, fmt.Errorf("key ID %q is malformed", keyID)
	}
	version, err = strconv.Atoi(v)
	if err != nil || version < 1 || strconv.Itoa(version) != v {
		return "", 0, fmt.Errorf("key ID %q has a bad version", keyID)
	}
	return ring, version, nil
}

// CheckKeyID reports whether keyID's version is still usable: a disabled or
// removed version is revoked. No cryptographic call.
func (s *Service) CheckKeyID(_ context.Context, keyID string) error {
	ring, err := s.current(false)
	if err != nil {
		return err
	}
	ringID, version, err := parseKeyID(keyID)
	if err != nil || ringID != ring.RingID {
		return keyservice.Invalid("check", fmt.Errorf("key ID %q is not in this keyring", keyID))
	}
	v := ring.Find(version)
	switch {
	case v == nil && version < ring.newest():
		return keyservice.Revoked("check", fmt.Errorf("key version %d was removed from the keyring", version))
	case v == nil:
		return keyservice.Invalid("check", fmt.Errorf("key version %d does not exist in the keyring", version))
	case v.Disabled:
		return keyservice.Revoked("check", fmt.Errorf("key %s is disabled", keyID))
	}
	return nil
}
