package softkey_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

func open(t *testing.T, path string, opts keyservice.Options) keyservice.Service {
	t.Helper()
	svc, err := softkey.Open(context.Background(), "softkey://"+path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return svc
}

// Of many creators racing on a missing keyring, all end up with one ring.
func TestLoadOrCreateRace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyring.json")
	const n = 16
	rings := make([]string, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			r, _, err := softkey.LoadOrCreate(path)
			if err != nil {
				t.Error(err)
				return
			}
			rings[i] = r.RingID
		})
	}
	close(start)
	wg.Wait()
	final, err := softkey.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range rings {
		if r != final.RingID {
			t.Errorf("creator %d got ring %s, the file holds %s", i, r, final.RingID)
		}
	}
}

func TestCreateNeverReplaces(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyring.json")
	first, err := softkey.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.Create(path); err == nil {
		t.Fatal("Create replaced an existing keyring")
	}
	if r, err := softkey.Load(path); err != nil || r.RingID != first.RingID {
		t.Fatalf("keyring after a second Create: %v, %v", r, err)
	}
}

// A saved state naming a keyring proves it existed: Open must not create a
// new one in its place, nor use another, unless told to.
func TestOpenRefusesMissingKeyringNamedByState(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keyring.json")
	ring, err := softkey.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	prior := ring.KeyID(1)
	if err := os.Rename(path, path+".bak"); err != nil {
		t.Fatal(err)
	}
	opts := keyservice.Options{PriorKeyID: prior, PriorKeyIDFrom: "/x/state.json"}
	_, err = softkey.Open(context.Background(), "softkey://"+path, opts)
	if err == nil {
		t.Fatal("Open created a new keyring although the state names the missing one")
	}
	for _, want := range []string{"missing", ring.RingID, "/x/state.json", "Restore", "--new-keyring"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("a keyring was created: %v", err)
	}

	// Another keyring in its place is refused too.
	if _, err := softkey.Create(path); err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.Open(context.Background(), "softkey://"+path, opts); err == nil || !strings.Contains(err.Error(), ring.RingID) {
		t.Fatalf("Open with another keyring in place: %v", err)
	}
	// --new-keyring: on purpose.
	opts.NewKey = true
	open(t, path, opts)

	// Restoring the old keyring works without the flag.
	if err := os.Rename(path+".bak", path); err != nil {
		t.Fatal(err)
	}
	opts.NewKey = false
	open(t, path, opts)
	// No state: first start creates.
	open(t, filepath.Join(dir, "fresh.json"), keyservice.Options{})
}

// newOtherRing makes another valid keyring file and returns its path.
func newOtherRing(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "other.json")
	if _, err := softkey.Create(p); err != nil {
		t.Fatal(err)
	}
	return p
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Missing(t, "root, to give files to another uid")
	}
}

// A running service never adopts a keyring file it would refuse at start,
// nor another ring: it keeps the last good keyring and Probe reports why.
func TestReloadRefusesHostileKeyring(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name  string
		apply func(t *testing.T, path string)
		want  string
	}{
		{"other ring", func(t *testing.T, path string) { copyOver(t, newOtherRing(t), path) }, "now holds keyring"},
		{"world-readable", func(t *testing.T, path string) { testutil.Chmod(t, path, 0o644) }, "other users can read it"},
		{"group-writable", func(t *testing.T, path string) { testutil.Chmod(t, path, 0o620) }, "other users can change it"},
		{"other owner", func(t *testing.T, path string) { testutil.Chown(t, path, 65534) }, "belongs to uid 65534"},
		{"world-writable folder", func(t *testing.T, path string) { testutil.Chmod(t, filepath.Dir(path), 0o777) }, "writable by every user"},
		{"folder of another user", func(t *testing.T, path string) { testutil.Chown(t, filepath.Dir(path), 65534) }, "folder belongs to uid 65534"},
		{"not JSON", func(t *testing.T, path string) { writeOver(t, path, []byte("{\n")) }, "parse keyring"},
		{"a folder", func(t *testing.T, path string) { mkdirOver(t, path) }, "not a regular file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "ring", "keyring.json")
			svc := open(t, path, keyservice.Options{})
			ctx := context.Background()
			before, err := svc.Probe(ctx)
			if err != nil {
				t.Fatal(err)
			}
			kek := keyservicetest.NewKEK(t)
			w, err := svc.Wrap(ctx, kek)
			if err != nil {
				t.Fatal(err)
			}
			tc.apply(t, path)
			_, err = svc.Probe(ctx)
			if keyservice.Classify(err) != keyservice.ClassInvalid || !strings.Contains(err.Error(), tc.want) ||
				!strings.Contains(err.Error(), "last good keyring kept") {
				t.Fatalf("Probe after %s: %v; want an invalid-class error saying %q", tc.name, err, tc.want)
			}
			// The last good ring still wraps and unwraps.
			got, err := svc.Unwrap(ctx, w.KeyID, w.Wrapped)
			if err != nil || !bytes.Equal(got, kek) {
				t.Fatalf("Unwrap with the last good keyring: %v", err)
			}
			w2, err := svc.Wrap(ctx, kek)
			if err != nil || w2.KeyID != before {
				t.Fatalf("Wrap after a refused reload: key %q, %v; want the last good %q", w2.KeyID, err, before)
			}
		})
	}
}

// After a refused reload, fixing the file makes Probe healthy again.
func TestReloadAcceptsFixedKeyring(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyring.json")
	svc := open(t, path, keyservice.Options{})
	testutil.Chmod(t, path, 0o644)
	if _, err := svc.Probe(context.Background()); err == nil {
		t.Fatal("Probe accepted a world-readable keyring")
	}
	testutil.Chmod(t, path, 0o600)
	if _, err := softkey.Rotate(path); err != nil {
		t.Fatal(err)
	}
	id, err := svc.Probe(context.Background())
	if err != nil || !strings.HasSuffix(id, ":v2") {
		t.Fatalf("Probe after the fix and a rotation: %q, %v", id, err)
	}
}

func TestChangedFiresOnRotateAndDisable(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyring.json")
	svc := open(t, path, keyservice.Options{})
	n, ok := svc.(keyservice.Notifier)
	if !ok {
		t.Fatal("softkey does not implement keyservice.Notifier")
	}
	drain := func() {
		for {
			select {
			case <-n.Changed():
			case <-time.After(200 * time.Millisecond):
				return
			}
		}
	}
	wait := func(what string) {
		t.Helper()
		select {
		case <-n.Changed():
		case <-time.After(5 * time.Second):
			t.Fatalf("Changed did not fire after %s", what)
		}
	}
	drain()
	if _, err := softkey.Rotate(path); err != nil {
		t.Fatal(err)
	}
	wait("rotate")
	if id, err := svc.Probe(context.Background()); err != nil || !strings.HasSuffix(id, ":v2") {
		t.Fatalf("Probe after rotate: %q, %v", id, err)
	}
	drain()
	if _, err := softkey.SetAllDisabled(path, true); err != nil {
		t.Fatal(err)
	}
	wait("disable")
	drain()
	testutil.Chmod(t, path, 0o640)
	wait("chmod")
	drain()
	// Other files in the folder do not count.
	if err := os.WriteFile(filepath.Join(filepath.Dir(path), "unrelated"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	select {
	case <-n.Changed():
		t.Fatal("Changed fired for another file")
	case <-time.After(300 * time.Millisecond):
	}
}

func TestOpenRefusesHostileKeyring(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name  string
		apply func(t *testing.T, path string)
		want  string
	}{
		{"world-readable", func(t *testing.T, path string) { testutil.Chmod(t, path, 0o644) }, "chmod 600"},
		{"other owner", func(t *testing.T, path string) { testutil.Chown(t, path, 65534) }, "belongs to uid 65534"},
		{"world-writable folder", func(t *testing.T, path string) { testutil.Chmod(t, filepath.Dir(path), 0o777) }, "writable by every user"},
		{"group-writable folder", func(t *testing.T, path string) { testutil.Chmod(t, filepath.Dir(path), 0o770) }, "writable by its group"},
		{"FIFO", func(t *testing.T, path string) { os.Remove(path); testutil.Mkfifo(t, path) }, "FIFO"},
		{"symlink to a file of another user", func(t *testing.T, path string) {
			other := filepath.Join(t.TempDir(), "k.json")
			testutil.CopyFile(t, path, other)
			testutil.Chown(t, other, 65534)
			os.Remove(path)
			if err := os.Symlink(other, path); err != nil {
				t.Fatal(err)
			}
		}, "belongs to uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "ring", "keyring.json")
			if _, err := softkey.Create(path); err != nil {
				t.Fatal(err)
			}
			tc.apply(t, path)
			done := make(chan error, 1)
			go func() {
				_, err := softkey.Open(context.Background(), "softkey://"+path, keyservice.Options{})
				done <- err
			}()
			select {
			case err := <-done:
				if err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("Open: %v; want an error saying %q", err, tc.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Open hangs")
			}
		})
	}
}

func TestSetDisabledChecks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyring.json")
	if _, err := softkey.Create(path); err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.SetDisabled(path, 99, true); err == nil || !strings.Contains(err.Error(), "version 99 does not exist") {
		t.Fatalf("disable version 99: %v", err)
	}
	// The only version may be disabled: that revokes the whole key.
	if _, err := softkey.SetDisabled(path, 1, true); err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.SetAllDisabled(path, false); err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.Rotate(path); err != nil {
		t.Fatal(err)
	}
	_, err := softkey.SetDisabled(path, 2, true)
	if err == nil || !strings.Contains(err.Error(), "rotate first") || !strings.Contains(err.Error(), "--all") {
		t.Fatalf("disable only the primary: %v", err)
	}
	if r, _ := softkey.Load(path); r.Find(2).Disabled {
		t.Fatal("the refused disable was saved")
	}
	if _, err := softkey.SetDisabled(path, 1, true); err != nil {
		t.Fatalf("disable an old version: %v", err)
	}
	// Now every other version is disabled: the primary may go too.
	if _, err := softkey.SetDisabled(path, 2, true); err != nil {
		t.Fatal(err)
	}
}

func writeOver(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func mkdirOver(t *testing.T, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
}

// copyOver puts a copy of the keyring file src over path by rename, as an
// attacker or a careless restore would.
func copyOver(t *testing.T, src, path string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	writeOver(t, path, b)
}
