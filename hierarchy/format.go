package hierarchy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"
)

// AnnotationKey carries the wrapped local KEK next to a format-1 or format-2
// ciphertext. It is a DNS name under a domain of ours, as the apiserver
// requires. Format 3 carries the same value inside the ciphertext.
const AnnotationKey = "local-kek.kubekms.io"

// Format versions. The first byte of every ciphertext and annotation value
// names its layout, so the layout can evolve (docs/design.md).
const (
	// sealV1: 0x01 || nonce(12) || AES-256-GCM(seed) || tag(16),
	// AAD = "kubekms.io/seal/v1\x00" || key_id || 0x00 || annotation value.
	// Read only: a key_id holding a NUL byte would make its AAD ambiguous, so
	// such key_ids are refused for v1 seals.
	sealV1 byte = 0x01
	// sealV2: the same layout as v1 with format byte 0x02 and an unambiguous
	// AAD: "kubekms.io/seal/v2\x00" || uint32be(len key_id) || key_id ||
	// uint32be(len annotation) || annotation value. Encrypt writes it with
	// Config.SealFormat 2, or when a seal would not fit format 3.
	sealV2 byte = 0x02
	// sealV3: the encoded local KEK (the annotation value of format 2) travels
	// inside the ciphertext, so the apiserver stores no annotation with the
	// object; it checks each annotation key of every object it reads against
	// a regular expression (~16,000 instructions an object at start-up).
	// 0x03 || uint16be(len kek) || kek || nonce(12) || AES-256-GCM(seed) || tag(16),
	// AAD = "kubekms.io/seal/v3\x00" || uint32be(len key_id) || key_id ||
	// uint32be(len kek) || kek. Encrypt writes v3 by default.
	sealV3 byte = 0x03
	// annotationV1: 0x01 || created (8 bytes, big-endian Unix seconds) || wrapped KEK.
	annotationV1 byte = 0x01
)

const (
	nonceSize = 12
	tagSize   = 16
	kekSize   = 32
	// SealOverhead is what a format-2 seal adds to the plaintext.
	SealOverhead = 1 + nonceSize + tagSize
	// inlineHeader is what format 3 adds in front of its local KEK.
	inlineHeader = 1 + 2
	// MaxCiphertext and MaxKeyID are the apiserver's limits on our answers.
	MaxCiphertext = 1024
	MaxKeyID      = 1024
	// MaxPlaintext is the largest plaintext whose (format-2) ciphertext fits
	// MaxCiphertext.
	MaxPlaintext = MaxCiphertext - SealOverhead
	// MaxAnnotations is the apiserver's limit on the sum of annotation key and value sizes.
	MaxAnnotations   = 32 * 1024
	annotationHeader = 1 + 8
	sealV1AADPrefix  = "kubekms.io/seal/v1\x00"
	sealV2AADPrefix  = "kubekms.io/seal/v2\x00"
	sealV3AADPrefix  = "kubekms.io/seal/v3\x00"
)

// SealFormats are the values of Config.SealFormat.
const (
	SealFormatAnnotation = 2 // the local KEK in annotation AnnotationKey: what plugins before format 3 read
	SealFormatInline     = 3 // the local KEK inside the ciphertext (the default)
)

// ErrBadRequest marks errors caused by the caller's input (gRPC InvalidArgument).
var ErrBadRequest = errors.New("bad request")

func badRequest(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadRequest, fmt.Sprintf(format, args...))
}

func encodeAnnotation(created time.Time, wrapped []byte) []byte {
	out := make([]byte, annotationHeader, annotationHeader+len(wrapped))
	out[0] = annotationV1
	binary.BigEndian.PutUint64(out[1:9], uint64(created.Unix()))
	return append(out, wrapped...)
}

// parsedAnnotation is the decoded annotation value.
type parsedAnnotation struct {
	created time.Time
	wrapped []byte
}

// decodeAnnotation decodes an encoded local KEK; where names its place for
// error messages (the annotation, or the ciphertext for format 3).
func decodeAnnotation(v []byte, where string) (parsedAnnotation, error) {
	if len(v) == 0 {
		return parsedAnnotation{}, badRequest("%s is empty", where)
	}
	if v[0] != annotationV1 {
		return parsedAnnotation{}, badRequest("%s has unknown format version %d", where, v[0])
	}
	if len(v) <= annotationHeader {
		return parsedAnnotation{}, badRequest("%s is truncated (%d bytes)", where, len(v))
	}
	sec := binary.BigEndian.Uint64(v[1:9])
	return parsedAnnotation{created: time.Unix(int64(sec), 0), wrapped: v[annotationHeader:]}, nil
}

// sealAAD binds a seal to its format, the key ID and the whole encoded local
// KEK (so to the wrapped local KEK and its creation time): swapping either, or
// moving a format-3 local KEK into an annotation, fails. The format byte
// selects the layout; callers check it first (checkSealed).
func sealAAD(format byte, keyID string, annotation []byte) []byte {
	if format == sealV1 {
		aad := make([]byte, 0, len(sealV1AADPrefix)+len(keyID)+1+len(annotation))
		aad = append(aad, sealV1AADPrefix...)
		aad = append(aad, keyID...)
		aad = append(aad, 0)
		return append(aad, annotation...)
	}
	prefix := sealV2AADPrefix
	if format == sealV3 {
		prefix = sealV3AADPrefix
	}
	aad := make([]byte, 0, len(prefix)+4+len(keyID)+4+len(annotation))
	aad = append(aad, prefix...)
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(keyID)))
	aad = append(aad, keyID...)
	aad = binary.BigEndian.AppendUint32(aad, uint32(len(annotation)))
	return append(aad, annotation...)
}

// checkSealed validates a ciphertext's framing before any crypto.
func checkSealed(ciphertext []byte) error {
	switch {
	case len(ciphertext) == 0:
		return badRequest("ciphertext is empty")
	case len(ciphertext) > MaxCiphertext:
		return badRequest("ciphertext is %d bytes, more than the %d the apiserver allows", len(ciphertext), MaxCiphertext)
	case ciphertext[0] != sealV1 && ciphertext[0] != sealV2 && ciphertext[0] != sealV3:
		return badRequest("ciphertext has unknown format version %d (want %d, %d or %d)", ciphertext[0], sealV1, sealV2, sealV3)
	case len(ciphertext) < SealOverhead+1:
		return badRequest("ciphertext is %d bytes, too short for format %d", len(ciphertext), ciphertext[0])
	}
	return nil
}

// checkKeyID validates the key ID a seal of the given format is opened with.
func checkKeyID(format byte, keyID string) error {
	switch {
	case keyID == "":
		return badRequest("key_id is empty")
	case len(keyID) > MaxKeyID:
		return badRequest("key_id is %d bytes, more than %d", len(keyID), MaxKeyID)
	case format == sealV1 && strings.IndexByte(keyID, 0) >= 0:
		return badRequest("key_id holds a NUL byte, which a format-1 seal cannot authenticate unambiguously")
	}
	return nil
}

// inlineSize is the size of a format-3 seal of n plaintext bytes with the
// encoded local KEK kek.
func inlineSize(kek []byte, n int) int {
	return inlineHeader + len(kek) + nonceSize + n + tagSize
}

// splitSeal returns the encoded local KEK of a checked ciphertext (inside it
// for format 3, in the annotation before) and the seal: nonce || sealed || tag.
func splitSeal(ciphertext []byte, annotations map[string][]byte) (kek, seal []byte, err error) {
	ann, annotated := annotations[AnnotationKey]
	if ciphertext[0] != sealV3 {
		if !annotated {
			return nil, nil, badRequest("annotation %s is missing: the ciphertext was not made by kubekms", AnnotationKey)
		}
		return ann, ciphertext[1:], nil
	}
	if annotated {
		return nil, nil, badRequest("annotation %s came with a format-3 ciphertext, which carries its local KEK itself", AnnotationKey)
	}
	n := int(binary.BigEndian.Uint16(ciphertext[1:inlineHeader]))
	if inlineHeader+n+nonceSize+tagSize+1 > len(ciphertext) {
		return nil, nil, badRequest("ciphertext is %d bytes, too short for its %d-byte local KEK", len(ciphertext), n)
	}
	return ciphertext[inlineHeader : inlineHeader+n], ciphertext[inlineHeader+n:], nil
}

// kekPlace names where a ciphertext's local KEK is, for error messages.
func kekPlace(format byte) string {
	if format == sealV3 {
		return "the ciphertext's local KEK"
	}
	return "annotation " + AnnotationKey
}
