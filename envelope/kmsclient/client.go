// Package kmsclient talks to a KMS v2 plugin over its unix socket, as
// kube-apiserver does: one gRPC connection, WaitForReady, a deadline on
// every call. It implements k8s.io/kms/pkg/service.Service.
package kmsclient

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"
	"k8s.io/kms/pkg/util"
)

// DefaultTimeout is the apiserver's default per-call timeout.
const DefaultTimeout = 3 * time.Second

// Client is a KMS v2 plugin client.
type Client struct {
	conn     *grpc.ClientConn
	kms      kmsapi.KeyManagementServiceClient
	timeout  time.Duration
	endpoint string
}

var _ kmsservice.Service = (*Client)(nil)

// Dial prepares a client for endpoint ("unix:///path.sock", or
// "unix:///@name" for an abstract socket). timeout bounds every call
// (DefaultTimeout when zero). The connection is made lazily.
func Dial(endpoint string, timeout time.Duration) (*Client, error) {
	addr, err := util.ParseEndpoint(endpoint)
	if err != nil {
		return nil, fmt.Errorf("KMS plugin endpoint %q: %w", endpoint, err)
	}
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	conn, err := grpc.NewClient("passthrough:///kms-plugin",
		grpc.WithAuthority("localhost"),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", addr)
		}),
	)
	if err != nil {
		return nil, fmt.Errorf("KMS plugin client for %q: %w", endpoint, err)
	}
	return &Client{conn: conn, kms: kmsapi.NewKeyManagementServiceClient(conn), timeout: timeout, endpoint: endpoint}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Status calls Status and checks the answer as the apiserver does: version
// "v2" (or "v2beta1"), healthz "ok", a key_id of 1 to 1024 bytes.
func (c *Client) Status(ctx context.Context) (*kmsservice.StatusResponse, error) {
	st, err := c.StatusAnswer(ctx)
	if err != nil {
		return nil, err
	}
	if err := CheckStatus(st); err != nil {
		return nil, fmt.Errorf("KMS plugin %s: Status: %w", c.endpoint, err)
	}
	return st, nil
}

// CheckStatus checks a Status answer as the apiserver's KMS check does.
func CheckStatus(st *kmsservice.StatusResponse) error {
	var errs []error
	if st.Version != "v2" && st.Version != "v2beta1" {
		errs = append(errs, fmt.Errorf("version %q, want v2", st.Version))
	}
	if st.Healthz != "ok" {
		errs = append(errs, fmt.Errorf("healthz %q (key_id %q), want ok", st.Healthz, st.KeyID))
	}
	if n := len(st.KeyID); n == 0 || n > 1024 {
		errs = append(errs, fmt.Errorf("key_id of %d bytes, want 1 to 1024", n))
	}
	return errors.Join(errs...)
}

// StatusAnswer calls Status and returns the answer unchecked, healthy or
// not: kube-apiserver takes the key_id of an unhealthy answer too (it
// records it and rotates its write seed to it).
func (c *Client) StatusAnswer(ctx context.Context) (*kmsservice.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.kms.Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		return nil, fmt.Errorf("KMS plugin %s: Status: %w", c.endpoint, err)
	}
	return &kmsservice.StatusResponse{Version: resp.Version, Healthz: resp.Healthz, KeyID: resp.KeyId}, nil
}

// Encrypt asks the plugin to encrypt plaintext (a DEK seed).
func (c *Client) Encrypt(ctx context.Context, uid string, plaintext []byte) (*kmsservice.EncryptResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.kms.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: uid})
	if err != nil {
		return nil, fmt.Errorf("KMS plugin %s: Encrypt uid=%s: %w", c.endpoint, uid, err)
	}
	return &kmsservice.EncryptResponse{Ciphertext: resp.Ciphertext, KeyID: resp.KeyId, Annotations: resp.Annotations}, nil
}

// Decrypt asks the plugin to decrypt a stored DEK seed.
func (c *Client) Decrypt(ctx context.Context, uid string, req *kmsservice.DecryptRequest) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	resp, err := c.kms.Decrypt(ctx, &kmsapi.DecryptRequest{
		Ciphertext:  req.Ciphertext,
		Uid:         uid,
		KeyId:       req.KeyID,
		Annotations: req.Annotations,
	})
	if err != nil {
		return nil, fmt.Errorf("KMS plugin %s: Decrypt uid=%s: %w", c.endpoint, uid, err)
	}
	return resp.Plaintext, nil
}
