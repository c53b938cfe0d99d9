// Package opaqueid hides a key service's own key IDs (ARNs with account IDs,
// resource names with project and vault names, token serials) from etcd.
//
// Key IDs are stored in plaintext next to every encrypted object, and so end
// up in etcd backups. Wrapped in this package's Service, a backend's key ID
// is replaced by an opaque one: a deterministic authenticated encryption
// (SIV: the IV is a keyed hash of the vendor's ID) under a secret the
// operator keeps with the plugin's configuration:
//
//	opaque:1.<base64url(HMAC-SHA256(mac key, vendor ID)[:16] || AES-CTR(enc key, IV, padded vendor ID))>
//
// The same vendor ID always gives the same opaque ID (the apiserver compares
// key IDs to spot stale data), different vendor IDs give different ones, and
// whoever holds the secret can turn an opaque ID back into the vendor's
// (Names, for the operator tools). Without the secret the opaque ID shows
// only that two values share a key, and a length rounded up to 32 bytes.
// The wrapped bytes are the backend's own, unchanged: an operator who lost
// the secret can still unwrap them with the vendor ID.
package opaqueid

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/kubekms/kubekms/keyservice"
)

// Prefix starts every opaque key ID; the digit is the format version.
const Prefix = "opaque:1."

const (
	ivSize    = 16
	padBlock  = 32
	minSecret = 32
	// maxVendorID keeps opaque IDs within the apiserver's 1024-byte key ID
	// limit: base64 of 16 + 736 bytes is 1003 characters, plus the prefix.
	maxVendorID = 736 - 1
)

// Codec turns vendor key IDs into opaque ones and back. It holds only keys
// derived from the secret.
type Codec struct {
	macKey, encKey []byte
}

// NewCodec derives the codec's keys from secret (at least 32 bytes).
func NewCodec(secret []byte) (*Codec, error) {
	if len(secret) < minSecret {
		return nil, fmt.Errorf("opaque key ID secret is %d bytes, want at least %d", len(secret), minSecret)
	}
	mac, err := hkdf.Key(sha256.New, secret, nil, "kubekms.io/opaque-key-id/v1/mac", 32)
	if err != nil {
		return nil, err
	}
	enc, err := hkdf.Key(sha256.New, secret, nil, "kubekms.io/opaque-key-id/v1/enc", 32)
	if err != nil {
		return nil, err
	}
	return &Codec{macKey: mac, encKey: enc}, nil
}

// ReadSecretFile reads a secret file (raw bytes; one trailing newline is
// dropped, so `head -c 32 /dev/urandom | base64 > file` works as well as raw
// bytes) and returns its codec.
func ReadSecretFile(path string) (*Codec, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("opaque key ID secret: %w", err)
	}
	b, _ = bytes.CutSuffix(b, []byte("\n"))
	c, err := NewCodec([]byte(b))
	if err != nil {
		return nil, fmt.Errorf("opaque key ID secret %s: %w", path, err)
	}
	return c, nil
}

// pad appends 0x80 and zeros up to a multiple of padBlock (ISO/IEC 7816-4).
func pad(b []byte) []byte {
	n := (len(b)/padBlock + 1) * padBlock
	out := make([]byte, n)
	copy(out, b)
	out[len(b)] = 0x80
	return out
}

func unpad(b []byte) ([]byte, bool) {
	for i := len(b) - 1; i >= 0; i-- {
		switch b[i] {
		case 0:
		case 0x80:
			return b[:i], true
		default:
			return nil, false
		}
	}
	return nil, false
}

func (c *Codec) iv(padded []byte) []byte {
	m := hmac.New(sha256.New, c.macKey)
	m.Write(padded)
	return m.Sum(nil)[:ivSize]
}

func (c *Codec) ctr(iv, in []byte) []byte {
	block, err := aes.NewCipher(c.encKey)
	if err != nil {
		panic(err) // 32-byte key: cannot fail
	}
	out := make([]byte, len(in))
	cipher.NewCTR(block, iv).XORKeyStream(out, in)
	return out
}

// Encode returns the opaque key ID for a vendor key ID.
func (c *Codec) Encode(vendorID string) (string, error) {
	if vendorID == "" || len(vendorID) > maxVendorID {
		return "", fmt.Errorf("vendor key ID is %d bytes, want 1 to %d", len(vendorID), maxVendorID)
	}
	padded := pad([]byte(vendorID))
	iv := c.iv(padded)
	return Prefix + base64.RawURLEncoding.EncodeToString(append(iv, c.ctr(iv, padded)...)), nil
}

// ErrNotOurs is returned by Decode for a key ID that is not an opaque ID
// made with this secret.
var ErrNotOurs = errors.New("not an opaque key ID made with this secret")

// Decode returns the vendor key ID inside an opaque one, checking that it
// was made with this secret.
func (c *Codec) Decode(keyID string) (string, error) {
	rest, ok := strings.CutPrefix(keyID, Prefix)
	if !ok {
		return "", fmt.Errorf("%w: no %q prefix", ErrNotOurs, Prefix)
	}
	raw, err := base64.RawURLEncoding.DecodeString(rest)
	if err != nil || len(raw) < ivSize+padBlock || (len(raw)-ivSize)%padBlock != 0 {
		return "", fmt.Errorf("%w: malformed", ErrNotOurs)
	}
	iv := raw[:ivSize]
	padded := c.ctr(iv, raw[ivSize:])
	if !hmac.Equal(iv, c.iv(padded)) {
		return "", fmt.Errorf("%w: authentication failed", ErrNotOurs)
	}
	id, ok := unpad(padded)
	if !ok || len(id) == 0 {
		return "", fmt.Errorf("%w: bad padding", ErrNotOurs)
	}
	return string(id), nil
}

// Name returns the readable vendor key ID for an opaque one, or keyID itself
// when it is not an opaque ID of this secret (a key ID written before opaque
// IDs were turned on, or by another plugin).
func (c *Codec) Name(keyID string) string {
	if id, err := c.Decode(keyID); err == nil {
		return id
	}
	return keyID
}

// Wrap returns svc with opaque key IDs. The result implements
// keyservice.VersionChecker and keyservice.Notifier when svc does. Closing it
// closes svc.
func Wrap(svc keyservice.Service, c *Codec) keyservice.Service {
	base := &service{inner: svc, codec: c}
	vc, checks := svc.(keyservice.VersionChecker)
	n, notifies := svc.(keyservice.Notifier)
	switch {
	case checks && notifies:
		return &struct {
			*checking
			keyservice.Notifier
		}{&checking{base, vc}, n}
	case checks:
		return &checking{base, vc}
	case notifies:
		return &struct {
			*service
			keyservice.Notifier
		}{base, n}
	}
	return base
}

type service struct {
	inner keyservice.Service
	codec *Codec
}

type checking struct {
	*service
	vc keyservice.VersionChecker
}

// CheckKeyID forwards to the backend's VersionChecker with the vendor ID.
func (s *checking) CheckKeyID(ctx context.Context, keyID string) error {
	id, err := s.decode("check", keyID)
	if err != nil {
		return err
	}
	return s.vc.CheckKeyID(ctx, id)
}

func (s *service) encode(op, vendorID string) (string, error) {
	id, err := s.codec.Encode(vendorID)
	if err != nil {
		return "", fmt.Errorf("key service %s: opaque key ID: %w", op, err)
	}
	return id, nil
}

// decode returns the vendor ID for a key ID given back by the hierarchy. A
// key ID without the opaque prefix was stored before opaque IDs were turned
// on and goes to the backend as it is (the backend checks its own IDs); an
// opaque one that fails authentication (another secret, tampered) is
// refused.
func (s *service) decode(op, keyID string) (string, error) {
	if !strings.HasPrefix(keyID, Prefix) {
		return keyID, nil
	}
	id, err := s.codec.Decode(keyID)
	if err != nil {
		return "", keyservice.Invalid(op, fmt.Errorf("key ID: %w", err))
	}
	return id, nil
}

func (s *service) Wrap(ctx context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	res, err := s.inner.Wrap(ctx, plaintext)
	if err != nil {
		return res, err
	}
	id, err := s.encode("wrap", res.KeyID)
	if err != nil {
		return keyservice.WrapResult{}, err
	}
	return keyservice.WrapResult{Wrapped: res.Wrapped, KeyID: id}, nil
}

func (s *service) Unwrap(ctx context.Context, keyID string, wrapped []byte) ([]byte, error) {
	id, err := s.decode("unwrap", keyID)
	if err != nil {
		return nil, err
	}
	return s.inner.Unwrap(ctx, id, wrapped)
}

func (s *service) Probe(ctx context.Context) (string, error) {
	id, err := s.inner.Probe(ctx)
	if err != nil {
		return "", err
	}
	return s.encode("probe", id)
}

func (s *service) Close() error { return s.inner.Close() }
