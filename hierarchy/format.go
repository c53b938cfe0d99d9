package hierarchy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// AnnotationKey carries the wrapped local KEK next to each ciphertext. It is a
// DNS name under a domain of ours, as the apiserver requires.
const AnnotationKey = "local-kek.kubekms.io"

// Format versions. The first byte of every ciphertext and annotation value
// names its layout, so the layout can evolve (docs/design.md).
const (
	// sealV1: 0x01 || nonce(12) || AES-256-GCM(seed) || tag(16),
	// AAD = sealAADPrefix || key_id || 0x00 || annotation value.
	sealV1 byte = 0x01
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
	sealAADPrefix    = "kubekms.io/seal/v1\x00"
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
// the wrapped local KEK and its creation time): swapping either fails.
func sealAAD(keyID string, annotation []byte) []byte {
	aad := make([]byte, 0, len(sealAADPrefix)+len(keyID)+1+len(annotation))
	aad = append(aad, sealAADPrefix...)
	aad = append(aad, keyID...)
	aad = append(aad, 0)
	return append(aad, annotation...)
}

// checkSealed validates a ciphertext's framing before any crypto.
func checkSealed(ciphertext []byte) error {
	switch {
	case len(ciphertext) == 0:
		return badRequest("ciphertext is empty")
	case len(ciphertext) > MaxCiphertext:
		return badRequest("ciphertext is %d bytes, more than the %d the apiserver allows", len(ciphertext), MaxCiphertext)
	case ciphertext[0] != sealV1:
		return badRequest("ciphertext has unknown format version %d (want %d)", ciphertext[0], sealV1)
	case len(ciphertext) < SealOverhead+1:
		return badRequest("ciphertext is %d bytes, too short for format %d", len(ciphertext), sealV1)
	}
	return nil
}
