// Package hierarchytest runs the local key hierarchy over a real backend: the
// behaviour every backend shares (one remote call per local KEK, rotation,
// outage grace, crypto-shredding) checked against that backend's server.
//
// A backend's test calls RunBackend with the same keyservicetest.Harness it
// gives keyservicetest.Run.
package hierarchytest

import (
	"bytes"
	"context"
	"crypto/rand"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
)

type clock struct{ ns atomic.Int64 }

func (c *clock) Now() time.Time      { return time.Unix(0, c.ns.Load()) }
func (c *clock) Add(d time.Duration) { c.ns.Add(int64(d)) }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(time.Now().UnixNano())
	return c
}

// RunBackend runs the shared-behaviour suite.
func RunBackend(t *testing.T, h keyservicetest.Harness) {
	t.Run("HierarchyEconomics", func(t *testing.T) { testEconomics(t, h) })
	if h.Rotate != nil {
		t.Run("HierarchyRotation", func(t *testing.T) { testRotation(t, h) })
	}
	if h.Stop != nil {
		t.Run("HierarchyOutageGrace", func(t *testing.T) { testOutage(t, h) })
	}
	if h.Disable != nil {
		t.Run("HierarchyRevocation", func(t *testing.T) { testRevocation(t, h) })
	}
	if h.Rotate != nil && h.RevokeVersion != nil {
		t.Run("HierarchyOldVersionRevocation", func(t *testing.T) { testOldVersionRevocation(t, h) })
	}
}

// testOldVersionRevocation: after a rotation, revoking the old key version
// (the current one stays usable) stops the cached local KEK it wrapped from
// decrypting within the revocation bound, with no cache miss needed.
func testOldVersionRevocation(t *testing.T, h keyservicetest.Harness) {
	svc := h.Open(t) // not the counting wrapper: it would hide the service's VersionChecker
	t.Cleanup(func() { _ = svc.Close() })
	if _, ok := svc.(keyservice.VersionChecker); !ok {
		t.Fatal("the harness sets RevokeVersion but the service does not implement keyservice.VersionChecker")
	}
	const bound = 200 * time.Millisecond
	hy := open(t, svc, hierarchy.Config{ProbeInterval: time.Hour, RevocationBound: bound, RemoteTimeout: 3 * time.Second})
	old, _ := roundTrip(t, hy)
	h.Rotate(t)
	deadline := time.Now().Add(20 * time.Second)
	var fresh hierarchy.Sealed
	var freshPlain []byte
	for {
		fresh, freshPlain = roundTrip(t, hy)
		if fresh.KeyID != old.KeyID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the rotation never reached Encrypt")
		}
		time.Sleep(2 * bound)
	}
	h.RevokeVersion(t, old.KeyID)
	for {
		_, err := hy.Decrypt(context.Background(), old.KeyID, old.Ciphertext, old.Annotations)
		if keyservice.Classify(err) == keyservice.ClassRevoked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("data under the revoked version still decrypts (err %v)", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	mustDecrypt(t, hy, fresh, freshPlain) // the current version is untouched
	roundTrip(t, hy)
}

func seed(t *testing.T) []byte {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func open(t *testing.T, svc keyservice.Service, cfg hierarchy.Config) *hierarchy.Hierarchy {
	t.Helper()
	hy, err := hierarchy.New(context.Background(), svc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hy.Close)
	return hy
}

func roundTrip(t *testing.T, hy *hierarchy.Hierarchy) (hierarchy.Sealed, []byte) {
	t.Helper()
	p := seed(t)
	s, err := hy.Encrypt(context.Background(), p)
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	mustDecrypt(t, hy, s, p)
	return s, p
}

func mustDecrypt(t *testing.T, hy *hierarchy.Hierarchy, s hierarchy.Sealed, want []byte) {
	t.Helper()
	got, err := hy.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations)
	if err != nil {
		t.Fatalf("Decrypt: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("Decrypt returned other bytes")
	}
}

func openService(t *testing.T, h keyservicetest.Harness) *keyservicetest.Counting {
	svc := h.Open(t)
	t.Cleanup(func() { _ = svc.Close() })
	return keyservicetest.NewCounting(svc)
}

func testEconomics(t *testing.T, h keyservicetest.Harness) {
	svc := openService(t, h)
	hy := open(t, svc, hierarchy.Config{})
	var sealed []hierarchy.Sealed
	var plain [][]byte
	for range 500 {
		s, p := roundTrip(t, hy)
		sealed, plain = append(sealed, s), append(plain, p)
	}
	if n := svc.Crypto(); n != 1 {
		t.Fatalf("500 round trips made %d remote wrap/unwrap calls, want 1", n)
	}
	// A restarted plugin (new hierarchy, no state) unwraps the old local KEK once.
	svc2 := openService(t, h)
	hy2 := open(t, svc2, hierarchy.Config{})
	for i, s := range sealed {
		mustDecrypt(t, hy2, s, plain[i])
	}
	if n := svc2.Calls("unwrap"); n != 1 {
		t.Fatalf("restart: decrypting 500 values made %d unwraps, want 1", n)
	}
}

func testRotation(t *testing.T, h keyservicetest.Harness) {
	c := newClock()
	svc := openService(t, h)
	hy := open(t, svc, hierarchy.Config{Now: c.Now, ProbeInterval: time.Hour, RevocationBound: time.Hour})
	before := hy.Status(context.Background())
	old, oldPlain := roundTrip(t, hy)
	if !before.OK || old.KeyID != before.KeyID {
		t.Fatalf("before rotation: status %+v, Encrypt key ID %q", before, old.KeyID)
	}
	h.Rotate(t)
	var after hierarchy.Health
	deadline := time.Now().Add(15 * time.Second)
	for {
		c.Add(time.Hour)
		after = hy.Status(context.Background())
		if after.OK && after.KeyID != before.KeyID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key ID did not change after remote rotation: %+v", after)
		}
		time.Sleep(100 * time.Millisecond)
	}
	s, _ := roundTrip(t, hy)
	if s.KeyID != after.KeyID {
		t.Fatalf("Encrypt after rotation used %q, Status says %q", s.KeyID, after.KeyID)
	}
	mustDecrypt(t, hy, old, oldPlain)
	// A restarted plugin still reads data sealed under the old key version.
	mustDecrypt(t, open(t, openService(t, h), hierarchy.Config{}), old, oldPlain)
}

func testOutage(t *testing.T, h keyservicetest.Harness) {
	c := newClock()
	svc := openService(t, h)
	hy := open(t, svc, hierarchy.Config{Now: c.Now, ProbeInterval: time.Minute, RevocationBound: time.Hour,
		OutageGrace: time.Hour, RemoteTimeout: 2 * time.Second})
	s, p := roundTrip(t, hy)
	h.Stop(t)
	started := false
	t.Cleanup(func() {
		if !started {
			h.Start(t)
		}
	})
	c.Add(2 * time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if st := hy.Status(ctx); !st.OK || st.Reason == "" {
		t.Fatalf("key service down, within grace: %+v, want ok with a note", st)
	}
	mustDecrypt(t, hy, s, p)
	roundTrip(t, hy)
	c.Add(2 * time.Hour)
	if st := hy.Status(ctx); st.OK {
		t.Fatalf("key service down past the grace: %+v, want not ok", st)
	}
	h.Start(t)
	started = true
	deadline := time.Now().Add(20 * time.Second)
	for {
		c.Add(2 * time.Minute)
		st := hy.Status(context.Background())
		if st.OK && st.Reason == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key service back: %+v", st)
		}
		time.Sleep(200 * time.Millisecond)
	}
	roundTrip(t, hy)
}

func testRevocation(t *testing.T, h keyservicetest.Harness) {
	svc := openService(t, h)
	const bound = 200 * time.Millisecond
	hy := open(t, svc, hierarchy.Config{ProbeInterval: time.Hour, RevocationBound: bound, RemoteTimeout: 3 * time.Second})
	s, p := roundTrip(t, hy)
	h.Disable(t)
	enabled := false
	t.Cleanup(func() {
		if !enabled && h.Enable != nil {
			h.Enable(t)
		}
	})
	deadline := time.Now().Add(10*bound + 10*time.Second)
	for {
		_, err := hy.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations)
		if err != nil && keyservice.Classify(err) == keyservice.ClassRevoked {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a cached local KEK still decrypts after the key was disabled (err %v)", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st := hy.Status(context.Background()); st.OK {
		t.Fatalf("disabled key: %+v, want not ok", st)
	}
	if h.Enable == nil {
		return
	}
	h.Enable(t)
	enabled = true
	deadline = time.Now().Add(20 * time.Second)
	for {
		time.Sleep(2 * bound)
		if _, err := hy.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("re-enabled key: old values still do not decrypt")
		}
	}
	mustDecrypt(t, hy, s, p)
}
