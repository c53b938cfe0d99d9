package hostile

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// nulShift moves the boundary between key_id and annotation across the
// annotation's first NUL byte (its creation time starts with zeros):
// key_id' = key_id || 0x00 || ann[:j], ann' = ann[j+1:]. Format 1 joined the
// two with a NUL and no lengths, so its associated data did not change.
func nulShift(t *testing.T, keyID string, annotations map[string][]byte) (string, map[string][]byte) {
	t.Helper()
	ann := annotations[hierarchy.AnnotationKey]
	j := bytes.IndexByte(ann, 0)
	if j < 0 {
		t.Fatal("annotation holds no NUL byte")
	}
	return keyID + "\x00" + string(ann[:j]), map[string][]byte{hierarchy.AnnotationKey: ann[j+1:]}
}

// decryptCode sends one Decrypt and returns its gRPC code and message.
func decryptCode(t *testing.T, s *server, keyID string, ciphertext []byte, annotations map[string][]byte) (codes.Code, string, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := s.kms.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: ciphertext, KeyId: keyID, Annotations: annotations, Uid: "hostile-seal"})
	st, _ := status.FromError(err)
	return st.Code(), st.Message(), resp.GetPlaintext()
}

// A key_id and annotation with a NUL moved from one to the other (issue 10
// item 6) are refused, for format-2 seals (length-prefixed associated data,
// written with --seal-format=2) and for seals written before it (format 1,
// which a release before format 2 accepted once the genuine pair was
// cached); the genuine pairs still decrypt. The default, format 3, has no
// annotation: its local KEK moved out into one is refused.
func TestAmbiguousSealRefused(t *testing.T) {
	t.Run("format 3", func(t *testing.T) {
		dir := shortDir(t)
		s := startServe(t, append(serveArgs(dir, softkeyURI(dir)), "--no-state"), nil, nil)
		var l ledger
		l.encrypt(s, 1)
		good := l.answers[0].resp
		kek := hierarchy.Sealed{Ciphertext: good.Ciphertext, Annotations: good.Annotations}.LocalKEK()
		if good.Ciphertext[0] != 3 || len(good.Annotations) != 0 || len(kek) == 0 {
			t.Fatalf("Encrypt wrote a format-%d seal with %d annotations, want 3 and none", good.Ciphertext[0], len(good.Annotations))
		}
		moved := append([]byte{2}, good.Ciphertext[3+len(kek):]...)
		if code, msg, _ := decryptCode(t, s, good.KeyId, moved, map[string][]byte{hierarchy.AnnotationKey: kek}); code != codes.InvalidArgument {
			t.Fatalf("local KEK moved into an annotation: %v %q, want InvalidArgument", code, msg)
		}
		s.kill(syscall.SIGTERM)
		l.verify(t, freshServe(t, softkeyURI(dir), nil, nil))
	})
	t.Run("format 2", func(t *testing.T) {
		dir := shortDir(t)
		s := startServe(t, append(serveArgs(dir, softkeyURI(dir)), "--no-state", "--seal-format=2"), nil, nil)
		var l ledger
		l.encrypt(s, 1)
		good := l.answers[0].resp
		if good.Ciphertext[0] != 2 {
			t.Fatalf("Encrypt wrote a format-%d seal, want 2", good.Ciphertext[0])
		}
		if code, msg, _ := decryptCode(t, s, good.KeyId, good.Ciphertext, good.Annotations); code != codes.OK {
			t.Fatalf("genuine Decrypt: %v %s", code, msg)
		}
		keyID, ann := nulShift(t, good.KeyId, good.Annotations)
		if code, msg, _ := decryptCode(t, s, keyID, good.Ciphertext, ann); code != codes.InvalidArgument {
			t.Fatalf("NUL-shifted key_id/annotation: %v %q, want InvalidArgument", code, msg)
		}
		s.kill(syscall.SIGTERM)
		l.verify(t, freshServe(t, softkeyURI(dir), nil, nil))
	})
	t.Run("format 1", func(t *testing.T) {
		golden := filepath.Join("..", "..", "hierarchy", "testdata", "seal-v1")
		var g struct {
			KeyID      string `json:"key_id"`
			Ciphertext []byte `json:"ciphertext"`
			Annotation []byte `json:"annotation"`
			Plaintext  []byte `json:"plaintext"`
		}
		b, err := os.ReadFile(filepath.Join(golden, "seal-v1.json"))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &g); err != nil {
			t.Fatal(err)
		}
		dir := shortDir(t)
		testutil.CopyFile(t, filepath.Join(golden, "keyring.json"), filepath.Join(dir, "keyring.json"))
		s := startServe(t, append(serveArgs(dir, softkeyURI(dir)), "--no-state"), nil, nil)
		ann := map[string][]byte{hierarchy.AnnotationKey: g.Annotation}
		code, msg, plain := decryptCode(t, s, g.KeyID, g.Ciphertext, ann)
		if code != codes.OK || !bytes.Equal(plain, g.Plaintext) {
			t.Fatalf("a format-1 seal written before format 2 does not decrypt: %v %s", code, msg)
		}
		keyID, forged := nulShift(t, g.KeyID, ann)
		if code, msg, _ := decryptCode(t, s, keyID, g.Ciphertext, forged); code != codes.InvalidArgument || !strings.Contains(msg, "NUL") {
			t.Fatalf("NUL-shifted key_id/annotation of a format-1 seal: %v %q, want InvalidArgument naming the NUL", code, msg)
		}
	})
}

// unwraps reads kubekms_keyservice_calls_total{operation="unwrap"}.
func (s *server) unwraps() float64 {
	s.t.Helper()
	return s.metric("kubekms_keyservice_calls_total", map[string]string{"operation": "unwrap"})
}

// metric sums the series of a counter whose labels include want.
func (s *server) metric(name string, want map[string]string) float64 {
	s.t.Helper()
	m, err := cluster.Scrape(context.Background(), "http://"+s.metrics+"/metrics")
	if err != nil {
		s.t.Fatal(err)
	}
	return m.Sum(name, want)
}

// Decrypts that end refused cost nothing (issue 10 item 7), on every
// backend: a forged creation time in the local KEK (inside the ciphertext)
// of a cached local KEK
// makes no remote unwrap, and a refused request for a local KEK that is not
// cached costs its unwrap but never enters the cache, so it cannot evict a
// good entry (--cache-size 1 here).
func TestRefusedDecryptsCostNoUnwrap(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			dir := shortDir(t)
			d := b.setup(t, dir)
			// Another plugin's local KEK, which the tested one has not seen.
			other := freshServe(t, d.keyURI, d.env, nil, d.flags...)
			var l ledger
			l.encrypt(other, 1)
			other.kill(syscall.SIGTERM)
			x := l.answers[0].resp

			s := freshServe(t, d.keyURI, d.env, nil, append(d.flags, "--cache-size", "1")...)
			l.encrypt(s, 1)
			y := l.answers[1].resp // sealed with s's current local KEK, cached
			// forge flips the creation time's last byte of the local KEK,
			// in the annotation of a format-2 seal or inside a format-3 one.
			forge := func(r *kmsapi.EncryptResponse) ([]byte, map[string][]byte) {
				if ann, ok := r.Annotations[hierarchy.AnnotationKey]; ok {
					ann = bytes.Clone(ann)
					ann[8] ^= 1
					return r.Ciphertext, map[string][]byte{hierarchy.AnnotationKey: ann}
				}
				ct := bytes.Clone(r.Ciphertext)
				ct[3+8] ^= 1
				return ct, nil
			}
			yct, yann := forge(y)
			xct, xann := forge(x)
			before := s.unwraps()
			for range 10 {
				if code, msg, _ := decryptCode(t, s, y.KeyId, yct, yann); code != codes.InvalidArgument {
					t.Fatalf("forged creation time: %v %q, want InvalidArgument", code, msg)
				}
			}
			if n := s.unwraps() - before; n != 0 {
				t.Errorf("10 forged Decrypts for a cached local KEK made %v remote unwraps, want 0", n)
			}
			if code, msg, _ := decryptCode(t, s, x.KeyId, xct, xann); code != codes.InvalidArgument {
				t.Fatalf("forged creation time of an uncached local KEK: %v %q, want InvalidArgument", code, msg)
			}
			before = s.unwraps()
			if code, msg, _ := decryptCode(t, s, y.KeyId, y.Ciphertext, y.Annotations); code != codes.OK {
				t.Fatalf("genuine Decrypt: %v %s", code, msg)
			}
			if n := s.unwraps() - before; n != 0 {
				t.Errorf("a refused Decrypt evicted the good cached local KEK: its next Decrypt made %v remote unwraps, want 0", n)
			}
			s.kill(syscall.SIGTERM)
			l.verify(t, freshServe(t, d.keyURI, d.env, nil, d.flags...))
		})
	}
}
