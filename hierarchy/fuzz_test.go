package hierarchy_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/kubekms/kubekms/hierarchy"
)

// FuzzDecrypt feeds untrusted (key_id, ciphertext, annotation) triples to
// Decrypt: it must never panic, and it may only succeed for the one genuine
// value, returning its plaintext.
func FuzzDecrypt(f *testing.F) {
	fx := newFixture(f)
	h, err := hierarchy.New(context.Background(), fx.svc, fx.config())
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(h.Close)
	s, err := h.Encrypt(context.Background(), seed)
	if err != nil {
		f.Fatal(err)
	}
	ann := s.Annotations[hierarchy.AnnotationKey]
	f.Add(s.KeyID, s.Ciphertext, ann)
	f.Add(s.KeyID, s.Ciphertext[:20], ann)
	f.Add("", []byte{1}, []byte{1})
	f.Add(s.KeyID, []byte{2, 0, 0}, ann[:9])
	f.Fuzz(func(t *testing.T, keyID string, ct, annotation []byte) {
		got, err := h.Decrypt(context.Background(), keyID, ct, map[string][]byte{hierarchy.AnnotationKey: annotation})
		if err != nil {
			return
		}
		if keyID != s.KeyID || !bytes.Equal(ct, s.Ciphertext) || !bytes.Equal(annotation, ann) || !bytes.Equal(got, seed) {
			t.Fatalf("Decrypt accepted a forged value (key_id %q, %d-byte ciphertext)", keyID, len(ct))
		}
	})
}
