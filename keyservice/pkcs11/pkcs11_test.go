package pkcs11

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
)

// harness drives the contract against a private SoftHSM2 token:
//   - Rotate creates a new key with the same label and a higher CKA_ID.
//   - Disable deletes every key object, which is how an operator revokes a
//     token key. Enable is nil: a deleted non-extractable key cannot be
//     brought back, which is the point. So that later sub-tests have a key,
//     Disable's sub-test ends by creating a fresh one.
//   - Stop/Start move the token's directory away and back.
func harness(h *softHSM) keyservicetest.Harness {
	uri := h.uri(";object="+testLabel, "")
	return keyservicetest.Harness{
		Open: func(t *testing.T) keyservice.Service {
			return h.open(t, uri, keyservice.Options{})
		},
		Rotate: func(t *testing.T) { h.keygen(testLabel) },
		Disable: func(t *testing.T) {
			h.deleteAll()
			t.Cleanup(func() { h.keygen(testLabel) })
		},
		Stop:  func(t *testing.T) { h.stop() },
		Start: func(t *testing.T) { h.start() },
		// Revoking an old key version on an HSM = deleting that key object.
		RevokeVersion: func(t *testing.T, keyID string) {
			ref, err := parseKeyID(keyID)
			if err != nil || len(ref.ID) != 1 {
				t.Fatalf("key ID %q: %v", keyID, err)
			}
			h.deleteKey(int(ref.ID[0]))
		},
	}
}

func TestContract(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	keyservicetest.Run(t, harness(h))
}

// Values wrapped before an outage unwrap after it, by the same service and a
// new one, and Wrap works again.
func TestOutageKeepsKeys(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	uri := h.uri(";object="+testLabel, "")
	svc := h.open(t, uri, keyservice.Options{})
	kek := keyservicetest.NewKEK(t)
	res, err := svc.Wrap(testCtx(t), kek)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	h.stop()
	_, err = svc.Unwrap(testCtx(t), res.KeyID, res.Wrapped)
	mustClass(t, "Unwrap while the token is away", err, keyservice.ClassTransient)
	_, err = svc.Wrap(testCtx(t), kek)
	mustClass(t, "Wrap while the token is away", err, keyservice.ClassTransient)
	if !strings.Contains(err.Error(), "not present or not responding") {
		t.Fatalf("outage error does not say what is wrong: %v", err)
	}
	h.start()
	if id := waitProbe(t, svc); id != res.KeyID {
		t.Fatalf("key ID changed across an outage: %q -> %q", res.KeyID, id)
	}
	for name, s := range map[string]keyservice.Service{"same": svc, "new": h.open(t, uri, keyservice.Options{})} {
		got, err := s.Unwrap(testCtx(t), res.KeyID, res.Wrapped)
		if err != nil || !bytes.Equal(got, kek) {
			t.Fatalf("%s service: Unwrap after the outage: %v", name, err)
		}
	}
	if _, err := svc.Wrap(testCtx(t), kek); err != nil {
		t.Fatalf("Wrap after the outage: %v", err)
	}
}

// A key deleted and re-created with the same label and CKA_ID gets a new key
// ID, and values wrapped by the old one are Revoked, not Invalid.
func TestRecreatedKeyGetsNewID(t *testing.T) {
	h := newSoftHSM(t)
	id := h.keygen(testLabel)
	svc := h.open(t, h.uri(";object="+testLabel, ""), keyservice.Options{})
	before, err := svc.Probe(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(before, "pkcs11:token=kms;") || len(before) > 1024 {
		t.Fatalf("key ID %q: want a pkcs11:token=kms; prefix and at most 1024 bytes", before)
	}
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	h.deleteKey(id)
	h.SetNextID(id)
	h.keygen(testLabel)
	after, err := svc.Probe(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if after == before {
		t.Fatalf("re-created key kept key ID %q", before)
	}
	_, err = svc.Unwrap(testCtx(t), res.KeyID, res.Wrapped)
	mustClass(t, "Unwrap with a re-created key", err, keyservice.ClassRevoked)
}

// With id= in the URI the named object is current, even when a higher id
// exists; without it the highest id wins.
func TestURISelectsKey(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	h.keygen(testLabel)
	pinned := h.open(t, h.uri(";object="+testLabel+";id=%01", ""), keyservice.Options{})
	newest := h.open(t, h.uri(";object="+testLabel, ""), keyservice.Options{})
	byID := h.open(t, h.uri(";id=%02", ""), keyservice.Options{})
	p, err := pinned.Probe(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	n, err := newest.Probe(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	b, err := byID.Probe(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(p, ";id=%01;") || !strings.Contains(n, ";id=%02;") || b != n {
		t.Fatalf("pinned %q, newest %q, by id %q", p, n, b)
	}
	// Each unwraps what the other wrapped: Unwrap follows the key ID.
	res, err := pinned.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newest.Unwrap(testCtx(t), res.KeyID, res.Wrapped); err != nil {
		t.Fatalf("Unwrap of a value wrapped by an older key: %v", err)
	}
}

// An extractable or non-sensitive key is refused.
func TestRefusesExtractableKey(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen("weak", "--extractable")
	svc := h.open(t, h.uri(";object=weak", ""), keyservice.Options{})
	_, err := svc.Probe(testCtx(t))
	if err == nil || !strings.Contains(err.Error(), "sensitive and non-extractable") {
		t.Fatalf("Probe of an extractable key: %v", err)
	}
	if _, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t)); err == nil {
		t.Fatal("Wrap with an extractable key succeeded")
	}
}

// A missing key is Revoked and says so.
func TestMissingKeyIsRevoked(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	svc := h.open(t, h.uri(";object=other", ""), keyservice.Options{})
	_, err := svc.Probe(testCtx(t))
	mustClass(t, "Probe of a missing key", err, keyservice.ClassRevoked)
	if !strings.Contains(err.Error(), "no AES secret key matches") {
		t.Fatalf("unclear error: %v", err)
	}
	// A token that is not there at all is transient (it may be plugged in).
	svc = h.open(t, strings.Replace(h.uri(";object=kek", ""), "token=kms", "token=elsewhere", 1), keyservice.Options{})
	_, err = svc.Probe(testCtx(t))
	mustClass(t, "Probe on a missing token", err, keyservice.ClassTransient)
}

// The cluster name is bound into the AAD: another cluster cannot unwrap.
func TestClusterBinding(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	uri := h.uri(";object="+testLabel, "")
	a := h.open(t, uri, keyservice.Options{ClusterName: "a"})
	b := h.open(t, uri, keyservice.Options{ClusterName: "b"})
	res, err := a.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.Unwrap(testCtx(t), res.KeyID, res.Wrapped)
	mustClass(t, "Unwrap by another cluster", err, keyservice.ClassInvalid)
}

// The PIN never shows up in errors or logs: not with a wrong PIN, not from a
// PIN pasted into the URI, not from an env variable.
func TestPINNeverLeaks(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts := keyservice.Options{Logger: log}

	_, err := Open(context.Background(), h.uri("", "&pin-value="+testPIN), opts)
	if err == nil || hasSecret(err, testPIN) {
		t.Fatalf("pin-value in the URI: %v", err)
	}

	const wrongPIN = "wrong-PIN-5521"
	t.Setenv("KUBEKMS_TEST_PIN", wrongPIN)
	uri := strings.Replace(h.uri(";object="+testLabel, ""), escape("file:"+h.pinFile, queryChar), "env:KUBEKMS_TEST_PIN", 1)
	svc := h.open(t, uri, opts)
	_, err = svc.Probe(testCtx(t))
	mustClass(t, "Probe with a wrong PIN", err, keyservice.ClassRevoked)
	if hasSecret(err, testPIN, wrongPIN) {
		t.Fatalf("error leaks the PIN: %v", err)
	}
	_, err = svc.Unwrap(testCtx(t), "pkcs11:token=kms;serial=x;object=kek;id=%01;fp=000000000000000000000000", make([]byte, wrappedLen))
	if err == nil || hasSecret(err, testPIN, wrongPIN) {
		t.Fatalf("Unwrap with a wrong PIN: %v", err)
	}

	t.Setenv("KUBEKMS_TEST_PIN", testPIN)
	if _, err := svc.Probe(testCtx(t)); err != nil {
		t.Fatalf("Probe after fixing the PIN: %v", err)
	}
	h.stop()
	_, err = svc.Probe(testCtx(t))
	mustClass(t, "Probe with the token away", err, keyservice.ClassTransient)
	h.start()
	waitProbe(t, svc)
	if strings.Contains(logs.String(), testPIN) || strings.Contains(logs.String(), wrongPIN) {
		t.Fatalf("logs leak the PIN:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "PKCS#11 token unavailable") {
		t.Fatalf("no health message logged for the outage:\n%s", logs.String())
	}
}

// The pool never holds more sessions than max-sessions, however many calls
// run at once.
func TestSessionPoolBounded(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	svc := h.open(t, h.uri(";object="+testLabel, "&max-sessions=2"), keyservice.Options{})
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for range 32 {
		wg.Go(func() {
			if _, err := svc.Unwrap(testCtx(t), res.KeyID, res.Wrapped); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent Unwrap: %v", err)
	}
	svc.mu.Lock()
	idle := len(svc.idle)
	svc.mu.Unlock()
	if idle < 1 || idle > 2 {
		t.Fatalf("%d idle sessions after 32 concurrent calls, want 1..2", idle)
	}
}

// Bad input is Invalid before it reaches the token.
func TestBadInput(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	svc := h.open(t, h.uri(";object="+testLabel, ""), keyservice.Options{})
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	_, err = svc.Wrap(testCtx(t), make([]byte, 31))
	mustClass(t, "Wrap of 31 bytes", err, keyservice.ClassInvalid)
	for name, c := range map[string]struct {
		id      string
		wrapped []byte
	}{
		"foreign key ID": {"local:abc", res.Wrapped},
		"short value":    {res.KeyID, res.Wrapped[:20]},
		"unknown format": {res.KeyID, append([]byte{9}, res.Wrapped[1:]...)},
	} {
		_, err := svc.Unwrap(testCtx(t), c.id, c.wrapped)
		mustClass(t, name, err, keyservice.ClassInvalid)
	}
}
