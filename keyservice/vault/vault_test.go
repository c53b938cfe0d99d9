package vault_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/vault"
	"github.com/kubekms/kubekms/keyservice/vault/transittest"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func writeFile(t *testing.T, path, content string) string {
	t.Helper()
	// Write-and-rename, the way Vault Agent and kubelet replace files.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	return path
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

func adminClient(t *testing.T, addr, token, namespace string) *api.Client {
	t.Helper()
	conf := api.DefaultConfig()
	conf.Address = addr
	c, err := api.NewClient(conf)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(token)
	c.SetNamespace(namespace)
	return c
}

// standIn is a stand-in server with one key and a renewable token in a file.
type standIn struct {
	srv       *transittest.Server
	admin     *api.Client
	dir       string
	tokenFile string
	uri       string
}

func newStandIn(t *testing.T) *standIn {
	srv := transittest.New(t, transittest.Options{Mounts: []string{"transit", "kms/transit"}})
	e := &standIn{srv: srv, admin: adminClient(t, srv.URL(), srv.RootToken(), ""), dir: t.TempDir()}
	if _, err := e.admin.Logical().Write("kms/transit/keys/kek", nil); err != nil {
		t.Fatal(err)
	}
	e.tokenFile = writeFile(t, filepath.Join(e.dir, "token"), srv.CreateToken(time.Hour, true))
	e.uri = fmt.Sprintf("hcvault://%s/kms/transit/keys/kek?token-file=%s", srv.Addr(), e.tokenFile)
	return e
}

func TestContractStandIn(t *testing.T) {
	keyservicetest.Run(t, newStandIn(t).harness())
}

// TestHierarchyStandIn runs the local key hierarchy's shared-behaviour suite
// over this backend and the stand-in.
func TestHierarchyStandIn(t *testing.T) {
	hierarchytest.RunBackend(t, newStandIn(t).harness())
}

func (e *standIn) harness() keyservicetest.Harness {
	return keyservicetest.Harness{
		Open: func(t *testing.T) keyservice.Service { return open(t, e.uri, nil) },
		Rotate: func(t *testing.T) {
			if _, err := e.admin.Logical().Write("kms/transit/keys/kek/rotate", nil); err != nil {
				t.Fatal(err)
			}
		},
		Disable: func(*testing.T) { e.srv.Deny(true) },
		Enable:  func(*testing.T) { e.srv.Deny(false) },
		Stop:    func(*testing.T) { e.srv.Stop() },
		Start: func(t *testing.T) {
			if err := e.srv.Start(); err != nil {
				t.Fatal(err)
			}
		},
	}
}

func TestTokenFileReread(t *testing.T) {
	e := newStandIn(t)
	var logs testutil.SyncBuffer
	svc := open(t, e.uri, debugLogger(&logs))
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	// A new token in the file is used from the next request on, while the
	// old one still works.
	fresh := e.srv.CreateToken(time.Hour, true)
	writeFile(t, e.tokenFile, fresh)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if e.srv.Uses(fresh) == 0 {
		t.Fatal("the rewritten token file was not re-read")
	}
	// Vault Agent writes a new token; the old one is revoked at once.
	next := e.srv.CreateToken(time.Hour, true)
	writeFile(t, e.tokenFile, next)
	e.srv.RevokeToken(strings.TrimSpace(fresh))
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe after the token file changed: %v", err)
	}

	// The token is revoked but the file still holds it: not a revoked key.
	e.srv.RevokeToken(next)
	_, err := svc.Probe(ctx(t))
	if err == nil || keyservice.Classify(err) == keyservice.ClassRevoked {
		t.Fatalf("Probe with a dead token: %v (class %v), want an unclassified auth error", err, keyservice.Classify(err))
	}
	if !strings.Contains(err.Error(), "invalid or expired") {
		t.Fatalf("error does not say what is wrong: %v", err)
	}
	for _, secret := range []string{strings.TrimSpace(fresh), next} {
		if strings.Contains(err.Error(), secret) || strings.Contains(logs.String(), secret) {
			t.Fatal("a token leaked into an error or a log")
		}
	}
}

func TestAppRoleLogin(t *testing.T) {
	e := newStandIn(t)
	roleID, secretID := "role-1234", "secret-5678-very-secret"
	e.srv.AddAppRole("approle-kms", roleID, secretID, time.Hour, 0)
	roleFile := writeFile(t, filepath.Join(e.dir, "role-id"), roleID)
	secretFile := writeFile(t, filepath.Join(e.dir, "secret-id"), secretID)
	uri := fmt.Sprintf("hcvault://%s/kms/transit/keys/kek?auth=approle&auth-mount=approle-kms&role-id-file=%s&secret-id-file=%s",
		e.srv.Addr(), roleFile, secretFile)
	var logs testutil.SyncBuffer
	svc := open(t, uri, debugLogger(&logs))
	res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatalf("Wrap with AppRole: %v", err)
	}
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if ttl := svc.TokenTTL(); ttl <= 0 || ttl > time.Hour {
		t.Fatalf("TokenTTL = %v, want within (0, 1h]", ttl)
	}
	if n := e.srv.Logins(); n != 1 {
		t.Fatalf("%d logins, want 1", n)
	}

	// A wrong secret ID: the login fails with a clear error and no secret.
	writeFile(t, secretFile, "wrong-secret-id")
	bad := open(t, uri, debugLogger(&logs))
	_, err = bad.Unwrap(ctx(t), res.KeyID, res.Wrapped)
	if err == nil || !strings.Contains(err.Error(), "approle login") {
		t.Fatalf("Unwrap with a wrong secret ID: %v", err)
	}
	if keyservice.Classify(err) == keyservice.ClassRevoked {
		t.Fatalf("a failed login is classified revoked: %v", err)
	}
	for _, s := range []string{secretID, "wrong-secret-id", roleID} {
		if strings.Contains(err.Error(), s) || strings.Contains(logs.String(), s) {
			t.Fatalf("%q leaked into an error or a log", s)
		}
	}
}

func TestKubernetesLogin(t *testing.T) {
	e := newStandIn(t)
	e.srv.AddKubernetesRole("kubernetes", "kms", "jwt-one", time.Hour, 0)
	jwtFile := writeFile(t, filepath.Join(e.dir, "sa-token"), "jwt-one")
	uri := fmt.Sprintf("hcvault://%s/kms/transit/keys/kek?auth=kubernetes&role=kms&jwt-file=%s", e.srv.Addr(), jwtFile)
	svc := open(t, uri, nil)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe with Kubernetes auth: %v", err)
	}
	// The service-account token rotates, and the Vault token is revoked: the
	// next request logs in again with the new JWT read from the file.
	e.srv.AddKubernetesRole("kubernetes", "kms", "jwt-two", time.Hour, 0)
	writeFile(t, jwtFile, "jwt-two")
	e.srv.RevokeIssued()
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe after the token was revoked: %v", err)
	}
	if n := e.srv.Logins(); n != 2 {
		t.Fatalf("%d logins, want 2", n)
	}
}

func TestRenewal(t *testing.T) {
	e := newStandIn(t)
	// A renewable token with a short TTL is renewed before it expires.
	writeFile(t, e.tokenFile, e.srv.CreateToken(3*time.Second, true))
	svc := open(t, e.uri, nil)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if ttl := svc.TokenTTL(); ttl <= 0 || ttl > 3*time.Second {
		t.Fatalf("TokenTTL = %v, want within (0, 3s]", ttl)
	}
	waitFor(t, "two renewals", func() bool { return e.srv.Renewals() >= 2 })
	// Past the original 3 s TTL the token still works.
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe after renewals: %v", err)
	}
	if ttl := svc.TokenTTL(); ttl <= 0 {
		t.Fatalf("TokenTTL after renewal = %v", ttl)
	}

	// An AppRole token that reaches its max TTL is replaced by a new login.
	e.srv.AddAppRole("approle", "r", "s", 2*time.Second, 3*time.Second)
	uri := fmt.Sprintf("hcvault://%s/kms/transit/keys/kek?auth=approle&role-id-file=%s&secret-id-file=%s",
		e.srv.Addr(), writeFile(t, filepath.Join(e.dir, "r"), "r"), writeFile(t, filepath.Join(e.dir, "s"), "s"))
	ar := open(t, uri, nil)
	if _, err := ar.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a second login", func() bool { return e.srv.Logins() >= 2 })
	if _, err := ar.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe after re-login: %v", err)
	}

	// A root token does not expire.
	writeFile(t, e.tokenFile, e.srv.RootToken())
	root := open(t, e.uri, nil)
	if _, err := root.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if ttl := root.TokenTTL(); ttl != vault.TTLNever {
		t.Fatalf("TokenTTL of a root token = %v, want TTLNever", ttl)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestRecreatedKeyGetsNewKeyID(t *testing.T) {
	e := newStandIn(t)
	svc := open(t, e.uri, nil)
	kek := keyservicetest.NewKEK(t)
	old, err := svc.Wrap(ctx(t), kek)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.admin.Logical().Write("kms/transit/keys/kek/config", map[string]any{"deletion_allowed": true}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.admin.Logical().Delete("kms/transit/keys/kek"); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Probe(ctx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Probe of a deleted key: %v, want revoked", err)
	}
	if _, err := svc.Unwrap(ctx(t), old.KeyID, old.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Unwrap with a deleted key: %v, want revoked", err)
	}
	// Vault records creation times in seconds: re-create in a later second.
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
	if _, err := e.admin.Logical().Write("kms/transit/keys/kek", nil); err != nil {
		t.Fatal(err)
	}
	id, err := svc.Probe(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if id == old.KeyID {
		t.Fatalf("re-created key has the old key ID %q", id)
	}
	if !strings.Contains(id, ":v1:") {
		t.Fatalf("re-created key ID %q is not version 1", id)
	}
	// The old wrapped key must not be tried against the new key.
	if _, err := svc.Unwrap(ctx(t), old.KeyID, old.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Unwrap of a value from the deleted key: %v, want revoked", err)
	}
	res, err := svc.Wrap(ctx(t), kek)
	if err != nil || res.KeyID != id {
		t.Fatalf("Wrap after re-create: %q %v, want key ID %q", res.KeyID, err, id)
	}
}

func TestErrorClasses(t *testing.T) {
	e := newStandIn(t)
	svc := open(t, e.uri, nil)
	res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	e.srv.Seal(true)
	if _, err := svc.Probe(ctx(t)); keyservice.Classify(err) != keyservice.ClassTransient {
		t.Fatalf("sealed: %v, want transient", err)
	}
	e.srv.Seal(false)

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
	}
	if _, err := svc.Wrap(ctx(t), nil); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Errorf("Wrap(nil): %v, want invalid", err)
	}

	missing := open(t, strings.Replace(e.uri, "/keys/kek", "/keys/missing", 1), nil)
	if _, err := missing.Probe(ctx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Errorf("Probe of a missing key: %v, want revoked", err)
	}
	if _, err := vault.Open(ctx(t), e.uri+"x", keyservice.Options{}); err == nil {
		t.Error("Open with a missing token file succeeded")
	}
}

func TestNamespace(t *testing.T) {
	srv := transittest.New(t, transittest.Options{Namespace: "team-a"})
	admin := adminClient(t, srv.URL(), srv.RootToken(), "team-a")
	if _, err := admin.Logical().Write("transit/keys/k", nil); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	srv.AddAppRole("approle", "r", "s", time.Hour, 0)
	uri := fmt.Sprintf("hcvault://%s/transit/keys/k?namespace=team-a&auth=approle&role-id-file=%s&secret-id-file=%s",
		srv.Addr(), writeFile(t, filepath.Join(dir, "r"), "r"), writeFile(t, filepath.Join(dir, "s"), "s"))
	svc := open(t, uri, nil)
	id, err := svc.Probe(ctx(t))
	if err != nil {
		t.Fatalf("Probe in a namespace: %v", err)
	}
	if !strings.HasPrefix(id, "vault:team-a/transit/k:v1:") {
		t.Fatalf("key ID %q does not name the namespace", id)
	}
}
