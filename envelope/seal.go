package envelope

import (
	"context"
	"crypto/cipher"
	"crypto/rand"
	"fmt"

	"github.com/google/uuid"

	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	kmsservice "k8s.io/kms/pkg/service"
)

// SeedEncrypter is the Encrypt half of a KMS v2 plugin (k8s.io/kms/pkg/service.Service
// and kmsclient.Client both satisfy it).
type SeedEncrypter interface {
	Encrypt(ctx context.Context, uid string, plaintext []byte) (*kmsservice.EncryptResponse, error)
}

// Sealer writes values as kube-apiserver does in seed mode
// (HKDF_SHA256_XNONCE_AES_GCM_SEED): one 32-byte seed per Sealer, encrypted
// once by the plugin, and a fresh 32-byte HKDF info and 12-byte nonce per value.
type Sealer struct {
	provider string
	seed     []byte
	keyID    string
	dekSrc   []byte
	ann      map[string][]byte
}

// NewSealer makes a seed and has the plugin encrypt it (one Encrypt call
// with a fresh UUIDv4 uid). The plugin's answer is checked against the
// apiserver's limits.
func NewSealer(ctx context.Context, enc SeedEncrypter, providerName string) (*Sealer, error) {
	if err := ValidateProviderName(providerName); err != nil {
		return nil, err
	}
	seed := make([]byte, SeedSize)
	_, _ = rand.Read(seed) // never fails since Go 1.24
	resp, err := enc.Encrypt(ctx, uuid.NewString(), seed)
	if err != nil {
		return nil, fmt.Errorf("encrypt DEK seed with the KMS plugin: %w", err)
	}
	if resp == nil {
		return nil, fmt.Errorf("encrypt DEK seed with the KMS plugin: empty answer")
	}
	probe := &kmstypes.EncryptedObject{
		KeyID:                  resp.KeyID,
		EncryptedDEKSource:     resp.Ciphertext,
		Annotations:            resp.Annotations,
		EncryptedDEKSourceType: kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED,
		EncryptedData:          []byte{0}, // any non-empty value, as the apiserver does
	}
	if err := Validate(probe); err != nil {
		return nil, fmt.Errorf("KMS plugin's Encrypt answer: %w", err)
	}
	return &Sealer{provider: providerName, seed: seed, keyID: resp.KeyID, dekSrc: resp.Ciphertext, ann: resp.Annotations}, nil
}

// KeyID is the key_id the plugin returned for this Sealer's seed.
func (s *Sealer) KeyID() string { return s.keyID }

// Seal encrypts plaintext for storage under etcdKey (the additional
// authenticated data, e.g. "/registry/secrets/ns/name").
func (s *Sealer) Seal(plaintext, etcdKey []byte) ([]byte, error) {
	info := make([]byte, infoSize)
	_, _ = rand.Read(info)
	key, err := seedKey(s.seed, info)
	if err != nil {
		return nil, err
	}
	aead, err := newGCM(key)
	if err != nil {
		return nil, err
	}
	data := sealGCM(aead, info, plaintext, etcdKey)
	return Encode(s.provider, &kmstypes.EncryptedObject{
		EncryptedData:          data,
		KeyID:                  s.keyID,
		EncryptedDEKSource:     s.dekSrc,
		Annotations:            s.ann,
		EncryptedDEKSourceType: kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED,
	})
}

// sealGCM returns prefix || nonce || ciphertext || tag with a random nonce
// (crypto/rand.Read does not fail since Go 1.24).
func sealGCM(aead cipher.AEAD, prefix, plaintext, aad []byte) []byte {
	ns := aead.NonceSize()
	out := make([]byte, len(prefix)+ns, len(prefix)+ns+len(plaintext)+aead.Overhead())
	copy(out, prefix)
	nonce := out[len(prefix):]
	_, _ = rand.Read(nonce)
	return aead.Seal(out, nonce, plaintext, aad)
}
