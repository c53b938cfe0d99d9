package envelope

import (
	"bytes"
	"testing"

	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
)

// BenchmarkParseRawHeader: the per-object header parse of inventory, on a
// value shaped like kubekms writes (500-byte ciphertext, one annotation),
// in the cache: what the parse costs in instructions.
func BenchmarkParseRawHeader(b *testing.B) {
	v := kmsValue(b, "kubekms", &kmstypes.EncryptedObject{
		EncryptedData:          bytes.Repeat([]byte{7}, 500),
		KeyID:                  "kubekms:v1:key-new:0123456789abcdef",
		EncryptedDEKSource:     bytes.Repeat([]byte{9}, 60),
		Annotations:            map[string][]byte{"kek.kubekms.io": bytes.Repeat([]byte{1}, 200)},
		EncryptedDEKSourceType: kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED,
	})
	for b.Loop() {
		if _, err := ParseRawHeader(v); err != nil {
			b.Fatal(err)
		}
	}
}
