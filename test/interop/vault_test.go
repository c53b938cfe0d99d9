package interop

import (
	"path/filepath"
	"testing"

	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
)

// vaultBackend runs kubekms on a real Vault server (file storage, on
// 127.0.0.1) with a token file; rotation is a transit key rotate.
func vaultBackend() Backend {
	return Backend{Name: "vault", Setup: func(t *testing.T, _ string) Deployment {
		k := vaultserver.New(t, vaultserver.Options{}).NewTransitKey(t)
		return Deployment{KeyURI: k.URI(), Rotate: func(t *testing.T) { k.Rotate(t) }}
	}}
}

// vaultCertBackend runs kubekms on a real Vault server over https, logged
// in with a TLS client certificate (auth=cert), as a static pod would.
func vaultCertBackend() Backend {
	return Backend{Name: "vault-cert", Setup: func(t *testing.T, dir string) Deployment {
		srv := vaultserver.New(t, vaultserver.Options{TLS: true})
		k := srv.NewTransitKey(t)
		srv.EnableAuth(t, "cert", "cert")
		srv.Write(t, "auth/cert/certs/node", map[string]any{"certificate": string(srv.CA.PEM), "token_policies": k.Policy})
		cert, key := filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key")
		srv.CA.Issue(t, cert, key, "control-plane-1", vaultserver.ClientCert)
		return Deployment{
			KeyURI: k.URIWith("auth=cert&role=node&cert-file=" + cert + "&key-file=" + key),
			Rotate: func(t *testing.T) { k.Rotate(t) },
		}
	}}
}
