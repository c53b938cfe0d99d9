package plugin

import (
	"fmt"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"

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

// checkAnnotations applies the apiserver's rules (kmsv2 validateAnnotations):
// keys are fully qualified domain names, and keys plus values fit 32 KiB.
func checkAnnotations(annotations map[string][]byte) error {
	total := 0
	for k, v := range annotations {
		total += len(k) + len(v)
		if k == hierarchy.AnnotationKey { // ours, known valid: skip the regexps on the hot path
			continue
		}
		if errs := validation.IsFullyQualifiedDomainName(field.NewPath("annotations"), k); len(errs) > 0 {
			return fmt.Errorf("annotation key %q is not a fully qualified domain name: %v", k, errs.ToAggregate())
		}
	}
	if total > hierarchy.MaxAnnotations {
		return fmt.Errorf("annotations are %d bytes (at most %d)", total, hierarchy.MaxAnnotations)
	}
	return nil
}
