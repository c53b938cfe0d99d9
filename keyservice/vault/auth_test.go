package vault_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/vault"
)

// Login and token upkeep, against the real server: each auth method is
// enabled and configured in the test's Vault, logins and renewals are
// counted in its audit log.

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func noLeak(t *testing.T, err error, logs string, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		if err != nil && strings.Contains(err.Error(), s) || strings.Contains(logs, s) {
			t.Fatalf("a credential leaked into an error or a log")
		}
	}
}

// TestTokenFileChanges: the token file is re-read before every request, so
// a token written by Vault Agent is used at once, also when the old one is
// revoked the same moment.
func TestTokenFileChanges(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	var logs testutil.SyncBuffer
	svc := open(t, k.URI(), debugLogger(&logs))
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	old := k.NewToken(t, time.Hour, true) // the file's token is replaced by this one, then by next
	vaultserver.WriteFile(t, k.TokenFile, old)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		next := k.NewToken(t, time.Hour, true)
		vaultserver.WriteFile(t, k.TokenFile, next)
		k.RevokeToken(t, old)
		if _, err := svc.Probe(ctx(t)); err != nil {
			t.Fatalf("Probe after the token file changed and the old token was revoked: %v", err)
		}
		old = next
	}
	noLeak(t, nil, logs.String(), old)
}

// TestRenewal: a renewable token is renewed before it expires, so it
// outlives its TTL; a root token never expires.
func TestRenewal(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	vaultserver.WriteFile(t, k.TokenFile, k.NewToken(t, 3*time.Second, true))
	svc := open(t, k.URI(), nil)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if ttl := svc.TokenTTL(); ttl <= 0 || ttl > 3*time.Second {
		t.Fatalf("TokenTTL = %v, want within (0, 3s]", ttl)
	}
	time.Sleep(7 * time.Second) // more than twice the TTL
	if n := k.Server.Requests(t, "auth/token/renew-self"); n < 2 {
		t.Fatalf("%d renewals in 7 s of a 3 s token, want at least 2", n)
	}
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe after the token's first TTL: %v", err)
	}
	if ttl := svc.TokenTTL(); ttl <= 0 {
		t.Fatalf("TokenTTL after renewals = %v", ttl)
	}

	vaultserver.WriteFile(t, k.TokenFile, k.Server.RootToken())
	root := open(t, k.URI(), nil)
	if _, err := root.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	if ttl := root.TokenTTL(); ttl != vault.TTLNever {
		t.Fatalf("TokenTTL of a root token = %v, want TTLNever", ttl)
	}
}

type appRole struct{ roleFile, secretFile string }

func newAppRole(t *testing.T, k *vaultserver.TransitKey, mount string, ttl, maxTTL time.Duration) appRole {
	t.Helper()
	admin := k.Server.Admin(t)
	k.Server.EnableAuth(t, mount, "approle")
	k.Server.Write(t, "auth/"+mount+"/role/kms", map[string]any{
		"token_policies": k.Policy, "token_ttl": ttl.String(), "token_max_ttl": maxTTL.String(),
	})
	sec, err := admin.Logical().Read("auth/" + mount + "/role/kms/role-id")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	roleID := sec.Data["role_id"].(string)
	secretID := k.Server.Write(t, "auth/"+mount+"/role/kms/secret-id", nil).Data["secret_id"].(string)
	return appRole{
		roleFile:   vaultserver.WriteFile(t, filepath.Join(dir, "role-id"), roleID),
		secretFile: vaultserver.WriteFile(t, filepath.Join(dir, "secret-id"), secretID),
	}
}

func TestAppRoleLogin(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	ar := newAppRole(t, k, "approle-kms", time.Hour, 2*time.Hour)
	uri := k.URIWith(fmt.Sprintf("auth=approle&auth-mount=approle-kms&role-id-file=%s&secret-id-file=%s", ar.roleFile, ar.secretFile))
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
	const login = "auth/approle-kms/login"
	if n := k.Server.Requests(t, login); n != 1 {
		t.Fatalf("%d logins, want 1", n)
	}
	// The token is revoked: the next request logs in again and succeeds.
	k.Server.RevokeLogins(t, "approle-kms")
	if _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); err != nil {
		t.Fatalf("Unwrap after the token was revoked: %v", err)
	}
	if n := k.Server.Requests(t, login); n != 2 {
		t.Fatalf("%d logins after the token was revoked, want 2", n)
	}

	// A wrong secret ID: the login fails with a clear error that is not
	// "revoked", and no credential shows.
	secretID := strings.TrimSpace(readFile(t, ar.secretFile))
	vaultserver.WriteFile(t, ar.secretFile, "wrong-secret-id")
	bad := open(t, uri, debugLogger(&logs))
	_, err = bad.Unwrap(ctx(t), res.KeyID, res.Wrapped)
	if err == nil || !strings.Contains(err.Error(), "approle login") {
		t.Fatalf("Unwrap with a wrong secret ID: %v", err)
	}
	if keyservice.Classify(err) == keyservice.ClassRevoked {
		t.Fatalf("a failed login is classified revoked: %v", err)
	}
	noLeak(t, err, logs.String(), secretID, "wrong-secret-id", strings.TrimSpace(readFile(t, ar.roleFile)))
}

// TestAppRoleMaxTTL: a token that reaches its max TTL is replaced by a new
// login before it ends.
func TestAppRoleMaxTTL(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	ar := newAppRole(t, k, "approle", 2*time.Second, 4*time.Second)
	svc := open(t, k.URIWith(fmt.Sprintf("auth=approle&role-id-file=%s&secret-id-file=%s", ar.roleFile, ar.secretFile)), nil)
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a second login", func() bool { return k.Server.Requests(t, "auth/approle/login") >= 2 })
	for range 3 {
		if _, err := svc.Probe(ctx(t)); err != nil {
			t.Fatalf("Probe across re-logins: %v", err)
		}
		time.Sleep(2 * time.Second)
	}
}

// jwtIssuer signs JWTs as a workload-identity agent would.
type jwtIssuer struct {
	key    *ecdsa.PrivateKey
	signer jose.Signer
	pubPEM string
}

func newJWTIssuer(t *testing.T) *jwtIssuer {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	return &jwtIssuer{key: key, signer: signer, pubPEM: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))}
}

const jwtIssuerURL = "https://workload-identity.test"

func (j *jwtIssuer) token(t *testing.T, subject string, ttl time.Duration) string {
	t.Helper()
	now := time.Now()
	s, err := jwt.Signed(j.signer).Claims(jwt.Claims{
		Issuer: jwtIssuerURL, Subject: subject, Audience: jwt.Audience{"vault"},
		IssuedAt: jwt.NewNumericDate(now), NotBefore: jwt.NewNumericDate(now.Add(-time.Minute)), Expiry: jwt.NewNumericDate(now.Add(ttl)),
	}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestJWTLogin: auth=jwt with a JWT from a file, as a static pod gets one
// from a workload-identity agent. A rotated JWT is read at the next login.
func TestJWTLogin(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	iss := newJWTIssuer(t)
	k.Server.EnableAuth(t, "jwt", "jwt")
	k.Server.Write(t, "auth/jwt/config", map[string]any{"jwt_validation_pubkeys": []string{iss.pubPEM}, "bound_issuer": jwtIssuerURL})
	role := func(subject string) {
		k.Server.Write(t, "auth/jwt/role/kms", map[string]any{
			"role_type": "jwt", "user_claim": "sub", "bound_subject": subject, "bound_audiences": []string{"vault"},
			"token_policies": k.Policy, "token_ttl": "1h",
		})
	}
	role("system:node:cp-1")
	first := iss.token(t, "system:node:cp-1", time.Hour)
	jwtFile := vaultserver.WriteFile(t, filepath.Join(t.TempDir(), "jwt"), first)
	var logs testutil.SyncBuffer
	svc := open(t, k.URIWith("auth=jwt&role=kms&jwt-file="+jwtFile), debugLogger(&logs))
	res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatalf("Wrap with JWT auth: %v", err)
	}
	if ttl := svc.TokenTTL(); ttl <= 0 || ttl > time.Hour {
		t.Fatalf("TokenTTL = %v", ttl)
	}
	// The agent writes a new JWT, the role now accepts only the new subject
	// (so the old JWT cannot log in), and the Vault token is revoked.
	second := iss.token(t, "system:node:cp-1-renewed", time.Hour)
	vaultserver.WriteFile(t, jwtFile, second)
	role("system:node:cp-1-renewed")
	k.Server.RevokeLogins(t, "jwt")
	if _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); err != nil {
		t.Fatalf("Unwrap after the JWT rotated and the token was revoked: %v", err)
	}
	if n := k.Server.Requests(t, "auth/jwt/login"); n != 2 {
		t.Fatalf("%d logins, want 2", n)
	}
	// A JWT signed by someone else: a clear login error, not "revoked".
	vaultserver.WriteFile(t, jwtFile, newJWTIssuer(t).token(t, "system:node:cp-1-renewed", time.Hour))
	bad := open(t, k.URIWith("auth=jwt&role=kms&jwt-file="+jwtFile), debugLogger(&logs))
	_, err = bad.Probe(ctx(t))
	if err == nil || !strings.Contains(err.Error(), "jwt login") || keyservice.Classify(err) == keyservice.ClassRevoked {
		t.Fatalf("Probe with a forged JWT: %v (class %v), want a jwt login error that is not revoked", err, keyservice.Classify(err))
	}
	noLeak(t, err, logs.String(), first, second)
}

// TestCertLogin: auth=cert over https. The certificate files are re-read at
// each login: after a rotation to a certificate from another CA, which the
// Vault role now trusts instead, the next login succeeds with the new one.
func TestCertLogin(t *testing.T) {
	k := newKey(t, vaultserver.Options{TLS: true})
	dir := t.TempDir()
	ca1, ca2 := vaultserver.NewCA(t, dir, "node-ca-1"), vaultserver.NewCA(t, dir, "node-ca-2")
	k.Server.EnableAuth(t, "cert", "cert")
	trust := func(ca *vaultserver.CA) {
		k.Server.Write(t, "auth/cert/certs/node", map[string]any{
			"certificate": string(ca.PEM), "token_policies": k.Policy, "token_ttl": "1h",
		})
	}
	trust(ca1)
	certFile, keyFile := filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key")
	ca1.Issue(t, certFile, keyFile, "cp-1", vaultserver.ClientCert)
	uri := k.URIWith(fmt.Sprintf("auth=cert&role=node&cert-file=%s&key-file=%s", certFile, keyFile))
	var logs testutil.SyncBuffer
	svc := open(t, uri, debugLogger(&logs))
	res, err := svc.Wrap(ctx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatalf("Wrap with cert auth: %v", err)
	}
	if ttl := svc.TokenTTL(); ttl <= 0 || ttl > time.Hour {
		t.Fatalf("TokenTTL = %v", ttl)
	}
	ca2.Issue(t, certFile, keyFile, "cp-1", vaultserver.ClientCert)
	trust(ca2)
	k.Server.RevokeLogins(t, "cert")
	if _, err := svc.Unwrap(ctx(t), res.KeyID, res.Wrapped); err != nil {
		t.Fatalf("Unwrap after the certificate rotated and the token was revoked: %v", err)
	}
	if n := k.Server.Requests(t, "auth/cert/login"); n != 2 {
		t.Fatalf("%d logins, want 2", n)
	}
	// A certificate the role does not trust: a clear login error.
	ca1.Issue(t, certFile, keyFile, "cp-1", vaultserver.ClientCert)
	bad := open(t, uri, nil)
	_, err = bad.Probe(ctx(t))
	if err == nil || !strings.Contains(err.Error(), "cert login") || keyservice.Classify(err) == keyservice.ClassRevoked {
		t.Fatalf("Probe with an untrusted certificate: %v (class %v), want a cert login error that is not revoked", err, keyservice.Classify(err))
	}
	noLeak(t, err, logs.String(), strings.TrimSpace(readFile(t, keyFile)))
}
