package safefile_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/safefile"
	"github.com/kubekms/kubekms/internal/testutil"
)

func TestRead(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "root, to give files to another uid")
	}
	secret := safefile.Rules{What: "PIN file", MaxSize: 64}
	shared := safefile.Rules{What: "PIN file", GroupRead: true, GroupWritableDir: true, MaxSize: 64}
	code := safefile.Rules{What: "module", GroupRead: true, OtherRead: true}
	for _, tc := range []struct {
		name  string
		rules safefile.Rules
		setup func(t *testing.T, dir, path string)
		want  string // "" = accepted
	}{
		{"0600", secret, nil, ""},
		{"0400", secret, func(t *testing.T, _, p string) { testutil.Chmod(t, p, 0o400) }, ""},
		{"0640 secret", secret, func(t *testing.T, _, p string) { testutil.Chmod(t, p, 0o640) }, "other users can read it; chmod 600"},
		{"0640 shared", shared, func(t *testing.T, _, p string) { testutil.Chmod(t, p, 0o640) }, ""},
		{"0644 shared", shared, func(t *testing.T, _, p string) { testutil.Chmod(t, p, 0o644) }, "other users can read it; chmod 640"},
		{"0644 code", code, func(t *testing.T, _, p string) { testutil.Chmod(t, p, 0o644) }, ""},
		{"0664 code", code, func(t *testing.T, _, p string) { testutil.Chmod(t, p, 0o664) }, "other users can change it"},
		{"0602", secret, func(t *testing.T, _, p string) { testutil.Chmod(t, p, 0o602) }, "other users can change it"},
		{"other owner", secret, func(t *testing.T, _, p string) { testutil.Chown(t, p, 65534) }, "belongs to uid 65534"},
		{"too large", secret, func(t *testing.T, _, p string) { testutil.WriteFile(t, p, strings.Repeat("x", 65)) }, "larger than 64 bytes"},
		{"missing", secret, func(t *testing.T, _, p string) { os.Remove(p) }, "no such file"},
		{"folder", secret, func(t *testing.T, _, p string) { os.Remove(p); testutil.Mkdir(t, p) }, "is a folder, not a regular file"},
		{"FIFO", secret, func(t *testing.T, _, p string) { os.Remove(p); testutil.Mkfifo(t, p) }, "is a FIFO (named pipe), not a regular file"},
		{"device", secret, func(t *testing.T, _, p string) { os.Remove(p); symlink(t, "/dev/null", p) }, "is a device"},
		{"world-writable folder", secret, func(t *testing.T, d, _ string) { testutil.Chmod(t, d, 0o777) }, "writable by every user"},
		{"sticky world-writable folder", secret, func(t *testing.T, d, _ string) { testutil.Chmod(t, d, 0o777|os.ModeSticky) }, ""},
		{"group-writable folder", secret, func(t *testing.T, d, _ string) { testutil.Chmod(t, d, 0o770) }, "writable by its group"},
		{"group-writable folder, shared", shared, func(t *testing.T, d, _ string) { testutil.Chmod(t, d, 0o770) }, ""},
		{"folder of another user", secret, func(t *testing.T, d, _ string) { testutil.Chown(t, d, 65534) }, "folder belongs to uid 65534"},
		{"symlink into a world-writable folder", secret, func(t *testing.T, _, p string) {
			d := filepath.Join(t.TempDir(), "open")
			testutil.Mkdir(t, d)
			testutil.Chmod(t, d, 0o777)
			target := filepath.Join(d, "pin")
			testutil.WriteFile(t, target, "1234")
			os.Remove(p)
			symlink(t, target, p)
		}, "writable by every user"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "d")
			testutil.Mkdir(t, dir)
			path := filepath.Join(dir, "pin")
			testutil.WriteFile(t, path, "1234\n")
			if tc.setup != nil {
				tc.setup(t, dir, path)
			}
			done := make(chan error, 1)
			go func() {
				_, _, err := safefile.Read(path, tc.rules)
				done <- err
			}()
			var err error
			select {
			case err = <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("Read hangs")
			}
			if tc.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Read: %v; want an error saying %q", err, tc.want)
			}
			if _, cerr := safefile.Check(path, tc.rules); cerr == nil {
				t.Fatalf("Check accepted what Read refused (%v)", err)
			}
		})
	}
}

func symlink(t *testing.T, target, p string) {
	t.Helper()
	if err := os.Symlink(target, p); err != nil {
		t.Fatal(err)
	}
}
