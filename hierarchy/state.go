package hierarchy

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// State is the current local KEK as kept across restarts: only its wrapped
// form (the annotation value), never the key itself. Restoring it costs one
// remote unwrap instead of a wrap, and lets Decrypt of everything sealed
// before the restart hit the cache: N apiserver restarts under one plugin
// KEK cost one remote call, not N.
type State struct {
	KeyID      string `json:"key_id"`
	Annotation []byte `json:"annotation"`
	// UsesReserved is an upper bound of the seals made with this KEK: it is
	// saved before the seals happen, so a crash never under-counts.
	UsesReserved uint64 `json:"uses_reserved"`
	// MAC is HMAC-SHA256 under the local KEK over the fields above, so an
	// edited state file is refused once the KEK is unwrapped.
	MAC []byte `json:"mac"`
}

// StateStore keeps State.
type StateStore interface {
	Load(ctx context.Context) (*State, error) // nil, nil when there is none
	Save(ctx context.Context, s State) error
}

// usesReservation is how many seals one saved reservation covers.
const usesReservation = 1 << 16

func (k *localKEK) state() State {
	reserved := (k.uses.Load()/usesReservation + 1) * usesReservation
	s := State{KeyID: k.remoteKeyID, Annotation: k.annotation, UsesReserved: reserved}
	s.MAC = stateMAC(k.key, s)
	return s
}

func stateMAC(key []byte, s State) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("kubekms.io/state/v1\x00"))
	m.Write([]byte(s.KeyID))
	m.Write([]byte{0})
	m.Write(s.Annotation)
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], s.UsesReserved)
	m.Write(n[:])
	return m.Sum(nil)
}

// restore makes the saved local KEK current if it is still good for
// encryption under keyID. It reports whether it did.
func (h *Hierarchy) restore(ctx context.Context, keyID string) bool {
	s, err := h.cfg.State.Load(ctx)
	if err != nil {
		h.log.Warn("could not load the local KEK state; making a new local KEK", "error", err)
		return false
	}
	if s == nil {
		return false
	}
	if s.KeyID != keyID {
		h.log.Info("saved local KEK is for an older remote key; making a new one", "saved_key_id", s.KeyID, "key_id", keyID)
		return false
	}
	parsed, err := decodeAnnotation(s.Annotation, "the saved local KEK")
	if err != nil {
		h.log.Warn("local KEK state holds a malformed annotation; making a new local KEK", "error", err)
		return false
	}
	k, err := h.unwrapKEK(ctx, kekID{s.KeyID, string(parsed.wrapped)}, parsed)
	if err != nil {
		h.log.Warn("could not unwrap the saved local KEK; making a new one", "error", err)
		return false
	}
	if !hmac.Equal(stateMAC(k.key, *s), s.MAC) {
		h.log.Warn("local KEK state failed its integrity check; making a new local KEK")
		return false
	}
	if h.now().Sub(k.created) >= h.cfg.MaxAge || s.UsesReserved >= h.cfg.MaxUses {
		return false
	}
	k.uses.Store(s.UsesReserved)
	h.install(k, "restored")
	if err := h.cfg.State.Save(ctx, k.state()); err != nil {
		h.log.Warn("could not save the local KEK state", "error", err)
	}
	return true
}

// reserveUses saves a new reservation when k crosses the last one, so the
// saved count stays an upper bound. Called on the Encrypt path only once per
// usesReservation seals.
func (h *Hierarchy) reserveUses(ctx context.Context, k *localKEK, n uint64) {
	if h.cfg.State == nil || n%usesReservation != 0 {
		return
	}
	if err := h.cfg.State.Save(ctx, k.state()); err != nil {
		h.log.Warn("could not save the local KEK state", "error", err)
	}
}

// FileState keeps State in a JSON file (mode 0600), replaced atomically.
type FileState struct{ Path string }

// Load reads the file; a missing file is no state.
func (f FileState) Load(context.Context) (*State, error) {
	data, err := os.ReadFile(f.Path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read local KEK state: %w", err)
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("parse local KEK state %s: %w", f.Path, err)
	}
	return &s, nil
}

// Save writes the file atomically and durably: a temp file (0600), fsynced,
// renamed over the old one, then the folder fsynced, so a power loss leaves
// the old state or the new one, never an empty file or none.
func (f FileState) Save(_ context.Context, s State) error {
	data, err := json.Marshal(s)
	if err != nil {
		return fmt.Errorf("encode local KEK state: %w", err)
	}
	dir := filepath.Dir(f.Path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create state folder: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(f.Path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write local KEK state: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write local KEK state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sync local KEK state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write local KEK state: %w", err)
	}
	if err := os.Rename(tmp.Name(), f.Path); err != nil {
		return fmt.Errorf("replace local KEK state: %w", err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync state folder: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync state folder: %w", err)
	}
	return nil
}
