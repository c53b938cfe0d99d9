package opaqueid_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/opaqueid"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

var secret = bytes.Repeat([]byte("s"), 32)

func codec(t *testing.T, s []byte) *opaqueid.Codec {
	t.Helper()
	c, err := opaqueid.NewCodec(s)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestCodec(t *testing.T) {
	c := codec(t, secret)
	vendor := "arn:aws:kms:eu-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
	id, err := c.Encode(vendor)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(id, opaqueid.Prefix) || strings.Contains(id, "111122223333") || strings.Contains(id, "arn") {
		t.Fatalf("opaque ID %q shows the vendor ID", id)
	}
	if again, _ := c.Encode(vendor); again != id {
		t.Fatalf("same vendor ID, different opaque IDs: %q, %q", id, again)
	}
	if other, _ := c.Encode(vendor + "x"); other == id {
		t.Fatal("different vendor IDs, same opaque ID")
	}
	if got, err := c.Decode(id); err != nil || got != vendor {
		t.Fatalf("Decode = %q, %v", got, err)
	}
	if c.Name(id) != vendor || c.Name("softkey:x:v1") != "softkey:x:v1" {
		t.Fatal("Name does not resolve opaque IDs or keep readable ones")
	}
	// Another secret neither decodes nor accepts it.
	if _, err := codec(t, bytes.Repeat([]byte("t"), 32)).Decode(id); !errors.Is(err, opaqueid.ErrNotOurs) {
		t.Fatalf("Decode with another secret: %v", err)
	}
	// Every single-character change is refused.
	for i := len(opaqueid.Prefix); i < len(id); i++ {
		b := []byte(id)
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
		if got, err := c.Decode(string(b)); err == nil {
			t.Fatalf("tampered opaque ID (char %d) decoded to %q", i, got)
		}
	}
	// Lengths are rounded up: 1 and 31 bytes give the same length.
	a, _ := c.Encode("a")
	b, _ := c.Encode(strings.Repeat("b", 31))
	if len(a) != len(b) {
		t.Fatalf("opaque IDs of 1 and 31 bytes differ in length: %d, %d", len(a), len(b))
	}
	long, err := c.Encode(strings.Repeat("x", 735))
	if err != nil || len(long) > 1024 {
		t.Fatalf("longest vendor ID: %d bytes, %v", len(long), err)
	}
	if _, err := c.Encode(strings.Repeat("x", 736)); err == nil {
		t.Fatal("a vendor ID whose opaque ID exceeds 1024 bytes was accepted")
	}
	if _, err := opaqueid.NewCodec(make([]byte, 31)); err == nil {
		t.Fatal("a 31-byte secret was accepted")
	}
}

func TestReadSecretFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(p, append(bytes.Clone(secret), '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := opaqueid.ReadSecretFile(p)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := c.Encode("v")
	b, _ := codec(t, secret).Encode("v")
	if a != b {
		t.Fatal("the trailing newline was not dropped")
	}
}

// harness is softkey's, behind opaque key IDs: the wrapper passes the shared
// contract and hierarchy suites, old-version revocation included (which
// needs VersionChecker forwarded with the decoded ID).
func harness(path string, c *opaqueid.Codec) keyservicetest.Harness {
	move := func(t *testing.T, from, to string) {
		if err := os.Rename(from, to); err != nil {
			t.Fatal(err)
		}
	}
	setAll := func(t *testing.T, disabled bool) {
		ring, err := softkey.Load(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range ring.Versions {
			if _, err := softkey.SetDisabled(path, v.Version, disabled); err != nil {
				t.Fatal(err)
			}
		}
	}
	return keyservicetest.Harness{
		Open: func(t *testing.T) keyservice.Service {
			svc, err := softkey.Open(context.Background(), "softkey://"+path, keyservice.Options{})
			if err != nil {
				t.Fatal(err)
			}
			return opaqueid.Wrap(svc, c)
		},
		Rotate: func(t *testing.T) {
			if _, err := softkey.Rotate(path); err != nil {
				t.Fatal(err)
			}
		},
		Disable: func(t *testing.T) { setAll(t, true) },
		Enable:  func(t *testing.T) { setAll(t, false) },
		Stop:    func(t *testing.T) { move(t, path, path+".away") },
		Start:   func(t *testing.T) { move(t, path+".away", path) },
		RevokeVersion: func(t *testing.T, keyID string) {
			vendor, err := c.Decode(keyID)
			if err != nil {
				t.Fatal(err)
			}
			ring, err := softkey.Load(path)
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range ring.Versions {
				if ring.KeyID(v.Version) == vendor {
					if _, err := softkey.SetDisabled(path, v.Version, true); err != nil {
						t.Fatal(err)
					}
					return
				}
			}
			t.Fatalf("no version has key ID %q", vendor)
		},
	}
}

func TestContractOverSoftkey(t *testing.T) {
	keyservicetest.Run(t, harness(filepath.Join(t.TempDir(), "keyring.json"), codec(t, secret)))
}

func TestHierarchyOverSoftkey(t *testing.T) {
	hierarchytest.RunBackend(t, harness(filepath.Join(t.TempDir(), "keyring.json"), codec(t, secret)))
}

func TestKeyIDsAreOpaque(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyring.json")
	c := codec(t, secret)
	svc := harness(path, c).Open(t)
	defer svc.Close()
	ctx := context.Background()
	res, err := svc.Wrap(ctx, keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	ring, err := softkey.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	vendor := ring.KeyID(1)
	if strings.Contains(res.KeyID, ring.RingID) || !strings.HasPrefix(res.KeyID, opaqueid.Prefix) {
		t.Fatalf("Wrap key ID %q is not opaque (vendor ID %q)", res.KeyID, vendor)
	}
	if c.Name(res.KeyID) != vendor {
		t.Fatalf("Name(%q) = %q, want %q", res.KeyID, c.Name(res.KeyID), vendor)
	}
	// A readable key ID (stored before opaque IDs were turned on) still
	// unwraps; an opaque ID of another secret does not.
	if _, err := svc.Unwrap(ctx, vendor, res.Wrapped); err != nil {
		t.Fatalf("Unwrap with the readable key ID of an older value: %v", err)
	}
	foreign, _ := codec(t, bytes.Repeat([]byte("t"), 32)).Encode(vendor)
	if _, err := svc.Unwrap(ctx, foreign, res.Wrapped); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Fatalf("Unwrap with another secret's opaque ID: %v, want invalid", err)
	}
	if _, ok := svc.(keyservice.VersionChecker); !ok {
		t.Fatal("softkey's VersionChecker is not forwarded")
	}
	if _, ok := svc.(keyservice.Notifier); !ok {
		t.Fatal("softkey's Notifier (its keyring watch) is not forwarded")
	}
	// A backend with neither gets neither: the hierarchy must not wait on
	// a change channel nobody feeds, or skip version checks it believes it has.
	if p := opaqueid.Wrap(plain{svc}, c); func() bool { _, n := p.(keyservice.Notifier); _, v := p.(keyservice.VersionChecker); return n || v }() {
		t.Fatal("the wrapper claims a Notifier or VersionChecker its backend does not have")
	}
	ch := make(chan struct{}, 1)
	n := opaqueid.Wrap(notifier{svc, ch}, c)
	nn, ok := n.(keyservice.Notifier)
	if !ok {
		t.Fatal("a backend's Notifier is not forwarded")
	}
	if _, ok := n.(keyservice.VersionChecker); !ok {
		t.Fatal("VersionChecker lost when the backend also notifies")
	}
	ch <- struct{}{}
	<-nn.Changed()
}

// plain hides every optional interface of the service it holds.
type plain struct{ keyservice.Service }

type notifier struct {
	keyservice.Service
	ch chan struct{}
}

func (n notifier) Changed() <-chan struct{}                 { return n.ch }
func (n notifier) CheckKeyID(context.Context, string) error { return nil }
