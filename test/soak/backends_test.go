package soak

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kubekms/kubekms/internal/testservers/azurekv"
	"github.com/kubekms/kubekms/internal/testservers/gcpkms"
	"github.com/kubekms/kubekms/internal/testservers/swtpm"
)

// TestSoakGCPKMSStandIn soaks the Cloud KMS backend on its STAND-IN server
// (internal/testservers/gcpkms, in this test process on 127.0.0.1): outage =
// the server stopped, rotation = a new primary version, disable = every
// version disabled.
func TestSoakGCPKMSStandIn(t *testing.T) {
	soak(t, func(t *testing.T, _ string) keyService {
		srv := gcpkms.Start(t, "kek")
		all := func(st kmspb.CryptoKeyVersion_CryptoKeyVersionState) func(t *testing.T) {
			return func(t *testing.T) {
				for _, v := range srv.Versions("kek") {
					srv.SetState(t, v, st)
				}
			}
		}
		return keyService{
			uri:   "gcpkms:///" + gcpkms.KeyName("kek") + "?endpoint=" + srv.Endpoint(),
			flags: []string{"--cluster-name", "soak"},
			outages: []fault{{"Cloud KMS stand-in stopped", func(t *testing.T, sleep func()) {
				srv.Stop(t)
				sleep()
				srv.Start(t)
			}}},
			rotate:  func(t *testing.T) { srv.Rotate(t, "kek") },
			disable: all(kmspb.CryptoKeyVersion_DISABLED),
			enable:  all(kmspb.CryptoKeyVersion_ENABLED),
		}
	})
}

// TestSoakAzureKVStandIn soaks the Azure Key Vault backend on its STAND-IN
// (internal/testservers/azurekv: the SDK's fake server with real RSA-OAEP,
// in this test process), which the plugin reaches through an HTTPS proxy on
// 127.0.0.1 with a managed identity endpoint (azurekv.Network): outage = the
// proxy stopped (connection refused), rotation = RotateKey, disable = every
// version's enabled=false.
func TestSoakAzureKVStandIn(t *testing.T) {
	soak(t, func(t *testing.T, _ string) keyService {
		srv := azurekv.Start(t, false, "kek")
		net := srv.Serve(t)
		admin := srv.AdminClient(t)
		call := func(t *testing.T, what string, f func(ctx context.Context) error) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if err := f(ctx); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
		all := func(enabled bool) func(t *testing.T) {
			return func(t *testing.T) {
				for _, kid := range srv.Versions("kek") {
					id := azkeys.ID(kid)
					call(t, "UpdateKey", func(ctx context.Context) error {
						_, err := admin.UpdateKey(ctx, id.Name(), id.Version(), azkeys.UpdateKeyParameters{
							KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(enabled)}}, nil)
						return err
					})
				}
			}
		}
		return keyService{
			uri:   "azurekv://" + strings.TrimPrefix(srv.URL, "https://") + "/keys/kek",
			flags: []string{"--cluster-name", "soak"},
			env:   net.Env(),
			outages: []fault{{"Key Vault unreachable (proxy stopped)", func(t *testing.T, sleep func()) {
				net.Stop(t)
				sleep()
				net.Start(t)
			}}},
			rotate: func(t *testing.T) {
				call(t, "RotateKey", func(ctx context.Context) error { _, err := admin.RotateKey(ctx, "kek", nil); return err })
			},
			disable: all(false),
			enable:  all(true),
		}
	})
}

// TestSoakTPM soaks the TPM backend on a real swtpm: outage = swtpm killed
// (restarted on the same state), rotation = `kubekms tpm provision`, disable
// = PCR 16 (which every key is bound to) extended, enable = PCR 16 reset.
func TestSoakTPM(t *testing.T) {
	soak(t, func(t *testing.T, _ string) keyService {
		tp := swtpm.Start(t)
		uri := "tpm://" + tp.Socket() + "?handle=0x81000100-0x810001ff&pcrs=16"
		provision := func(t *testing.T) {
			if out, err := exec.Command(bin, "tpm", "provision", "--key-uri", uri, "--node", "soak").CombinedOutput(); err != nil {
				t.Fatalf("kubekms tpm provision: %v: %s", err, out)
			}
		}
		provision(t)
		return keyService{
			uri: uri,
			outages: []fault{{"swtpm killed, restarted on its state", func(t *testing.T, sleep func()) {
				tp.Stop(t)
				sleep()
				tp.Start(t)
			}}},
			rotate:  provision,
			disable: func(t *testing.T) { tp.Tool(t, "tpm2_pcrextend", "16:sha256="+strings.Repeat("ab", 32)) },
			enable:  func(t *testing.T) { tp.Tool(t, "tpm2_pcrreset", "16") },
		}
	})
}
