// Package azurekv is a STAND-IN for Azure Key Vault and Managed HSM, for
// tests: neither can run here. It is the Azure SDK's own fake server
// (github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys/fake, an
// in-process transport that routes the official client's HTTP requests,
// challenge authentication included, to Go functions) with real
// cryptography behind those functions: RSA-2048 keys with RSA-OAEP-256
// (Key Vault) and AES-256 keys with AES key wrap, RFC 3394 (Managed HSM),
// one key per key version, and Key Vault's answers for disabled, expired and
// missing keys and bad ciphertexts. Not modelled: RBAC and access policies
// (Deny switches every call to 403), soft delete, the rest of the API.
package azurekv

import (
	"context"
	"crypto/aes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	azfake "github.com/Azure/azure-sdk-for-go/sdk/azcore/fake"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys/fake"
)

// Server is one stand-in vault (or Managed HSM pool).
type Server struct {
	// URL is the vault URL, e.g. https://kubekms-test.vault.azure.net.
	URL string
	hsm bool

	mu    sync.Mutex
	keys  map[string][]*version // by name, oldest first
	down  bool
	deny  bool
	calls map[string]int
}

type version struct {
	name  string
	id    string // 32 hex digits, as Key Vault's
	attrs azkeys.KeyAttributes
	rsa   *rsa.PrivateKey
	aes   []byte
}

// Start makes a vault (hsm=false: NAME.vault.azure.net, RSA keys) or a
// Managed HSM (hsm=true: NAME.managedhsm.azure.net, oct-HSM AES keys) with
// the named keys, each with one enabled version.
func Start(t testing.TB, hsm bool, keys ...string) *Server {
	t.Helper()
	s := &Server{URL: "https://kubekms-test.vault.azure.net", hsm: hsm, keys: map[string][]*version{}, calls: map[string]int{}}
	if hsm {
		s.URL = "https://kubekms-test.managedhsm.azure.net"
	}
	for _, k := range keys {
		if _, err := s.addVersion(k); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// Transport is the SDK's fake transport on this server: set it as
// ClientOptions.Transport.
func (s *Server) Transport() policy.Transporter { return fake.NewServerTransport(s.fake()) }

// Credential is a token credential for the fake (which checks none).
func Credential() azcore.TokenCredential { return &azfake.TokenCredential{} }

// AdminClient is the official client on this server, for the tests'
// administrative calls (rotation, disabling versions).
func (s *Server) AdminClient(t testing.TB) *azkeys.Client {
	t.Helper()
	c, err := azkeys.NewClient(s.URL, Credential(), &azkeys.ClientOptions{ClientOptions: azcore.ClientOptions{Transport: s.Transport()}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Stop makes the vault unreachable (connection refused); Start undoes it.
func (s *Server) Stop(testing.TB)  { s.set(&s.down, true) }
func (s *Server) Start(testing.TB) { s.set(&s.down, false) }

// Deny makes every call fail with 403 (the role assignment removed).
func (s *Server) Deny(deny bool) { s.set(&s.deny, deny) }

func (s *Server) set(f *bool, v bool) {
	s.mu.Lock()
	*f = v
	s.mu.Unlock()
}

// Calls returns how often op ("GetKey", "WrapKey", ...) was called.
func (s *Server) Calls(op string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[op]
}

// Latest returns the KID of a key's newest version.
func (s *Server) Latest(name string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	vs := s.keys[name]
	return s.kid(vs[len(vs)-1])
}

// Versions returns the KIDs of a key's versions, oldest first.
func (s *Server) Versions(name string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for _, v := range s.keys[name] {
		out = append(out, s.kid(v))
	}
	return out
}

func (s *Server) kid(v *version) string {
	return fmt.Sprintf("%s/keys/%s/%s", s.URL, v.name, v.id)
}

func (s *Server) addVersion(name string) (*version, error) {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	now := time.Now().UTC().Truncate(time.Second)
	v := &version{name: name, id: hex.EncodeToString(id), attrs: azkeys.KeyAttributes{Enabled: to.Ptr(true), Created: &now, Updated: &now}}
	if s.hsm {
		v.aes = make([]byte, 32)
		if _, err := rand.Read(v.aes); err != nil {
			return nil, err
		}
	} else {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return nil, err
		}
		v.rsa = k
	}
	s.mu.Lock()
	s.keys[name] = append(s.keys[name], v)
	s.mu.Unlock()
	return v, nil
}

// kvError is a Key Vault error answer (the fake carries status and code;
// the comment at each use gives Key Vault's message).
func kvError(status int, code string) azfake.ErrorResponder {
	var e azfake.ErrorResponder
	e.SetResponseError(status, code)
	return e
}

// enter counts the call and applies the outage and IAM switches.
func (s *Server) enter(op string) (azfake.ErrorResponder, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls[op]++
	var e azfake.ErrorResponder
	switch {
	case s.down:
		e.SetError(&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED})
		return e, false
	case s.deny:
		return kvError(http.StatusForbidden, "Forbidden") /* "Caller is not authorized to perform action on resource." */, false
	}
	return e, true
}

// find returns the named version (the newest for ""), or Key Vault's error.
func (s *Server) find(name, ver string) (*version, azfake.ErrorResponder, bool) {
	// The SDK fake's path pattern lets the key name take the "/" and the
	// version that follow it ("kek/", "kek/abc"): split them again.
	if n, v, ok := strings.Cut(name, "/"); ok {
		name = n
		if ver == "" {
			ver = v
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	vs := s.keys[name]
	if len(vs) == 0 {
		return nil, kvError(http.StatusNotFound, "KeyNotFound") /* "A key with (name/id) was not found in this key vault." */, false
	}
	if ver == "" {
		return vs[len(vs)-1], azfake.ErrorResponder{}, true
	}
	for _, v := range vs {
		if v.id == ver {
			return v, azfake.ErrorResponder{}, true
		}
	}
	return nil, kvError(http.StatusNotFound, "KeyNotFound") /* "A key with (name/id) was not found in this key vault." */, false
}

func (s *Server) bundle(v *version) azkeys.KeyBundle {
	s.mu.Lock()
	defer s.mu.Unlock()
	attrs := v.attrs
	kty := azkeys.KeyTypeRSA
	if s.hsm {
		kty = azkeys.KeyTypeOctHSM
	}
	jwk := &azkeys.JSONWebKey{KID: to.Ptr(azkeys.ID(s.kid(v))), Kty: &kty,
		KeyOps: to.SliceOfPtrs(azkeys.KeyOperationWrapKey, azkeys.KeyOperationUnwrapKey)}
	if v.rsa != nil {
		jwk.N = v.rsa.N.Bytes()
		jwk.E = exponentBytes(v.rsa.E)
	}
	return azkeys.KeyBundle{Attributes: &attrs, Key: jwk}
}

func exponentBytes(e int) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, uint32(e))
	for len(b) > 1 && b[0] == 0 {
		b = b[1:]
	}
	return b
}

// usable is Key Vault's refusal of a disabled, not yet valid or (for wrap)
// expired key version.
func (s *Server) usable(v *version, wrap bool) (azfake.ErrorResponder, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	switch {
	case v.attrs.Enabled == nil || !*v.attrs.Enabled:
		return kvError(http.StatusForbidden, "Forbidden") /* "Operation is not allowed on a disabled key." */, false
	case v.attrs.NotBefore != nil && now.Before(*v.attrs.NotBefore):
		return kvError(http.StatusForbidden, "Forbidden") /* "Operation is not allowed on a key that is not yet valid." */, false
	case wrap && v.attrs.Expires != nil && now.After(*v.attrs.Expires):
		return kvError(http.StatusForbidden, "Forbidden") /* "Operation wrapKey is not allowed on an expired key." */, false
	}
	return azfake.ErrorResponder{}, true
}

func (s *Server) fake() *fake.Server {
	return &fake.Server{
		GetKey: func(_ context.Context, name, ver string, _ *azkeys.GetKeyOptions) (resp azfake.Responder[azkeys.GetKeyResponse], e azfake.ErrorResponder) {
			if e, ok := s.enter("GetKey"); !ok {
				return resp, e
			}
			v, e, ok := s.find(name, ver)
			if !ok {
				return resp, e
			}
			resp.SetResponse(http.StatusOK, azkeys.GetKeyResponse{KeyBundle: s.bundle(v)}, nil)
			return resp, e
		},
		CreateKey: func(_ context.Context, name string, _ azkeys.CreateKeyParameters, _ *azkeys.CreateKeyOptions) (resp azfake.Responder[azkeys.CreateKeyResponse], e azfake.ErrorResponder) {
			if e, ok := s.enter("CreateKey"); !ok {
				return resp, e
			}
			name, _, _ = strings.Cut(name, "/")
			v, err := s.addVersion(name)
			if err != nil {
				e.SetError(err)
				return resp, e
			}
			resp.SetResponse(http.StatusOK, azkeys.CreateKeyResponse{KeyBundle: s.bundle(v)}, nil)
			return resp, e
		},
		RotateKey: func(_ context.Context, name string, _ *azkeys.RotateKeyOptions) (resp azfake.Responder[azkeys.RotateKeyResponse], e azfake.ErrorResponder) {
			if e, ok := s.enter("RotateKey"); !ok {
				return resp, e
			}
			if _, e, ok := s.find(name, ""); !ok {
				return resp, e
			}
			name, _, _ = strings.Cut(name, "/")
			v, err := s.addVersion(name)
			if err != nil {
				e.SetError(err)
				return resp, e
			}
			resp.SetResponse(http.StatusOK, azkeys.RotateKeyResponse{KeyBundle: s.bundle(v)}, nil)
			return resp, e
		},
		UpdateKey: func(_ context.Context, name, ver string, p azkeys.UpdateKeyParameters, _ *azkeys.UpdateKeyOptions) (resp azfake.Responder[azkeys.UpdateKeyResponse], e azfake.ErrorResponder) {
			if e, ok := s.enter("UpdateKey"); !ok {
				return resp, e
			}
			v, e, ok := s.find(name, ver)
			if !ok {
				return resp, e
			}
			if a := p.KeyAttributes; a != nil {
				s.mu.Lock()
				if a.Enabled != nil {
					v.attrs.Enabled = to.Ptr(*a.Enabled)
				}
				if a.Expires != nil {
					v.attrs.Expires = to.Ptr(*a.Expires)
				}
				if a.NotBefore != nil {
					v.attrs.NotBefore = to.Ptr(*a.NotBefore)
				}
				s.mu.Unlock()
			}
			resp.SetResponse(http.StatusOK, azkeys.UpdateKeyResponse{KeyBundle: s.bundle(v)}, nil)
			return resp, e
		},
		WrapKey: func(_ context.Context, name, ver string, p azkeys.KeyOperationParameters, _ *azkeys.WrapKeyOptions) (resp azfake.Responder[azkeys.WrapKeyResponse], e azfake.ErrorResponder) {
			if e, ok := s.enter("WrapKey"); !ok {
				return resp, e
			}
			v, e, ok := s.find(name, ver)
			if !ok {
				return resp, e
			}
			if e, ok := s.usable(v, true); !ok {
				return resp, e
			}
			out, err := s.wrap(v, p)
			if err != nil {
				return resp, kvError(http.StatusBadRequest, "BadParameter")
			}
			resp.SetResponse(http.StatusOK, azkeys.WrapKeyResponse{KeyOperationResult: azkeys.KeyOperationResult{
				KID: to.Ptr(azkeys.ID(s.kid(v))), Result: out}}, nil)
			return resp, e
		},
		UnwrapKey: func(_ context.Context, name, ver string, p azkeys.KeyOperationParameters, _ *azkeys.UnwrapKeyOptions) (resp azfake.Responder[azkeys.UnwrapKeyResponse], e azfake.ErrorResponder) {
			if e, ok := s.enter("UnwrapKey"); !ok {
				return resp, e
			}
			v, e, ok := s.find(name, ver)
			if !ok {
				return resp, e
			}
			if e, ok := s.usable(v, false); !ok { // unwrap is allowed after expiry
				return resp, e
			}
			out, err := s.unwrap(v, p)
			if err != nil {
				return resp, kvError(http.StatusBadRequest, "BadParameter")
			}
			resp.SetResponse(http.StatusOK, azkeys.UnwrapKeyResponse{KeyOperationResult: azkeys.KeyOperationResult{
				KID: to.Ptr(azkeys.ID(s.kid(v))), Result: out}}, nil)
			return resp, e
		},
	}
}

func (s *Server) wrap(v *version, p azkeys.KeyOperationParameters) ([]byte, error) {
	switch alg := deref(p.Algorithm); {
	case v.rsa != nil && alg == azkeys.EncryptionAlgorithmRSAOAEP256:
		return rsa.EncryptOAEP(sha256.New(), rand.Reader, &v.rsa.PublicKey, p.Value, nil)
	case v.aes != nil && alg == azkeys.EncryptionAlgorithmA256KW:
		return aesKeyWrap(v.aes, p.Value)
	default:
		return nil, fmt.Errorf("algorithm %q is not supported by this key", alg)
	}
}

func (s *Server) unwrap(v *version, p azkeys.KeyOperationParameters) ([]byte, error) {
	switch alg := deref(p.Algorithm); {
	case v.rsa != nil && alg == azkeys.EncryptionAlgorithmRSAOAEP256:
		return rsa.DecryptOAEP(sha256.New(), nil, v.rsa, p.Value, nil)
	case v.aes != nil && alg == azkeys.EncryptionAlgorithmA256KW:
		return aesKeyUnwrap(v.aes, p.Value)
	default:
		return nil, fmt.Errorf("algorithm %q is not supported by this key", alg)
	}
}

func deref(a *azkeys.EncryptionAlgorithm) azkeys.EncryptionAlgorithm {
	if a == nil {
		return ""
	}
	return *a
}

// AES key wrap (RFC 3394), as Managed HSM's A256KW.
var kwIV = []byte{0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6, 0xA6}

func aesKeyWrap(kek, plain []byte) ([]byte, error) {
	if len(plain)%8 != 0 || len(plain) < 16 {
		return nil, errors.New("key to wrap must be a multiple of 8 bytes, at least 16")
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	n := len(plain) / 8
	a := append([]byte(nil), kwIV...)
	r := append([]byte(nil), plain...)
	buf := make([]byte, 16)
	for j := 0; j < 6; j++ {
		for i := 0; i < n; i++ {
			copy(buf, a)
			copy(buf[8:], r[i*8:i*8+8])
			block.Encrypt(buf, buf)
			t := uint64(n*j + i + 1)
			binary.BigEndian.PutUint64(a, binary.BigEndian.Uint64(buf[:8])^t)
			copy(r[i*8:], buf[8:])
		}
	}
	return append(a, r...), nil
}

func aesKeyUnwrap(kek, wrapped []byte) ([]byte, error) {
	if len(wrapped)%8 != 0 || len(wrapped) < 24 {
		return nil, errors.New("wrapped key has a bad length")
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, err
	}
	n := len(wrapped)/8 - 1
	a := append([]byte(nil), wrapped[:8]...)
	r := append([]byte(nil), wrapped[8:]...)
	buf := make([]byte, 16)
	for j := 5; j >= 0; j-- {
		for i := n - 1; i >= 0; i-- {
			t := uint64(n*j + i + 1)
			binary.BigEndian.PutUint64(buf, binary.BigEndian.Uint64(a)^t)
			copy(buf[8:], r[i*8:i*8+8])
			block.Decrypt(buf, buf)
			copy(a, buf[:8])
			copy(r[i*8:], buf[8:])
		}
	}
	if subtle.ConstantTimeCompare(a, kwIV) != 1 {
		return nil, errors.New("unwrap failed: integrity check")
	}
	return r, nil
}
