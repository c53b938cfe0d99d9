package interop

import (
	"testing"

	"github.com/kubekms/kubekms/internal/testservers/gcpkms"
)

// gcpkmsStandInBackend runs kubekms on the Cloud KMS STAND-IN
// (internal/testservers/gcpkms: the official KeyManagementService gRPC API
// on 127.0.0.1 in the test process, real AES-GCM behind it); kubekms reaches
// it with the official client over plaintext loopback gRPC (endpoint=http://).
// Rotation is a new primary version.
func gcpkmsStandInBackend() Backend {
	return Backend{Name: "gcpkms-standin", Setup: func(t *testing.T, _ string) Deployment {
		srv := gcpkms.Start(t, "kek")
		return Deployment{
			KeyURI: "gcpkms:///" + gcpkms.KeyName("kek") + "?endpoint=" + srv.Endpoint(),
			Flags:  []string{"--cluster-name", "interop"},
			Rotate: func(t *testing.T) { srv.Rotate(t, "kek") },
		}
	}}
}
