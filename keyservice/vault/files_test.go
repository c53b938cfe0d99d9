package vault_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/vault"
)

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestCredentialFiles: a credential file that other users could read or
// replace is refused at start with a message that says what to fix (no
// server needed: nothing is read from a refused file).
func TestCredentialFiles(t *testing.T) {
	const base = "hcvault://127.0.0.1:1/transit/keys/kek?"
	type setup func(t *testing.T, dir string) string // returns the query
	token := func(mode os.FileMode) setup {
		return func(t *testing.T, dir string) string {
			p := vaultserver.WriteFile(t, filepath.Join(dir, "token"), "s.not-a-real-token")
			if err := os.Chmod(p, mode); err != nil {
				t.Fatal(err)
			}
			return "token-file=" + p
		}
	}
	inDir := func(mode os.FileMode) setup {
		return func(t *testing.T, dir string) string {
			sub := filepath.Join(dir, "sub")
			if err := os.Mkdir(sub, 0o700); err != nil {
				t.Fatal(err)
			}
			p := vaultserver.WriteFile(t, filepath.Join(sub, "token"), "s.not-a-real-token")
			if err := os.Chmod(sub, mode); err != nil {
				t.Fatal(err)
			}
			return "token-file=" + p
		}
	}
	owned := func(t *testing.T, dir string) string {
		if os.Getuid() != 0 {
			t.Skip("changing a file's owner needs root")
		}
		p := vaultserver.WriteFile(t, filepath.Join(dir, "token"), "s.not-a-real-token")
		if err := os.Chown(p, 4242, 4242); err != nil {
			t.Fatal(err)
		}
		return "token-file=" + p
	}
	for _, tc := range []struct {
		name    string
		setup   setup
		wantErr string // "" = accepted
	}{
		{"token 0600", token(0o600), ""},
		{"token 0640 (Vault Agent's default)", token(0o640), ""},
		{"token 0644", token(0o644), "every user can read it; chmod 600"},
		{"token 0620", token(0o620), "other users can change it"},
		{"token 0602", token(0o602), "other users can change it"},
		{"token owned by another user", owned, "owned by uid 4242"},
		{"folder 0777", inDir(0o777), "every user can replace token"},
		{"folder 1777 (sticky, like /tmp)", inDir(0o777 | os.ModeSticky), ""},
		{"folder 0755", inDir(0o755), ""},
		{"token is a folder", func(t *testing.T, dir string) string { return "token-file=" + dir }, "not a regular file"},
		{"token through a symlink (kubelet's ..data)", func(t *testing.T, dir string) string {
			real := filepath.Join(dir, "..data")
			if err := os.Mkdir(real, 0o755); err != nil {
				t.Fatal(err)
			}
			vaultserver.WriteFile(t, filepath.Join(real, "token"), "s.not-a-real-token")
			if err := os.Symlink(filepath.Join("..data", "token"), filepath.Join(dir, "token")); err != nil {
				t.Fatal(err)
			}
			return "token-file=" + filepath.Join(dir, "token")
		}, ""},
		{"jwt 0644 (a projected token)", func(t *testing.T, dir string) string {
			p := vaultserver.WriteFile(t, filepath.Join(dir, "jwt"), "a.b.c")
			if err := os.Chmod(p, 0o644); err != nil {
				t.Fatal(err)
			}
			return "auth=jwt&role=r&jwt-file=" + p
		}, ""},
		{"jwt 0666", func(t *testing.T, dir string) string {
			p := vaultserver.WriteFile(t, filepath.Join(dir, "jwt"), "a.b.c")
			if err := os.Chmod(p, 0o666); err != nil {
				t.Fatal(err)
			}
			return "auth=jwt&role=r&jwt-file=" + p
		}, "other users can change it"},
		{"secret-id 0644", func(t *testing.T, dir string) string {
			r := vaultserver.WriteFile(t, filepath.Join(dir, "role"), "r")
			s := vaultserver.WriteFile(t, filepath.Join(dir, "secret"), "s")
			if err := os.Chmod(s, 0o644); err != nil {
				t.Fatal(err)
			}
			return "auth=approle&role-id-file=" + r + "&secret-id-file=" + s
		}, "vault secret-id-file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			query := tc.setup(t, t.TempDir())
			svc, err := vault.Open(ctx(t), base+query, keyservice.Options{})
			if err == nil {
				_ = svc.Close()
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Open: %v, want it accepted", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("Open: %v, want an error with %q", err, tc.wantErr)
			case err != nil && strings.Contains(err.Error(), "not-a-real-token"):
				t.Fatalf("the error shows the token: %v", err)
			}
		})
	}

	t.Run("key-file 0644", func(t *testing.T) {
		dir := t.TempDir()
		ca := vaultserver.NewCA(t, dir, "ca")
		cert, key := filepath.Join(dir, "c.crt"), filepath.Join(dir, "c.key")
		ca.Issue(t, cert, key, "n", vaultserver.ClientCert)
		if err := os.Chmod(key, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := vault.Open(ctx(t), "vault+https://127.0.0.1:1/transit/keys/kek?auth=cert&cert-file="+cert+"&key-file="+key, keyservice.Options{})
		if err == nil || !strings.Contains(err.Error(), "key-file") || !strings.Contains(err.Error(), "every user can read it") {
			t.Fatalf("Open with a world-readable client key: %v", err)
		}
	})
}

// TestTokenFileReplacedBadly: a token file rewritten with a mode others can
// read is not adopted while the plugin runs; the token in use stays, and a
// warning says why.
func TestTokenFileReplacedBadly(t *testing.T) {
	k := newKey(t, vaultserver.Options{})
	var logs testutil.SyncBuffer
	svc := open(t, k.URI(), debugLogger(&logs))
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatal(err)
	}
	tmp := k.TokenFile + ".new"
	if err := os.WriteFile(tmp, []byte(k.NewToken(t, time.Hour, true)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, k.TokenFile); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.Probe(ctx(t)); err != nil {
		t.Fatalf("Probe with the token in use: %v", err)
	}
	if !strings.Contains(logs.String(), "vault token file refused") || !strings.Contains(logs.String(), "every user can read it") {
		t.Fatalf("no warning about the refused token file:\n%s", logs.String())
	}
	// A new plugin refuses to start on it.
	if _, err := vault.Open(ctx(t), k.URI(), keyservice.Options{}); err == nil {
		t.Fatal("Open with a world-readable token file succeeded")
	}
}
