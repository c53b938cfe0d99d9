package envelope

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"errors"
	"fmt"
	"slices"

	"google.golang.org/protobuf/proto"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// Decode parses a stored KMS v2 value into its EncryptedObject (the upstream
// generated type) and validates it with all of the apiserver's rules.
// Values of other kinds return their header and ErrUnknownProvider (or a nil
// object for identity).
func Decode(value []byte) (Header, *kmstypes.EncryptedObject, error) {
	kind, provider, payload, err := splitPrefix(value)
	if err != nil {
		return Header{Kind: kind}, nil, err
	}
	h := Header{Kind: kind, Provider: string(provider)}
	switch kind {
	case KindIdentity:
		return h, nil, nil
	case KindKMSv2:
	default:
		return h, nil, fmt.Errorf("%w: %s (provider %q) values are not decrypted by kubekms", ErrUnknownProvider, kind, h.Provider)
	}
	o := &kmstypes.EncryptedObject{}
	if err := proto.Unmarshal(payload, o); err != nil {
		return h, nil, fmt.Errorf("%w: EncryptedObject: %v", ErrMalformed, err)
	}
	if err := Validate(o); err != nil {
		return h, nil, err
	}
	h.KeyID = o.KeyID
	h.DEKSourceType = o.EncryptedDEKSourceType
	for k := range o.Annotations {
		h.AnnotationKeys = append(h.AnnotationKeys, k)
	}
	slices.Sort(h.AnnotationKeys)
	return h, o, nil
}

// Validate applies the checks of the apiserver's ValidateEncryptedObject.
func Validate(o *kmstypes.EncryptedObject) error {
	if o == nil {
		return fmt.Errorf("%w: EncryptedObject is nil", ErrMalformed)
	}
	s := scanned{
		keyID:        []byte(o.KeyID),
		typ:          o.EncryptedDEKSourceType,
		dataLen:      len(o.EncryptedData),
		dekSourceLen: len(o.EncryptedDEKSource),
	}
	if len(o.KeyID) > maxKeyIDSize {
		return fmt.Errorf("%w: keyID is %d bytes, over the limit of %d", ErrMalformed, len(o.KeyID), maxKeyIDSize)
	}
	if err := validateAnnotationKeys(o.Annotations); err != nil {
		return err
	}
	for k, v := range o.Annotations {
		s.annotationsSize += len(k) + len(v)
	}
	return s.check()
}

func validateAnnotationKeys(annotations map[string][]byte) error {
	var errs []error
	for k := range annotations {
		if fe := validation.IsFullyQualifiedDomainName(field.NewPath("annotations"), k); len(fe) > 0 {
			errs = append(errs, fe.ToAggregate())
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %w", ErrMalformed, errors.Join(errs...))
	}
	return nil
}

// Encode returns the stored form of o: the KMS v2 prefix with providerName,
// then proto.Marshal(o). It validates o first, as the apiserver does.
func Encode(providerName string, o *kmstypes.EncryptedObject) ([]byte, error) {
	if err := ValidateProviderName(providerName); err != nil {
		return nil, err
	}
	if err := Validate(o); err != nil {
		return nil, err
	}
	body, err := proto.Marshal(o)
	if err != nil {
		return nil, fmt.Errorf("marshal EncryptedObject: %w", err)
	}
	out := make([]byte, 0, len(PrefixKMSv2)+len(providerName)+1+len(body))
	out = append(out, PrefixKMSv2...)
	out = append(out, providerName...)
	out = append(out, ':')
	return append(out, body...), nil
}

// ValidateProviderName checks a KMS v2 provider name: non-empty, no ':'.
func ValidateProviderName(name string) error {
	if name == "" {
		return errors.New("KMS provider name is empty")
	}
	for i := 0; i < len(name); i++ {
		if name[i] == ':' {
			return fmt.Errorf("KMS provider name %q must not contain ':'", name)
		}
	}
	return nil
}

// seedKey derives the per-write AES-256 key: HKDF-Expand only (no Extract,
// no salt) with SHA-256, the seed used directly as the PRK, info = 32 random
// bytes stored in front of the ciphertext.
func seedKey(seed, info []byte) ([]byte, error) {
	key, err := hkdf.Expand(sha256.New, seed, string(info), 32)
	if err != nil {
		return nil, fmt.Errorf("HKDF-Expand: %w", err)
	}
	return key, nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("AES key: %w", err)
	}
	return cipher.NewGCM(block) // 12-byte nonce, 16-byte tag
}

// openData decrypts EncryptedObject.encryptedData with the decrypted DEK
// source (seed or legacy DEK). etcdKey is the additional authenticated data.
func openData(typ kmstypes.EncryptedDEKSourceType, aead cipher.AEAD, seed, data, etcdKey []byte) ([]byte, error) {
	if typ == kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED {
		if len(data) < infoSize {
			return nil, fmt.Errorf("%w: seed-mode ciphertext is %d bytes, shorter than its %d-byte info", ErrMalformed, len(data), infoSize)
		}
		key, err := seedKey(seed, data[:infoSize])
		if err != nil {
			return nil, err
		}
		if aead, err = newGCM(key); err != nil {
			return nil, err
		}
		data = data[infoSize:]
	}
	ns := aead.NonceSize()
	if len(data) < ns+aead.Overhead() {
		return nil, fmt.Errorf("%w: ciphertext is %d bytes, shorter than nonce and tag", ErrMalformed, len(data))
	}
	out, err := aead.Open(nil, data[:ns], data[ns:], etcdKey)
	if err != nil {
		return nil, ErrTampered
	}
	return out, nil
}
