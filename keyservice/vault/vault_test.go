package vault_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/vault"
)

// Every test here runs against a real Vault server (internal/testservers/
// vaultserver: file storage, initialized and unsealed, on 127.0.0.1).

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func debugLogger(buf *testutil.SyncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func open(t *testing.T, uri string, log *slog.Logger) *vault.Service {
	t.Helper()
	svc, err := vault.Open(ctx(t), uri, keyservice.Options{Logger: log})
	if err != nil {
		t.Fatalf("Open(%s): %v", uri, err)
	}
	t.Cleanup(func() { _ = svc.Close() })
	return svc.(*vault.Service)
}

// newKey starts a server with one transit key.
func newKey(t *testing.T, opts vaultserver.Options) *vaultserver.TransitKey {
	return vaultserver.New(t, opts).NewTransitKey(t)
}

// keyVersion is N of a key ID "vault:<path>:v<N>:<created>".
func keyVersion(t *testing.T, keyID string) int {
	t.Helper()
	parts := strings.Split(keyID, ":")
	if len(parts) != 4 || !strings.HasPrefix(parts[2], "v") {
		t.Fatalf("key ID %q is not a vault key ID", keyID)
	}
	v, err := strconv.Atoi(parts[2][1:])
	if err != nil {
		t.Fatalf("key ID %q: %v", keyID, err)
	}
	return v
}

// harness drives the key as the shared suites need: Disable removes the
// key's policy (the token stays valid), Stop/Start restart the server on its
// storage, RevokeVersion raises min_decryption_version above the version.
func harness(k *vaultserver.TransitKey) keyservicetest.Harness {
	return keyservicetest.Harness{
		Open:    func(t *testing.T) keyservice.Service { return open(t, k.URI(), nil) },
		Rotate:  func(t *testing.T) { k.Rotate(t) },
		Disable: func(t *testing.T) { k.RemovePolicy(t) },
		Enable:  func(t *testing.T) { k.RestorePolicy(t) },
		Stop:    func(t *testing.T) { k.Server.Stop(t) },
		Start:   func(t *testing.T) { k.Server.Start(t) },
		RevokeVersion: func(t *testing.T, keyID string) {
			k.SetMinDecryptionVersion(t, keyVersion(t, keyID)+1)
		},
	}
}

func TestContract(t *testing.T) {
	keyservicetest.Run(t, harness(newKey(t, vaultserver.Options{})))
}

// TestContractTLS runs the contract over https with the server's CA in
// ca-file=.
func TestContractTLS(t *testing.T) {
	keyservicetest.Run(t, harness(newKey(t, vaultserver.Options{TLS: true})))
}

func TestHierarchy(t *testing.T) {
	hierarchytest.RunBackend(t, harness(newKey(t, vaultserver.Options{})))
}

// TestSealedIsAnOutage: a sealed Vault answers 503. That is an outage
// (transient), never a revocation: cached local KEKs keep working and
// nothing is dropped; after unsealing everything works again.
func TestSealedIsAnOutage(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	svc := open(t, k.URI(), nil)
	hy, err := hierarchy.New(ctx(t), svc, hierarchy.Config{RevocationBound: 100 * time.Millisecond, ProbeInterval: 100 * time.Millisecond, RemoteTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(hy.Close)
	sealed, err := hy.Encrypt(ctx(t), []byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	k.Server.Seal(t)
	checks := map[string]func() error{
		"Probe":      func() error { _, err := svc.Probe(ctx(t)); return err },
		"Wrap":       func() error { _, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t)); return err },
		"Unwrap":     func() error { _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); return err },
		"CheckKeyID": func() error { return svc.CheckKeyID(ctx(t), res.KeyID) },
	}
	for name, call := range checks {
		err := call()
		if c := keyservice.Classify(err); c != keyservice.ClassTransient {
			t.Errorf("%s on a sealed Vault: %v (class %v), want transient", name, err, c)
		} else if !strings.Contains(err.Error(), "sealed") {
			t.Errorf("%s on a sealed Vault: %v, want the error to say so", name, err)
		}
	}
	// Many revocation bounds pass: the cached local KEK must survive them.
	time.Sleep(time.Second)
	if _, err := hy.Decrypt(ctx(t), sealed.KeyID, sealed.Ciphertext, sealed.Annotations); err != nil {
		t.Fatalf("Decrypt from the cache while Vault is sealed: %v", err)
	}
	k.Server.Unseal(t)
	for name, call := range checks {
		if err := call(); err != nil {
			t.Errorf("%s after unseal: %v", name, err)
		}
	}
}

// TestPausedIsAnOutage: a server that accepts connections but never
// answers (SIGSTOP) gives transient errors within the caller's deadline.
func TestPausedIsAnOutage(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	svc := open(t, k.URI(), nil)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	k.Server.Pause(t)
	c, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	_, err := svc.Probe(c)
	if keyservice.Classify(err) != keyservice.ClassTransient {
		t.Fatalf("Probe of a hung server: %v, want transient", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Probe of a hung server took %v, past its 2 s deadline", d)
	}
	k.Server.Resume(t)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe after the server resumed: %v", err)
	}
}

// TestDeletedKey: deleting the key revokes every version; a key re-created
// under the same name gets new key IDs and never sees the old values.
func TestDeletedKey(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	svc := open(t, k.URI(), nil)
	kek := keyservicetest.NewKEK(t)
	old, err := svc.Wrap(ctx(t), kek)
	if err != nil {
		t.Fatal(err)
	}
	k.Delete(t)
	if _, err := svc.Probe(ctx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Probe of a deleted key: %v, want revoked", err)
	}
	if _, err := svc.Unwrap(ctx(t), old.KeyID, old.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Unwrap with a deleted key: %v, want revoked", err)
	}
	if err := svc.CheckKeyID(ctx(t), old.KeyID); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("CheckKeyID of a deleted key: %v, want revoked", err)
	}
	if _, err := svc.Wrap(ctx(t), kek); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Wrap with a deleted key: %v, want revoked (the policy grants no create)", err)
	}
	// Vault records creation times in seconds: re-create in a later second.
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
	k.Create(t)
	id, err := svc.Probe(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if id == old.KeyID || keyVersion(t, id) != 1 {
		t.Fatalf("re-created key has key ID %q (old %q), want a new v1 ID", id, old.KeyID)
	}
	if _, err := svc.Unwrap(ctx(t), old.KeyID, old.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Unwrap of a value from the deleted key: %v, want revoked", err)
	}
	res, err := svc.Wrap(ctx(t), kek)
	if err != nil || res.KeyID != id {
		t.Fatalf("Wrap after re-create: %q %v, want key ID %q", res.KeyID, err, id)
	}
}

// TestMinDecryptionVersion: raising min_decryption_version revokes the
// older versions only, as the key read shows (CheckKeyID makes no crypto
// call); lowering it again brings them back.
func TestMinDecryptionVersion(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	svc := open(t, k.URI(), nil)
	var wrapped []keyservice.WrapResult
	for i := range 3 {
		if i > 0 {
			k.Rotate(t)
		}
		res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
		if err != nil {
			t.Fatal(err)
		}
		if keyVersion(t, res.KeyID) != i+1 {
			t.Fatalf("wrap %d used key ID %q", i, res.KeyID)
		}
		wrapped = append(wrapped, res)
	}
	k.SetMinDecryptionVersion(t, 3)
	before := k.Server.Requests(t, k.Mount+"/decrypt/"+k.Name)
	for i, res := range wrapped {
		want := keyservice.ClassRevoked
		if i == 2 {
			want = keyservice.ClassUnknown // nil
		}
		err := svc.CheckKeyID(ctx(t), res.KeyID)
		if keyservice.Classify(err) != want {
			t.Errorf("CheckKeyID(v%d) with min_decryption_version 3: %v, want %v", i+1, err, want)
		}
		if want == keyservice.ClassRevoked && (err == nil || !strings.Contains(err.Error(), "min_decryption_version")) {
			t.Errorf("CheckKeyID(v%d): %v, want the error to name min_decryption_version", i+1, err)
		}
	}
	if n := k.Server.Requests(t, k.Mount+"/decrypt/"+k.Name) - before; n != 0 {
		t.Errorf("CheckKeyID made %d decrypt calls, want none", n)
	}
	if _, err := svc.Unwrap(ctx(t), wrapped[0].KeyID, wrapped[0].Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Errorf("Unwrap of v1 below min_decryption_version: %v, want revoked", err)
	}
	if _, err := svc.Unwrap(ctx(t), wrapped[2].KeyID, wrapped[2].Wrapped); err != nil {
		t.Errorf("Unwrap of v3: %v", err)
	}
	k.SetMinDecryptionVersion(t, 1)
	for i, res := range wrapped {
		if err := svc.CheckKeyID(ctx(t), res.KeyID); err != nil {
			t.Errorf("CheckKeyID(v%d) after lowering min_decryption_version: %v", i+1, err)
		}
		if _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); err != nil {
			t.Errorf("Unwrap(v%d) after lowering min_decryption_version: %v", i+1, err)
		}
	}
}

// TestPolicyRemovedIsRevoked and the token tests below tell a 403 about the
// key from a 403 about the token: only the first is a revocation.
func TestPolicyRemovedIsRevoked(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	svc := open(t, k.URI(), nil)
	res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	k.RemovePolicy(t)
	for name, err := range map[string]error{
		"Probe":      func() error { _, err := svc.Probe(ctx(t)); return err }(),
		"Unwrap":     func() error { _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); return err }(),
		"CheckKeyID": svc.CheckKeyID(ctx(t), res.KeyID),
	} {
		if keyservice.Classify(err) != keyservice.ClassRevoked || !strings.Contains(err.Error(), "403") {
			t.Errorf("%s with the key's policy removed: %v, want revoked (403)", name, err)
		}
	}
}

// TestDeadTokenIsNotRevocation: a revoked or expired token in a token file
// that nobody replaces is an authentication problem. It must never read as
// "key revoked": the hierarchy keeps its cached local KEKs.
func TestDeadTokenIsNotRevocation(t *testing.T) {
	for _, tc := range []struct {
		name string
		kill func(t *testing.T, k *vaultserver.TransitKey, token string)
	}{
		{"revoked", func(t *testing.T, k *vaultserver.TransitKey, token string) { k.RevokeToken(t, token) }},
		{"expired", func(t *testing.T, k *vaultserver.TransitKey, token string) { time.Sleep(3 * time.Second) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := newKey(t, vaultserver.Options{})
			// A token that cannot be renewed, so "expired" really expires.
			token := k.NewToken(t, 2*time.Second, false)
			vaultserver.WriteFile(t, k.TokenFile, token)
			var logs testutil.SyncBuffer
			svc := open(t, k.URI(), debugLogger(&logs))
			hy, err := hierarchy.New(ctx(t), svc, hierarchy.Config{RevocationBound: 100 * time.Millisecond, ProbeInterval: 100 * time.Millisecond, RemoteTimeout: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(hy.Close)
			plain := []byte("0123456789abcdef0123456789abcdef")
			sealed, err := hy.Encrypt(ctx(t), plain)
			if err != nil {
				t.Fatal(err)
			}
			res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
			if err != nil {
				t.Fatal(err)
			}
			tc.kill(t, k, token)
			for name, err := range map[string]error{
				"Probe":      func() error { _, err := svc.Probe(ctx(t)); return err }(),
				"Unwrap":     func() error { _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); return err }(),
				"CheckKeyID": svc.CheckKeyID(ctx(t), res.KeyID),
			} {
				if err == nil || keyservice.Classify(err) == keyservice.ClassRevoked {
					t.Errorf("%s with a %s token: %v (class %v), want an error that is not revoked", name, tc.name, err, keyservice.Classify(err))
				} else if !strings.Contains(err.Error(), "invalid or expired") {
					t.Errorf("%s with a %s token: %v, want the error to say the token is invalid or expired", name, tc.name, err)
				}
			}
			time.Sleep(time.Second) // ten revocation bounds
			if got, err := hy.Decrypt(ctx(t), sealed.KeyID, sealed.Ciphertext, sealed.Annotations); err != nil || string(got) != string(plain) {
				t.Fatalf("Decrypt from the cache with a %s token: %v; a dead token must not shred the cache", tc.name, err)
			}
			if strings.Contains(logs.String(), token) {
				t.Fatal("the token leaked into a log")
			}
			// A new token in the file: everything works again.
			vaultserver.WriteFile(t, k.TokenFile, k.NewToken(t, time.Hour, true))
			if _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); err != nil {
				t.Fatalf("Unwrap after a new token was written: %v", err)
			}
		})
	}
}

func TestErrorClasses(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	svc := open(t, k.URI(), nil)
	res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	for name, wrapped := range map[string]string{
		"no prefix":      "xyz",
		"bad base64":     "vault:v1:!!!!",
		"too short":      "vault:v1:AAAA",
		"auth failure":   "vault:v1:" + strings.Repeat("A", 80),
		"other version":  "vault:v2:" + strings.Repeat("A", 80),
		"empty":          "",
		"truncated copy": string(res.Wrapped[:len(res.Wrapped)-8]),
	} {
		if _, err := svc.Unwrap(ctx(t), res.KeyID, []byte(wrapped)); keyservice.Classify(err) != keyservice.ClassInvalid {
			t.Errorf("Unwrap(%s): %v, want invalid", name, err)
		}
	}
	for _, id := range []string{"", "aws:x", "vault:transit/other:v1:1", strings.Replace(res.KeyID, "kek", "kek2", 1)} {
		if _, err := svc.Unwrap(ctx(t), id, res.Wrapped); keyservice.Classify(err) != keyservice.ClassInvalid {
			t.Errorf("Unwrap with key ID %q: %v, want invalid", id, err)
		}
		if err := svc.CheckKeyID(ctx(t), id); keyservice.Classify(err) != keyservice.ClassInvalid {
			t.Errorf("CheckKeyID(%q): %v, want invalid", id, err)
		}
	}
	if _, err := svc.Wrap(ctx(t), nil); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Errorf("Wrap(nil): %v, want invalid", err)
	}
	missing := open(t, strings.Replace(k.URI(), "/keys/kek", "/keys/missing", 1), nil)
	if _, err := missing.Probe(ctx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Errorf("Probe of a missing key: %v, want revoked", err)
	}
	if _, err := vault.Open(ctx(t), k.URI()+"x", keyservice.Options{}); err == nil {
		t.Error("Open with a missing token file succeeded")
	}
}

// TestNamespace: namespace= is sent as X-Vault-Namespace on every request
// (the logins too) and is part of the key ID. Namespaces are a Vault
// Enterprise (and OpenBao) feature; the open-source server ignores the
// header, so a recording proxy in front of the real server checks that the
// header arrives while the real server answers.
func TestNamespace(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	ar := newAppRole(t, k, "approle", time.Hour, 2*time.Hour)
	target, err := url.Parse(k.Server.URL())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	seen := map[string]int{} // namespace header -> requests
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.Header.Get("X-Vault-Namespace")]++
		mu.Unlock()
		httputil.NewSingleHostReverseProxy(target).ServeHTTP(w, r)
	}))
	t.Cleanup(proxy.Close)
	uri := fmt.Sprintf("hcvault://%s/%s/keys/%s?namespace=team-a/&auth=approle&role-id-file=%s&secret-id-file=%s",
		strings.TrimPrefix(proxy.URL, "http://"), k.Mount, k.Name, ar.roleFile, ar.secretFile)
	svc := open(t, uri, nil)
	id, err := svc.Probe(ctx(t))
	if err != nil {
		t.Fatalf("Probe in a namespace: %v", err)
	}
	if !strings.HasPrefix(id, "vault:team-a/"+k.Mount+"/kek:v1:") {
		t.Fatalf("key ID %q does not name the namespace", id)
	}
	res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
	if err != nil || res.KeyID != id {
		t.Fatalf("Wrap in a namespace: %q %v", res.KeyID, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 1 || seen["team-a"] < 3 {
		t.Fatalf("requests by X-Vault-Namespace: %v, want every one (login, key read, encrypt) with team-a", seen)
	}
}

// TestForbiddenThenNoAnswer: after a 403 the backend asks whether its token
// still works (lookup-self). When that question gets no answer (the server
// went away or is sealed in between), it cannot tell a key policy from a
// dead token, so the error is transient, never "revoked". A proxy in front
// of the real server drops the lookups: no server fails exactly that call on
// demand.
func TestForbiddenThenNoAnswer(t *testing.T) {
	for _, how := range []string{"connection closed", "503"} {
		t.Run(how, func(t *testing.T) {
			k := newKey(t, vaultserver.Options{})
			target, err := url.Parse(k.Server.URL())
			if err != nil {
				t.Fatal(err)
			}
			var failLookups atomic.Bool
			proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if failLookups.Load() && r.URL.Path == "/v1/auth/token/lookup-self" {
					if how == "503" {
						http.Error(w, `{"errors":["Vault is sealed"]}`, http.StatusServiceUnavailable)
						return
					}
					conn, _, err := w.(http.Hijacker).Hijack()
					if err == nil {
						conn.Close()
					}
					return
				}
				httputil.NewSingleHostReverseProxy(target).ServeHTTP(w, r)
			}))
			t.Cleanup(proxy.Close)
			uri := strings.Replace(k.URI(), k.Server.Addr(), strings.TrimPrefix(proxy.URL, "http://"), 1)
			svc := open(t, uri, nil)
			if _, err := svc.Probe(ctx(t)); err != nil { // logged in, token looked up
				t.Fatal(err)
			}
			failLookups.Store(true)
			k.RemovePolicy(t) // a real 403 for the key read
			_, err = svc.Probe(ctx(t))
			if keyservice.Classify(err) != keyservice.ClassTransient {
				t.Fatalf("Probe after a 403 whose token check got no answer: %v (class %v), want transient", err, keyservice.Classify(err))
			}
		})
	}
}
