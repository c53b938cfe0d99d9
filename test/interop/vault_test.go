package interop

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kubekms/kubekms/keyservice/vault/transittest"
)

// vaultStandInBackend runs kubekms on the Vault Transit STAND-IN
// (keyservice/vault/transittest): no Vault or OpenBao server runs on this
// project's machines. The stand-in serves the real HTTP API shapes on
// 127.0.0.1 in the test process; kubekms reaches it over loopback. Rotation
// is the transit key rotate endpoint.
func vaultStandInBackend() Backend {
	return Backend{Name: "vault-standin", Setup: func(t *testing.T, dir string) Deployment {
		srv := transittest.New(t, transittest.Options{})
		transitPost(t, srv, "transit/keys/kek")
		tokenFile := filepath.Join(dir, "vault-token")
		if err := os.WriteFile(tokenFile, []byte(srv.CreateToken(time.Hour, true)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return Deployment{
			KeyURI: fmt.Sprintf("hcvault://%s/transit/keys/kek?token-file=%s", srv.Addr(), tokenFile),
			Rotate: func(t *testing.T) { transitPost(t, srv, "transit/keys/kek/rotate") },
		}
	}}
}

// transitPost sends an empty POST with the root token, as `vault write` does.
func transitPost(t *testing.T, srv *transittest.Server, path string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL()+"/v1/"+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Vault-Token", srv.RootToken())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("POST %s: %s", path, resp.Status)
	}
}
