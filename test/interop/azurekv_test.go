package interop

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testservers/azurekv"
)

// azurekvStandInBackend runs kubekms on the Key Vault (hsm=false, RSA keys)
// or Managed HSM (hsm=true, AES keys) STAND-IN (internal/testservers/azurekv:
// the SDK's own fake server with real cryptography, in the test process).
// The plugin process reaches it unchanged, with the production key URI, as
// from a locked-down network: through an HTTPS proxy on 127.0.0.1 with a
// private CA, authenticating with a managed identity endpoint on 127.0.0.1
// (see azurekv.Network). Rotation is RotateKey (a new key version).
func azurekvStandInBackend(hsm bool) Backend {
	name := "azurekv-standin"
	if hsm {
		name = "azurehsm-standin"
	}
	return Backend{Name: name, Setup: func(t *testing.T, _ string) Deployment {
		srv := azurekv.Start(t, hsm, "kek")
		net := srv.Serve(t)
		return Deployment{
			KeyURI: "azurekv://" + strings.TrimPrefix(srv.URL, "https://") + "/keys/kek",
			Flags:  []string{"--cluster-name", "interop"},
			Env:    net.Env(),
			Rotate: func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				if _, err := srv.AdminClient(t).RotateKey(ctx, "kek", nil); err != nil {
					t.Fatalf("RotateKey: %v", err)
				}
			},
		}
	}}
}
