// Package noopkms is the baseline of the benchmarks: a KMS v2 server that
// answers every call at once, with no checks, no crypto, no logging and no
// metrics. What any plugin pays for gRPC and the socket is all it costs.
package noopkms

import (
	"context"

	kmsapi "k8s.io/kms/apis/v2"
)

// plaintext is what Decrypt answers: a seed's size, as the apiserver expects.
var plaintext = make([]byte, 32)

// Server is the no-op KMS v2 service.
type Server struct {
	kmsapi.UnimplementedKeyManagementServiceServer
	// Echo makes Decrypt answer the ciphertext (which Encrypt made the
	// plaintext): a plugin that "encrypts" with the identity, so a real
	// apiserver can store and read through it (the cold-start baseline).
	// Without it Decrypt answers 32 zero bytes.
	Echo bool
}

// Status answers healthy.
func (Server) Status(context.Context, *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	return &kmsapi.StatusResponse{Version: "v2", Healthz: "ok", KeyId: "noop"}, nil
}

// Encrypt answers the plaintext as the ciphertext.
func (Server) Encrypt(_ context.Context, r *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	return &kmsapi.EncryptResponse{Ciphertext: r.Plaintext, KeyId: "noop"}, nil
}

// Decrypt answers 32 zero bytes, or with Echo the ciphertext.
func (s Server) Decrypt(_ context.Context, r *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	if s.Echo {
		return &kmsapi.DecryptResponse{Plaintext: r.Ciphertext}, nil
	}
	return &kmsapi.DecryptResponse{Plaintext: plaintext}, nil
}
