// Package keyservicetest is the contract every keyservice backend must pass,
// run against that backend's real server (or, where none can run here, a
// stand-in that says so).
package keyservicetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/keyservice"
)

// Harness lets the contract drive one backend. Open is required; the other
// hooks are optional and their sub-tests fail (not skip) when a backend that
// claims the capability lacks them, so set every hook the server supports.
type Harness struct {
	// Open returns a fresh client for the key under test.
	Open func(t *testing.T) keyservice.Service
	// Rotate makes a new key version current on the server.
	Rotate func(t *testing.T)
	// Disable makes the key unusable (disabled, destroyed or access denied);
	// Enable undoes it.
	Disable, Enable func(t *testing.T)
	// Stop makes the server unreachable; Start brings it back.
	Stop, Start func(t *testing.T)
	// RevokeVersion makes the key version behind keyID (an older one, after
	// Rotate) unusable while the current one stays usable: a disabled softkey
	// version, a disabled AWS key the alias no longer points at. Set it for
	// backends that implement keyservice.VersionChecker.
	RevokeVersion func(t *testing.T, keyID string)
}

// Run runs the contract.
func Run(t *testing.T, h Harness) {
	t.Run("RoundTrip", func(t *testing.T) { testRoundTrip(t, h) })
	t.Run("Tampered", func(t *testing.T) { testTampered(t, h) })
	if h.Rotate != nil {
		t.Run("Rotate", func(t *testing.T) { testRotate(t, h) })
	}
	if h.Disable != nil {
		t.Run("Disable", func(t *testing.T) { testDisable(t, h) })
	}
	if h.Stop != nil {
		t.Run("Outage", func(t *testing.T) { testOutage(t, h) })
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// NewKEK returns 32 random bytes.
func NewKEK(t *testing.T) []byte {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

func open(t *testing.T, h Harness) keyservice.Service {
	svc := h.Open(t)
	t.Cleanup(func() { _ = svc.Close() })
	return svc
}

// noSecret fails when err's text contains the hex or raw secret.
func noSecret(t *testing.T, err error, secret []byte) {
	t.Helper()
	if err == nil {
		return
	}
	msg := err.Error()
	if strings.Contains(msg, string(secret)) || strings.Contains(strings.ToLower(msg), hexString(secret)) {
		t.Fatalf("error leaks key material: %v", err)
	}
}

func hexString(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

func testRoundTrip(t *testing.T, h Harness) {
	svc := open(t, h)
	kek := NewKEK(t)
	id, err := svc.Probe(ctx(t))
	if err != nil {
		t.Fatalf("Probe: %v", err)
	}
	res, err := svc.Wrap(ctx(t), kek)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	if res.KeyID == "" || len(res.KeyID) > 1024 {
		t.Fatalf("Wrap key ID %q: want 1..1024 bytes", res.KeyID)
	}
	if res.KeyID != id {
		t.Fatalf("Wrap key ID %q differs from Probe's %q", res.KeyID, id)
	}
	if bytes.Contains(res.Wrapped, kek) {
		t.Fatal("wrapped value contains the plaintext KEK")
	}
	got, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped)
	if err != nil {
		t.Fatalf("Unwrap: %v", err)
	}
	if !bytes.Equal(got, kek) {
		t.Fatal("Unwrap returned different bytes")
	}
	// A second client (a restarted plugin) unwraps what the first wrapped.
	other := open(t, h)
	got, err = other.Unwrap(ctx(t), res.KeyID, res.Wrapped)
	if err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("Unwrap by a second client: %v", err)
	}
}

func testTampered(t *testing.T, h Harness) {
	svc := open(t, h)
	kek := NewKEK(t)
	res, err := svc.Wrap(ctx(t), kek)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	bad := bytes.Clone(res.Wrapped)
	bad[len(bad)-1] ^= 0x01
	got, err := svc.Unwrap(ctx(t), res.KeyID, bad)
	if err == nil {
		t.Fatalf("Unwrap of a tampered value succeeded (%d bytes)", len(got))
	}
	if c := keyservice.Classify(err); c != keyservice.ClassInvalid {
		t.Fatalf("tampered value: class %v, want invalid (%v)", c, err)
	}
	noSecret(t, err, kek)
	if _, err := svc.Unwrap(ctx(t), res.KeyID, nil); err == nil {
		t.Fatal("Unwrap of an empty value succeeded")
	}
}

func testRotate(t *testing.T, h Harness) {
	svc := open(t, h)
	before, err := svc.Probe(ctx(t))
	if err != nil {
		t.Fatalf("Probe: %v", err)
	}
	kek := NewKEK(t)
	old, err := svc.Wrap(ctx(t), kek)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	h.Rotate(t)
	var after string
	deadline := time.Now().Add(10 * time.Second)
	for {
		after, err = svc.Probe(ctx(t))
		if err == nil && after != before {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key ID did not change after rotation: %q (%v)", after, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	res, err := svc.Wrap(ctx(t), NewKEK(t))
	if err != nil {
		t.Fatalf("Wrap after rotation: %v", err)
	}
	if res.KeyID != after {
		t.Fatalf("Wrap after rotation used %q, Probe says %q", res.KeyID, after)
	}
	got, err := svc.Unwrap(ctx(t), old.KeyID, old.Wrapped)
	if err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("old wrapped key no longer unwraps after rotation: %v", err)
	}
}

func testDisable(t *testing.T, h Harness) {
	svc := open(t, h)
	kek := NewKEK(t)
	res, err := svc.Wrap(ctx(t), kek)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	h.Disable(t)
	enabled := false
	enable := func() {
		if !enabled && h.Enable != nil {
			h.Enable(t)
			enabled = true
		}
	}
	t.Cleanup(enable)
	if _, err := svc.Probe(ctx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Probe of a disabled key: %v (class %v), want revoked", err, keyservice.Classify(err))
	}
	if _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Unwrap with a disabled key: %v (class %v), want revoked", err, keyservice.Classify(err))
	}
	if h.Enable == nil {
		return
	}
	enable()
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe after re-enable: %v", err)
	}
	got, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped)
	if err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("Unwrap after re-enable: %v", err)
	}
}

func testOutage(t *testing.T, h Harness) {
	svc := open(t, h)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe: %v", err)
	}
	h.Stop(t)
	started := false
	start := func() {
		if !started {
			h.Start(t)
			started = true
		}
	}
	t.Cleanup(start)
	c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := svc.Probe(c); keyservice.Classify(err) != keyservice.ClassTransient {
		t.Fatalf("Probe while the server is down: %v (class %v), want transient", err, keyservice.Classify(err))
	}
	start()
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := svc.Probe(ctx(t))
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Probe after the server came back: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
