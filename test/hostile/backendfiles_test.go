package hostile

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testservers/softhsm"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice/vault/transittest"
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

// Vault: a token file others can read or write is refused at start; one
// replaced by such a file while serve runs is not adopted (serve goes on with
// the token it read before) and the refusal is logged.
func TestVaultTokenFileHostile(t *testing.T) {
	srv := transittest.New(t, transittest.Options{})
	srv.RootWrite(t, "transit/keys/kek")
	dir := shortDir(t)
	token := filepath.Join(dir, "vault-token")
	uri := fmt.Sprintf("hcvault://%s/transit/keys/kek?token-file=%s", srv.Addr(), token)
	testutil.WriteFile(t, token, srv.CreateToken(time.Hour, true))
	for _, tc := range []struct {
		mode os.FileMode
		want string
	}{
		{0o644, "vault token-file has mode 0644: other users can read it; chmod 640"},
		{0o602, "vault token-file has mode 0602: other users can change it"},
	} {
		testutil.Chmod(t, token, tc.mode)
		kubekms(t, 20*time.Second, append(serveArgs(dir, uri), "--no-state")...).check(t, want{1, tc.want})
	}
	testutil.Chmod(t, token, 0o600)
	s := startServe(t, serveArgs(dir, uri), nil, nil)
	var l ledger
	l.encrypt(s, 3)
	evil := srv.CreateToken(time.Hour, true)
	tmp := filepath.Join(dir, "evil")
	testutil.WriteFile(t, tmp, evil)
	testutil.Chmod(t, tmp, 0o644)
	mustRename(t, tmp, token)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(s.logs.String(), "vault token-file REFUSED") {
		if time.Now().After(deadline) {
			t.Fatalf("the replaced token file was not reported: %s", s.logs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if srv.Uses(evil) != 0 {
		t.Fatal("the refused token file's token was used")
	}
	s.waitHealthy(5 * time.Second)
	l.encrypt(s, 3)
	s.kill(syscall.SIGTERM)
	testutil.Chmod(t, token, 0o600)
	testutil.WriteFile(t, token, srv.CreateToken(time.Hour, true))
	l.verify(t, freshServe(t, uri, nil, nil))
}

// Vault's login files: AppRole role-id and secret-id files are secrets (at
// most group-readable), a Kubernetes jwt-file may be world-readable (the
// kubelet projects service-account tokens 0644) but never writable by
// others. A refused file ends serve at start with what to fix.
func TestVaultLoginFilesHostile(t *testing.T) {
	srv := transittest.New(t, transittest.Options{})
	srv.RootWrite(t, "transit/keys/kek")
	srv.AddAppRole("approle", "role-1", "secret-1", time.Hour, 24*time.Hour)
	srv.AddKubernetesRole("kubernetes", "kubekms", "jwt-1", time.Hour, 24*time.Hour)
	dir := shortDir(t)
	roleID, secretID, jwt := filepath.Join(dir, "role-id"), filepath.Join(dir, "secret-id"), filepath.Join(dir, "jwt")
	testutil.WriteFile(t, roleID, "role-1")
	testutil.WriteFile(t, secretID, "secret-1")
	testutil.WriteFile(t, jwt, "jwt-1")
	approle := fmt.Sprintf("hcvault://%s/transit/keys/kek?auth=approle&role-id-file=%s&secret-id-file=%s", srv.Addr(), roleID, secretID)
	kube := fmt.Sprintf("hcvault://%s/transit/keys/kek?auth=kubernetes&role=kubekms&jwt-file=%s", srv.Addr(), jwt)
	for _, tc := range []struct {
		name string
		file string
		mode os.FileMode
		uri  string
		want string // "" means serve starts
	}{
		{"role-id-file world-readable", roleID, 0o644, approle, "vault role-id-file has mode 0644: other users can read it; chmod 640"},
		{"secret-id-file world-writable", secretID, 0o646, approle, "vault secret-id-file has mode 0646: other users can change it"},
		{"approle files 0640", secretID, 0o640, approle, ""},
		{"jwt-file world-writable", jwt, 0o666, kube, "vault jwt-file has mode 0666: other users can change it"},
		{"jwt-file world-readable, as the kubelet projects it", jwt, 0o644, kube, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testutil.Chmod(t, tc.file, tc.mode)
			defer testutil.Chmod(t, tc.file, 0o600)
			sdir := shortDir(t)
			args := append(serveArgs(sdir, tc.uri), "--no-state")
			if tc.want != "" {
				kubekms(t, 20*time.Second, args...).check(t, want{1, tc.want})
				return
			}
			s := startServe(t, args, nil, nil)
			var l ledger
			if failed := l.encrypt(s, 2); len(failed) > 0 {
				t.Fatalf("Encrypt failed: %v", failed)
			}
			s.kill(syscall.SIGTERM)
		})
	}
}
