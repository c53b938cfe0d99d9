//go:build e2e

package e2e

import (
	"context"
	"testing"

	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// onVault starts a real Vault server (file storage, initialized and
// unsealed, on 127.0.0.1) with one transit key and points p at it with a
// token file whose token carries the key's minimal policy.
func onVault(t *testing.T, p *cluster.Plugin) *vaultserver.TransitKey {
	t.Helper()
	k := vaultserver.New(t, vaultserver.Options{}).NewTransitKey(t)
	p.KeyURI = k.URI()
	return k
}

// vaultRevocableBackends are TestRevocation's Vault cases: the key's policy
// removed (the token stays valid, so this is the key's revocation, not a
// dead token) and restored, and the transit key deleted (final). Vault
// pushes nothing: the plugin's probe loop (a key read) sees both.
func vaultRevocableBackends() []revocableBackend {
	return []revocableBackend{
		{name: "vault policy removed", detect: defaultProbeLoop, setup: func(t *testing.T, p *cluster.Plugin) (func(context.Context) error, func(context.Context) error) {
			k := onVault(t, p)
			return func(context.Context) error { k.RemovePolicy(t); return nil },
				func(context.Context) error { k.RestorePolicy(t); return nil }
		}},
		{name: "vault key deleted", detect: defaultProbeLoop, setup: func(t *testing.T, p *cluster.Plugin) (func(context.Context) error, func(context.Context) error) {
			k := onVault(t, p)
			return func(context.Context) error { k.Delete(t); return nil }, nil
		}},
	}
}

// vaultVersionedBackends: a transit rotation, then min_decryption_version
// raised to 2, which Vault enforces at decrypt and the plugin learns from
// the key read (no crypto call).
func vaultVersionedBackends() []versionedBackend {
	return []versionedBackend{
		{name: "vault min_decryption_version raised", setup: func(t *testing.T, p *cluster.Plugin) (func(context.Context) error, func(context.Context) error) {
			k := onVault(t, p)
			return func(context.Context) error { k.Rotate(t); return nil },
				func(context.Context) error { k.SetMinDecryptionVersion(t, 2); return nil }
		}},
	}
}

// vaultOutageBackends: a sealed Vault answers every request with 503
// "Vault is sealed": an outage, served from the outage grace, never a
// revocation.
func vaultOutageBackends() []outageBackend {
	return []outageBackend{
		{name: "vault sealed", setup: func(t *testing.T, p *cluster.Plugin) (func(testing.TB), func(testing.TB)) {
			srv := onVault(t, p).Server
			return srv.Seal, srv.Unseal
		}},
	}
}
