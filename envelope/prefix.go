// Package envelope reads and writes the values kube-apiserver stores in etcd
// under encryption at rest, byte for byte as k8s.io/apiserver v0.37 does:
// "k8s:enc:kms:v2:<provider>:" followed by a protobuf EncryptedObject
// (k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2). It also
// recognises, without decrypting, the other providers' prefixes and
// unencrypted (identity) values.
package envelope

import (
	"bytes"
	"errors"
	"fmt"
)

// Kind is the provider family that wrote a stored value.
type Kind int

const (
	// KindIdentity is an unencrypted value (no "k8s:enc:" prefix).
	KindIdentity Kind = iota
	// KindKMSv2 is "k8s:enc:kms:v2:<provider>:".
	KindKMSv2
	// KindKMSv1 is "k8s:enc:kms:v1:<provider>:" (deprecated, not decrypted here).
	KindKMSv1
	// KindAESCBC is "k8s:enc:aescbc:v1:<key>:".
	KindAESCBC
	// KindAESGCM is "k8s:enc:aesgcm:v1:<key>:".
	KindAESGCM
	// KindSecretbox is "k8s:enc:secretbox:v1:<key>:".
	KindSecretbox
)

// String returns the name used in reports: identity, kms-v2, kms-v1, aescbc, aesgcm, secretbox.
func (k Kind) String() string {
	switch k {
	case KindIdentity:
		return "identity"
	case KindKMSv2:
		return "kms-v2"
	case KindKMSv1:
		return "kms-v1"
	case KindAESCBC:
		return "aescbc"
	case KindAESGCM:
		return "aesgcm"
	case KindSecretbox:
		return "secretbox"
	default:
		return fmt.Sprintf("kind(%d)", int(k))
	}
}

// Encrypted reports whether values of this kind are encrypted.
func (k Kind) Encrypted() bool { return k != KindIdentity }

const (
	encryptedPrefix = "k8s:enc:"
	// PrefixKMSv2 starts every KMS v2 value; the provider name and ":" follow.
	PrefixKMSv2     = "k8s:enc:kms:v2:"
	prefixKMSv1     = "k8s:enc:kms:v1:"
	prefixAESCBC    = "k8s:enc:aescbc:v1:"
	prefixAESGCM    = "k8s:enc:aesgcm:v1:"
	prefixSecretbox = "k8s:enc:secretbox:v1:"
)

var knownPrefixes = []struct {
	prefix string
	kind   Kind
}{
	{PrefixKMSv2, KindKMSv2},
	{prefixKMSv1, KindKMSv1},
	{prefixAESCBC, KindAESCBC},
	{prefixAESGCM, KindAESGCM},
	{prefixSecretbox, KindSecretbox},
}

// Errors that classify why a value could not be read. Every error this
// package returns for a bad value wraps exactly one of them.
var (
	// ErrMalformed: the value is not a well-formed envelope (truncated,
	// bad protobuf, a field out of the apiserver's limits).
	ErrMalformed = errors.New("malformed envelope")
	// ErrUnknownProvider: an encrypted value whose provider this package
	// cannot decrypt (kms v1, aescbc, aesgcm, secretbox, or an unknown "k8s:enc:" prefix).
	ErrUnknownProvider = errors.New("unsupported provider")
	// ErrKeyUnavailable: the key service did not decrypt the stored DEK seed
	// (missing key version, revoked key, unreachable plugin).
	ErrKeyUnavailable = errors.New("key service could not decrypt the DEK seed")
	// ErrTampered: AES-GCM authentication failed: the ciphertext, or the etcd key
	// used as additional data, is not what was encrypted.
	ErrTampered = errors.New("authentication failed (tampered value or wrong etcd key)")
)

// splitPrefix returns the kind, the provider or key name, and the payload
// after the prefix. Names end at the first ':' (KMS v2 names may not contain
// one; for the other providers the first ':' is the best guess).
func splitPrefix(value []byte) (Kind, []byte, []byte, error) {
	if !bytes.HasPrefix(value, []byte(encryptedPrefix)) {
		return KindIdentity, nil, value, nil
	}
	for _, p := range knownPrefixes {
		if !bytes.HasPrefix(value, []byte(p.prefix)) {
			continue
		}
		rest := value[len(p.prefix):]
		i := bytes.IndexByte(rest, ':')
		if i < 0 {
			return p.kind, nil, nil, fmt.Errorf("%w: %s value has no provider name terminated by ':'", ErrMalformed, p.kind)
		}
		if i == 0 {
			return p.kind, nil, nil, fmt.Errorf("%w: %s value has an empty provider name", ErrMalformed, p.kind)
		}
		return p.kind, rest[:i], rest[i+1:], nil
	}
	end := min(len(value), 32)
	return KindIdentity, nil, nil, fmt.Errorf("%w: unknown prefix %q", ErrUnknownProvider, printable(value[:end]))
}

// printable keeps a prefix readable in an error without echoing binary data.
func printable(b []byte) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			break
		}
		out = append(out, c)
	}
	return string(out)
}
