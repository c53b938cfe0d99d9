package hierarchy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"time"
)

// AnnotationKey carries the wrapped local KEK next to each ciphertext. It is a
// DNS name under a domain of ours, as the apiserver requires.
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
	// uint32be(len annotation) || annotation value. Encrypt writes v2.
	sealV2 byte = 0x02
	// annotationV1: 0x01 || created (8 bytes, big-endian Unix seconds) || wrapped KEK.
	annotationV1 byte = 0x01
)

const (
	nonceSize = 12
	tagSize   = 16
	kekSize   = 32
	// SealOverhead is what a seal adds to the plaintext.
	SealOverhead = 1 + nonceSize + tagSize
	// MaxCiphertext and MaxKeyID are the apiserver's limits on our answers.
	MaxCiphertext = 1024
	MaxKeyID      = 1024
	// MaxPlaintext is the largest plaintext whose ciphertext fits MaxCiphertext.
	MaxPlaintext = MaxCiphertext - SealOverhead
	// MaxAnnotations is the apiserver's limit on the sum of annotation key and value sizes.
	MaxAnnotations   = 32 * 1024
	annotationHeader = 1 + 8
	sealV1AADPrefix  = "kubekms.io/seal/v1\x00"
	sealV2AADPrefix  = "kubekms.io/seal/v2\x00"
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

func decodeAnnotation(v []byte) (parsedAnnotation, error) {
	if len(v) == 0 {
		return parsedAnnotation{}, badRequest("annotation %s is empty", AnnotationKey)
	}
	if v[0] != annotationV1 {
		return parsedAnnotation{}, badRequest("annotation %s has unknown format version %d", AnnotationKey, v[0])
	}
	if len(v) <= annotationHeader {
		return parsedAnnotation{}, badRequest("annotation %s is truncated (%d bytes)", AnnotationKey, len(v))
	}
	sec := binary.BigEndian.Uint64(v[1:9])
	return parsedAnnotation{created: time.Unix(int64(sec), 0), wrapped: v[annotationHeader:]}, nil
}

// sealAAD binds a seal to the key ID and the whole annotation value (and so to
// the wrapped local KEK and its creation time): swapping either fails. The
// format byte selects the layout; callers check it first (checkSealed).
func sealAAD(format byte, keyID string, annotation []byte) []byte {
	if format == sealV1 {
		aad := make([]byte, 0, len(sealV1AADPrefix)+len(keyID)+1+len(annotation))
		aad = append(aad, sealV1AADPrefix...)
		aad = append(aad, keyID...)
		aad = append(aad, 0)
		return append(aad, annotation...)
	}
	aad := make([]byte, 0, len(sealV2AADPrefix)+4+len(keyID)+4+len(annotation))
	aad = append(aad, sealV2AADPrefix...)
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
	case ciphertext[0] != sealV1 && ciphertext[0] != sealV2:
		return badRequest("ciphertext has unknown format version %d (want %d or %d)", ciphertext[0], sealV1, sealV2)
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
