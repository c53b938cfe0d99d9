package pkcs11

import (
	"testing"

	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
)

func TestHierarchyOverSoftHSM(t *testing.T) {
	h := newSoftHSM(t)
	h.keygen(testLabel)
	hierarchytest.RunBackend(t, harness(h))
}
