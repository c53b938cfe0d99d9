// Package awskms is the AWS KMS key service: a symmetric KMS key (by ARN or
// alias) wraps the local KEKs, bound to one cluster by an encryption context.
//
// Credentials come from the AWS SDK's default chain (environment, shared
// config, web identity / IRSA, container and instance roles). The SDK's own
// retries are turned off: every call is one attempt and the hierarchy retries
// transient errors with its backoff, so retries never double up.
package awskms

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/kubekms/kubekms/keyservice"
)

// Encryption-context keys. KMS checks the context on Decrypt, so a wrapped
// KEK from one cluster does not unwrap in another.
const (
	ContextCluster = "kubekms.io/cluster"
	ContextPurpose = "kubekms.io/purpose"
	purposeKEK     = "local-kek"
)

const (
	// suffixSep joins the key ARN and the suffix in a key ID; it cannot occur
	// in a key ARN or a suffix.
	suffixSep = "#"
	// Limits of the KMS API and of the KMS v2 key ID.
	maxPlaintext  = 4096
	maxCiphertext = 6144
	maxKeyID      = 1024
)

var keyARNRE = regexp.MustCompile(`^arn:aws(-[a-z]+)*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$`)

// Open opens the AWS KMS key named by uri (see ParseURI). It makes no KMS
// call; Probe checks the key.
func Open(ctx context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
	return open(ctx, uri, opts)
}

// open is Open with extra SDK load options (the tests pass an HTTP client
// that reaches local-kms in its network namespace).
func open(ctx context.Context, uri string, opts keyservice.Options, extra ...func(*config.LoadOptions) error) (*service, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	if opts.ClusterName == "" {
		return nil, errors.New("awskms needs a cluster name: the KMS encryption context binds wrapped keys to one cluster")
	}
	suffix := u.KeyIDSuffix
	if opts.KeyIDSuffix != "" {
		if err := CheckKeyIDSuffix(opts.KeyIDSuffix); err != nil {
			return nil, err
		}
		if suffix != "" && suffix != opts.KeyIDSuffix {
			return nil, fmt.Errorf("key ID suffix %q in the key URI differs from the configured %q", suffix, opts.KeyIDSuffix)
		}
		suffix = opts.KeyIDSuffix
	}
	load := []func(*config.LoadOptions) error{}
	if u.Region != "" {
		load = append(load, config.WithRegion(u.Region))
	}
	cfg, err := config.LoadDefaultConfig(ctx, append(load, extra...)...)
	if err != nil {
		return nil, fmt.Errorf("load AWS SDK config: %w", err)
	}
	if cfg.Region == "" {
		return nil, fmt.Errorf("no AWS region for %s: use a key ARN, the region= option or AWS_REGION", u.Key)
	}
	client := kms.NewFromConfig(cfg, func(o *kms.Options) {
		if u.Endpoint != "" {
			o.BaseEndpoint = aws.String(u.Endpoint)
		}
		// One attempt per call: the hierarchy retries transient errors.
		o.RetryMaxAttempts = 1
	})
	log := opts.LoggerOrDiscard().With("backend", Scheme, "key", u.Key)
	log.Info("AWS KMS key service opened", "region", cfg.Region, "endpoint", u.Endpoint, "keyIDSuffix", suffix)
	return &service{
		client: client,
		http:   cfg.HTTPClient,
		key:    u.Key,
		suffix: suffix,
		encCtx: map[string]string{ContextCluster: opts.ClusterName, ContextPurpose: purposeKEK},
		log:    log,
	}, nil
}

type service struct {
	client *kms.Client
	http   aws.HTTPClient
	key    string // as in the URI: key ARN, alias ARN or alias/NAME
	suffix string
	encCtx map[string]string
	log    *slog.Logger
}

// keyID returns the key ID for a key ARN.
func (s *service) keyID(keyARN string) (string, error) {
	if !keyARNRE.MatchString(keyARN) {
		return "", fmt.Errorf("KMS returned key %q, want a key ARN", keyARN)
	}
	id := keyARN
	if s.suffix != "" {
		id += suffixSep + s.suffix
	}
	if len(id) > maxKeyID {
		return "", fmt.Errorf("key ID is %d bytes, the limit is %d (shorten the key ID suffix)", len(id), maxKeyID)
	}
	return id, nil
}

// keyARN returns the key ARN in a key ID that Wrap or Probe returned, with
// any suffix, also one that has since been changed.
// A key ID that is not one (a forged key_id) is refused here, without a
// KMS call.
func keyARN(keyID string) (string, error) {
	arn, _, _ := strings.Cut(keyID, suffixSep)
	_, id, _ := strings.Cut(arn, ":key/")
	if !keyARNRE.MatchString(arn) || !keyIDRE.MatchString(id) {
		return "", fmt.Errorf("key ID %q is not a KMS key ARN with an optional %q suffix", keyID, suffixSep)
	}
	return arn, nil
}

func (s *service) Wrap(ctx context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	if len(plaintext) == 0 || len(plaintext) > maxPlaintext {
		return keyservice.WrapResult{}, keyservice.Invalid("wrap", fmt.Errorf("plaintext is %d bytes, want 1 to %d", len(plaintext), maxPlaintext))
	}
	out, err := s.client.Encrypt(ctx, &kms.EncryptInput{
		KeyId:             aws.String(s.key),
		Plaintext:         plaintext,
		EncryptionContext: s.encCtx,
	})
	if err != nil {
		return keyservice.WrapResult{}, classify("wrap", fmt.Errorf("KMS Encrypt with %s: %w", s.key, err))
	}
	id, err := s.keyID(aws.ToString(out.KeyId))
	if err != nil {
		return keyservice.WrapResult{}, fmt.Errorf("KMS Encrypt with %s: %w", s.key, err)
	}
	if len(out.CiphertextBlob) == 0 {
		return keyservice.WrapResult{}, fmt.Errorf("KMS Encrypt with %s returned no ciphertext", s.key)
	}
	return keyservice.WrapResult{Wrapped: out.CiphertextBlob, KeyID: id}, nil
}

func (s *service) Unwrap(ctx context.Context, keyID string, wrapped []byte) ([]byte, error) {
	arn, err := keyARN(keyID)
	if err != nil {
		return nil, keyservice.Invalid("unwrap", err)
	}
	if len(wrapped) == 0 || len(wrapped) > maxCiphertext {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("wrapped key is %d bytes, want 1 to %d", len(wrapped), maxCiphertext))
	}
	out, err := s.client.Decrypt(ctx, &kms.DecryptInput{
		CiphertextBlob:      wrapped,
		KeyId:               aws.String(arn),
		EncryptionContext:   s.encCtx,
		EncryptionAlgorithm: types.EncryptionAlgorithmSpecSymmetricDefault,
	})
	if err != nil {
		return nil, classify("unwrap", fmt.Errorf("KMS Decrypt with %s: %w", arn, err))
	}
	if got := aws.ToString(out.KeyId); got != "" && got != arn {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("KMS Decrypt used key %s, want %s", got, arn))
	}
	return out.Plaintext, nil
}

func (s *service) Probe(ctx context.Context) (string, error) {
	arn, err := s.describe(ctx, "probe", s.key)
	if err != nil {
		return "", err
	}
	id, err := s.keyID(arn)
	if err != nil {
		return "", fmt.Errorf("KMS DescribeKey %s: %w", s.key, err)
	}
	return id, nil
}

// CheckKeyID describes the key behind an older key ID (DescribeKey, no paid
// crypto call): after "point the alias at a new key", disabling or
// scheduling the deletion of the old key then cuts access to the data it
// protected within the plugin's revocation bound (keyservice.VersionChecker).
func (s *service) CheckKeyID(ctx context.Context, keyID string) error {
	arn, err := keyARN(keyID)
	if err != nil {
		return keyservice.Invalid("check", err)
	}
	_, err = s.describe(ctx, "check", arn)
	return err
}

// describe returns the ARN of key if the key is usable for encryption,
// or a classified error saying why not.
func (s *service) describe(ctx context.Context, op, key string) (string, error) {
	out, err := s.client.DescribeKey(ctx, &kms.DescribeKeyInput{KeyId: aws.String(key)})
	if err != nil {
		return "", classify(op, fmt.Errorf("KMS DescribeKey %s: %w", key, err))
	}
	md := out.KeyMetadata
	if md == nil {
		return "", fmt.Errorf("KMS DescribeKey %s returned no key metadata", key)
	}
	arn := aws.ToString(md.Arn)
	switch md.KeyState {
	case types.KeyStateEnabled:
	case types.KeyStateDisabled, types.KeyStatePendingDeletion, types.KeyStatePendingImport,
		types.KeyStatePendingReplicaDeletion, types.KeyStateUnavailable:
		return "", keyservice.Revoked(op, fmt.Errorf("KMS key %s is %s", arn, md.KeyState))
	case types.KeyStateCreating, types.KeyStateUpdating:
		return "", keyservice.Transient(op, fmt.Errorf("KMS key %s is %s", arn, md.KeyState))
	default:
		return "", fmt.Errorf("KMS key %s is in unknown state %q", arn, md.KeyState)
	}
	if md.KeyUsage != "" && md.KeyUsage != types.KeyUsageTypeEncryptDecrypt {
		return "", keyservice.Invalid(op, fmt.Errorf("KMS key %s has key usage %s, want %s", arn, md.KeyUsage, types.KeyUsageTypeEncryptDecrypt))
	}
	if md.KeySpec != "" && md.KeySpec != types.KeySpecSymmetricDefault {
		return "", keyservice.Invalid(op, fmt.Errorf("KMS key %s has key spec %s, want %s", arn, md.KeySpec, types.KeySpecSymmetricDefault))
	}
	return arn, nil
}

// Close drops idle connections; the client holds nothing else.
func (s *service) Close() error {
	if c, ok := s.http.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
	return nil
}
