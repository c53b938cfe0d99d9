package bench

// The apiserver's own cost per stored object read, by provider: what its
// watch cache pays for every Secret when it starts (the cold start of
// docs/performance.md), with the upstream transformers of k8s.io/apiserver
// in this process:
//
//	go test -run '^$' -bench ApiserverRead -benchtime 200000x -count 5 ./bench/
//	bench/callgrind_read.sh     # instructions per object, whatever the load
//
// kms-v2 is the apiserver's KMS v2 envelope (KDF on, its default) over an
// in-process echo plugin: one plugin call per transformer and seed, as in
// the apiserver, so what remains is the per-object work of the KMS v2 format
// whatever the plugin: decoding the EncryptedObject, the seed cache lookup,
// the key_id metric, an HKDF-SHA256 key derivation and AES-GCM. Every
// objectsPerStart reads the transformer is made anew (a new apiserver
// process: every object a KDF cache miss, as at start-up).
//
// kms-v2-kubekms and kms-v2-kubekms-format2 are the same with answers of the
// shape kubekms's real hierarchy (softkey) gives in seal format 3 and 2: what
// they add to kms-v2 is what kubekms's answers (their sizes, format 2's
// annotation) cost the apiserver on every object.

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/storage/value"
	aestransformer "k8s.io/apiserver/pkg/storage/value/encrypt/aes"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	"k8s.io/apiserver/pkg/storage/value/encrypt/identity"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/hierarchy"
)

// objectsPerStart is how many distinct stored objects one transformer reads.
const objectsPerStart = 4096

// echoService is a KMS v2 plugin in process: the seed is the start of its
// own ciphertext. The zero value answers with a 4-byte key_id and the bare
// seed; kubekmsShape gives it the shape of kubekms's real answers.
type echoService struct {
	keyID       string
	size        int // ciphertext size: the seed, padded
	annotations map[string][]byte
}

func (echoService) Decrypt(_ context.Context, _ string, r *kmsservice.DecryptRequest) ([]byte, error) {
	return r.Ciphertext[:32], nil
}

func (e echoService) Encrypt(_ context.Context, _ string, p []byte) (*kmsservice.EncryptResponse, error) {
	if e.keyID == "" {
		return &kmsservice.EncryptResponse{Ciphertext: p, KeyID: "echo"}, nil
	}
	ct := append(bytes.Clone(p), make([]byte, max(0, e.size-len(p)))...)
	return &kmsservice.EncryptResponse{Ciphertext: ct, KeyID: e.keyID, Annotations: e.annotations}, nil
}

func (echoService) Status(context.Context) (*kmsservice.StatusResponse, error) {
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: "echo"}, nil
}

// kubekmsShape seals one seed with kubekms's real hierarchy (softkey) in the
// given seal format and returns an echo service whose answers have that
// answer's key_id, ciphertext size and annotations: what the apiserver's read
// path costs depends on those, not on the plugin. The hierarchy is closed
// before the benchmark runs, so no background work of it is measured.
func kubekmsShape(b *testing.B, format int) echoService {
	svc := openSoftkey(b)
	defer svc.Close() // also stops its keyring watch
	h, err := hierarchy.New(context.Background(), svc, hierarchy.Config{SealFormat: format})
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	sealed, err := h.Encrypt(context.Background(), make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	return echoService{keyID: sealed.KeyID, size: len(sealed.Ciphertext), annotations: sealed.Annotations}
}

func BenchmarkApiserverRead(b *testing.B) {
	ctx := context.Background()
	// A Secret with a 256-byte value as the apiserver stores it (protobuf
	// with its metadata): ~420 bytes. The transformers do not parse it.
	plain := make([]byte, 420)
	if _, err := rand.Read(plain); err != nil {
		b.Fatal(err)
	}
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		b.Fatal(err)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		b.Fatal(err)
	}
	prefixed := func(prefix string, t value.Transformer) value.Transformer {
		return value.NewPrefixTransformers(nil, value.PrefixTransformer{Prefix: []byte(prefix), Transformer: t})
	}
	kmsState := func(b *testing.B, svc echoService) kmsv2.StateFunc {
		t, o, cacheKey, err := kmsv2.GenerateTransformer(ctx, "bench", svc, true)
		if err != nil {
			b.Fatal(err)
		}
		st := kmsv2.State{Transformer: t, EncryptedObjectKeyID: o.KeyID, EncryptedObjectEncryptedDEKSource: o.EncryptedDEKSource,
			EncryptedObjectAnnotations: o.Annotations, EncryptedObjectEncryptedDEKSourceType: o.EncryptedDEKSourceType,
			UID: "bench", ExpirationTimestamp: time.Now().Add(time.Hour), CacheKey: cacheKey}
		return func() (kmsv2.State, error) { return st, nil }
	}
	gcm, err := aestransformer.NewGCMTransformer(block)
	if err != nil {
		b.Fatal(err)
	}
	// kms is a KMS v2 provider over the echo plugin that shape makes.
	kms := func(shape func(*testing.B) echoService) func(*testing.B) func() value.Transformer {
		return func(b *testing.B) func() value.Transformer {
			svc := shape(b)
			st := kmsState(b, svc)
			return func() value.Transformer {
				return prefixed("k8s:enc:kms:v2:kubekms:", kmsv2.NewEnvelopeTransformer(svc, "kubekms", st, "bench"))
			}
		}
	}
	// start returns a "new apiserver process": a transformer with empty caches.
	providers := []struct {
		name  string
		start func(b *testing.B) func() value.Transformer
	}{
		{"identity", func(*testing.B) func() value.Transformer {
			return func() value.Transformer { return prefixed("", identity.NewEncryptCheckTransformer()) }
		}},
		{"aescbc", func(*testing.B) func() value.Transformer {
			return func() value.Transformer {
				return prefixed("k8s:enc:aescbc:v1:k1:", aestransformer.NewCBCTransformer(block))
			}
		}},
		{"aesgcm", func(*testing.B) func() value.Transformer {
			return func() value.Transformer { return prefixed("k8s:enc:aesgcm:v1:k1:", gcm) }
		}},
		{"kms-v2", kms(func(*testing.B) echoService { return echoService{} })},
		{"kms-v2-kubekms", kms(func(b *testing.B) echoService { return kubekmsShape(b, hierarchy.SealFormatInline) })},
		{"kms-v2-kubekms-format2", kms(func(b *testing.B) echoService { return kubekmsShape(b, hierarchy.SealFormatAnnotation) })},
	}
	for _, p := range providers {
		b.Run(p.name, func(b *testing.B) {
			start := p.start(b)
			w := start()
			stored, keys := make([][]byte, objectsPerStart), make([]value.Context, objectsPerStart)
			for i := range stored {
				keys[i] = value.DefaultContext(fmt.Sprintf("/registry/secrets/default/s-%d", i))
				if stored[i], err = w.TransformToStorage(ctx, plain, keys[i]); err != nil {
					b.Fatal(err)
				}
			}
			var r value.Transformer
			for i := 0; b.Loop(); i++ {
				j := i % objectsPerStart
				if j == 0 {
					r = start()
				}
				out, _, err := r.TransformFromStorage(ctx, stored[j], keys[j])
				if err != nil || len(out) != len(plain) {
					b.Fatalf("read %d: %d bytes, %v", j, len(out), err)
				}
			}
		})
	}
}
