// Package conformance checks a running KMS v2 plugin on its unix socket, from
// the outside, the way kube-apiserver uses it: `kubekms status` (Status, a
// round trip, the apiserver's limits), the real k8s.io/apiserver envelope
// transformer writing and reading through it, clear InvalidArgument answers
// to malformed requests, and concurrent round trips. It is run against
// `kubekms serve` here, and against the container image and the static pod
// run by podman (test/image).
package conformance

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os/exec"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/apiserver/pkg/storage/value"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope/envelopetest"
)

// Run runs every check against endpoint ("unix:///path.sock"), whose
// EncryptionConfiguration provider is named provider. kubekms is the binary
// whose `status` command is used.
func Run(t *testing.T, endpoint, provider, kubekms string) {
	t.Run("status command", func(t *testing.T) { statusCommand(t, endpoint, kubekms) })
	t.Run("apiserver transformer", func(t *testing.T) { transformer(t, endpoint, provider) })
	t.Run("malformed requests", func(t *testing.T) { malformed(t, endpoint) })
	t.Run("concurrent round trips", func(t *testing.T) { concurrent(t, endpoint) })
}

func statusCommand(t *testing.T, endpoint, kubekms string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, kubekms, "status", "--plugin", endpoint, "-o", "json").Output()
	var rep struct {
		Healthz  string   `json:"healthz"`
		KeyID    string   `json:"key_id"`
		Problems []string `json:"problems"`
	}
	if jerr := json.Unmarshal(out, &rep); jerr != nil {
		t.Fatalf("kubekms status: %v, output %q: %v", err, out, jerr)
	}
	if err != nil || len(rep.Problems) > 0 || rep.Healthz != "ok" {
		t.Fatalf("kubekms status: %v, healthz %q, problems %q", err, rep.Healthz, rep.Problems)
	}
	t.Logf("kubekms status: key_id %s", rep.KeyID)
}

func transformer(t *testing.T, endpoint, provider string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tr := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets)
	prefix := []byte("k8s:enc:kms:v2:" + provider + ":")
	for i := range 3 {
		key := value.DefaultContext(fmt.Sprintf("/registry/secrets/conformance/s-%d", i))
		plain := []byte(fmt.Sprintf("k8s\x00secret %d written through the real apiserver transformer", i))
		var stored []byte
		var err error
		for { // the apiserver's first Status may still be on its way
			if stored, err = tr.TransformToStorage(ctx, plain, key); err == nil || ctx.Err() != nil {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("apiserver write: %v", err)
		}
		if !bytes.HasPrefix(stored, prefix) {
			t.Fatalf("stored value starts %q, want %q", stored[:min(len(stored), 32)], prefix)
		}
		got, stale, err := tr.TransformFromStorage(ctx, stored, key)
		if err != nil || !bytes.Equal(got, plain) || stale {
			t.Fatalf("apiserver read: %q stale=%v %v", got, stale, err)
		}
		// Authenticated against the object's key: another key must not read it.
		if _, _, err := tr.TransformFromStorage(ctx, stored, value.DefaultContext("/registry/secrets/conformance/other")); err == nil {
			t.Fatal("a value read back under another etcd key")
		}
	}
}

func malformed(t *testing.T, endpoint string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := envelopetest.Dial(t, endpoint)
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	enc, err := c.Encrypt(ctx, "conformance-uid", seed)
	if err != nil {
		t.Fatal(err)
	}
	if enc.KeyID != st.KeyID {
		t.Errorf("Encrypt key_id %q, Status key_id %q: the apiserver discards such a seed", enc.KeyID, st.KeyID)
	}
	tampered := bytes.Clone(enc.Ciphertext)
	tampered[len(tampered)-1] ^= 1
	for name, req := range map[string]*kmsservice.DecryptRequest{
		"empty ciphertext":    {KeyID: enc.KeyID, Annotations: enc.Annotations},
		"tampered ciphertext": {Ciphertext: tampered, KeyID: enc.KeyID, Annotations: enc.Annotations},
		// kubekms's answer with its local KEK cut off: inside the ciphertext
		// (format 3) or in the annotation (format 2).
		"its local KEK cut off": cutLocalKEK(enc),
	} {
		_, err := c.Decrypt(ctx, "conformance-uid", req)
		if code := status.Code(err); code != codes.InvalidArgument {
			t.Errorf("Decrypt with %s: %v (code %s), want InvalidArgument", name, err, code)
		}
	}
	if _, err := c.Encrypt(ctx, "conformance-uid", nil); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Encrypt of nothing: %v, want InvalidArgument", err)
	}
	// The plugin still serves after refusing them.
	if got, err := c.Decrypt(ctx, "conformance-uid", &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID, Annotations: enc.Annotations}); err != nil || !bytes.Equal(got, seed) {
		t.Errorf("round trip after malformed requests: %v", err)
	}
}

func concurrent(t *testing.T, endpoint string) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := envelopetest.Dial(t, endpoint)
	const workers, each = 16, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				seed := make([]byte, 32)
				_, _ = rand.Read(seed)
				uid := fmt.Sprintf("conformance-%d-%d", w, i)
				enc, err := c.Encrypt(ctx, uid, seed)
				if err == nil {
					var got []byte
					got, err = c.Decrypt(ctx, uid, &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID, Annotations: enc.Annotations})
					if err == nil && !bytes.Equal(got, seed) {
						err = fmt.Errorf("uid %s: decrypted other bytes", uid)
					}
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// cutLocalKEK returns enc's Decrypt request without kubekms's wrapped local
// KEK: the annotations dropped for format 2, the ciphertext cut after its
// header for format 3.
func cutLocalKEK(enc *kmsservice.EncryptResponse) *kmsservice.DecryptRequest {
	if len(enc.Annotations) > 0 || len(enc.Ciphertext) < 3 {
		return &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID}
	}
	return &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext[:3], KeyID: enc.KeyID}
}
