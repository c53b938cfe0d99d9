// Package keyservice defines the small interface every remote key service
// (the holder of the key-encrypting key) implements, the classification of its
// errors, and a registry that opens a backend from a key URI.
//
// A backend only wraps and unwraps 32-byte local KEKs: the hierarchy package
// calls it once per local KEK, never once per object.
package keyservice

import (
	"context"
	"log/slog"
)

// Service is one remote key-encrypting key.
//
// Implementations must be safe for concurrent use and must never put key
// material (plaintext KEKs, PINs, tokens) into errors or logs.
type Service interface {
	// Wrap encrypts a local KEK under the remote key's current version and
	// returns the wrapped bytes with the key ID of the version that did it.
	Wrap(ctx context.Context, plaintext []byte) (WrapResult, error)
	// Unwrap decrypts a wrapped local KEK. keyID is the one Wrap returned.
	Unwrap(ctx context.Context, keyID string, wrapped []byte) ([]byte, error)
	// Probe checks that the key is usable with the cheapest call the service
	// offers (a key read or lookup, never a paid encrypt) and returns the
	// current key ID. The key ID must change when the remote key version
	// changes and must never repeat for a different key.
	Probe(ctx context.Context) (keyID string, err error)
	// Close releases connections and sessions.
	Close() error
}

// WrapResult is what Wrap returns.
type WrapResult struct {
	Wrapped []byte
	KeyID   string
}

// Options are passed to every backend when it is opened.
type Options struct {
	Logger *slog.Logger
	// ClusterName binds wrapped keys to one cluster where the service
	// supports it (AWS KMS encryption context).
	ClusterName string
	// KeyIDSuffix is appended to the key ID by backends whose key versions
	// are invisible (AWS KMS), so an operator can force a new key ID.
	KeyIDSuffix string
	// PriorKeyID is the key ID this plugin last used, from its saved state
	// ("" when there is none): proof that its key existed. A backend that
	// creates its key on first use (softkey) refuses to create a new one, or
	// to use another, when PriorKeyID names a key that is missing.
	PriorKeyID string
	// PriorKeyIDFrom says where PriorKeyID came from (the state file), for
	// messages.
	PriorKeyIDFrom string
	// NewKey lets such a backend start a new key although PriorKeyID names
	// another: the operator's explicit choice (serve --new-keyring).
	NewKey bool
}

// PriorKeyIDSource names where PriorKeyID came from.
func (o Options) PriorKeyIDSource() string {
	if o.PriorKeyIDFrom != "" {
		return "the state file " + o.PriorKeyIDFrom
	}
	return "the saved state"
}

// LoggerOrDiscard returns o.Logger or a logger that discards.
func (o Options) LoggerOrDiscard() *slog.Logger {
	if o.Logger != nil {
		return o.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// VersionChecker is implemented by services that can tell cheaply (no paid
// crypto call) whether an older key ID is still usable. The hierarchy asks it
// about the key IDs of its cached local KEKs, so revoking one old key version
// also cuts access within the revocation bound, not only revoking the key.
type VersionChecker interface {
	CheckKeyID(ctx context.Context, keyID string) error
}

// Notifier is implemented by services that learn of a change to their key
// without being asked (the softkey keyring file, watched). The hierarchy
// probes at once when Changed fires, so a rotation or revocation made on this
// node shows in Status without waiting for the probe interval. The channel
// never closes while the service is open; a send may be coalesced.
type Notifier interface {
	Changed() <-chan struct{}
}
