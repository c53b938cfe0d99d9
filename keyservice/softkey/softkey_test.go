package softkey_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

func TestContract(t *testing.T) {
	keyservicetest.Run(t, harness(filepath.Join(t.TempDir(), "keyring.json")))
}

// harness drives a keyring file: Disable revokes every version, Stop moves
// the file away (an unreadable key service).
func harness(path string) keyservicetest.Harness {
	return keyservicetest.Harness{
		Open: func(t *testing.T) keyservice.Service {
			svc, err := softkey.Open(context.Background(), "softkey://"+path, keyservice.Options{})
			if err != nil {
				t.Fatal(err)
			}
			return svc
		},
		Rotate: func(t *testing.T) {
			if _, err := softkey.Rotate(path); err != nil {
				t.Fatal(err)
			}
		},
		Disable: func(t *testing.T) { setAll(t, path, true) },
		Enable:  func(t *testing.T) { setAll(t, path, false) },
		Stop:    func(t *testing.T) { mustRename(t, path, path+".away") },
		Start:   func(t *testing.T) { mustRename(t, path+".away", path) },
		RevokeVersion: func(t *testing.T, keyID string) {
			ring, err := softkey.Load(path)
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range ring.Versions {
				if ring.KeyID(v.Version) == keyID {
					if _, err := softkey.SetDisabled(path, v.Version, true); err != nil {
						t.Fatal(err)
					}
					return
				}
			}
			t.Fatalf("no version has key ID %q", keyID)
		},
	}
}

func mustRename(t *testing.T, from, to string) {
	t.Helper()
	if err := os.Rename(from, to); err != nil {
		t.Fatal(err)
	}
}

func setAll(t *testing.T, path string, disabled bool) {
	t.Helper()
	ring, err := softkey.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range ring.Versions {
		if _, err := softkey.SetDisabled(path, v.Version, disabled); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCreateModeAndRotate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "keyring.json")
	ring, created, err := softkey.LoadOrCreate(path)
	if err != nil || !created {
		t.Fatalf("LoadOrCreate: created=%v err=%v", created, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("keyring mode %v, want 0600", st.Mode().Perm())
	}
	first := ring.KeyID(ring.Primary)
	r2, err := softkey.Rotate(path)
	if err != nil {
		t.Fatal(err)
	}
	if r2.Primary != 2 || len(r2.Versions) != 2 || r2.KeyID(2) == first {
		t.Fatalf("after rotate: primary %d, %d versions", r2.Primary, len(r2.Versions))
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Fatalf("rotated keyring mode %v, want 0600", st.Mode().Perm())
	}
	// A second keyring never repeats the first's key IDs.
	other, err := softkey.Create(filepath.Join(t.TempDir(), "k.json"))
	if err != nil {
		t.Fatal(err)
	}
	if other.KeyID(1) == first {
		t.Fatal("two keyrings share a key ID")
	}
}

func TestOpenRefusesWorldReadableKeyring(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyring.json")
	if _, err := softkey.Create(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.Open(context.Background(), "softkey://"+path, keyservice.Options{}); err == nil {
		t.Fatal("Open accepted a world-readable keyring")
	}
}

func TestParseURI(t *testing.T) {
	for _, tc := range []struct {
		uri  string
		want string
	}{
		{"softkey:///var/lib/kubekms/keyring.json", "/var/lib/kubekms/keyring.json"},
		{"softkey://host/keyring.json", ""},
		{"softkey:relative.json", ""},
		{"softkey:///a/../b.json", ""},
		{"softkey:///a/b.json?x=1", ""},
		{"other:///a.json", ""},
		{"softkey:///", ""},
	} {
		got, err := softkey.ParseURI(tc.uri)
		if tc.want == "" {
			if err == nil {
				t.Errorf("ParseURI(%q) = %q, want an error", tc.uri, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseURI(%q) = %q, %v; want %q", tc.uri, got, err, tc.want)
		}
	}
}

func TestUnwrapErrors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyring.json")
	svc, err := softkey.Open(context.Background(), "softkey://"+path, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := svc.Wrap(context.Background(), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	for name, keyID := range map[string]string{
		"foreign ring":    "softkey:0000000000000000:v1",
		"missing version": res.KeyID[:len(res.KeyID)-1] + "9",
		"not softkey":     "vault:x:v1",
		"bad version":     res.KeyID + "x",
	} {
		if _, err := svc.Unwrap(context.Background(), keyID, res.Wrapped); err == nil {
			t.Errorf("%s: Unwrap(%q) succeeded", name, keyID)
		}
	}
	if _, err := svc.Unwrap(context.Background(), res.KeyID[:len(res.KeyID)-1]+"9", res.Wrapped); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Errorf("never existing version: class %v, want invalid", keyservice.Classify(err))
	}
}
