// Package tpm is the TPM 2.0 key service, for clusters with no key service
// of their own (edge, bare metal): the local KEK is encrypted to an ECC P-256
// key that lives in this node's TPM and never leaves it, optionally bound to
// PCR values (a policy the TPM enforces on every use).
//
// What it protects: etcd data on a stolen disk or in a backup, which is
// useless without the node's TPM. What it does not: root on the running node,
// who can ask the TPM to unwrap like the plugin does (and read the plugin's
// memory).
//
// HA: every node has its own TPM key; a peers file lists every node's public
// key, and each wrapped local KEK carries one entry per node (wrapping needs
// only public keys, so any node wraps for all; each unwraps its own entry).
// The key ID is a hash of the node set's key names: the same on every node,
// new when any node rotates.
//
// Rotation: persist a new key at a higher handle within the URI's handle
// range (`kubekms tpm provision`); the highest occupied handle is current,
// and values wrapped before unwrap with the older key, which the entry
// names, until it is evicted. Revocation: evicting the key, changing a PCR it
// is bound to, or clearing the TPM's owner hierarchy.
package tpm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/kubekms/kubekms/keyservice"
)

// Open opens the TPM key service named by uri (see ParseURI). It does not
// touch the TPM; Probe does.
func Open(_ context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	log := opts.LoggerOrDiscard().With("backend", Scheme, "device", u.Device)
	log.Info("TPM key service opened", "handles", fmt.Sprintf("0x%x-0x%x", uint32(u.First), uint32(u.Last)),
		"pcrs", formatPCRs(u.PCRs), "peers", u.Peers)
	return &service{u: u, cluster: opts.ClusterName, log: log, known: map[string][]entry{}}, nil
}

type service struct {
	u       KeyURI
	cluster string
	log     *slog.Logger

	mu  sync.Mutex // one TPM command sequence at a time
	dev transport.TPMCloser
	// known maps key IDs seen to the entries of a value wrapped under them,
	// so CheckKeyID can look at this node's key of an older node set.
	known map[string][]entry
}

// withTPM runs fn on the (lazily opened) TPM. A transport failure closes
// the device, so the next call opens it again.
func (s *service) withTPM(op string, fn func(t transport.TPM) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		d, err := openDevice(s.u.Device)
		if err != nil {
			return keyservice.Transient(op, fmt.Errorf("open TPM %s: %w", s.u.Device, err))
		}
		s.dev = d
	}
	err := fn(s.dev)
	if err != nil && !isTPMError(err) {
		_ = s.dev.Close()
		s.dev = nil
	}
	return classify(op, err)
}

func isTPMError(err error) bool {
	var rc tpm2.TPMRC
	return errors.As(err, &rc)
}

// classify sorts TPM errors: a missing key or a failed policy is revoked, a
// busy TPM or a broken transport is transient, a bad point is invalid.
func classify(op string, err error) error {
	if err == nil {
		return nil
	}
	var ke *keyservice.Error
	if errors.As(err, &ke) {
		return err
	}
	var rc tpm2.TPMRC
	if !errors.As(err, &rc) {
		if errors.Is(err, errMalformed) {
			return keyservice.Invalid(op, err)
		}
		return keyservice.Transient(op, err) // device or socket unreachable
	}
	switch {
	case errors.Is(rc, tpm2.TPMRCHandle), errors.Is(rc, tpm2.TPMRCPolicyFail), errors.Is(rc, tpm2.TPMRCPCRChanged),
		errors.Is(rc, tpm2.TPMRCAuthFail), errors.Is(rc, tpm2.TPMRCBadAuth), errors.Is(rc, tpm2.TPMRCPolicy):
		return keyservice.Revoked(op, err)
	case errors.Is(rc, tpm2.TPMRCECCPoint), errors.Is(rc, tpm2.TPMRCValue):
		return keyservice.Invalid(op, err)
	case rc.IsWarning(): // TPM_RC_RETRY, _YIELDED, _TESTING, _LOCKOUT, _MEMORY, ...
		return keyservice.Transient(op, err)
	}
	return err
}

// current returns this node's current key and the node set, checking the
// key's PCR policy against the PCRs' current values.
func (s *service) current(op string) ([]member, string, error) {
	var self member
	err := s.withTPM(op, func(t transport.TPM) error {
		hs, err := persistentHandles(t, s.u.First, s.u.Last)
		if err != nil {
			return err
		}
		if len(hs) == 0 {
			return keyservice.Revoked(op, fmt.Errorf("no key at the TPM's persistent handles 0x%x-0x%x (evicted, TPM cleared, or never provisioned: kubekms tpm provision)", uint32(s.u.First), uint32(s.u.Last)))
		}
		h := slices.Max(hs)
		pub, name, err := readKey(t, h)
		if err != nil {
			if isTPMError(err) {
				return err
			}
			return keyservice.Invalid(op, err)
		}
		if err := s.checkPolicy(op, t, pub, s.u.PCRs); err != nil {
			return err
		}
		k, err := ecdhPub(pub)
		if err != nil {
			return keyservice.Invalid(op, fmt.Errorf("key at 0x%x: %w", uint32(h), err))
		}
		self = member{node: "self", name: name, handle: h, pcrs: s.u.PCRs, pub: k}
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	set := []member{self}
	if s.u.Peers != "" {
		peers, err := readPeers(s.u.Peers)
		if err != nil {
			return nil, "", fmt.Errorf("key service %s: %w", op, err)
		}
		i := slices.IndexFunc(peers, func(m member) bool { return bytes.Equal(m.name, self.name) })
		if i < 0 {
			return nil, "", fmt.Errorf("key service %s: the peers file %s does not list this node's current TPM key %x (add the line `kubekms tpm public` prints)", op, s.u.Peers, self.name)
		}
		set = peers
	}
	names := make([][]byte, len(set))
	for i, m := range set {
		names[i] = m.name
	}
	return set, keyIDOf(names), nil
}

// checkPolicy checks that a key is bound to exactly the given PCRs at their
// current values (or to none).
func (s *service) checkPolicy(op string, t transport.TPM, pub tpm2.TPMTPublic, pcrs []uint) error {
	has := len(pub.AuthPolicy.Buffer) != 0
	switch {
	case len(pcrs) == 0 && has:
		return keyservice.Invalid(op, errors.New("the TPM key has a policy but the key URI names no pcrs="))
	case len(pcrs) == 0:
		return nil
	case !has:
		return keyservice.Invalid(op, fmt.Errorf("the key URI names pcrs=%s but the TPM key has no PCR policy", formatPCRs(pcrs)))
	}
	want, err := pcrPolicy(t, pcrs)
	if err != nil {
		return err
	}
	if !bytes.Equal(want, pub.AuthPolicy.Buffer) {
		return keyservice.Revoked(op, fmt.Errorf("PCRs %s no longer have the values the TPM key is bound to", formatPCRs(pcrs)))
	}
	return nil
}

func (s *service) remember(keyID string, entries []entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.known) > 1024 {
		clear(s.known)
	}
	s.known[keyID] = entries
}

func (s *service) Wrap(_ context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	if len(plaintext) == 0 || len(plaintext) > maxPlain {
		return keyservice.WrapResult{}, keyservice.Invalid("wrap", fmt.Errorf("plaintext is %d bytes, want 1 to %d", len(plaintext), maxPlain))
	}
	set, keyID, err := s.current("wrap")
	if err != nil {
		return keyservice.WrapResult{}, err
	}
	blob, err := seal(set, keyID, s.cluster, plaintext)
	if err != nil {
		return keyservice.WrapResult{}, fmt.Errorf("wrap for the TPM keys: %w", err)
	}
	if entries, err := parseBlob(blob); err == nil {
		s.remember(keyID, entries)
	}
	return keyservice.WrapResult{Wrapped: blob, KeyID: keyID}, nil
}

func (s *service) Unwrap(_ context.Context, keyID string, wrapped []byte) ([]byte, error) {
	entries, err := parseBlob(wrapped)
	if err != nil {
		return nil, keyservice.Invalid("unwrap", err)
	}
	if got := keyIDOf(names(entries)); got != keyID {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("key ID %q does not match the wrapped key's node set (%s)", keyID, got))
	}
	var out []byte
	err = s.withTPM("unwrap", func(t transport.TPM) error {
		e, pub, err := s.ownEntry("unwrap", t, entries)
		if err != nil {
			return err
		}
		pcrs := maskPCRs(e.pcrMask)
		if err := s.checkPolicy("unwrap", t, pub, pcrs); err != nil {
			return err
		}
		z, err := zgen(t, e.handle, e.name, pcrs, e.ephemeral)
		if err != nil {
			return err
		}
		k, err := ecdhPub(pub)
		if err != nil {
			return err
		}
		out, err = e.open(z, k, keyID, s.cluster)
		clear(z)
		if err != nil {
			return keyservice.Invalid("unwrap", errors.New("the wrapped key failed authentication (tampered, or wrapped for another cluster)"))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.remember(keyID, entries)
	return out, nil
}

// ownEntry finds the entry whose key is in this TPM: the key at the entry's
// handle has the entry's name.
func (s *service) ownEntry(op string, t transport.TPM, entries []entry) (entry, tpm2.TPMTPublic, error) {
	seen := map[tpm2.TPMHandle]bool{}
	for _, e := range entries {
		if seen[e.handle] {
			continue
		}
		pub, name, err := readKey(t, e.handle)
		if err != nil {
			if errors.Is(err, tpm2.TPMRCHandle) {
				seen[e.handle] = true
				continue
			}
			if isTPMError(err) {
				return entry{}, pub, err
			}
			seen[e.handle] = true
			continue
		}
		for _, c := range entries {
			if c.handle == e.handle && bytes.Equal(c.name, name) {
				return c, pub, nil
			}
		}
		seen[e.handle] = true
	}
	return entry{}, tpm2.TPMTPublic{}, keyservice.Revoked(op, errors.New("no key in this TPM matches the wrapped key's entries: the key was evicted or replaced, the TPM cleared, or this node was not in the node set when it was wrapped"))
}

// Probe reads this node's current key (TPM2_GetCapability, TPM2_ReadPublic,
// TPM2_PCR_Read when PCR-bound: no cryptographic operation) and returns the
// node set's key ID.
func (s *service) Probe(_ context.Context) (string, error) {
	_, keyID, err := s.current("probe")
	return keyID, err
}

// CheckKeyID checks that this node's key of an older node set (seen in a
// value wrapped or unwrapped since start) is still in the TPM and its PCR
// policy still holds (keyservice.VersionChecker): evicting a rotated-out key
// drops the cached local KEKs it wrapped within the revocation bound.
func (s *service) CheckKeyID(_ context.Context, keyID string) error {
	s.mu.Lock()
	entries, ok := s.known[keyID]
	s.mu.Unlock()
	if !ok {
		return nil // nothing known to check without a wrapped value
	}
	return s.withTPM("check", func(t transport.TPM) error {
		e, pub, err := s.ownEntry("check", t, entries)
		if err != nil {
			return err
		}
		return s.checkPolicy("check", t, pub, maskPCRs(e.pcrMask))
	})
}

func (s *service) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dev == nil {
		return nil
	}
	err := s.dev.Close()
	s.dev = nil
	return err
}
