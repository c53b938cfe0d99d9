package interop

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"

	"github.com/kubekms/kubekms/internal/testservers/localkms"
)

const (
	awsKeyA  = "5d1e7a20-3b4c-4d5e-8f60-718293a4b5c6"
	awsKeyB  = "6e2f8b31-4c5d-4e6f-9071-8293a4b5c6d7"
	awsAlias = "alias/kubekms-interop"
)

// awskmsBackend runs kubekms on local-kms (the real AWS KMS API server). The
// server binds all interfaces, so it lives in a private network namespace,
// and kubekms runs in that namespace too (nsenter) to reach it on 127.0.0.1;
// the unix socket is a file, reachable from the test's namespace. Rotation
// re-points the alias to another key, as an operator would.
func awskmsBackend() Backend {
	return Backend{Name: "awskms", Setup: func(t *testing.T, dir string) Deployment {
		srv := localkms.Start(t, localkms.Seed{
			AESKeys: []string{awsKeyA, awsKeyB},
			Aliases: map[string]string{awsAlias: awsKeyA},
		})
		ns := srv.NetNS()
		return Deployment{
			KeyURI: "awskms:///" + awsAlias + "?endpoint=" + srv.Endpoint(),
			Flags:  []string{"--cluster-name", "interop"},
			Env:    localkms.ClientEnv(filepath.Join(dir, "no-aws-config")),
			Wrap: func(cmd []string) []string {
				return append([]string{"nsenter", "--net=" + ns, "--"}, cmd...)
			},
			Rotate: func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				_, err := srv.AdminClient().UpdateAlias(ctx, &kms.UpdateAliasInput{
					AliasName: aws.String(awsAlias), TargetKeyId: aws.String(awsKeyB)})
				if err != nil {
					t.Fatalf("UpdateAlias: %v", err)
				}
			},
		}
	}}
}
