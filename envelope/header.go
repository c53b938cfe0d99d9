package envelope

import (
	"fmt"
	"slices"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/reflect/protoreflect"

	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// Limits the apiserver enforces on a stored EncryptedObject (kmsv2/envelope.go).
const (
	maxKeyIDSize              = 1024
	maxEncryptedDEKSourceSize = 1024
	maxAnnotationsSize        = 32 * 1024
	// SeedSize is the size of the DEK seed the apiserver sends to the plugin.
	SeedSize = 32
	infoSize = 32 // random HKDF info stored in front of every seed-mode ciphertext
)

// Header is what a stored value says about itself without decrypting it.
type Header struct {
	Kind Kind
	// Provider is the KMS provider name (kms v1/v2) or the key name (aescbc,
	// aesgcm, secretbox) from the prefix; empty for identity.
	Provider string
	// KeyID, DEKSourceType and AnnotationKeys (sorted) are set for KindKMSv2.
	KeyID          string
	DEKSourceType  kmstypes.EncryptedDEKSourceType
	AnnotationKeys []string
}

// Field numbers of EncryptedObject, taken from the generated descriptor so
// the header parser cannot drift from the upstream proto.
var (
	fieldEncryptedData, fieldKeyID, fieldDEKSource, fieldAnnotations, fieldDEKSourceType protowire.Number
	fieldMapKey, fieldMapValue                                                           protowire.Number
)

func init() {
	fields := (&kmstypes.EncryptedObject{}).ProtoReflect().Descriptor().Fields()
	num := func(fs protoreflect.FieldDescriptors, name protoreflect.Name) protowire.Number {
		f := fs.ByName(name)
		if f == nil {
			panic(fmt.Sprintf("EncryptedObject has no field %q", name)) // upstream proto changed: fail at start-up
		}
		return f.Number()
	}
	fieldEncryptedData = num(fields, "encryptedData")
	fieldKeyID = num(fields, "keyID")
	fieldDEKSource = num(fields, "encryptedDEKSource")
	fieldAnnotations = num(fields, "annotations")
	fieldDEKSourceType = num(fields, "encryptedDEKSourceType")
	entry := fields.ByName("annotations").MapKey().ContainingMessage().Fields()
	fieldMapKey = num(entry, "key")
	fieldMapValue = num(entry, "value")
}

// ParseHeader reads the prefix of a stored value and, for KMS v2, the
// EncryptedObject's key ID, DEK source type and annotation keys. It never
// calls a plugin and does not copy the ciphertext. It checks the limits the
// apiserver checks, except that annotation keys are not checked to be
// domain names (Decode does that).
func ParseHeader(value []byte) (Header, error) {
	var buf [4]annotation
	r, ann, err := parseRawHeader(value, buf[:0])
	h := Header{Kind: r.Kind, Provider: string(r.Provider), KeyID: string(r.KeyID), DEKSourceType: r.DEKSourceType}
	if err != nil {
		return Header{Kind: r.Kind, Provider: h.Provider}, err
	}
	for i := range ann {
		h.AnnotationKeys = append(h.AnnotationKeys, string(ann[i].key))
	}
	slices.Sort(h.AnnotationKeys)
	return h, nil
}

// RawHeader is a Header whose byte slices alias the parsed value: for
// scanning many values without allocating (inventory). Valid only as long
// as the value is.
type RawHeader struct {
	Kind          Kind
	Provider      []byte
	KeyID         []byte
	DEKSourceType kmstypes.EncryptedDEKSourceType
	// Annotations is the number of distinct annotation keys.
	Annotations int
}

type annotation struct {
	key  []byte
	vlen int
}

// ParseRawHeader is ParseHeader without allocations for values with up to
// four annotations.
func ParseRawHeader(value []byte) (RawHeader, error) {
	var buf [4]annotation
	h, _, err := parseRawHeader(value, buf[:0])
	return h, err
}

func parseRawHeader(value []byte, ann []annotation) (RawHeader, []annotation, error) {
	kind, provider, payload, err := splitPrefix(value)
	h := RawHeader{Kind: kind, Provider: provider}
	if err != nil || kind != KindKMSv2 {
		return h, nil, err
	}
	o, err := scanEncryptedObject(payload, ann)
	if err != nil {
		return h, nil, err
	}
	h.KeyID, h.DEKSourceType, h.Annotations = o.keyID, o.typ, len(o.annotations)
	return h, o.annotations, nil
}

// scanned is the result of a protowire scan of an EncryptedObject.
type scanned struct {
	keyID           []byte
	typ             kmstypes.EncryptedDEKSourceType
	dataLen         int
	dekSourceLen    int
	annotations     []annotation // distinct keys; a repeated key's last value wins
	annotationsSize int
}

// scanEncryptedObject walks the protobuf wire format the way proto.Unmarshal
// does (last value of a scalar wins, a field with an unexpected wire type is
// an unknown field and skipped, strings must be UTF-8) and applies the
// apiserver's size limits. Annotations are appended to ann.
func scanEncryptedObject(b []byte, ann []annotation) (scanned, error) {
	var o scanned
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return o, fmt.Errorf("%w: EncryptedObject: %v", ErrMalformed, protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == fieldEncryptedData && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return o, fmt.Errorf("%w: encryptedData: %v", ErrMalformed, protowire.ParseError(m))
			}
			o.dataLen, b = len(v), b[m:]
		case num == fieldKeyID && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return o, fmt.Errorf("%w: keyID: %v", ErrMalformed, protowire.ParseError(m))
			}
			if !utf8.Valid(v) {
				return o, fmt.Errorf("%w: keyID is not valid UTF-8", ErrMalformed)
			}
			if len(v) > maxKeyIDSize {
				return o, fmt.Errorf("%w: keyID is %d bytes, over the limit of %d", ErrMalformed, len(v), maxKeyIDSize)
			}
			o.keyID, b = v, b[m:]
		case num == fieldDEKSource && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return o, fmt.Errorf("%w: encryptedDEKSource: %v", ErrMalformed, protowire.ParseError(m))
			}
			o.dekSourceLen, b = len(v), b[m:]
		case num == fieldAnnotations && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return o, fmt.Errorf("%w: annotations: %v", ErrMalformed, protowire.ParseError(m))
			}
			k, vlen, err := scanMapEntry(v)
			if err != nil {
				return o, err
			}
			found := false
			for i := range ann {
				if string(ann[i].key) == string(k) {
					ann[i].vlen, found = vlen, true
					break
				}
			}
			if !found {
				ann = append(ann, annotation{key: k, vlen: vlen})
			}
			b = b[m:]
		case num == fieldDEKSourceType && typ == protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return o, fmt.Errorf("%w: encryptedDEKSourceType: %v", ErrMalformed, protowire.ParseError(m))
			}
			o.typ, b = kmstypes.EncryptedDEKSourceType(int32(v)), b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return o, fmt.Errorf("%w: EncryptedObject field %d: %v", ErrMalformed, num, protowire.ParseError(m))
			}
			b = b[m:]
		}
	}
	o.annotations = ann
	for _, a := range ann {
		o.annotationsSize += len(a.key) + a.vlen
	}
	return o, o.check()
}

func scanMapEntry(b []byte) ([]byte, int, error) {
	var key []byte
	var vlen int
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, 0, fmt.Errorf("%w: annotation entry: %v", ErrMalformed, protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == fieldMapKey && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil, 0, fmt.Errorf("%w: annotation key: %v", ErrMalformed, protowire.ParseError(m))
			}
			if !utf8.Valid(v) {
				return nil, 0, fmt.Errorf("%w: annotation key is not valid UTF-8", ErrMalformed)
			}
			key, b = v, b[m:]
		case num == fieldMapValue && typ == protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return nil, 0, fmt.Errorf("%w: annotation value: %v", ErrMalformed, protowire.ParseError(m))
			}
			vlen, b = len(v), b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return nil, 0, fmt.Errorf("%w: annotation entry field %d: %v", ErrMalformed, num, protowire.ParseError(m))
			}
			b = b[m:]
		}
	}
	return key, vlen, nil
}

// check applies ValidateEncryptedObject's rules except the domain-name check.
func (o *scanned) check() error {
	switch o.typ {
	case kmstypes.EncryptedDEKSourceType_AES_GCM_KEY, kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED:
	default:
		return fmt.Errorf("%w: unknown encryptedDEKSourceType %d", ErrMalformed, int32(o.typ))
	}
	if o.dataLen == 0 {
		return fmt.Errorf("%w: encryptedData is empty", ErrMalformed)
	}
	if o.dekSourceLen == 0 {
		return fmt.Errorf("%w: encryptedDEKSource is empty", ErrMalformed)
	}
	if o.dekSourceLen > maxEncryptedDEKSourceSize {
		return fmt.Errorf("%w: encryptedDEKSource is %d bytes, over the limit of %d", ErrMalformed, o.dekSourceLen, maxEncryptedDEKSourceSize)
	}
	if len(o.keyID) == 0 {
		return fmt.Errorf("%w: keyID is empty", ErrMalformed)
	}
	if o.annotationsSize > maxAnnotationsSize {
		return fmt.Errorf("%w: annotations are %d bytes, over the limit of %d", ErrMalformed, o.annotationsSize, maxAnnotationsSize)
	}
	return nil
}

// IsCurrent reports whether an encrypted value is stored the way the
// apiserver writes it today under currentKeyID: KMS v2, that key_id, seed
// mode. Anything else encrypted is stale and needs a rewrite (a storage
// migration); inventory counts and migrate rewrites by this one rule.
// keyID is a string or the []byte of a RawHeader (compared without a copy).
func IsCurrent[K ~string | ~[]byte](kind Kind, keyID K, typ kmstypes.EncryptedDEKSourceType, currentKeyID string) bool {
	return kind == KindKMSv2 && string(keyID) == currentKeyID &&
		typ == kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED
}
