// Package azurekv is the Azure Key Vault and Managed HSM key service: a key
// wraps the local KEKs with WrapKey/UnwrapKey, RSA-OAEP-256 for RSA keys
// (Key Vault) and A256KW (AES key wrap) for AES keys (Managed HSM).
//
// The key ID is the key version's KID URL that wrapped (WrapKey reports it),
// so a new key version (a rotation, by hand or by a rotation policy) is a new
// key ID. Credentials: Azure workload identity (AKS, a federated service
// account token) or a managed identity (VM, VMSS, Arc). The SDK's own
// retries are off: the hierarchy retries transient errors.
//
// Neither algorithm takes additional authenticated data, so the cluster
// binding is inside the wrapped value: the service wraps the local KEK
// followed by a 16-byte hash of the cluster name and checks it on unwrap.
package azurekv

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kubekms/kubekms/keyservice"
)

// Wrapped value layout: algorithm tag (1 byte) || WrapKey's result.
const (
	tagRSAOAEP256 byte = 1
	tagA256KW     byte = 2
	bindingSize        = 16
	maxPlaintext       = 128 // RSA-2048 OAEP-SHA256 takes 190 bytes; the binding needs 16
	maxWrapped         = 1 + 1024
)

// Open opens the key named by uri (see ParseURI). It makes no call; Probe
// checks the key.
func Open(ctx context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	cred, err := credential(u)
	if err != nil {
		return nil, err
	}
	return open(u, opts, cred, nil)
}

// credential builds the URI's credential.
func credential(u KeyURI) (azcore.TokenCredential, error) {
	kind := u.Credential
	if kind == "" {
		kind = CredentialManagedIdentity
		if os.Getenv("AZURE_FEDERATED_TOKEN_FILE") != "" {
			kind = CredentialWorkloadIdentity
		}
	}
	switch kind {
	case CredentialWorkloadIdentity:
		c, err := azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{ClientID: u.ClientID})
		if err != nil {
			return nil, fmt.Errorf("azure workload identity credential (needs AZURE_TENANT_ID, AZURE_CLIENT_ID or client-id=, AZURE_FEDERATED_TOKEN_FILE): %w", err)
		}
		return c, nil
	default:
		o := &azidentity.ManagedIdentityCredentialOptions{}
		if u.ClientID != "" {
			o.ID = azidentity.ClientID(u.ClientID)
		}
		c, err := azidentity.NewManagedIdentityCredential(o)
		if err != nil {
			return nil, fmt.Errorf("azure managed identity credential: %w", err)
		}
		return c, nil
	}
}

// OpenWith opens the key named by uri with the caller's credential and,
// when transport is set, HTTP transport (a proxy client, or the SDK's fake
// server in tests and benchmarks).
func OpenWith(uri string, opts keyservice.Options, cred azcore.TokenCredential, transport policy.Transporter) (keyservice.Service, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return open(u, opts, cred, transport)
}

// open builds the service; transport, when set, replaces the HTTP client.
func open(u KeyURI, opts keyservice.Options, cred azcore.TokenCredential, transport policy.Transporter) (*service, error) {
	if opts.ClusterName == "" {
		return nil, errors.New("azurekv needs a cluster name: it is bound into every wrapped key")
	}
	co := azcore.ClientOptions{Retry: policy.RetryOptions{MaxRetries: -1}} // one attempt: the hierarchy retries
	if transport != nil {
		co.Transport = transport
	}
	client, err := azkeys.NewClient(u.VaultURL, cred, &azkeys.ClientOptions{ClientOptions: co})
	if err != nil {
		return nil, fmt.Errorf("keyvault client: %w", err)
	}
	b := sha256.Sum256([]byte("kubekms.io/azurekv/v1\x00cluster\x00" + opts.ClusterName))
	log := opts.LoggerOrDiscard().With("backend", Scheme, "vault", u.VaultURL, "key", u.Name)
	log.Info("Azure Key Vault key service opened", "managed_hsm", u.HSM)
	return &service{client: client, u: u, binding: b[:bindingSize], log: log}, nil
}

type service struct {
	client  *azkeys.Client
	u       KeyURI
	binding []byte
	log     *slog.Logger

	mu  sync.Mutex
	alg azkeys.EncryptionAlgorithm // of the newest version, learned by Probe
}

func (s *service) Wrap(ctx context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	if len(plaintext) == 0 || len(plaintext) > maxPlaintext {
		return keyservice.WrapResult{}, keyservice.Invalid("wrap", fmt.Errorf("plaintext is %d bytes, want 1 to %d", len(plaintext), maxPlaintext))
	}
	alg, err := s.algorithm(ctx)
	if err != nil {
		return keyservice.WrapResult{}, err
	}
	if alg == azkeys.EncryptionAlgorithmA256KW && len(plaintext)%8 != 0 {
		return keyservice.WrapResult{}, keyservice.Invalid("wrap", fmt.Errorf("AES key wrap needs a multiple of 8 bytes, got %d", len(plaintext)))
	}
	resp, err := s.client.WrapKey(ctx, s.u.Name, "", azkeys.KeyOperationParameters{
		Algorithm: &alg, Value: append(bytes.Clone(plaintext), s.binding...),
	}, nil)
	if err != nil {
		return keyservice.WrapResult{}, classify("wrap", fmt.Errorf("keyvault WrapKey %s/keys/%s: %w", s.u.VaultURL, s.u.Name, err))
	}
	kid := ""
	if resp.KID != nil {
		kid = string(*resp.KID)
	}
	if _, ok := s.u.versionOf(kid); !ok {
		return keyservice.WrapResult{}, fmt.Errorf("keyvault WrapKey answered with key %q, not a version of %s/keys/%s", kid, s.u.VaultURL, s.u.Name)
	}
	if len(resp.Result) == 0 {
		return keyservice.WrapResult{}, fmt.Errorf("keyvault WrapKey %s returned no result", kid)
	}
	return keyservice.WrapResult{Wrapped: append([]byte{tagOf(alg)}, resp.Result...), KeyID: kid}, nil
}

func tagOf(alg azkeys.EncryptionAlgorithm) byte {
	if alg == azkeys.EncryptionAlgorithmA256KW {
		return tagA256KW
	}
	return tagRSAOAEP256
}

func (s *service) Unwrap(ctx context.Context, keyID string, wrapped []byte) ([]byte, error) {
	ver, ok := s.u.versionOf(keyID)
	if !ok {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("key ID %q is not a version of %s/keys/%s", keyID, s.u.VaultURL, s.u.Name))
	}
	if len(wrapped) < 2 || len(wrapped) > maxWrapped {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("wrapped key is %d bytes, want 2 to %d", len(wrapped), maxWrapped))
	}
	var alg azkeys.EncryptionAlgorithm
	switch wrapped[0] {
	case tagRSAOAEP256:
		alg = azkeys.EncryptionAlgorithmRSAOAEP256
	case tagA256KW:
		alg = azkeys.EncryptionAlgorithmA256KW
	default:
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("wrapped key has unknown algorithm tag %d", wrapped[0]))
	}
	resp, err := s.client.UnwrapKey(ctx, s.u.Name, ver, azkeys.KeyOperationParameters{Algorithm: &alg, Value: wrapped[1:]}, nil)
	if err != nil {
		return nil, classify("unwrap", fmt.Errorf("keyvault UnwrapKey %s: %w", keyID, err))
	}
	out := resp.Result
	if len(out) <= bindingSize || subtle.ConstantTimeCompare(out[len(out)-bindingSize:], s.binding) != 1 {
		clear(out)
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("keyvault UnwrapKey %s: the wrapped key belongs to another cluster (or was not made by kubekms)", keyID))
	}
	return out[:len(out)-bindingSize], nil
}

// Probe reads the newest key version (GetKey: a key read, no cryptographic
// operation) and returns its KID.
func (s *service) Probe(ctx context.Context) (string, error) {
	b, err := s.getKey(ctx, "probe", "")
	if err != nil {
		return "", err
	}
	if err := attributes("probe", b, true); err != nil {
		return "", err
	}
	alg, err := algorithmFor(b)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	s.alg = alg
	s.mu.Unlock()
	return string(*b.Key.KID), nil
}

// CheckKeyID reads an older key version (GetKey of that version, no
// cryptographic call): disabling it drops the cached local KEKs it wrapped
// within the revocation bound (keyservice.VersionChecker). An expired
// version is still usable: Key Vault allows unwrap after expiry (a rotation
// policy sets expiry on versions it replaces).
func (s *service) CheckKeyID(ctx context.Context, keyID string) error {
	ver, ok := s.u.versionOf(keyID)
	if !ok {
		return keyservice.Invalid("check", fmt.Errorf("key ID %q is not a version of %s/keys/%s", keyID, s.u.VaultURL, s.u.Name))
	}
	b, err := s.getKey(ctx, "check", ver)
	if err != nil {
		return err
	}
	return attributes("check", b, false)
}

func (s *service) getKey(ctx context.Context, op, ver string) (azkeys.KeyBundle, error) {
	resp, err := s.client.GetKey(ctx, s.u.Name, ver, nil)
	if err != nil {
		return azkeys.KeyBundle{}, classify(op, fmt.Errorf("keyvault GetKey %s/keys/%s/%s: %w", s.u.VaultURL, s.u.Name, ver, err))
	}
	b := resp.KeyBundle
	if b.Key == nil || b.Key.KID == nil {
		return azkeys.KeyBundle{}, fmt.Errorf("keyvault GetKey %s/keys/%s returned no key", s.u.VaultURL, s.u.Name)
	}
	if _, ok := s.u.versionOf(string(*b.Key.KID)); !ok {
		return azkeys.KeyBundle{}, fmt.Errorf("keyvault GetKey answered with key %q, not a version of %s/keys/%s", *b.Key.KID, s.u.VaultURL, s.u.Name)
	}
	return b, nil
}

// attributes classifies a key version's enabled, not-before and (for the
// version new keys are wrapped with) expiry attributes.
func attributes(op string, b azkeys.KeyBundle, current bool) error {
	kid := string(*b.Key.KID)
	a := b.Attributes
	if a == nil {
		return nil
	}
	now := time.Now()
	switch {
	case a.Enabled != nil && !*a.Enabled:
		return keyservice.Revoked(op, fmt.Errorf("key %s is disabled", kid))
	case a.NotBefore != nil && now.Before(*a.NotBefore):
		return keyservice.Transient(op, fmt.Errorf("key %s is not valid before %s", kid, a.NotBefore.UTC().Format(time.RFC3339)))
	case current && a.Expires != nil && now.After(*a.Expires):
		// Not revoked: what it wrapped still unwraps. New local KEKs need a
		// new key version.
		return fmt.Errorf("key %s expired at %s: create a new key version", kid, a.Expires.UTC().Format(time.RFC3339))
	}
	return nil
}

// algorithmFor is the wrap algorithm for a key's type and allowed operations.
func algorithmFor(b azkeys.KeyBundle) (azkeys.EncryptionAlgorithm, error) {
	kid := string(*b.Key.KID)
	for _, op := range []azkeys.KeyOperation{azkeys.KeyOperationWrapKey, azkeys.KeyOperationUnwrapKey} {
		if len(b.Key.KeyOps) > 0 && !slices.ContainsFunc(b.Key.KeyOps, func(o *azkeys.KeyOperation) bool { return o != nil && *o == op }) {
			return "", keyservice.Invalid("probe", fmt.Errorf("key %s does not allow %s", kid, op))
		}
	}
	if b.Key.Kty == nil {
		return "", fmt.Errorf("key %s has no key type", kid)
	}
	switch *b.Key.Kty {
	case azkeys.KeyTypeRSA, azkeys.KeyTypeRSAHSM:
		return azkeys.EncryptionAlgorithmRSAOAEP256, nil
	case azkeys.KeyTypeOct, azkeys.KeyTypeOctHSM:
		return azkeys.EncryptionAlgorithmA256KW, nil
	}
	return "", keyservice.Invalid("probe", fmt.Errorf("key %s has type %s, want RSA, RSA-HSM or oct-HSM", kid, *b.Key.Kty))
}

// algorithm returns the wrap algorithm, probing when none is known yet.
func (s *service) algorithm(ctx context.Context) (azkeys.EncryptionAlgorithm, error) {
	s.mu.Lock()
	alg := s.alg
	s.mu.Unlock()
	if alg != "" {
		return alg, nil
	}
	if _, err := s.Probe(ctx); err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.alg, nil
}

// classify wraps err from a Key Vault call by its HTTP status.
func classify(op string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return keyservice.Transient(op, err)
	}
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		switch st := re.StatusCode; {
		case st == http.StatusForbidden, st == http.StatusNotFound:
			// The role assignment or access policy no longer grants the key,
			// or the key (version) is disabled or gone.
			return keyservice.Revoked(op, err)
		case st == http.StatusBadRequest:
			// A tampered or foreign ciphertext ("BadParameter").
			return keyservice.Invalid(op, err)
		case st == http.StatusRequestTimeout, st == http.StatusTooManyRequests, st >= 500:
			return keyservice.Transient(op, err)
		}
		// 401 and the rest: credentials or configuration; nothing is shredded.
		return err
	}
	var netErr net.Error
	if errors.As(err, &netErr) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return keyservice.Transient(op, err)
	}
	return err
}

// Close: the client holds no connections of its own beyond the shared HTTP
// transport.
func (s *service) Close() error { return nil }
