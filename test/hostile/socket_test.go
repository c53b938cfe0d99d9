package hostile

import (
	"github.com/kubekms/kubekms/internal/testutil"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Two plugins on one socket path: the newer one took the path (its folder
// was cleaned by tmpfiles, or an operator removed the socket). Stopping the
// older one must not remove the newer one's socket.
func TestOlderInstanceLeavesNewerSocket(t *testing.T) {
	ring := shortDir(t)
	dir := shortDir(t)
	args := append(serveArgs(dir, softkeyURI(ring)), "--no-state")
	older := startServe(t, args, nil, nil)
	if err := os.Remove(older.socket); err != nil {
		t.Fatal(err)
	}
	newer := startServe(t, args, nil, nil)
	older.kill(syscall.SIGTERM)
	if st, err := os.Lstat(newer.socket); err != nil || st.Mode().Type() != os.ModeSocket {
		t.Fatalf("the older instance's shutdown removed the newer one's socket: %v", err)
	}
	var l ledger
	if failed := l.encrypt(newer, 3); len(failed) > 0 {
		t.Fatalf("the newer instance is unreachable after the older one stopped: %v", failed)
	}
	newer.kill(syscall.SIGTERM)
	if _, err := os.Lstat(newer.socket); !os.IsNotExist(err) {
		t.Fatalf("a plugin left its own socket behind on SIGTERM: %v", err)
	}
	l.verify(t, freshServe(t, softkeyURI(ring), nil, nil))
}

// What may sit at the socket path, and what serve does about it.
func TestSocketPathHostile(t *testing.T) {
	requireRoot(t)
	ring := shortDir(t)
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir, sock string) (cleanup func())
		want  want
	}{
		{"a regular file", func(t *testing.T, _, sock string) func() { testutil.WriteFile(t, sock, "data"); return nil },
			want{1, "exists and is not a socket; refusing to remove it"}},
		{"a folder", func(t *testing.T, _, sock string) func() { testutil.Mkdir(t, sock); return nil },
			want{1, "exists and is not a socket"}},
		{"a live plugin", func(t *testing.T, dir, _ string) func() {
			s := startServe(t, append(serveArgs(dir, softkeyURI(ring)), "--no-state"), nil, nil)
			return func() { s.kill(syscall.SIGTERM) }
		}, want{1, "another process is serving on"}},
		{"a world-writable folder", func(t *testing.T, dir, _ string) func() { testutil.Chmod(t, dir, 0o777); return nil },
			want{1, "writable by every user (mode 0777): another user could replace the socket"}},
		{"a folder of another user", func(t *testing.T, dir, _ string) func() { testutil.Chown(t, dir, otherUID); return nil },
			want{1, "belongs to uid 65534"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := shortDir(t)
			sock := filepath.Join(dir, "kms.sock")
			if c := tc.setup(t, dir, sock); c != nil {
				defer c()
			}
			before := readRegular(sock)
			fresh := shortDir(t) // refused before the key service is opened: no keyring is made
			r := kubekms(t, 20*time.Second, append(serveArgs(dir, softkeyURI(fresh)), "--no-state")...)
			r.check(t, tc.want)
			if _, err := os.Stat(filepath.Join(fresh, "keyring.json")); tc.name != "a live plugin" && !os.IsNotExist(err) {
				t.Errorf("serve created a keyring before refusing the socket path: %v", err)
			}
			if after := readRegular(sock); after != before {
				t.Fatal("serve changed what was at the socket path")
			}
		})
	}
}
