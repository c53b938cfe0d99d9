package envelope

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	kmsservice "k8s.io/kms/pkg/service"
)

func validObject() *kmstypes.EncryptedObject {
	return &kmstypes.EncryptedObject{
		EncryptedData:          bytes.Repeat([]byte{7}, 60),
		KeyID:                  "key-1",
		EncryptedDEKSource:     []byte("wrapped seed"),
		Annotations:            map[string][]byte{"b.example.com": []byte("x"), "a.example.com": nil},
		EncryptedDEKSourceType: kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED,
	}
}

func kmsValue(t testing.TB, provider string, o *kmstypes.EncryptedObject) []byte {
	b, err := proto.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(PrefixKMSv2+provider+":"), b...)
}

func TestParseHeader(t *testing.T) {
	mut := func(f func(o *kmstypes.EncryptedObject)) *kmstypes.EncryptedObject {
		o := validObject()
		f(o)
		return o
	}
	tests := []struct {
		name    string
		value   []byte
		want    Header
		wantErr error
	}{
		{"identity protobuf", []byte("k8s\x00\n\x0c\n\x02v1"), Header{Kind: KindIdentity}, nil},
		{"identity json", []byte(`{"kind":"Widget"}`), Header{Kind: KindIdentity}, nil},
		{"empty", nil, Header{Kind: KindIdentity}, nil},
		{"kms v2", kmsValue(t, "prov", validObject()), Header{Kind: KindKMSv2, Provider: "prov", KeyID: "key-1",
			DEKSourceType: kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED, AnnotationKeys: []string{"a.example.com", "b.example.com"}}, nil},
		{"kms v2 legacy dek", kmsValue(t, "p", mut(func(o *kmstypes.EncryptedObject) {
			o.EncryptedDEKSourceType = kmstypes.EncryptedDEKSourceType_AES_GCM_KEY
			o.Annotations = nil
		})), Header{Kind: KindKMSv2, Provider: "p", KeyID: "key-1", DEKSourceType: kmstypes.EncryptedDEKSourceType_AES_GCM_KEY}, nil},
		{"kms v1", []byte("k8s:enc:kms:v1:old:\x00\x05abcde..."), Header{Kind: KindKMSv1, Provider: "old"}, nil},
		{"aescbc", []byte("k8s:enc:aescbc:v1:key1:ciphertext"), Header{Kind: KindAESCBC, Provider: "key1"}, nil},
		{"aesgcm", []byte("k8s:enc:aesgcm:v1:key2:ciphertext"), Header{Kind: KindAESGCM, Provider: "key2"}, nil},
		{"secretbox", []byte("k8s:enc:secretbox:v1:key3:ciphertext"), Header{Kind: KindSecretbox, Provider: "key3"}, nil},
		{"unknown k8s:enc prefix", []byte("k8s:enc:rot13:v1:k:abc"), Header{}, ErrUnknownProvider},
		{"kms v2 without name end", []byte("k8s:enc:kms:v2:prov"), Header{Kind: KindKMSv2}, ErrMalformed},
		{"kms v2 empty name", []byte("k8s:enc:kms:v2::abc"), Header{Kind: KindKMSv2}, ErrMalformed},
		{"kms v2 empty body", []byte("k8s:enc:kms:v2:p:"), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"kms v2 truncated", kmsValue(t, "p", validObject())[:40], Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"kms v2 garbage", []byte("k8s:enc:kms:v2:p:\xff\xff\xff\xff"), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"no key id", kmsValue(t, "p", mut(func(o *kmstypes.EncryptedObject) { o.KeyID = "" })), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"key id too long", kmsValue(t, "p", mut(func(o *kmstypes.EncryptedObject) { o.KeyID = string(bytes.Repeat([]byte("k"), 1025)) })), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"no data", kmsValue(t, "p", mut(func(o *kmstypes.EncryptedObject) { o.EncryptedData = nil })), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"no dek source", kmsValue(t, "p", mut(func(o *kmstypes.EncryptedObject) { o.EncryptedDEKSource = nil })), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"dek source too long", kmsValue(t, "p", mut(func(o *kmstypes.EncryptedObject) { o.EncryptedDEKSource = make([]byte, 1025) })), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"unknown dek type", kmsValue(t, "p", mut(func(o *kmstypes.EncryptedObject) { o.EncryptedDEKSourceType = 7 })), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
		{"annotations too big", kmsValue(t, "p", mut(func(o *kmstypes.EncryptedObject) {
			o.Annotations = map[string][]byte{"a.example.com": make([]byte, 32*1024)}
		})), Header{Kind: KindKMSv2, Provider: "p"}, ErrMalformed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := ParseHeader(tc.value)
			if !errors.Is(err, tc.wantErr) || (tc.wantErr == nil) != (err == nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				return
			}
			if fmt.Sprint(h) != fmt.Sprint(tc.want) {
				t.Errorf("header = %+v, want %+v", h, tc.want)
			}
		})
	}
}

// Limits are inclusive: exactly at the limit is accepted, as upstream.
func TestParseHeaderLimitsInclusive(t *testing.T) {
	o := validObject()
	o.KeyID = string(bytes.Repeat([]byte("k"), 1024))
	o.EncryptedDEKSource = make([]byte, 1024)
	o.Annotations = map[string][]byte{"a.example.com": make([]byte, 32*1024-len("a.example.com"))}
	v := kmsValue(t, "p", o)
	if _, err := ParseHeader(v); err != nil {
		t.Fatalf("ParseHeader at the limits: %v", err)
	}
	if _, _, err := Decode(v); err != nil {
		t.Fatalf("Decode at the limits: %v", err)
	}
}

func TestDecodeRejectsNonDomainAnnotation(t *testing.T) {
	o := validObject()
	o.Annotations = map[string][]byte{"NotADomain": []byte("x")}
	if _, _, err := Decode(kmsValue(t, "p", o)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("Decode: %v, want ErrMalformed", err)
	}
}

// The protowire header scan and proto.Unmarshal agree on odd encodings:
// duplicate fields (last wins), unknown fields, a known field number with
// the wrong wire type (an unknown field to proto.Unmarshal).
func TestParseHeaderMatchesProtoUnmarshal(t *testing.T) {
	base := kmsValue(t, "p", validObject())
	var extra []byte
	extra = protowire.AppendTag(extra, fieldKeyID, protowire.BytesType)
	extra = protowire.AppendString(extra, "key-2") // duplicate keyID: last wins
	extra = protowire.AppendTag(extra, 99, protowire.Fixed64Type)
	extra = protowire.AppendFixed64(extra, 1) // unknown field
	extra = protowire.AppendTag(extra, fieldKeyID, protowire.VarintType)
	extra = protowire.AppendVarint(extra, 5) // wrong wire type: unknown
	v := append(bytes.Clone(base), extra...)
	h, err := ParseHeader(v)
	if err != nil {
		t.Fatal(err)
	}
	h2, _, err := Decode(v)
	if err != nil {
		t.Fatal(err)
	}
	if h.KeyID != "key-2" || fmt.Sprint(h) != fmt.Sprint(h2) {
		t.Fatalf("ParseHeader %+v, Decode %+v, want key-2 from both", h, h2)
	}
}

// FuzzParseHeader: no input panics, and whenever the full Decode (the
// generated type and all upstream checks) accepts a value the header scan
// accepts it too with the same fields.
func FuzzParseHeader(f *testing.F) {
	f.Add(kmsValue(f, "p", validObject()))
	f.Add([]byte("k8s:enc:kms:v2:p:"))
	f.Add([]byte("k8s:enc:aescbc:v1:k:abc"))
	f.Add([]byte("k8s\x00plain"))
	f.Fuzz(func(t *testing.T, v []byte) {
		h, herr := ParseHeader(v)
		d, _, derr := Decode(v)
		if derr == nil && d.Kind == KindKMSv2 {
			if herr != nil {
				t.Fatalf("Decode accepted, ParseHeader: %v", herr)
			}
			if h.KeyID != d.KeyID || h.DEKSourceType != d.DEKSourceType || !slices.Equal(h.AnnotationKeys, d.AnnotationKeys) || h.Provider != d.Provider {
				t.Fatalf("ParseHeader %+v != Decode %+v", h, d)
			}
		}
		if herr != nil && !errors.Is(herr, ErrMalformed) && !errors.Is(herr, ErrUnknownProvider) {
			t.Fatalf("unclassified error %v", herr)
		}
	})
}

// fixedSeed is a SeedDecrypter that returns the same bytes for every seed.
type fixedSeed []byte

func (s fixedSeed) Decrypt(context.Context, string, *kmsservice.DecryptRequest) ([]byte, error) {
	return s, nil
}

// FuzzParseOpen: Open never panics on any value and every failure is classified.
func FuzzParseOpen(f *testing.F) {
	f.Add(kmsValue(f, "p", validObject()), []byte("/registry/secrets/a/b"))
	legacy := validObject()
	legacy.EncryptedDEKSourceType = kmstypes.EncryptedDEKSourceType_AES_GCM_KEY
	f.Add(kmsValue(f, "p", legacy), []byte("/registry/secrets/a/b"))
	f.Add([]byte("k8s:enc:kms:v2:p:\n\x01x"), []byte(""))
	op := NewOpener(fixedSeed(bytes.Repeat([]byte{1}, 32)))
	f.Fuzz(func(t *testing.T, v, key []byte) {
		_, _, err := op.Open(context.Background(), v, key)
		if err != nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnknownProvider) &&
			!errors.Is(err, ErrTampered) && !errors.Is(err, ErrKeyUnavailable) {
			t.Fatalf("unclassified error %v", err)
		}
	})
}
