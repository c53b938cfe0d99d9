package hostile

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kubekms/kubekms/internal/testservers/softhsm"
	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/internal/testutil"
)

// PKCS#11: the PIN file and the module are trusted like the keyring: a PIN
// file others can read or write, or of another owner, and a module others
// could have replaced (world-writable, in a folder others can write) are
// refused at start with what to fix; a FIFO hangs nothing.
func TestPKCS11FilesHostile(t *testing.T) {
	requireRoot(t)
	tk := softhsm.Start(t)
	tk.Keygen(softhsm.KeyLabel)
	// A copy of the module we can make hostile (the real one is the system's).
	modDir := filepath.Join(shortDir(t), "lib")
	testutil.Mkdir(t, modDir)
	mod := filepath.Join(modDir, "libsofthsm2.so")
	copyMode(t, tk.Module, mod, 0o755)
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, pin string) (module string)
		want  string
	}{
		{"PIN file world-readable", func(t *testing.T, pin string) string { testutil.Chmod(t, pin, 0o644); return mod },
			"PIN file has mode 0644: other users can read it; chmod 640"},
		{"PIN file group-writable", func(t *testing.T, pin string) string { testutil.Chmod(t, pin, 0o660); return mod },
			"other users can change it"},
		{"PIN file of another user", func(t *testing.T, pin string) string { testutil.Chown(t, pin, otherUID); return mod },
			"belongs to uid 65534"},
		{"PIN file missing", func(t *testing.T, pin string) string { os.Remove(pin); return mod }, "no such file"},
		{"PIN file a FIFO", func(t *testing.T, pin string) string { os.Remove(pin); testutil.Mkfifo(t, pin); return mod },
			"PIN file is a FIFO (named pipe), not a regular file"},
		{"module world-writable", func(t *testing.T, _ string) string {
			m := filepath.Join(t.TempDir(), "m.so")
			copyMode(t, mod, m, 0o777)
			return m
		}, "PKCS#11 module has mode 0777: other users can change it"},
		{"module in a world-writable folder", func(t *testing.T, _ string) string {
			d := filepath.Join(t.TempDir(), "open")
			testutil.Mkdir(t, d)
			testutil.Chmod(t, d, 0o777)
			m := filepath.Join(d, "m.so")
			copyMode(t, mod, m, 0o755)
			return m
		}, "PKCS#11 module folder is writable by every user"},
		{"module of another user", func(t *testing.T, _ string) string {
			m := filepath.Join(t.TempDir(), "m.so")
			copyMode(t, mod, m, 0o755)
			testutil.Chown(t, m, otherUID)
			return m
		}, "belongs to uid 65534"},
		{"module a folder", func(t *testing.T, _ string) string { return t.TempDir() }, "not a regular file"},
		{"module a FIFO", func(t *testing.T, _ string) string {
			m := filepath.Join(t.TempDir(), "m.so")
			testutil.Mkfifo(t, m)
			return m
		}, "not a regular file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			pin := filepath.Join(dir, "pin")
			testutil.WriteFile(t, pin, softhsm.PIN+"\n")
			module := tc.setup(t, pin)
			uri := pkcs11URI(module, pin)
			kubekms2 := command(append(serveArgs(dir, uri), "--no-state")...)
			kubekms2.Env = append(cleanEnv(), tk.Env()...)
			runCmd(t, 20*time.Second, kubekms2).check(t, want{1, tc.want})
		})
	}
	// The copy itself, 0755 in a 0700 folder, is fine.
	dir := shortDir(t)
	pin := filepath.Join(dir, "pin")
	testutil.WriteFile(t, pin, softhsm.PIN+"\n")
	testutil.Chmod(t, pin, 0o640)
	uri := pkcs11URI(mod, pin)
	s := startServe(t, append(serveArgs(dir, uri), "--no-state"), tk.Env(), nil)
	var l ledger
	l.encrypt(s, 3)
	s.kill(syscall.SIGTERM)
	l.verify(t, freshServe(t, uri, tk.Env(), nil))
}

func pkcs11URI(module, pin string) string {
	return "pkcs11:token=" + softhsm.TokenLabel + ";object=" + softhsm.KeyLabel + "?module-path=" + softhsm.Escape(module) +
		"&pin-source=" + softhsm.Escape("file:"+pin)
}

func copyMode(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	testutil.Chmod(t, to, mode)
}

// Vault (a real server): a token file others can read or write is refused
// at start; one replaced by such a file while serve runs is not adopted
// (serve goes on with the token it read before, and its token is never
// used) and the refusal is logged. The other credential files (AppRole,
// JWT, client certificate) follow the same checks in the same code
// (keyservice/vault TestCredentialFiles).
func TestVaultTokenFileHostile(t *testing.T) {
	k := vaultserver.New(t, vaultserver.Options{}).NewTransitKey(t)
	dir := shortDir(t)
	for _, tc := range []struct {
		mode os.FileMode
		want string
	}{
		{0o644, "vault token-file " + k.TokenFile + " has mode 0644: every user can read it; chmod 600"},
		{0o602, "has mode 0602: other users can change it"},
	} {
		testutil.Chmod(t, k.TokenFile, tc.mode)
		kubekms(t, 20*time.Second, append(serveArgs(dir, k.URI()), "--no-state")...).check(t, want{1, tc.want})
	}
	testutil.Chmod(t, k.TokenFile, 0o600)
	s := startServe(t, serveArgs(dir, k.URI()), nil, nil)
	var l ledger
	l.encrypt(s, 3)
	// A token with a use limit: an admin lookup shows whether it was used.
	const uses = 100
	evil, err := k.Server.Admin(t).Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{k.Policy}, TTL: "1h", NumUses: uses})
	if err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(filepath.Dir(k.TokenFile), "evil")
	testutil.WriteFile(t, tmp, evil.Auth.ClientToken)
	testutil.Chmod(t, tmp, 0o644)
	mustRename(t, tmp, k.TokenFile)
	l.encrypt(s, 3) // the token file is read before every request
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(s.logs.String(), "vault token file refused") {
		if time.Now().After(deadline) {
			t.Fatalf("the replaced token file was not reported: %s", s.logs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	look, err := k.Server.Admin(t).Auth().Token().Lookup(evil.Auth.ClientToken)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := look.Data["num_uses"].(json.Number).Int64(); n != uses {
		t.Fatalf("the refused token file's token was used: %d of %d uses left", n, uses)
	}
	s.waitHealthy(5 * time.Second)
	if failed := l.encrypt(s, 3); len(failed) > 0 {
		t.Fatalf("Encrypt after the refused token file: %v", failed)
	}
	s.kill(syscall.SIGTERM)
	testutil.WriteFile(t, k.TokenFile, k.NewToken(t, time.Hour, true))
	testutil.Chmod(t, k.TokenFile, 0o600)
	l.verify(t, freshServe(t, k.URI(), nil, nil))
}
