package softkey_test

import (
	"path/filepath"
	"testing"

	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
)

func TestHierarchyOverSoftkey(t *testing.T) {
	hierarchytest.RunBackend(t, harness(filepath.Join(t.TempDir(), "keyring.json")))
}
