package interop

import (
	"os/exec"
	"testing"

	"github.com/kubekms/kubekms/internal/testservers/swtpm"
)

// tpmBackend runs kubekms on a real software TPM (swtpm) on a unix socket;
// the key is provisioned, and rotated, with `kubekms tpm provision`.
func tpmBackend() Backend {
	return Backend{Name: "tpm-swtpm", Setup: func(t *testing.T, _ string) Deployment {
		tp := swtpm.Start(t)
		uri := "tpm://" + tp.Socket() + "?handle=0x81000100-0x8100010f&pcrs=7"
		provision := func(t *testing.T) {
			if out, err := exec.Command(kubekmsBin, "tpm", "provision", "--key-uri", uri, "--node", "interop").CombinedOutput(); err != nil {
				t.Fatalf("kubekms tpm provision: %v: %s", err, out)
			}
		}
		provision(t)
		return Deployment{KeyURI: uri, Rotate: provision}
	}}
}
