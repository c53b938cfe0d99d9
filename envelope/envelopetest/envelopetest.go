// Package envelopetest holds test helpers for the operator tools: a small
// KMS v2 plugin served with the upstream k8s.io/kms gRPC server, and the
// real k8s.io/apiserver envelope transformer loaded from an
// EncryptionConfiguration that points at it.
//
// The plugin is a stand-in for kubekms's own plugin (it wraps seeds with
// in-memory AES-GCM keys) so the envelope tests do not depend on the
// plugin packages; what is under test is the storage format, which the
// real apiserver code produces and consumes here.
package envelopetest

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope/kmsclient"
)

// AnnotationKey is the annotation the test plugin adds to every Encrypt answer.
const AnnotationKey = "kubekms.test.example.com"

// Plugin is an in-memory KMS v2 service with rotatable keys.
type Plugin struct {
	mu       sync.Mutex
	keys     map[string]cipher.AEAD
	current  string
	next     int
	decrypts atomic.Int64
}

var _ kmsservice.Service = (*Plugin)(nil)

// NewPlugin returns a plugin with one key, "key-1".
func NewPlugin() *Plugin {
	p := &Plugin{keys: map[string]cipher.AEAD{}}
	p.Rotate()
	return p
}

// Rotate makes a new current key and returns its key_id; old keys still decrypt.
func (p *Plugin) Rotate() string {
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	block, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(block)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.next++
	p.current = fmt.Sprintf("key-%d", p.next)
	p.keys[p.current] = aead
	return p.current
}

// Forget drops a key, as if that key version were destroyed.
func (p *Plugin) Forget(keyID string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.keys, keyID)
}

// CurrentKeyID is the key_id Status reports.
func (p *Plugin) CurrentKeyID() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.current
}

// DecryptCalls counts Decrypt calls so far.
func (p *Plugin) DecryptCalls() int64 { return p.decrypts.Load() }

// Status reports the current key.
func (p *Plugin) Status(context.Context) (*kmsservice.StatusResponse, error) {
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: p.CurrentKeyID()}, nil
}

// Encrypt wraps plaintext under the current key.
func (p *Plugin) Encrypt(_ context.Context, uid string, plaintext []byte) (*kmsservice.EncryptResponse, error) {
	if uid == "" {
		return nil, errors.New("empty uid")
	}
	p.mu.Lock()
	id, aead := p.current, p.keys[p.current]
	p.mu.Unlock()
	nonce := make([]byte, aead.NonceSize())
	_, _ = rand.Read(nonce)
	ct := aead.Seal(nonce, nonce, plaintext, []byte(id))
	return &kmsservice.EncryptResponse{Ciphertext: ct, KeyID: id, Annotations: map[string][]byte{AnnotationKey: []byte("v1")}}, nil
}

// Decrypt unwraps a ciphertext made by Encrypt under req.KeyID.
func (p *Plugin) Decrypt(_ context.Context, uid string, req *kmsservice.DecryptRequest) ([]byte, error) {
	p.decrypts.Add(1)
	if uid == "" {
		return nil, errors.New("empty uid")
	}
	p.mu.Lock()
	aead := p.keys[req.KeyID]
	p.mu.Unlock()
	if aead == nil {
		return nil, fmt.Errorf("unknown key_id %q", req.KeyID)
	}
	if string(req.Annotations[AnnotationKey]) != "v1" {
		return nil, errors.New("annotation missing")
	}
	ns := aead.NonceSize()
	if len(req.Ciphertext) < ns {
		return nil, errors.New("ciphertext too short")
	}
	return aead.Open(nil, req.Ciphertext[:ns], req.Ciphertext[ns:], []byte(req.KeyID))
}

// Serve serves p on a fresh unix socket until the test ends and returns
// its endpoint ("unix:///...").
func Serve(t testing.TB, p kmsservice.Service) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kms") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "kms.sock")
	srv := kmsservice.NewGRPCService(sock, 10*time.Second, p)
	done := make(chan error, 1)
	go func() { done <- srv.ListenAndServe() }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("KMS test plugin: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("KMS test plugin socket did not appear")
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return "unix://" + sock
}

// Apiserver loads a real EncryptionConfiguration for secrets and configmaps
// with a KMS v2 provider (providerName, at endpoint) followed by identity,
// and returns the apiserver's transformer for resource. Its pollers stop when
// the test ends.
func Apiserver(t testing.TB, endpoint, providerName string, resource schema.GroupResource) value.Transformer {
	t.Helper()
	cfg := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets, configmaps]
    providers:
      - kms:
          apiVersion: v2
          name: %s
          endpoint: %s
          timeout: 5s
      - identity: {}
`, providerName, endpoint)
	path := filepath.Join(t.TempDir(), "encryption-config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ec, err := encryptionconfig.LoadEncryptionConfig(ctx, path, false, "kubekms-test")
	if err != nil {
		t.Fatalf("LoadEncryptionConfig: %v", err)
	}
	return encryptionconfig.StaticTransformers(ec.Transformers).TransformerForResource(resource)
}

// Secrets is the GroupResource of core secrets.
var Secrets = schema.GroupResource{Resource: "secrets"}

// Dial returns a KMS v2 client for endpoint, closed when the test ends.
func Dial(t testing.TB, endpoint string) *kmsclient.Client {
	t.Helper()
	c, err := kmsclient.Dial(endpoint, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
