// Package vault is the keyservice backend for the HashiCorp Vault Transit
// secrets engine (and OpenBao, which serves the same API).
//
// Wrap is a transit encrypt, Unwrap a transit decrypt, Probe a key read (no
// crypto). Key IDs read "vault:[<namespace>/]<mount>/<name>:v<version>:<unix
// creation time of that version>": the version is the one the encrypt call
// itself reported, and the creation time (from the key read, cached) makes a
// deleted and re-created key yield new IDs.
package vault

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kubekms/kubekms/keyservice"
)

// Service is a Vault Transit key. It is safe for concurrent use.
type Service struct {
	cfg    Config
	client *api.Client
	idle   func() // closes the transport's idle connections
	sess   *session
	log    *slog.Logger

	stop context.CancelFunc
	done chan struct{}
	once sync.Once

	mu       sync.Mutex
	versions map[int]int64 // version -> creation (unix seconds) from the last key read
}

var (
	_ keyservice.Service        = (*Service)(nil)
	_ keyservice.VersionChecker = (*Service)(nil)
)

// Open opens the key a Vault Transit key URI names (see ParseURI).
func Open(ctx context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
	cfg, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	return New(ctx, cfg, opts)
}

// New opens the key cfg names. It checks the configuration and starts token
// upkeep; it does not wait for the server, so a plugin can start while Vault
// is down (the first request then logs in).
func New(ctx context.Context, cfg Config, opts keyservice.Options) (*Service, error) {
	// Refuse credential files others could read or replace before anything
	// is read from them; they are checked again at every read.
	for _, f := range []struct {
		what, path string
		kind       fileKind
	}{
		{"token-file", cfg.TokenFile, secretFile}, {"role-id-file", cfg.RoleIDFile, publicFile},
		{"secret-id-file", cfg.SecretIDFile, secretFile}, {"jwt-file", cfg.JWTFile, publicFile},
		{"cert-file", cfg.CertFile, publicFile}, {"key-file", cfg.KeyFile, secretFile},
		{"ca-file", cfg.CAFile, publicFile},
	} {
		if f.path == "" {
			continue
		}
		if err := checkFile(f.what, f.path, f.kind); err != nil {
			return nil, err
		}
	}
	var cert *clientCert
	if cfg.Auth == AuthCert {
		cert = &clientCert{certFile: cfg.CertFile, keyFile: cfg.KeyFile}
		if err := cert.load(); err != nil {
			return nil, err
		}
	}
	client, transport, err := newClient(cfg, cert, false)
	if err != nil {
		return nil, err
	}
	var certClient *api.Client
	if cert != nil {
		if certClient, _, err = newClient(cfg, cert, true); err != nil {
			return nil, err
		}
	}
	log := opts.LoggerOrDiscard().With("keyservice", "vault", "key", cfg.KeyPath())
	runCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	s := &Service{
		cfg:    cfg,
		client: client,
		idle:   transport.CloseIdleConnections,
		sess:   newSession(client, certClient, cert, cfg, log),
		log:    log,
		stop:   stop,
		done:   make(chan struct{}),
	}
	go func() {
		defer close(s.done)
		s.sess.run(runCtx)
	}()
	return s, nil
}

// newClient builds an API client from cfg alone: the client's defaults read
// VAULT_* variables (VAULT_SKIP_VERIFY among them), which must not silently
// change a key service's TLS or token. With cert set, the client presents
// that certificate when the server asks for one; fresh opens a new
// connection for every request (the cert-auth login client).
func newClient(cfg Config, cert *clientCert, fresh bool) (*api.Client, *http.Transport, error) {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	transport.DisableKeepAlives = fresh
	if cert != nil {
		transport.TLSClientConfig.GetClientCertificate = cert.get
	}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, nil, fmt.Errorf("vault ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, nil, fmt.Errorf("vault ca-file %s: no PEM certificates found", cfg.CAFile)
		}
		transport.TLSClientConfig.RootCAs = pool
	}
	conf := &api.Config{
		Address: cfg.Address,
		HttpClient: &http.Client{
			Transport: transport,
			// The client follows Vault's standby redirects itself.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		Timeout: 30 * time.Second,
		// One HTTP attempt per call: the hierarchy retries transient errors
		// with its own backoff within the caller's deadline, and Status
		// must learn of an outage within its budget.
		MaxRetries: 0,
	}
	client, err := api.NewClient(conf)
	if err != nil {
		return nil, nil, fmt.Errorf("vault client: %w", err)
	}
	client.ClearToken()
	client.ClearNamespace()
	if cfg.Namespace != "" {
		client.SetNamespace(cfg.Namespace)
	}
	return client, transport, nil
}

// TokenTTL is the remaining lifetime of the Vault token in use (for a
// metric): 0 when there is none or it ran out, TTLNever when it does not
// expire.
func (s *Service) TokenTTL() time.Duration { return s.sess.TokenTTL() }

// Close stops token upkeep. It does not revoke the token: a token file may
// be shared, and a login token simply expires.
func (s *Service) Close() error {
	s.once.Do(func() {
		s.stop()
		<-s.done
		s.idle()
	})
	return nil
}

// call runs one request with a token, logging in again once when the server
// says the token itself is no longer valid.
func (s *Service) call(ctx context.Context, op string, req func(context.Context) (*api.Secret, error)) (*api.Secret, error) {
	if err := s.sess.ensure(ctx); err != nil {
		return nil, classify(op, err)
	}
	sec, err := req(ctx)
	if isStatus(err, http.StatusForbidden) {
		retry, rerr := s.sess.reauth(ctx)
		if rerr != nil {
			return nil, classify(op, rerr)
		}
		if retry {
			sec, err = req(ctx)
		}
	}
	if err != nil {
		return nil, classify(op, err)
	}
	return sec, nil
}

func (s *Service) keyPath(action string) string {
	if action == "keys" {
		return s.cfg.Mount + "/keys/" + s.cfg.Key
	}
	return s.cfg.Mount + "/" + action + "/" + s.cfg.Key
}

// keyInfo is what Probe and the key-ID check need from a key read.
type keyInfo struct {
	latest        int
	minDecryption int           // min_decryption_version (at least 1)
	versions      map[int]int64 // the versions that can decrypt, by creation time
}

// readKey reads the transit key and refreshes the version cache.
func (s *Service) readKey(ctx context.Context, op string) (keyInfo, error) {
	sec, err := s.call(ctx, op, func(ctx context.Context) (*api.Secret, error) {
		return s.client.Logical().ReadWithContext(ctx, s.keyPath("keys"))
	})
	if err != nil {
		return keyInfo{}, err
	}
	if sec == nil || sec.Data == nil {
		return keyInfo{}, keyservice.Revoked(op, fmt.Errorf("transit key %s not found", s.cfg.KeyPath()))
	}
	info, err := parseKeyInfo(sec.Data)
	if err != nil {
		return keyInfo{}, fmt.Errorf("key service %s: transit key %s: %w", op, s.cfg.KeyPath(), err)
	}
	s.mu.Lock()
	s.versions = info.versions
	s.mu.Unlock()
	return info, nil
}

func parseKeyInfo(data map[string]any) (keyInfo, error) {
	latest, err := jsonInt(data["latest_version"])
	if err != nil || latest < 1 {
		return keyInfo{}, fmt.Errorf("key read has no valid latest_version (%v)", data["latest_version"])
	}
	raw, ok := data["keys"].(map[string]any)
	if !ok {
		return keyInfo{}, errors.New("key read has no keys map")
	}
	info := keyInfo{latest: latest, minDecryption: 1, versions: make(map[int]int64, len(raw))}
	if v, ok := data["min_decryption_version"]; ok {
		if info.minDecryption, err = jsonInt(v); err != nil || info.minDecryption < 1 || info.minDecryption > latest {
			return keyInfo{}, fmt.Errorf("key read has an invalid min_decryption_version (%v)", v)
		}
	}
	for k, v := range raw {
		ver, err := strconv.Atoi(k)
		if err != nil || ver < 1 {
			return keyInfo{}, fmt.Errorf("key read has version %q", k)
		}
		created, err := creationTime(v)
		if err != nil {
			return keyInfo{}, fmt.Errorf("key version %d: %w", ver, err)
		}
		// Vault archives the versions below min_decryption_version and no
		// longer lists them; drop any that a server still lists.
		if ver >= info.minDecryption {
			info.versions[ver] = created
		}
	}
	if _, ok := info.versions[latest]; !ok {
		return keyInfo{}, fmt.Errorf("key read lists no version %d (the latest)", latest)
	}
	return info, nil
}

// creationTime reads a version's creation time: symmetric keys list unix
// seconds, asymmetric keys an object with an RFC 3339 creation_time.
func creationTime(v any) (int64, error) {
	if m, ok := v.(map[string]any); ok {
		s, _ := m["creation_time"].(string)
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return 0, fmt.Errorf("creation_time %q: %w", s, err)
		}
		return t.Unix(), nil
	}
	n, err := jsonInt(v)
	return int64(n), err
}

func jsonInt(v any) (int, error) {
	switch n := v.(type) {
	case json.Number:
		i, err := n.Int64()
		return int(i), err
	case float64:
		return int(n), nil
	case int:
		return n, nil
	}
	return 0, fmt.Errorf("not a number: %v", v)
}

func (s *Service) keyID(version int, created int64) string {
	return fmt.Sprintf("vault:%s:v%d:%d", s.cfg.KeyPath(), version, created)
}

// parseKeyID splits a key ID made by keyID.
func parseKeyID(id string) (path string, version int, created int64, err error) {
	rest, ok := strings.CutPrefix(id, "vault:")
	parts := strings.Split(rest, ":")
	if !ok || len(parts) != 3 || !strings.HasPrefix(parts[1], "v") {
		return "", 0, 0, fmt.Errorf("key ID %q is not a vault transit key ID", id)
	}
	version, err1 := strconv.Atoi(parts[1][1:])
	created, err2 := strconv.ParseInt(parts[2], 10, 64)
	if err1 != nil || err2 != nil || version < 1 {
		return "", 0, 0, fmt.Errorf("key ID %q is not a vault transit key ID", id)
	}
	return parts[0], version, created, nil
}

// created returns the creation time of version, reading the key when the
// cache does not know it (a rotation, or a key re-created under the name).
func (s *Service) created(ctx context.Context, op string, version int, want int64) (int64, bool, error) {
	s.mu.Lock()
	c, ok := s.versions[version]
	s.mu.Unlock()
	if ok && (want == 0 || c == want) {
		return c, true, nil
	}
	info, err := s.readKey(ctx, op)
	if err != nil {
		return 0, false, err
	}
	c, ok = info.versions[version]
	return c, ok, nil
}

// CheckKeyID says whether the version behind an older key ID can still
// decrypt (keyservice.VersionChecker), from a key read (no crypto): revoked
// when the key is gone or re-created, when the version is below
// min_decryption_version, or when the policy no longer grants the key read.
// Raising min_decryption_version thus cuts access to the data the older
// versions protected within the plugin's revocation bound.
func (s *Service) CheckKeyID(ctx context.Context, keyID string) error {
	const op = "check"
	path, version, created, err := parseKeyID(keyID)
	if err != nil {
		return keyservice.Invalid(op, err)
	}
	if path != s.cfg.KeyPath() {
		return keyservice.Invalid(op, fmt.Errorf("key ID %q belongs to another key than %s", keyID, s.cfg.KeyPath()))
	}
	info, err := s.readKey(ctx, op)
	if err != nil {
		return err
	}
	if version < info.minDecryption {
		return keyservice.Revoked(op, fmt.Errorf("transit key %s: version %d of key ID %q is below min_decryption_version %d", s.cfg.KeyPath(), version, keyID, info.minDecryption))
	}
	if have, ok := info.versions[version]; !ok || have != created {
		return keyservice.Revoked(op, fmt.Errorf("transit key %s no longer has the version of key ID %q (deleted or re-created)", s.cfg.KeyPath(), keyID))
	}
	return nil
}

// Probe reads the key (no crypto) and returns the current key ID, so a
// rotation in Vault shows up as a new key ID without a restart.
func (s *Service) Probe(ctx context.Context) (string, error) {
	info, err := s.readKey(ctx, "probe")
	if err != nil {
		return "", err
	}
	return s.keyID(info.latest, info.versions[info.latest]), nil
}

// Wrap encrypts plaintext with the key's current version.
func (s *Service) Wrap(ctx context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	const op = "wrap"
	if len(plaintext) == 0 {
		return keyservice.WrapResult{}, keyservice.Invalid(op, errors.New("empty plaintext"))
	}
	body := map[string]any{"plaintext": base64.StdEncoding.EncodeToString(plaintext)}
	sec, err := s.call(ctx, op, func(ctx context.Context) (*api.Secret, error) {
		return s.client.Logical().WriteWithContext(ctx, s.keyPath("encrypt"), body)
	})
	if err != nil {
		return keyservice.WrapResult{}, err
	}
	if sec == nil || sec.Data == nil {
		return keyservice.WrapResult{}, fmt.Errorf("key service %s: transit encrypt returned no data", op)
	}
	ct, _ := sec.Data["ciphertext"].(string)
	version, err := ciphertextVersion(ct)
	if err != nil {
		return keyservice.WrapResult{}, fmt.Errorf("key service %s: transit encrypt: %w", op, err)
	}
	if kv, ok := sec.Data["key_version"]; ok {
		if n, err := jsonInt(kv); err != nil || n != version {
			return keyservice.WrapResult{}, fmt.Errorf("key service %s: transit encrypt: key_version %v disagrees with the ciphertext's v%d", op, kv, version)
		}
	}
	created, ok, err := s.created(ctx, op, version, 0)
	if err != nil {
		return keyservice.WrapResult{}, err
	}
	if !ok {
		return keyservice.WrapResult{}, keyservice.Revoked(op, fmt.Errorf("transit key %s has no version %d after encrypting with it", s.cfg.KeyPath(), version))
	}
	return keyservice.WrapResult{Wrapped: []byte(ct), KeyID: s.keyID(version, created)}, nil
}

// ciphertextVersion parses N from "vault:vN:...".
func ciphertextVersion(ct string) (int, error) {
	rest, ok := strings.CutPrefix(ct, "vault:v")
	num, _, ok2 := strings.Cut(rest, ":")
	v, err := strconv.Atoi(num)
	if !ok || !ok2 || err != nil || v < 1 {
		return 0, errors.New("ciphertext lacks the vault:v<N>: prefix")
	}
	return v, nil
}

// Unwrap decrypts wrapped, which Wrap returned with keyID.
func (s *Service) Unwrap(ctx context.Context, keyID string, wrapped []byte) ([]byte, error) {
	const op = "unwrap"
	path, version, created, err := parseKeyID(keyID)
	if err != nil {
		return nil, keyservice.Invalid(op, err)
	}
	if path != s.cfg.KeyPath() {
		return nil, keyservice.Invalid(op, fmt.Errorf("key ID %q belongs to another key than %s", keyID, s.cfg.KeyPath()))
	}
	ct := string(wrapped)
	if v, err := ciphertextVersion(ct); err != nil || v != version {
		return nil, keyservice.Invalid(op, fmt.Errorf("wrapped value is not a v%d transit ciphertext", version))
	}
	// The version must still be the one that wrapped: a key deleted and
	// re-created under the same name has the same version numbers.
	have, ok, err := s.created(ctx, op, version, created)
	if err != nil {
		return nil, err
	}
	if !ok || have != created {
		return nil, keyservice.Revoked(op, fmt.Errorf("transit key %s no longer has the version of key ID %q (deleted, re-created or below min_decryption_version)", s.cfg.KeyPath(), keyID))
	}
	body := map[string]any{"ciphertext": ct}
	sec, err := s.call(ctx, op, func(ctx context.Context) (*api.Secret, error) {
		return s.client.Logical().WriteWithContext(ctx, s.keyPath("decrypt"), body)
	})
	if err != nil {
		return nil, err
	}
	if sec == nil || sec.Data == nil {
		return nil, fmt.Errorf("key service %s: transit decrypt returned no data", op)
	}
	b64, _ := sec.Data["plaintext"].(string)
	pt, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("key service %s: transit decrypt returned invalid base64", op)
	}
	return pt, nil
}
