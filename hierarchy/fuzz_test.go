package hierarchy_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/kubekms/kubekms/hierarchy"
)

// FuzzDecrypt feeds untrusted (key_id, ciphertext, annotation) triples, with
// or without the annotation, to Decrypt: it must never panic, and it may only
// succeed for the genuine values (one seal of format 2, one of format 3),
// returning their plaintext.
func FuzzDecrypt(f *testing.F) {
	fx := newFixture(f)
	cfg := fx.config()
	cfg.SealFormat = hierarchy.SealFormatAnnotation
	h := fx.open(f, cfg)
	s2 := encrypt(f, h)
	s3 := encrypt(f, fx.open(f, fx.config()))
	ann, kek := s2.Annotations[hierarchy.AnnotationKey], s3.LocalKEK()
	f.Add(s2.KeyID, s2.Ciphertext, ann, true)
	f.Add(s2.KeyID, s2.Ciphertext[:20], ann, true)
	f.Add(s3.KeyID, s3.Ciphertext, []byte(nil), false)
	f.Add(s3.KeyID, s3.Ciphertext[:3+len(kek)+5], []byte(nil), false)
	f.Add(s3.KeyID, s3.Ciphertext, kek, true)
	f.Add("", []byte{1}, []byte{1}, true)
	f.Add(s2.KeyID, []byte{2, 0, 0}, ann[:9], true)
	f.Add(s3.KeyID, []byte{3, 0, 9}, []byte(nil), false)
	genuine := func(keyID string, ct []byte, anns map[string][]byte) bool {
		return keyID == s2.KeyID && bytes.Equal(ct, s2.Ciphertext) && bytes.Equal(anns[hierarchy.AnnotationKey], ann) && len(anns) == 1 ||
			keyID == s3.KeyID && bytes.Equal(ct, s3.Ciphertext) && len(anns) == 0
	}
	f.Fuzz(func(t *testing.T, keyID string, ct, annotation []byte, annotated bool) {
		var anns map[string][]byte
		if annotated {
			anns = map[string][]byte{hierarchy.AnnotationKey: annotation}
		}
		got, err := h.Decrypt(context.Background(), keyID, ct, anns)
		if err != nil {
			return
		}
		if !genuine(keyID, ct, anns) || !bytes.Equal(got, seed) {
			t.Fatalf("Decrypt accepted a forged value (key_id %q, %d-byte ciphertext, annotated %v)", keyID, len(ct), annotated)
		}
	})
}
