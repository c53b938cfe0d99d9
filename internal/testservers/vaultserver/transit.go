package vaultserver

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
)

// TransitKey is a transit key on its own mount, with a policy that grants
// exactly what the kubekms backend needs (the documented minimal policy) and a
// renewable token bound to that policy in a private token file.
type TransitKey struct {
	Server *Server
	Mount  string
	Name   string
	// Policy is the policy's name; Rules its text.
	Policy, Rules string
	// TokenFile holds a token with Policy (mode 0600, in a 0700 folder).
	TokenFile string
}

// RandomName returns prefix plus 12 random hex digits.
func RandomName(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return prefix + hex.EncodeToString(b)
}

// NewTransitKey enables transit at a random mount, creates key "kek" and
// writes the policy and a token (TTL 1h, renewable) for it.
func (s *Server) NewTransitKey(t testing.TB) *TransitKey {
	t.Helper()
	admin := s.Admin(t)
	k := &TransitKey{Server: s, Mount: RandomName("transit-"), Name: "kek"}
	k.Policy = k.Mount
	if err := admin.Sys().Mount(k.Mount, &api.MountInput{Type: "transit"}); err != nil {
		t.Fatalf("enable transit at %s: %v", k.Mount, err)
	}
	k.Create(t)
	k.Rules = fmt.Sprintf(`path "%[1]s/encrypt/%[2]s" { capabilities = ["update"] }
path "%[1]s/decrypt/%[2]s" { capabilities = ["update"] }
path "%[1]s/keys/%[2]s" { capabilities = ["read"] }
`, k.Mount, k.Name)
	k.RestorePolicy(t)
	dir := filepath.Join(s.Dir, "tokens-"+k.Mount)
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	k.TokenFile = WriteFile(t, filepath.Join(dir, "token"), k.NewToken(t, time.Hour, true))
	return k
}

// URI is the key URI with the token file (auth=token).
func (k *TransitKey) URI() string { return k.Server.KeyURI(k.Mount, k.Name, "token-file="+k.TokenFile) }

// URIWith is the key URI with another query (another auth method).
func (k *TransitKey) URIWith(query string) string { return k.Server.KeyURI(k.Mount, k.Name, query) }

// NewToken creates a token with the key's policy.
func (k *TransitKey) NewToken(t testing.TB, ttl time.Duration, renewable bool) string {
	t.Helper()
	sec, err := k.Server.Admin(t).Auth().Token().Create(&api.TokenCreateRequest{
		Policies: []string{k.Policy}, TTL: ttl.String(), Renewable: &renewable, ExplicitMaxTTL: "24h",
	})
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	return sec.Auth.ClientToken
}

// RevokeToken revokes a token (and its children) at once.
func (k *TransitKey) RevokeToken(t testing.TB, token string) {
	t.Helper()
	if err := k.Server.Admin(t).Auth().Token().RevokeTree(token); err != nil {
		t.Fatalf("revoke token: %v", err)
	}
}

func (k *TransitKey) write(t testing.TB, path string, data map[string]any) *api.Secret {
	t.Helper()
	sec, err := k.Server.Admin(t).Logical().Write(path, data)
	if err != nil {
		t.Fatalf("vault write %s: %v", path, err)
	}
	return sec
}

// Create creates the key (again, after Delete).
func (k *TransitKey) Create(t testing.TB) { k.write(t, k.Mount+"/keys/"+k.Name, nil) }

// Rotate makes a new key version current.
func (k *TransitKey) Rotate(t testing.TB) { k.write(t, k.Mount+"/keys/"+k.Name+"/rotate", nil) }

// Delete deletes the key and all its versions (no way back).
func (k *TransitKey) Delete(t testing.TB) {
	t.Helper()
	k.write(t, k.Mount+"/keys/"+k.Name+"/config", map[string]any{"deletion_allowed": true})
	if _, err := k.Server.Admin(t).Logical().Delete(k.Mount + "/keys/" + k.Name); err != nil {
		t.Fatalf("delete transit key: %v", err)
	}
}

// SetMinDecryptionVersion raises (or lowers) min_decryption_version: older
// versions can no longer decrypt.
func (k *TransitKey) SetMinDecryptionVersion(t testing.TB, v int) {
	k.write(t, k.Mount+"/keys/"+k.Name+"/config", map[string]any{"min_decryption_version": v})
}

// RemovePolicy deletes the key's policy: tokens that carry it stay valid
// but may no longer use the key (403 permission denied).
func (k *TransitKey) RemovePolicy(t testing.TB) {
	t.Helper()
	if err := k.Server.Admin(t).Sys().DeletePolicy(k.Policy); err != nil {
		t.Fatalf("delete policy: %v", err)
	}
}

// RestorePolicy writes the key's policy (again).
func (k *TransitKey) RestorePolicy(t testing.TB) {
	t.Helper()
	if err := k.Server.Admin(t).Sys().PutPolicy(k.Policy, k.Rules); err != nil {
		t.Fatalf("write policy: %v", err)
	}
}
