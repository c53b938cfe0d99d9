package softkey_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

func fingerprint(t *testing.T, path string) string {
	t.Helper()
	r, err := softkey.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return softkey.Fingerprint(r)
}

func exportFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := softkey.Export(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// Two nodes share a keyring through Export/Import and rotate in the safe
// order (stage, distribute, promote one node at a time): at every step
// each node unwraps what the other wrapped, and the fingerprints tell when
// they hold the same ring.
func TestShareAcrossNodes(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a", "keyring.json"), filepath.Join(dir, "b", "keyring.json")
	svcA := open(t, a, keyservice.Options{}) // creates node A's ring

	res, err := softkey.Import(b, exportFile(t, a))
	if err != nil {
		t.Fatal(err)
	}
	if !res.Created || res.Fingerprint != fingerprint(t, a) || fingerprint(t, b) != fingerprint(t, a) {
		t.Fatalf("first import: %+v", res)
	}
	if st, _ := os.Stat(b); st.Mode().Perm() != 0o600 {
		t.Errorf("imported keyring has mode %v", st.Mode().Perm())
	}
	svcB := open(t, b, keyservice.Options{})
	crossCheck := func(step string) {
		t.Helper()
		for _, pair := range [][2]keyservice.Service{{svcA, svcB}, {svcB, svcA}} {
			w, err := pair[0].Wrap(ctx, bytes.Repeat([]byte{7}, 32))
			if err != nil {
				t.Fatalf("%s: wrap: %v", step, err)
			}
			if _, err := pair[1].Unwrap(ctx, w.KeyID, w.Wrapped); err != nil {
				t.Fatalf("%s: the other node cannot unwrap %s: %v", step, w.KeyID, err)
			}
		}
	}
	crossCheck("after the first import")

	if _, n, err := softkey.Stage(a); err != nil || n != 2 {
		t.Fatalf("Stage: %d, %v", n, err)
	}
	if id, _ := svcA.Probe(ctx); !strings.HasSuffix(id, ":v1") {
		t.Errorf("a staged version became primary: %s", id)
	}
	if fingerprint(t, a) == fingerprint(t, b) {
		t.Fatal("the fingerprint did not change with a staged version")
	}
	res, err = softkey.Import(b, exportFile(t, a))
	if err != nil {
		t.Fatal(err)
	}
	if res.Created || !slices.Equal(res.Added, []int{2}) || res.Primary != 1 || res.Fingerprint != fingerprint(t, a) {
		t.Fatalf("import of the staged version: %+v", res)
	}
	if _, err := softkey.Promote(a, 2); err != nil { // A first: B already holds v2
		t.Fatal(err)
	}
	crossCheck("with only A promoted")
	if _, err := softkey.Promote(b, 2); err != nil {
		t.Fatal(err)
	}
	crossCheck("with both promoted")
	if fingerprint(t, a) != fingerprint(t, b) {
		t.Error("promoted on both nodes but the fingerprints differ")
	}
	if _, err := softkey.Promote(a, 9); err == nil {
		t.Error("promoted a version that does not exist")
	}

	// Disabling is carried by an import too.
	if _, err := softkey.SetDisabled(a, 1, true); err != nil {
		t.Fatal(err)
	}
	if res, err = softkey.Import(b, exportFile(t, a)); err != nil || !slices.Equal(res.StateChanged, []int{1}) {
		t.Fatalf("import of a disabled version: %+v, %v", res, err)
	}
	if _, err := softkey.Promote(b, 1); err == nil {
		t.Error("promoted a disabled version")
	}
}

// Import refuses, and leaves the keyring untouched, whenever it would lose
// a key: another keyring, an older export, or two rings rotated apart.
func TestImportRefusals(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.json"), filepath.Join(dir, "b.json")
	if _, err := softkey.Create(a); err != nil {
		t.Fatal(err)
	}
	old := exportFile(t, a)
	if _, err := softkey.Import(b, old); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other.json")
	if _, err := softkey.Create(other); err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.Rotate(a); err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.Import(b, exportFile(t, a)); err != nil { // b is now at v2 too
		t.Fatal(err)
	}
	if _, err := softkey.Rotate(a); err != nil { // a: v3 ...
		t.Fatal(err)
	}
	if _, err := softkey.Rotate(b); err != nil { // ... and b: another v3
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		data []byte
		want string
	}{
		"another keyring":  {exportFile(t, other), "share no key"},
		"an older export":  {old, "lacks version 2"},
		"rotated apart":    {exportFile(t, a), "version 3 differs"},
		"not a keyring":    {[]byte(`{"format":"x"}`), "exported keyring"},
		"not even JSON":    {[]byte("hello"), "parse exported keyring"},
		"a truncated ring": {exportFile(t, a)[:40], "parse exported keyring"},
	} {
		before, _ := os.ReadFile(b)
		_, err := softkey.Import(b, tc.data)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %q", name, err, tc.want)
		}
		if after, _ := os.ReadFile(b); !bytes.Equal(before, after) {
			t.Errorf("%s: a refused import changed the keyring", name)
		}
	}
}

func TestFingerprintCoversEverything(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k.json")
	r, err := softkey.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	base := softkey.Fingerprint(r)
	if len(base) != 32 || strings.Contains(string(exportFile(t, path)), base) {
		t.Fatalf("fingerprint %q", base)
	}
	for name, change := range map[string]func(*softkey.Keyring){
		"ring id":  func(r *softkey.Keyring) { r.RingID = "x" },
		"key":      func(r *softkey.Keyring) { r.Versions[0].Key = bytes.Repeat([]byte{1}, 32) },
		"disabled": func(r *softkey.Keyring) { r.Versions[0].Disabled = true },
		"primary":  func(r *softkey.Keyring) { r.Primary = 2 },
		"created":  func(r *softkey.Keyring) { r.Versions[0].Created = r.Versions[0].Created.Add(1e9) },
	} {
		c, _ := softkey.Load(path)
		change(c)
		if softkey.Fingerprint(c) == base {
			t.Errorf("changing the %s keeps the fingerprint", name)
		}
	}
}
