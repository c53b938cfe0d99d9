package hierarchy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

// golden is a seal made by an earlier kubekms (testdata/seal-vN: the keyring
// and the Encrypt answer, written by the code of format N).
type golden struct {
	KeyID      string `json:"key_id"`
	Ciphertext []byte `json:"ciphertext"`
	Annotation []byte `json:"annotation"`
	Plaintext  []byte `json:"plaintext"`
}

func openGolden(t *testing.T, format int) (*hierarchy.Hierarchy, *keyservicetest.Counting, golden) {
	t.Helper()
	dir := fmt.Sprintf("testdata/seal-v%d", format)
	data, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("seal-v%d.json", format)))
	if err != nil {
		t.Fatal(err)
	}
	var g golden
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	ring, err := os.ReadFile(filepath.Join(dir, "keyring.json"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "keyring.json")
	if err := os.WriteFile(path, ring, 0o600); err != nil {
		t.Fatal(err)
	}
	svc, err := softkey.Open(context.Background(), "softkey://"+path, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	c := keyservicetest.NewCounting(svc)
	h, err := hierarchy.New(context.Background(), c, hierarchy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h, c, g
}

// TestOlderFormatsStillDecrypt: data written before format 2 and before
// format 3 stays readable.
func TestOlderFormatsStillDecrypt(t *testing.T) {
	for _, format := range []int{1, 2} {
		t.Run(fmt.Sprintf("format %d", format), func(t *testing.T) {
			h, _, g := openGolden(t, format)
			if int(g.Ciphertext[0]) != format {
				t.Fatalf("golden seal has format %d, want %d", g.Ciphertext[0], format)
			}
			got, err := h.Decrypt(context.Background(), g.KeyID, g.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: g.Annotation})
			if err != nil {
				t.Fatalf("format-%d seal: %v", format, err)
			}
			if !bytes.Equal(got, g.Plaintext) {
				t.Fatalf("format-%d seal opened to other bytes", format)
			}
		})
	}
}

// nulShift moves the boundary between key_id and annotation across a NUL:
// key_id' = key_id || 0x00 || ann[:j], ann' = ann[j+1:], for the first j with
// ann[j] == 0. Format 1 joined the two with a NUL and no lengths, so its AAD
// (and the old cache key) did not change.
func nulShift(t *testing.T, keyID string, ann []byte) (string, []byte) {
	t.Helper()
	j := bytes.IndexByte(ann, 0)
	if j < 0 {
		t.Fatal("annotation holds no NUL byte")
	}
	return keyID + "\x00" + string(ann[:j]), ann[j+1:]
}

func TestAmbiguousAADIsRefused(t *testing.T) {
	t.Run("format 1", func(t *testing.T) {
		h, _, g := openGolden(t, 1)
		// The genuine value first, so its local KEK is cached.
		if _, err := h.Decrypt(context.Background(), g.KeyID, g.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: g.Annotation}); err != nil {
			t.Fatal(err)
		}
		keyID, ann := nulShift(t, g.KeyID, g.Annotation)
		if _, err := h.Decrypt(context.Background(), keyID, g.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: ann}); err == nil {
			t.Fatal("format 1: a key_id/annotation pair with a NUL moved across the boundary was accepted")
		}
	})
	t.Run("format 2", func(t *testing.T) {
		f := newFixture(t)
		cfg := f.config()
		cfg.SealFormat = hierarchy.SealFormatAnnotation
		h := f.open(t, cfg)
		s := encrypt(t, h)
		decrypt(t, h, s)
		keyID, ann := nulShift(t, s.KeyID, s.Annotations[hierarchy.AnnotationKey])
		if _, err := h.Decrypt(context.Background(), keyID, s.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: ann}); err == nil {
			t.Fatal("format 2: a key_id/annotation pair with a NUL moved across the boundary was accepted")
		}
	})
}

// TestRefusedRequestsCostNothing: a forged creation time in the annotation
// of a cached local KEK is refused without a remote call, and requests that
// end refused never enter the cache, so they cannot evict good entries.
func TestRefusedRequestsCostNothing(t *testing.T) {
	f := newFixture(t)
	cfg := f.config()
	cfg.CacheSize = 2
	h := f.open(t, cfg)
	own := encrypt(t, h)                       // local KEK 0 (current, cached)
	other := encrypt(t, f.open(t, f.config())) // local KEK 1
	third := encrypt(t, f.open(t, f.config())) // local KEK 2, not cached by h
	decrypt(t, h, other)                       // cache: KEK 0, KEK 1 (most recent)
	// forge changes the creation time's last byte of the local KEK, which
	// a format-3 ciphertext carries after its 3-byte header.
	forge := func(s hierarchy.Sealed) []byte { return flip(s.Ciphertext, 3+8) }
	unwraps := f.svc.Calls("unwrap")
	for range 10 {
		if _, err := h.Decrypt(context.Background(), other.KeyID, forge(other), nil); err == nil {
			t.Fatal("a forged creation time was accepted")
		}
	}
	if n := f.svc.Calls("unwrap") - unwraps; n != 0 {
		t.Fatalf("10 forged requests for a cached local KEK made %d remote unwraps, want 0", n)
	}
	// A forged value of a local KEK h has not seen costs its unwrap, but is
	// not cached: KEKs 0 and 1 stay.
	if _, err := h.Decrypt(context.Background(), third.KeyID, forge(third), nil); err == nil {
		t.Fatal("a forged creation time was accepted")
	}
	unwraps = f.svc.Calls("unwrap")
	decrypt(t, h, own)
	decrypt(t, h, other)
	if n := f.svc.Calls("unwrap") - unwraps; n != 0 {
		t.Fatalf("a refused request evicted a good local KEK: %d more unwraps, want 0", n)
	}
	decrypt(t, h, third) // the genuine value still opens (one unwrap)
}
