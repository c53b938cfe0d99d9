package hostile

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Many `kubekms serve` started at one instant on a missing keyring (a
// systemd unit and a static pod both installed; plugins sharing a keyring
// path): exactly one keyring is created, every plugin uses it, and every
// ciphertext any of them answered decrypts afterwards.
func TestRacingStarts(t *testing.T) {
	const n = 12
	ring := shortDir(t)
	uri := softkeyURI(ring)
	gate := filepath.Join(ring, "gate")
	if err := syscall.Mkfifo(gate, 0o600); err != nil {
		t.Fatal(err)
	}
	servers := make([]*server, n)
	for i := range n {
		dir := shortDir(t)
		args := append(serveArgs(dir, uri), "--no-state")
		// Every plugin waits on the FIFO; opening it for writing releases all at once.
		servers[i] = startServeNoWait(t, args, nil, func(argv []string) []string {
			return append([]string{"sh", "-c", `read x < "$0"; exec "$@"`, gate}, argv...)
		})
	}
	time.Sleep(500 * time.Millisecond) // let every shell reach the FIFO
	f, err := os.OpenFile(gate, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	var l ledger
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Go(func() {
			s.waitHealthy(60 * time.Second)
			l.encrypt(s, 3)
		})
	}
	wg.Wait()
	for _, s := range servers {
		s.kill(syscall.SIGTERM)
	}
	rings := map[string]bool{}
	for id := range l.keyIDs() {
		rings[strings.Split(id, ":")[1]] = true
	}
	created := 0
	for _, s := range servers {
		created += strings.Count(s.logs.String(), "created a new softkey keyring")
	}
	if len(rings) != 1 || created != 1 {
		t.Errorf("%d plugins started at once made %d keyrings and answered under %d: %v", n, created, len(rings), rings)
	}
	l.verify(t, freshServe(t, uri, nil, nil))
}

// copyFile copies a keyring file (contents and mode 0600).
func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// newKeyring makes a keyring with `softkey rotate`... on a fresh path via
// `serve`'s first start would be slower: `softkey list` on a missing file
// fails, so start one serve briefly.
func newKeyring(t *testing.T, dir string) {
	t.Helper()
	s := startServe(t, append(serveArgs(dir, softkeyURI(dir)), "--no-state"), nil, nil)
	s.kill(syscall.SIGTERM)
}

// A plugin's state file names its keyring: a start without that keyring
// (a volume that did not mount, a wrong path, a copy of another keyring) is
// refused with what to restore, never a silent new keyring; --new-keyring
// starts one on purpose; restoring the keyring works.
func TestMissingKeyringNamedByState(t *testing.T) {
	dir := shortDir(t)
	keyring := filepath.Join(dir, "keyring.json")
	s := startServe(t, serveArgs(dir, softkeyURI(dir)), nil, nil)
	var l ledger
	l.encrypt(s, 5)
	s.kill(syscall.SIGTERM)
	ringID := strings.Split(l.answers[0].resp.KeyId, ":")[1]
	if err := os.Rename(keyring, keyring+".bak"); err != nil {
		t.Fatal(err)
	}

	r := kubekms(t, 30*time.Second, serveArgs(dir, softkeyURI(dir))...)
	r.check(t, want{1, "keyring " + keyring + " is missing, but the state file " + filepath.Join(dir, "state.json") + " names key softkey:" + ringID})
	r.check(t, want{1, "Restore the keyring file from a backup"})
	if _, err := os.Stat(keyring); !os.IsNotExist(err) {
		t.Fatalf("a keyring was created in place of the missing one: %v", err)
	}

	// Another keyring in its place: refused too.
	other := shortDir(t)
	newKeyring(t, other)
	copyFile(t, filepath.Join(other, "keyring.json"), keyring)
	kubekms(t, 30*time.Second, serveArgs(dir, softkeyURI(dir))...).check(t, want{1, "data encrypted under " + ringID + " cannot be decrypted with this file"})

	// Restored: it starts, and everything decrypts.
	if err := os.Rename(keyring+".bak", keyring); err != nil {
		t.Fatal(err)
	}
	s = startServe(t, serveArgs(dir, softkeyURI(dir)), nil, nil)
	l.encrypt(s, 5)
	s.kill(syscall.SIGTERM)
	l.verify(t, freshServe(t, softkeyURI(dir), nil, nil))

	// --new-keyring: a new ring on purpose, said loudly.
	os.Remove(keyring)
	s = startServe(t, append(serveArgs(dir, softkeyURI(dir)), "--new-keyring"), nil, nil)
	if !strings.Contains(s.logs.String(), "created a NEW softkey keyring although the saved state names another") {
		t.Fatalf("--new-keyring did not warn: %s", s.logs)
	}
}

// Keyring files serve refuses at start: each exits 1 with a message that
// says what is wrong, at once (a FIFO does not hang it), and leaves the file
// as it was.
func TestKeyringRefusedAtStart(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dir, keyring string)
		want  string
	}{
		{"world-readable", func(t *testing.T, _, k string) { chmod(t, k, 0o644) }, "has mode 0644: other users can read it; chmod 600"},
		{"group-writable", func(t *testing.T, _, k string) { chmod(t, k, 0o620) }, "other users can change it"},
		{"owned by another user", func(t *testing.T, _, k string) { chown(t, k, otherUID) }, fmt.Sprintf("belongs to uid %d", otherUID)},
		{"world-writable folder", func(t *testing.T, d, _ string) { chmod(t, d, 0o777) }, "keyring folder is writable by every user"},
		{"group-writable folder", func(t *testing.T, d, _ string) { chmod(t, d, 0o770) }, "keyring folder is writable by its group"},
		{"folder of another user", func(t *testing.T, d, _ string) { chown(t, d, otherUID) }, "keyring folder belongs to uid"},
		{"FIFO", func(t *testing.T, _, k string) { os.Remove(k); mkfifo(t, k) }, "is a FIFO (named pipe), not a regular file"},
		{"folder", func(t *testing.T, _, k string) { os.Remove(k); mkdir(t, k) }, "is a folder, not a regular file"},
		{"empty", func(t *testing.T, _, k string) { write(t, k, "") }, "parse keyring"},
		{"truncated", func(t *testing.T, _, k string) { truncate(t, k, 40) }, "parse keyring"},
		{"garbage", func(t *testing.T, _, k string) { write(t, k, "\x00\xff not json") }, "parse keyring"},
		{"no versions", func(t *testing.T, _, k string) {
			write(t, k, `{"format":"kubekms-softkey/v1","ring_id":"x","primary":1,"versions":[]}`)
		}, "primary version 1 does not exist"},
		{"symlink to another user's file", func(t *testing.T, d, k string) {
			other := filepath.Join(d, "other.json")
			copyFile(t, k, other)
			chown(t, other, otherUID)
			os.Remove(k)
			if err := os.Symlink(other, k); err != nil {
				t.Fatal(err)
			}
		}, "belongs to uid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := shortDir(t)
			ringDir := filepath.Join(root, "ring")
			mkdir(t, ringDir)
			newKeyring(t, ringDir)
			keyring := filepath.Join(ringDir, "keyring.json")
			tc.setup(t, ringDir, keyring)
			before := readRegular(keyring)
			r := kubekms(t, 20*time.Second, append(serveArgs(root, softkeyURI(ringDir)), "--no-state")...)
			r.check(t, want{1, tc.want})
			if after := readRegular(keyring); after != before {
				t.Fatal("the refused keyring file was changed")
			}
			// The operator tools refuse it too.
			kubekms(t, 20*time.Second, "softkey", "rotate", "--key-uri", softkeyURI(ringDir)).check(t, want{1, tc.want})
		})
	}
}

// Changes to the keyring while serve runs that it would refuse at start:
// the file is not adopted (no Encrypt is ever answered under a key it
// names), Status reports it, and once the file is put right the plugin is
// healthy again; every ciphertext answered before, during and after
// decrypts.
func TestKeyringChangedWhileRunning(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name         string
		break_, mend func(t *testing.T, dir, keyring, good string)
		healthz      string
	}{
		{"replaced by another keyring", func(t *testing.T, d, k, _ string) {
			other := shortDir(t)
			newKeyring(t, other)
			replace(t, filepath.Join(other, "keyring.json"), k)
		}, func(t *testing.T, d, k, good string) { replace(t, good, k) }, "now holds keyring"},
		{"chmod 644", func(t *testing.T, _, k, _ string) { chmod(t, k, 0o644) },
			func(t *testing.T, _, k, _ string) { chmod(t, k, 0o600) }, "other users can read it"},
		{"given to another user", func(t *testing.T, _, k, _ string) { chown(t, k, otherUID) },
			func(t *testing.T, _, k, _ string) { chown(t, k, 0) }, "belongs to uid"},
		{"folder made world-writable, then another user swaps the keyring", func(t *testing.T, d, k, _ string) {
			chmod(t, filepath.Dir(d), 0o711) // let uid 65534 reach the folder
			chmod(t, d, 0o777)
			// uid 65534 writes its own keyring (valid, mode 0600) over ours.
			other := shortDir(t)
			newKeyring(t, other)
			evil := filepath.Join(d, ".evil")
			copyFile(t, filepath.Join(other, "keyring.json"), evil)
			chown(t, evil, otherUID)
			asOther(t, fmt.Sprintf("mv -f %s %s", evil, k))
		}, func(t *testing.T, d, k, good string) {
			replace(t, good, k)
			chmod(t, d, 0o700)
		}, "writable by every user"},
		{"replaced by garbage", func(t *testing.T, _, k, _ string) {
			tmp := k + ".new"
			write(t, tmp, "{")
			mustRename(t, tmp, k)
		}, func(t *testing.T, _, k, good string) { replace(t, good, k) }, "parse keyring"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := shortDir(t)
			ringDir := filepath.Join(root, "ring")
			mkdir(t, ringDir)
			keyring := filepath.Join(ringDir, "keyring.json")
			s := startServe(t, serveArgs(root, softkeyURI(ringDir)), nil, nil)
			good := filepath.Join(root, "good.json")
			copyFile(t, keyring, good)
			var l ledger
			l.encrypt(s, 5)
			goodKeyID := l.answers[0].resp.KeyId

			tc.break_(t, ringDir, keyring, good)
			st := s.waitHealthz(10*time.Second, "Status reporting the refused keyring", func(h string) bool { return strings.Contains(h, tc.healthz) })
			if !strings.Contains(st.Healthz, "keyring file refused, last good keyring kept") {
				t.Errorf("healthz does not say the file is not adopted: %q", st.Healthz)
			}
			l.encrypt(s, 5) // refused or under the last good key; never under the new file's
			if !strings.Contains(s.logs.String(), "REFUSED") {
				t.Errorf("the refused keyring was not logged at level ERROR")
			}
			if m := s.scrape(); !strings.Contains(m, `kubekms_keyservice_calls_total{operation="probe",outcome="invalid"}`) {
				t.Errorf("the refused keyring is not counted in kubekms_keyservice_calls_total")
			}

			tc.mend(t, ringDir, keyring, good)
			s.waitHealthy(10 * time.Second)
			l.encrypt(s, 5)
			for id := range l.keyIDs() {
				if id != goodKeyID {
					t.Errorf("an Encrypt was answered under %s, not the plugin's key %s", id, goodKeyID)
				}
			}
			s.kill(syscall.SIGTERM)
			l.verify(t, freshServe(t, "softkey://"+good, nil, nil))
		})
	}
}

// `softkey rotate`, `disable` and `enable` reach a running serve at once (it
// watches the keyring's folder), well within one probe interval.
func TestKeyringChangeSeenAtOnce(t *testing.T) {
	dir := shortDir(t)
	args := append(serveArgs(dir, softkeyURI(dir)), "--probe-interval", "1h")
	s := startServe(t, args, nil, nil)
	before, _ := s.status()
	kubekms(t, 20*time.Second, "softkey", "rotate", "--key-uri", softkeyURI(dir)).check(t, want{0, "primary is now"})
	start := time.Now()
	deadline := start.Add(5 * time.Second)
	for {
		st, err := s.status()
		if err == nil && st.KeyId != before.KeyId && strings.HasSuffix(st.KeyId, ":v2") {
			t.Logf("rotation seen by Status after %s (probe interval 1h)", time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rotation not seen within 5 s with a 1 h probe interval: %+v %v", st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A state file that is not a regular file is refused at start (a FIFO
// would hang it); an unparsable one is no proof of anything: serve starts,
// makes a new local KEK, and loses nothing.
func TestStateFileHostile(t *testing.T) {
	dir := shortDir(t)
	state := filepath.Join(dir, "state.json")
	s := startServe(t, serveArgs(dir, softkeyURI(dir)), nil, nil)
	var l ledger
	l.encrypt(s, 3)
	s.kill(syscall.SIGTERM)

	os.Remove(state)
	mkfifo(t, state)
	kubekms(t, 20*time.Second, serveArgs(dir, softkeyURI(dir))...).check(t, want{1, "--state-file " + state + " is not a regular file"})
	os.Remove(state)
	mkdir(t, state)
	kubekms(t, 20*time.Second, serveArgs(dir, softkeyURI(dir))...).check(t, want{1, "is not a regular file"})
	os.Remove(state)
	for _, junk := range []string{"", "{", `{"key_id": 7}`, "\x00\x01garbage"} {
		write(t, state, junk)
		s = startServe(t, serveArgs(dir, softkeyURI(dir)), nil, nil)
		l.encrypt(s, 2)
		s.kill(syscall.SIGTERM)
	}
	l.verify(t, freshServe(t, softkeyURI(dir), nil, nil))
}

// A `softkey` command that holds the keyring lock (stopped, or slow) makes a
// starting serve wait, and SIGTERM still ends that wait at once.
func TestSIGTERMWhileWaitingForTheKeyringLock(t *testing.T) {
	dir := shortDir(t)
	lock, err := os.OpenFile(filepath.Join(dir, "keyring.json.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	cmd := command(serveArgs(dir, softkeyURI(dir))...)
	time.AfterFunc(2*time.Second, func() { _ = cmd.Process.Signal(syscall.SIGTERM) })
	start := time.Now()
	r := runCmd(t, 10*time.Second, cmd)
	r.check(t, want{1, "waiting for the keyring lock"})
	if d := time.Since(start); d > 6*time.Second {
		t.Fatalf("SIGTERM took %s to end serve", d)
	}
}

func chmod(t *testing.T, p string, m os.FileMode) {
	t.Helper()
	if err := os.Chmod(p, m); err != nil {
		t.Fatal(err)
	}
}

func chown(t *testing.T, p string, uid int) {
	t.Helper()
	if err := os.Chown(p, uid, uid); err != nil {
		t.Fatal(err)
	}
}

func mkfifo(t *testing.T, p string) {
	t.Helper()
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
}

func mkdir(t *testing.T, p string) {
	t.Helper()
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
}

func write(t *testing.T, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func truncate(t *testing.T, p string, n int64) {
	t.Helper()
	if err := os.Truncate(p, n); err != nil {
		t.Fatal(err)
	}
}

func mustRename(t *testing.T, from, to string) {
	t.Helper()
	if err := os.Rename(from, to); err != nil {
		t.Fatal(err)
	}
}

// replace puts a copy of from over to by rename, as `cp` + `mv` would.
func replace(t *testing.T, from, to string) {
	t.Helper()
	tmp := to + ".copy"
	copyFile(t, from, tmp)
	mustRename(t, tmp, to)
}

// readRegular returns the content of p if it is a regular file (reading a
// FIFO would block).
func readRegular(p string) string {
	if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
		return ""
	}
	b, _ := os.ReadFile(p)
	return string(b)
}
