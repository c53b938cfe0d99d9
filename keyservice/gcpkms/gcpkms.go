// Package gcpkms is the Google Cloud KMS key service: a symmetric CryptoKey
// (purpose ENCRYPT_DECRYPT) wraps the local KEKs, bound to one cluster by
// additional authenticated data.
//
// The key ID is the CryptoKeyVersion that encrypted (Encrypt reports it), so
// a Cloud KMS rotation (a new primary version) is a new key ID. Credentials
// are Application Default Credentials: GKE Workload Identity or the VM's
// service account through the metadata server, a workload identity
// federation or service account file named by GOOGLE_APPLICATION_CREDENTIALS.
// The client library's own retries are off: the hierarchy retries transient
// errors, so retries never double up.
package gcpkms

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"
	"github.com/googleapis/gax-go/v2"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/kubekms/kubekms/keyservice"
)

const (
	aadDomain = "kubekms.io/local-kek/v1\x00cluster\x00"
	// Cloud KMS limits: 64 KiB plaintext; ciphertexts are somewhat larger.
	maxPlaintext  = 64 * 1024
	maxCiphertext = 64*1024 + 1024
)

// Open opens the CryptoKey named by uri (see ParseURI). It makes no call;
// Probe checks the key.
func Open(ctx context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
	return open(ctx, uri, opts)
}

// open is Open with extra client options (tests).
func open(ctx context.Context, uri string, opts keyservice.Options, extra ...option.ClientOption) (*service, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	if opts.ClusterName == "" {
		return nil, errors.New("gcpkms needs a cluster name: the additional authenticated data binds wrapped keys to one cluster")
	}
	var copts []option.ClientOption
	switch {
	case u.Plaintext():
		copts = append(copts, option.WithEndpoint(u.Address()), option.WithoutAuthentication(),
			option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	case u.Endpoint != "":
		copts = append(copts, option.WithEndpoint(u.Endpoint))
	}
	client, err := kms.NewKeyManagementClient(ctx, append(copts, extra...)...)
	if err != nil {
		return nil, fmt.Errorf("KMS client: %w", err)
	}
	// One attempt per call: the hierarchy retries transient errors.
	client.CallOptions.Encrypt = []gax.CallOption{}
	client.CallOptions.Decrypt = []gax.CallOption{}
	client.CallOptions.GetCryptoKey = []gax.CallOption{}
	client.CallOptions.GetCryptoKeyVersion = []gax.CallOption{}
	log := opts.LoggerOrDiscard().With("backend", Scheme, "key", u.Key)
	log.Info("Cloud KMS key service opened", "endpoint", u.Endpoint)
	return &service{client: client, key: u.Key, aad: []byte(aadDomain + opts.ClusterName), log: log}, nil
}

type service struct {
	client *kms.KeyManagementClient
	key    string // CryptoKey resource name
	aad    []byte
	log    *slog.Logger
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func crc(b []byte) *wrapperspb.Int64Value {
	return wrapperspb.Int64(int64(crc32.Checksum(b, castagnoli)))
}

// keyID checks that version is a CryptoKeyVersion of this key.
func (s *service) keyID(version string) (string, error) {
	if key, ok := versionKey(version); !ok || key != s.key {
		return "", fmt.Errorf("KMS answered with %q, not a version of %s", version, s.key)
	}
	return version, nil
}

func (s *service) Wrap(ctx context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	if len(plaintext) == 0 || len(plaintext) > maxPlaintext {
		return keyservice.WrapResult{}, keyservice.Invalid("wrap", fmt.Errorf("plaintext is %d bytes, want 1 to %d", len(plaintext), maxPlaintext))
	}
	resp, err := s.client.Encrypt(ctx, &kmspb.EncryptRequest{
		Name: s.key, Plaintext: plaintext, PlaintextCrc32C: crc(plaintext),
		AdditionalAuthenticatedData: s.aad, AdditionalAuthenticatedDataCrc32C: crc(s.aad),
	})
	if err != nil {
		return keyservice.WrapResult{}, classify("wrap", fmt.Errorf("KMS Encrypt with %s: %w", s.key, err))
	}
	// Integrity checks Google recommends: the request arrived intact, and
	// so did the answer.
	if !resp.GetVerifiedPlaintextCrc32C() || !resp.GetVerifiedAdditionalAuthenticatedDataCrc32C() {
		return keyservice.WrapResult{}, keyservice.Transient("wrap", fmt.Errorf("KMS Encrypt with %s: request corrupted in transit (checksums not verified)", s.key))
	}
	if resp.GetCiphertextCrc32C().GetValue() != crc(resp.GetCiphertext()).GetValue() || len(resp.GetCiphertext()) == 0 {
		return keyservice.WrapResult{}, keyservice.Transient("wrap", fmt.Errorf("KMS Encrypt with %s: response corrupted in transit (ciphertext checksum)", s.key))
	}
	id, err := s.keyID(resp.GetName())
	if err != nil {
		return keyservice.WrapResult{}, fmt.Errorf("KMS Encrypt: %w", err)
	}
	return keyservice.WrapResult{Wrapped: resp.GetCiphertext(), KeyID: id}, nil
}

func (s *service) Unwrap(ctx context.Context, keyID string, wrapped []byte) ([]byte, error) {
	if _, err := s.keyID(keyID); err != nil {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("key ID %q is not a version of %s", keyID, s.key))
	}
	if len(wrapped) == 0 || len(wrapped) > maxCiphertext {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("wrapped key is %d bytes, want 1 to %d", len(wrapped), maxCiphertext))
	}
	// Decrypt takes the CryptoKey: Cloud KMS finds the version in the
	// ciphertext.
	resp, err := s.client.Decrypt(ctx, &kmspb.DecryptRequest{
		Name: s.key, Ciphertext: wrapped, CiphertextCrc32C: crc(wrapped),
		AdditionalAuthenticatedData: s.aad, AdditionalAuthenticatedDataCrc32C: crc(s.aad),
	})
	if err != nil {
		return nil, classify("unwrap", fmt.Errorf("KMS Decrypt with %s: %w", s.key, err))
	}
	if resp.GetPlaintextCrc32C().GetValue() != crc(resp.GetPlaintext()).GetValue() {
		return nil, keyservice.Transient("unwrap", fmt.Errorf("KMS Decrypt with %s: response corrupted in transit (plaintext checksum)", s.key))
	}
	return resp.GetPlaintext(), nil
}

// Probe reads the CryptoKey (GetCryptoKey: a free key-management call, no
// cryptographic operation) and returns its primary version.
func (s *service) Probe(ctx context.Context) (string, error) {
	ck, err := s.client.GetCryptoKey(ctx, &kmspb.GetCryptoKeyRequest{Name: s.key})
	if err != nil {
		return "", classify("probe", fmt.Errorf("KMS GetCryptoKey %s: %w", s.key, err))
	}
	if ck.GetPurpose() != kmspb.CryptoKey_ENCRYPT_DECRYPT {
		return "", keyservice.Invalid("probe", fmt.Errorf("KMS key %s has purpose %s, want ENCRYPT_DECRYPT", s.key, ck.GetPurpose()))
	}
	p := ck.GetPrimary()
	if p == nil {
		return "", keyservice.Revoked("probe", fmt.Errorf("KMS key %s has no primary version", s.key))
	}
	if err := versionState("probe", p); err != nil {
		return "", err
	}
	id, err := s.keyID(p.GetName())
	if err != nil {
		return "", fmt.Errorf("KMS GetCryptoKey: %w", err)
	}
	return id, nil
}

// CheckKeyID reads an older key version's state (GetCryptoKeyVersion, no
// cryptographic call): disabling or scheduling the destruction of the
// version that wrapped cached local KEKs drops them within the revocation
// bound (keyservice.VersionChecker).
func (s *service) CheckKeyID(ctx context.Context, keyID string) error {
	if _, err := s.keyID(keyID); err != nil {
		return keyservice.Invalid("check", err)
	}
	v, err := s.client.GetCryptoKeyVersion(ctx, &kmspb.GetCryptoKeyVersionRequest{Name: keyID})
	if err != nil {
		return classify("check", fmt.Errorf("KMS GetCryptoKeyVersion %s: %w", keyID, err))
	}
	return versionState("check", v)
}

// versionState classifies a CryptoKeyVersion's state.
func versionState(op string, v *kmspb.CryptoKeyVersion) error {
	switch st := v.GetState(); st {
	case kmspb.CryptoKeyVersion_ENABLED:
		return nil
	case kmspb.CryptoKeyVersion_DISABLED, kmspb.CryptoKeyVersion_DESTROY_SCHEDULED, kmspb.CryptoKeyVersion_DESTROYED,
		kmspb.CryptoKeyVersion_IMPORT_FAILED, kmspb.CryptoKeyVersion_GENERATION_FAILED,
		kmspb.CryptoKeyVersion_PENDING_EXTERNAL_DESTRUCTION, kmspb.CryptoKeyVersion_EXTERNAL_DESTRUCTION_FAILED:
		return keyservice.Revoked(op, fmt.Errorf("KMS key version %s is %s", v.GetName(), st))
	case kmspb.CryptoKeyVersion_PENDING_GENERATION, kmspb.CryptoKeyVersion_PENDING_IMPORT:
		return keyservice.Transient(op, fmt.Errorf("KMS key version %s is %s", v.GetName(), st))
	default:
		return fmt.Errorf("KMS key version %s is in unknown state %s", v.GetName(), st)
	}
}

// classify wraps err from a Cloud KMS call by its gRPC status code.
func classify(op string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return keyservice.Transient(op, err)
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted, codes.Internal, codes.Canceled:
		return keyservice.Transient(op, err)
	case codes.PermissionDenied, codes.NotFound, codes.FailedPrecondition:
		// IAM no longer grants the key, the key is gone, or the version
		// that made the ciphertext is disabled or destroyed.
		return keyservice.Revoked(op, err)
	case codes.InvalidArgument, codes.OutOfRange:
		// A tampered, foreign or mis-bound (other cluster) ciphertext.
		return keyservice.Invalid(op, err)
	}
	// Unauthenticated and the rest: credentials or configuration, not the
	// key; nothing is shredded.
	return err
}

func (s *service) Close() error { return s.client.Close() }
