package envelope

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/google/uuid"

	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	kmsservice "k8s.io/kms/pkg/service"
)

// SeedDecrypter is the Decrypt half of a KMS v2 plugin (k8s.io/kms/pkg/service.Service
// and kmsclient.Client both satisfy it).
type SeedDecrypter interface {
	Decrypt(ctx context.Context, uid string, req *kmsservice.DecryptRequest) ([]byte, error)
}

// Opener decrypts stored values. Decrypted seeds are cached for the
// Opener's lifetime, keyed like the apiserver's cache (SHA-256 over type,
// encryptedDEKSource, keyID and sorted annotations), so reading many values
// costs one plugin call per distinct seed. A failed seed is cached too: an
// offline run does not ask the plugin again for every value of that seed.
type Opener struct {
	dec   SeedDecrypter
	mu    sync.Mutex
	seeds map[[sha256.Size]byte]*seedEntry
	calls atomic.Int64
}

type seedEntry struct {
	once sync.Once
	seed []byte      // seed mode
	aead cipher.AEAD // legacy AES_GCM_KEY mode
	err  error
}

// NewOpener returns an Opener that asks dec for seeds. dec may be nil to
// read only unencrypted values.
func NewOpener(dec SeedDecrypter) *Opener {
	return &Opener{dec: dec, seeds: make(map[[sha256.Size]byte]*seedEntry)}
}

// PluginCalls is the number of Decrypt calls made to the plugin so far.
func (o *Opener) PluginCalls() int64 { return o.calls.Load() }

// Open returns the plaintext of a stored value. etcdKey is the full etcd key
// the value was read from (the additional authenticated data). Identity
// values are returned as they are. Errors wrap ErrMalformed,
// ErrUnknownProvider, ErrKeyUnavailable or ErrTampered.
func (o *Opener) Open(ctx context.Context, value, etcdKey []byte) ([]byte, Header, error) {
	h, obj, err := Decode(value)
	if err != nil {
		return nil, h, err
	}
	if h.Kind == KindIdentity {
		return value, h, nil
	}
	e, err := o.entry(ctx, obj)
	if err != nil {
		return nil, h, err
	}
	out, err := openData(obj.EncryptedDEKSourceType, e.aead, e.seed, obj.EncryptedData, etcdKey)
	if err != nil {
		return nil, h, err
	}
	return out, h, nil
}

func (o *Opener) entry(ctx context.Context, obj *kmstypes.EncryptedObject) (*seedEntry, error) {
	k := cacheKey(obj)
	o.mu.Lock()
	e := o.seeds[k]
	if e == nil {
		e = &seedEntry{}
		o.seeds[k] = e
	}
	o.mu.Unlock()
	e.once.Do(func() { e.load(ctx, o, obj) })
	return e, e.err
}

func (e *seedEntry) load(ctx context.Context, o *Opener, obj *kmstypes.EncryptedObject) {
	if o.dec == nil {
		e.err = fmt.Errorf("%w: no KMS plugin given", ErrKeyUnavailable)
		return
	}
	o.calls.Add(1)
	src, err := o.dec.Decrypt(ctx, uuid.NewString(), &kmsservice.DecryptRequest{
		Ciphertext:  obj.EncryptedDEKSource,
		KeyID:       obj.KeyID,
		Annotations: obj.Annotations,
	})
	if err != nil {
		e.err = fmt.Errorf("%w (key_id %q): %w", ErrKeyUnavailable, obj.KeyID, err)
		return
	}
	if obj.EncryptedDEKSourceType == kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED {
		if len(src) < SeedSize {
			e.err = fmt.Errorf("%w (key_id %q): plugin returned a %d-byte seed, want at least %d", ErrKeyUnavailable, obj.KeyID, len(src), SeedSize)
			return
		}
		e.seed = src
		return
	}
	block, err := aes.NewCipher(src)
	if err != nil {
		e.err = fmt.Errorf("%w (key_id %q): plugin returned an unusable DEK: %w", ErrKeyUnavailable, obj.KeyID, err)
		return
	}
	if e.aead, err = cipher.NewGCM(block); err != nil {
		e.err = fmt.Errorf("%w (key_id %q): AES-GCM: %w", ErrKeyUnavailable, obj.KeyID, err)
	}
}

// cacheKey hashes the same fields, in the same length-prefixed layout, as
// the apiserver's generateCacheKey.
func cacheKey(obj *kmstypes.EncryptedObject) [sha256.Size]byte {
	h := sha256.New()
	var b [4]byte
	u32 := func(v uint32) { binary.BigEndian.PutUint32(b[:], v); h.Write(b[:4]) }
	u16p := func(p []byte) { binary.BigEndian.PutUint16(b[:], uint16(len(p))); h.Write(b[:2]); h.Write(p) }
	u32(uint32(obj.EncryptedDEKSourceType))
	u16p(obj.EncryptedDEKSource)
	u16p([]byte(obj.KeyID))
	if len(obj.Annotations) > 0 {
		u32(uint32(len(obj.Annotations)))
		keys := make([]string, 0, len(obj.Annotations))
		for k := range obj.Annotations {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			u16p([]byte(k))
			u16p(obj.Annotations[k])
		}
	}
	var out [sha256.Size]byte
	h.Sum(out[:0])
	return out
}
