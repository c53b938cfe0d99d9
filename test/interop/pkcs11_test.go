package interop

import (
	"testing"

	"github.com/kubekms/kubekms/internal/testservers/softhsm"
)

// pkcs11Backend runs kubekms on a private SoftHSM2 token; rotation makes a
// new key with the same label and a higher CKA_ID.
func pkcs11Backend() Backend {
	return Backend{Name: "pkcs11", Setup: func(t *testing.T, _ string) Deployment {
		tk := softhsm.StartForProcesses(t)
		tk.Keygen(softhsm.KeyLabel)
		return Deployment{
			KeyURI: tk.URI(";object="+softhsm.KeyLabel, ""),
			Env:    tk.Env(),
			Rotate: func(*testing.T) { tk.Keygen(softhsm.KeyLabel) },
		}
	}}
}
