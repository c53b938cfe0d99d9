package localkms

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/kms"
)

const testKey = "3d91b26f-8e40-4f51-a293-b4c5d6e7f809"

// A client with a plain HTTP client reaches the server through Forward, and
// the forwarder stops with the test.
func TestForward(t *testing.T) {
	srv := Start(t, Seed{AESKeys: []string{testKey}})
	endpoint := srv.Forward(t)
	client := kms.New(kms.Options{
		Region:           Region,
		BaseEndpoint:     aws.String(endpoint),
		Credentials:      credentials.NewStaticCredentialsProvider(AccessKeyID, SecretAccessKey, ""),
		HTTPClient:       &http.Client{Transport: &http.Transport{Proxy: nil}},
		RetryMaxAttempts: 1,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for range 3 { // several requests, on one or more relayed connections
		out, err := client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(testKey)})
		if err != nil {
			t.Fatalf("DescribeKey through the forwarder: %v", err)
		}
		if got := aws.ToString(out.KeyMetadata.Arn); got != KeyARN(testKey) {
			t.Fatalf("key ARN %q, want %q", got, KeyARN(testKey))
		}
	}
}
