package vault

import (
	"slices"
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	good := []struct {
		uri  string
		want Config
	}{
		{"hcvault://127.0.0.1:8200/transit/keys/kek?token-file=/run/tok", Config{
			Address: "http://127.0.0.1:8200", Mount: "transit", Key: "kek", Auth: AuthToken, TokenFile: "/run/tok"}},
		{"vault+https://vault.example/kms/transit/keys/k-1.a?token-file=/t&namespace=team/a/&ca-file=/ca.pem", Config{
			Address: "https://vault.example:8200", Mount: "kms/transit", Key: "k-1.a", Auth: AuthToken,
			TokenFile: "/t", Namespace: "team/a", CAFile: "/ca.pem"}},
		{"HCVAULT+HTTPS://[::1]:9999/transit/keys/x?auth=approle&role-id-file=/r&secret-id-file=/s", Config{
			Address: "https://[::1]:9999", Mount: "transit", Key: "x", Auth: AuthAppRole, AuthMount: "approle",
			RoleIDFile: "/r", SecretIDFile: "/s"}},
		{"hcvault://h:1/transit/keys/x?auth=kubernetes&role=kms&auth-mount=/k8s/prod/", Config{
			Address: "http://h:1", Mount: "transit", Key: "x", Auth: AuthKubernetes, AuthMount: "k8s/prod",
			Role: "kms", JWTFile: DefaultJWTFile}},
		{"vault+https://h:1/transit/keys/x?auth=cert&cert-file=/c.pem&key-file=/k.pem&role=node", Config{
			Address: "https://h:1", Mount: "transit", Key: "x", Auth: AuthCert, AuthMount: "cert",
			CertFile: "/c.pem", KeyFile: "/k.pem", Role: "node"}},
		{"vault+https://h:1/transit/keys/x?auth=cert&cert-file=/c.pem&key-file=/k.pem", Config{
			Address: "https://h:1", Mount: "transit", Key: "x", Auth: AuthCert, AuthMount: "cert",
			CertFile: "/c.pem", KeyFile: "/k.pem"}},
		{"hcvault://h:1/transit/keys/x?auth=jwt&role=kms&jwt-file=/run/wi/token&auth-mount=spiffe", Config{
			Address: "http://h:1", Mount: "transit", Key: "x", Auth: AuthJWT, AuthMount: "spiffe",
			Role: "kms", JWTFile: "/run/wi/token"}},
		{"hcvault://h:1/keys/keys/keys?token-file=/t", Config{
			Address: "http://h:1", Mount: "keys", Key: "keys", Auth: AuthToken, TokenFile: "/t"}},
	}
	for _, tc := range good {
		got, err := ParseURI(tc.uri)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", tc.uri, err)
			continue
		}
		if got != tc.want {
			t.Errorf("ParseURI(%q)\n got %+v\nwant %+v", tc.uri, got, tc.want)
		}
	}

	bad := []struct{ uri, wantErr string }{
		{"softkey:///x", "scheme"},
		{"vault://h/transit/keys/x?token-file=/t", "scheme"},
		{"hcvault:transit/keys/x", "must look like"},
		{"hcvault://tok@h/transit/keys/x?token-file=/t", "credentials"},
		{"hcvault://h/transit/keys/x?token-file=/t#frag", "fragment"},
		{"hcvault:///transit/keys/x?token-file=/t", "no host"},
		{"hcvault://h:0/transit/keys/x?token-file=/t", "port"},
		{"hcvault://h:99999/transit/keys/x?token-file=/t", "port"},
		{"hcvault://h:/transit/keys/x?token-file=/t", "empty port"},
		{"hcvault://h/transit/x?token-file=/t", "want path"},
		{"hcvault://h/keys/x?token-file=/t", "want path"},
		{"hcvault://h/transit/keys/?token-file=/t", "empty path segment"},
		{"hcvault://h/transit/keys/x/?token-file=/t", "want path"},
		{"hcvault://h//keys/x?token-file=/t", "empty path segment"},
		{"hcvault://h/../keys/x?token-file=/t", "not allowed"},
		{"hcvault://h/transit/keys/a%20b?token-file=/t", "character"},
		{"hcvault://h/transit/keys/x", "needs token-file"},
		{"hcvault://h/transit/keys/x?token-file=rel/path", "absolute"},
		{"hcvault://h/transit/keys/x?token-file=/a&token-file=/b", "2 times"},
		{"hcvault://h/transit/keys/x?token-file=", "empty"},
		{"hcvault://h/transit/keys/x?tokenfile=/t", "unknown"},
		{"hcvault://h/transit/keys/x?token-file=/t&ca-file=/ca", "https"},
		{"hcvault://h/transit/keys/x?auth=ldap", "want token, approle, kubernetes, jwt or cert"},
		{"hcvault://h/transit/keys/x?auth=jwt&jwt-file=/j", "role="},
		{"hcvault://h/transit/keys/x?auth=jwt&role=r", "jwt-file="},
		{"hcvault://h/transit/keys/x?auth=cert&cert-file=/c&key-file=/k", "https"},
		{"vault+https://h/transit/keys/x?auth=cert&cert-file=/c", "key-file"},
		{"vault+https://h/transit/keys/x?auth=cert&key-file=/k", "cert-file"},
		{"vault+https://h/transit/keys/x?auth=cert&cert-file=c&key-file=/k", "absolute"},
		{"vault+https://h/transit/keys/x?auth=cert&cert-file=/c&key-file=/k&jwt-file=/j", "needs auth=kubernetes or auth=jwt"},
		{"hcvault://h/transit/keys/x?token-file=/t&cert-file=/c", "needs auth=cert"},
		{"hcvault://h/transit/keys/x?auth=approle", "role-id-file"},
		{"hcvault://h/transit/keys/x?auth=approle&role-id-file=/r&token-file=/t", "needs auth=token"},
		{"hcvault://h/transit/keys/x?auth=kubernetes", "role="},
		{"hcvault://h/transit/keys/x?auth=kubernetes&role=a&secret-id-file=/s", "needs auth=approle"},
		{"hcvault://h/transit/keys/x?token-file=/t&role=r", "needs auth=kubernetes or auth=jwt or auth=cert"},
		{"hcvault://h/transit/keys/x?token-file=/t&auth-mount=x", "does not apply"},
		{"hcvault://h/transit/keys/x?token-file=/t&namespace=a/../b", "not allowed"},
		{"hcvault://h/transit/keys/x?token-file=/t&x=%zz", "query"},
		{"hcvault://h/transit/keys/" + strings.Repeat("a", 3000) + "?token-file=/t", "limit"},
	}
	for _, tc := range bad {
		_, err := ParseURI(tc.uri)
		if err == nil {
			t.Errorf("ParseURI(%q) succeeded, want an error with %q", tc.uri, tc.wantErr)
			continue
		}
		if !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("ParseURI(%q) = %v, want an error with %q", tc.uri, err, tc.wantErr)
		}
	}
}

func TestKeyIDRoundTrip(t *testing.T) {
	s := &Service{cfg: Config{Mount: "kms/transit", Key: "k", Namespace: "ns1"}}
	id := s.keyID(3, 1732614077)
	if id != "vault:ns1/kms/transit/k:v3:1732614077" {
		t.Fatalf("keyID = %q", id)
	}
	path, v, c, err := parseKeyID(id)
	if err != nil || path != "ns1/kms/transit/k" || v != 3 || c != 1732614077 {
		t.Fatalf("parseKeyID(%q) = %q %d %d %v", id, path, v, c, err)
	}
	for _, bad := range []string{"", "vault:", "vault:a:v:1", "vault:a:v0:1", "vault:a:3:1", "vault:a:v3:x", "aws:a:v3:1", "vault:a:v3:1:2"} {
		if _, _, _, err := parseKeyID(bad); err == nil {
			t.Errorf("parseKeyID(%q) succeeded", bad)
		}
	}
}

// FuzzParseURI checks that ParseURI never panics and that what it accepts is
// safe to put into request paths and key IDs.
func FuzzParseURI(f *testing.F) {
	for _, seed := range []string{
		"hcvault://127.0.0.1:8200/transit/keys/kek?token-file=/t",
		"vault+https://h/kms/transit/keys/k?auth=approle&role-id-file=/r&secret-id-file=/s&namespace=a/b",
		"hcvault+https://[::1]/transit/keys/k?auth=kubernetes&role=r&ca-file=/ca",
		"vault+https://h/transit/keys/k?auth=cert&cert-file=/c&key-file=/k&role=node",
		"hcvault://h/transit/keys/k?auth=jwt&role=r&jwt-file=/j",
		"hcvault://h/../keys/x?token-file=/t",
		"hcvault://u:p@h/t/keys/x#f",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, uri string) {
		c, err := ParseURI(uri)
		if err != nil {
			return
		}
		for _, p := range []string{c.Mount, c.Key, c.AuthMount, c.Namespace} {
			if strings.ContainsAny(p, "?#%: \t\n") {
				t.Fatalf("accepted an unsafe path %q from %q", p, uri)
			}
		}
		if c.Key == "" || c.Mount == "" || strings.Contains(c.Key, "/") {
			t.Fatalf("bad mount %q / key %q from %q", c.Mount, c.Key, uri)
		}
		if !slices.Contains([]string{AuthToken, AuthAppRole, AuthKubernetes, AuthJWT, AuthCert}, c.Auth) {
			t.Fatalf("auth %q from %q", c.Auth, uri)
		}
		for _, seg := range strings.Split(c.Mount+"/"+c.Key, "/") {
			if seg == "." || seg == ".." || seg == "" {
				t.Fatalf("bad segment %q from %q", seg, uri)
			}
		}
	})
}
