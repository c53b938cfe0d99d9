package plugin

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/kubekms/kubekms/hierarchy"
)

// CheckEncryptAnswer enforces on our own Encrypt answer the limits the apiserver
// enforces (kmsv2/envelope.go): a violation is our bug, so it is caught here
// with a clear message instead of as an opaque apiserver retry loop.
func CheckEncryptAnswer(ciphertext []byte, keyID string, annotations map[string][]byte) error {
	if len(ciphertext) == 0 || len(ciphertext) > hierarchy.MaxCiphertext {
		return fmt.Errorf("ciphertext is %d bytes (want 1..%d)", len(ciphertext), hierarchy.MaxCiphertext)
	}
	if err := checkKeyID(keyID); err != nil {
		return err
	}
	return checkAnnotations(annotations)
}

func checkKeyID(keyID string) error {
	if keyID == "" || len(keyID) > hierarchy.MaxKeyID {
		return fmt.Errorf("key_id is %d bytes (want 1..%d)", len(keyID), hierarchy.MaxKeyID)
	}
	return nil
}

// checkAnnotations applies the apiserver's rules: keys are fully qualified
// DNS names, not under the reserved suffix, and keys plus values fit 32 KiB.
func checkAnnotations(annotations map[string][]byte) error {
	total := 0
	for k, v := range annotations {
		if k == hierarchy.AnnotationKey { // ours, known valid: skip the regexp on the hot path
			total += len(k) + len(v)
			continue
		}
		if errs := validation.IsDNS1123Subdomain(k); len(errs) > 0 || !strings.Contains(k, ".") {
			return fmt.Errorf("annotation key %q is not a fully qualified domain name", k)
		}
		if strings.HasSuffix(k, ".reference.encryption.k8s.io") {
			return fmt.Errorf("annotation key %q uses the reserved suffix", k)
		}
		total += len(k) + len(v)
	}
	if total > hierarchy.MaxAnnotations {
		return fmt.Errorf("annotations are %d bytes (at most %d)", total, hierarchy.MaxAnnotations)
	}
	return nil
}
