// Package transittest is a STAND-IN for a HashiCorp Vault / OpenBao server,
// for tests only. No Vault or OpenBao server can run on the project's
// machines (neither is packaged in Debian, and Vault's module does not build
// from the module proxy), so CI runs the keyservice contract against this
// server, and the same tests run against a real server when VAULT_ADDR and
// VAULT_TOKEN (or VAULT_BIN) are set.
//
// It implements exactly the endpoints the vault backend uses, with Vault's
// response shapes and error texts: transit encrypt, decrypt, key read,
// create, rotate, config (deletion_allowed) and delete; token lookup-self and
// renew-self; AppRole and Kubernetes login. Ciphertexts are "vault:v<N>:"
// plus base64(nonce|AES-256-GCM sealed box), so tampering fails as in Vault.
// It also has switches a real server reaches by other means: Deny (a policy
// that no longer grants the key), Seal, and Stop/Start (an outage on the same
// port). It is not a Vault: no policies language, storage, leases or audit.
package transittest

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Server is the stand-in. Its zero value is not usable; call New.
type Server struct {
	addr string

	mu        sync.Mutex
	srv       *http.Server
	root      string
	namespace string
	tokens    map[string]*token
	keys      map[string]*key // "mount/name"
	mounts    map[string]bool // transit mounts
	approles  map[string]map[string]appRole
	k8sRoles  map[string]map[string]k8sRole
	denied    bool
	sealed    bool
	renewals  int
	logins    int
	requests  []string       // "METHOD path", for tests
	uses      map[string]int // requests per token
}

type token struct {
	id        string
	policies  []string
	ttl       time.Duration // 0: never expires
	maxTTL    time.Duration
	issued    time.Time
	expires   time.Time
	renewable bool
	root      bool
}

type key struct {
	versions       [][]byte // versions[i] is version i+1
	created        []int64
	deletionAllowd bool
}

type appRole struct {
	secretID    string
	ttl, maxTTL time.Duration
}

type k8sRole struct {
	jwt         string
	ttl, maxTTL time.Duration
}

// Options configure New.
type Options struct {
	// Mounts are the transit mount paths; default ["transit"].
	Mounts []string
	// Namespace, when set, must be sent by every request (X-Vault-Namespace).
	Namespace string
}

// New starts a stand-in on 127.0.0.1 and stops it when t ends.
func New(t testing.TB, opts Options) *Server {
	t.Helper()
	s := &Server{
		namespace: strings.Trim(opts.Namespace, "/"),
		tokens:    map[string]*token{},
		keys:      map[string]*key{},
		mounts:    map[string]bool{},
		approles:  map[string]map[string]appRole{},
		k8sRoles:  map[string]map[string]k8sRole{},
		uses:      map[string]int{},
	}
	if len(opts.Mounts) == 0 {
		opts.Mounts = []string{"transit"}
	}
	for _, m := range opts.Mounts {
		s.mounts[strings.Trim(m, "/")] = true
	}
	s.root = s.CreateToken(0, false)
	s.tokens[s.root].root = true
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("transittest: listen: %v", err)
	}
	s.addr = ln.Addr().String()
	s.serve(ln)
	t.Cleanup(s.Stop)
	return s
}

func (s *Server) serve(ln net.Listener) {
	srv := &http.Server{Handler: http.HandlerFunc(s.handle), ReadHeaderTimeout: 10 * time.Second}
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	go func() { _ = srv.Serve(ln) }()
}

// Addr is host:port; URL is http://host:port.
func (s *Server) Addr() string { return s.addr }

// URL is the server's base address.
func (s *Server) URL() string { return "http://" + s.addr }

// RootToken never expires and is never denied.
func (s *Server) RootToken() string { return s.root }

// Stop closes the listener and all connections (an outage). Idempotent.
func (s *Server) Stop() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

// Start listens again on the same address after Stop.
func (s *Server) Start() error {
	var ln net.Listener
	var err error
	for range 50 {
		if ln, err = net.Listen("tcp", s.addr); err == nil {
			s.serve(ln)
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("transittest: listen again on %s: %w", s.addr, err)
}

// Deny switches the policy on or off that makes every transit request by a
// non-root token answer 403 permission denied (a revoked grant). Token
// lookup and renewal still work, as with Vault's default policy.
func (s *Server) Deny(on bool) { s.mu.Lock(); s.denied = on; s.mu.Unlock() }

// Seal makes every request answer 503 "Vault is sealed".
func (s *Server) Seal(on bool) { s.mu.Lock(); s.sealed = on; s.mu.Unlock() }

// Renewals counts successful renew-self calls; Logins successful logins.
func (s *Server) Renewals() int { s.mu.Lock(); defer s.mu.Unlock(); return s.renewals }

// Logins counts successful logins.
func (s *Server) Logins() int { s.mu.Lock(); defer s.mu.Unlock(); return s.logins }

// Uses counts the requests that presented token.
func (s *Server) Uses(token string) int { s.mu.Lock(); defer s.mu.Unlock(); return s.uses[token] }

// Requests returns "METHOD /v1/path" of every request so far.
func (s *Server) Requests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.requests...)
}

func randomID(prefix string) string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// CreateToken issues a token; ttl 0 means it never expires.
func (s *Server) CreateToken(ttl time.Duration, renewable bool) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.issueLocked(ttl, 0, renewable).id
}

func (s *Server) issueLocked(ttl, maxTTL time.Duration, renewable bool) *token {
	now := time.Now()
	t := &token{id: randomID("hvs."), policies: []string{"default", "kubekms"}, ttl: ttl, maxTTL: maxTTL, issued: now, renewable: renewable}
	if ttl > 0 {
		t.expires = now.Add(ttl)
	}
	s.tokens[t.id] = t
	return t
}

// RevokeToken makes a token invalid.
func (s *Server) RevokeToken(id string) { s.mu.Lock(); delete(s.tokens, id); s.mu.Unlock() }

// RevokeIssued revokes every token except the root token.
func (s *Server) RevokeIssued() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, t := range s.tokens {
		if !t.root {
			delete(s.tokens, id)
		}
	}
}

// AddAppRole accepts role_id/secret_id logins on auth/<mount>/login.
func (s *Server) AddAppRole(mount, roleID, secretID string, ttl, maxTTL time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.approles[mount] == nil {
		s.approles[mount] = map[string]appRole{}
	}
	s.approles[mount][roleID] = appRole{secretID: secretID, ttl: ttl, maxTTL: maxTTL}
}

// AddKubernetesRole accepts role/jwt logins on auth/<mount>/login. The
// stand-in does not verify JWTs with a TokenReview; it compares them.
func (s *Server) AddKubernetesRole(mount, role, jwt string, ttl, maxTTL time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.k8sRoles[mount] == nil {
		s.k8sRoles[mount] = map[string]k8sRole{}
	}
	s.k8sRoles[mount][role] = k8sRole{jwt: jwt, ttl: ttl, maxTTL: maxTTL}
}

type reply struct {
	status int
	data   map[string]any
	auth   map[string]any
	errs   []string
}

func errReply(status int, msg ...string) reply {
	if msg == nil {
		msg = []string{}
	}
	return reply{status: status, errs: msg}
}

func (s *Server) handle(w http.ResponseWriter, r *http.Request) {
	rep := s.route(r)
	w.Header().Set("Content-Type", "application/json")
	if rep.status == http.StatusNoContent {
		w.WriteHeader(rep.status)
		return
	}
	var body any
	if rep.errs != nil {
		body = map[string]any{"errors": rep.errs}
	} else {
		body = map[string]any{
			"request_id": randomID(""), "lease_id": "", "renewable": false, "lease_duration": 0,
			"data": rep.data, "wrap_info": nil, "warnings": nil, "auth": rep.auth,
		}
	}
	w.WriteHeader(rep.status)
	_ = json.NewEncoder(w).Encode(body)
}

func (s *Server) route(r *http.Request) reply {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, r.Method+" "+r.URL.Path)
	if s.sealed {
		return errReply(http.StatusServiceUnavailable, "Vault is sealed")
	}
	path, ok := strings.CutPrefix(r.URL.Path, "/v1/")
	if !ok {
		return errReply(http.StatusNotFound)
	}
	if s.namespace != "" && strings.Trim(r.Header.Get("X-Vault-Namespace"), "/") != s.namespace {
		return errReply(http.StatusNotFound, fmt.Sprintf("no handler for route %q. route entry not found.", path))
	}
	var body map[string]any
	if raw, err := io.ReadAll(io.LimitReader(r.Body, 1<<20)); err != nil {
		return errReply(http.StatusBadRequest, "failed to read request body")
	} else if len(bytes.TrimSpace(raw)) > 0 {
		if err := json.Unmarshal(raw, &body); err != nil {
			return errReply(http.StatusBadRequest, "failed to parse JSON input: "+err.Error())
		}
	}
	write := r.Method == http.MethodPut || r.Method == http.MethodPost

	// Logins need no token.
	if mount, ok := strings.CutSuffix(strings.TrimPrefix(path, "auth/"), "/login"); ok && strings.HasPrefix(path, "auth/") && write {
		return s.login(mount, body)
	}
	tok := s.tokens[r.Header.Get("X-Vault-Token")]
	s.uses[r.Header.Get("X-Vault-Token")]++
	if tok == nil || (!tok.expires.IsZero() && time.Now().After(tok.expires)) {
		return errReply(http.StatusForbidden, "permission denied")
	}
	switch {
	case path == "auth/token/lookup-self" && r.Method == http.MethodGet:
		return reply{status: 200, data: s.lookup(tok)}
	case path == "auth/token/renew-self" && write:
		return s.renew(tok)
	}
	for mount := range s.mounts {
		rest, ok := strings.CutPrefix(path, mount+"/")
		if !ok {
			continue
		}
		if s.denied && !tok.root {
			return errReply(http.StatusForbidden, "permission denied")
		}
		return s.transit(r.Method, mount, rest, body)
	}
	return errReply(http.StatusNotFound, fmt.Sprintf("no handler for route %q. route entry not found.", path))
}

func (s *Server) lookup(t *token) map[string]any {
	ttl := 0
	var expire any
	if !t.expires.IsZero() {
		ttl = max(0, int(time.Until(t.expires).Seconds()))
		expire = t.expires.UTC().Format(time.RFC3339Nano)
	}
	return map[string]any{
		"accessor": "acc-" + t.id[4:12], "creation_time": t.issued.Unix(), "creation_ttl": int(t.ttl.Seconds()),
		"display_name": "token", "entity_id": "", "expire_time": expire, "explicit_max_ttl": 0,
		"id": t.id, "issue_time": t.issued.UTC().Format(time.RFC3339Nano), "meta": nil, "num_uses": 0,
		"orphan": true, "path": "auth/token/create", "policies": t.policies, "renewable": t.renewable,
		"ttl": ttl, "type": "service",
	}
}

func (s *Server) authBlock(t *token) map[string]any {
	return map[string]any{
		"client_token": t.id, "accessor": "acc-" + t.id[4:12], "policies": t.policies,
		"token_policies": t.policies, "metadata": map[string]any{}, "lease_duration": int(t.ttl.Seconds()),
		"renewable": t.renewable, "entity_id": "", "token_type": "service", "orphan": true,
		"mfa_requirement": nil, "num_uses": 0,
	}
}

func (s *Server) renew(t *token) reply {
	if !t.renewable || t.expires.IsZero() {
		return errReply(http.StatusBadRequest, "lease is not renewable")
	}
	now := time.Now()
	exp := now.Add(t.ttl)
	if t.maxTTL > 0 && exp.After(t.issued.Add(t.maxTTL)) {
		exp = t.issued.Add(t.maxTTL)
	}
	t.expires = exp
	s.renewals++
	blk := s.authBlock(t)
	blk["lease_duration"] = int(exp.Sub(now).Seconds())
	return reply{status: 200, auth: blk}
}

func (s *Server) login(mount string, body map[string]any) reply {
	str := func(k string) string { v, _ := body[k].(string); return v }
	var ttl, maxTTL time.Duration
	switch {
	case s.approles[mount] != nil:
		role, ok := s.approles[mount][str("role_id")]
		if !ok || role.secretID != str("secret_id") {
			return errReply(http.StatusBadRequest, "invalid role or secret ID")
		}
		ttl, maxTTL = role.ttl, role.maxTTL
	case s.k8sRoles[mount] != nil:
		role, ok := s.k8sRoles[mount][str("role")]
		if !ok {
			return errReply(http.StatusBadRequest, fmt.Sprintf("invalid role name %q", str("role")))
		}
		if role.jwt != str("jwt") {
			return errReply(http.StatusForbidden, "permission denied")
		}
		ttl, maxTTL = role.ttl, role.maxTTL
	default:
		return errReply(http.StatusNotFound, fmt.Sprintf("no handler for route \"auth/%s/login\". route entry not found.", mount))
	}
	s.logins++
	return reply{status: 200, auth: s.authBlock(s.issueLocked(ttl, maxTTL, true))}
}

func (s *Server) transit(method, mount, rest string, body map[string]any) reply {
	action, name, _ := strings.Cut(rest, "/")
	name, sub, _ := strings.Cut(name, "/")
	if name == "" {
		return errReply(http.StatusNotFound)
	}
	id := mount + "/" + name
	k := s.keys[id]
	write := method == http.MethodPut || method == http.MethodPost
	switch {
	case action == "encrypt" && sub == "" && write:
		if k == nil { // Vault's encrypt creates a missing key (upsert)
			k = newKey()
			s.keys[id] = k
		}
		return s.encrypt(k, body)
	case action == "decrypt" && sub == "" && write:
		if k == nil {
			return errReply(http.StatusBadRequest, "encryption key not found")
		}
		return decrypt(k, body)
	case action == "keys" && sub == "" && method == http.MethodGet:
		if k == nil {
			return errReply(http.StatusNotFound)
		}
		return reply{status: 200, data: keyData(name, k)}
	case action == "keys" && sub == "" && write:
		if k == nil {
			k = newKey()
			s.keys[id] = k
		}
		return reply{status: 200, data: keyData(name, k)}
	case action == "keys" && sub == "" && method == http.MethodDelete:
		if k == nil {
			return reply{status: http.StatusNoContent}
		}
		if !k.deletionAllowd {
			return errReply(http.StatusBadRequest, "deletion is not allowed for this key")
		}
		delete(s.keys, id)
		return reply{status: http.StatusNoContent}
	case action == "keys" && sub == "rotate" && write:
		if k == nil {
			return errReply(http.StatusBadRequest, "key not found")
		}
		k.addVersion()
		return reply{status: 200, data: keyData(name, k)}
	case action == "keys" && sub == "config" && write:
		if k == nil {
			return errReply(http.StatusBadRequest, "no existing key named "+name+" could be found")
		}
		if v, ok := body["deletion_allowed"].(bool); ok {
			k.deletionAllowd = v
		}
		return reply{status: 200, data: keyData(name, k)}
	}
	return errReply(http.StatusMethodNotAllowed, "unsupported operation")
}

func newKey() *key {
	k := &key{}
	k.addVersion()
	return k
}

func (k *key) addVersion() {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	k.versions = append(k.versions, b)
	k.created = append(k.created, time.Now().Unix())
}

func keyData(name string, k *key) map[string]any {
	keys := map[string]int64{}
	for i, c := range k.created {
		keys[strconv.Itoa(i+1)] = c
	}
	return map[string]any{
		"name": name, "type": "aes256-gcm96", "keys": keys, "latest_version": len(k.versions),
		"min_decryption_version": 1, "min_encryption_version": 0, "min_available_version": 0,
		"deletion_allowed": k.deletionAllowd, "derived": false, "exportable": false,
		"allow_plaintext_backup": false, "supports_encryption": true, "supports_decryption": true,
		"supports_derivation": true, "supports_signing": false, "imported_key": false, "auto_rotate_period": 0,
	}
}

func gcm(key []byte) cipher.AEAD {
	b, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // 32-byte keys only
	}
	a, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return a
}

func (s *Server) encrypt(k *key, body map[string]any) reply {
	b64, _ := body["plaintext"].(string)
	pt, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return errReply(http.StatusBadRequest, "failed to base64-decode plaintext")
	}
	v := len(k.versions)
	a := gcm(k.versions[v-1])
	nonce := make([]byte, a.NonceSize())
	_, _ = rand.Read(nonce)
	sealed := a.Seal(nonce, nonce, pt, nil)
	ct := fmt.Sprintf("vault:v%d:%s", v, base64.StdEncoding.EncodeToString(sealed))
	return reply{status: 200, data: map[string]any{"ciphertext": ct, "key_version": v}}
}

// decrypt follows Vault's checks and error texts in order.
func decrypt(k *key, body map[string]any) reply {
	ct, _ := body["ciphertext"].(string)
	if ct == "" {
		return errReply(http.StatusBadRequest, "missing ciphertext to decrypt")
	}
	rest, ok := strings.CutPrefix(ct, "vault:v")
	if !ok {
		return errReply(http.StatusBadRequest, "invalid ciphertext: no prefix")
	}
	verStr, b64, ok := strings.Cut(rest, ":")
	if !ok {
		return errReply(http.StatusBadRequest, "invalid ciphertext: wrong number of fields")
	}
	ver, err := strconv.Atoi(verStr)
	if err != nil {
		return errReply(http.StatusBadRequest, "invalid ciphertext: version number could not be decoded")
	}
	ver = max(ver, 1)
	if ver > len(k.versions) {
		return errReply(http.StatusBadRequest, "invalid ciphertext: version is too new")
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return errReply(http.StatusBadRequest, "invalid ciphertext: could not decode base64")
	}
	a := gcm(k.versions[ver-1])
	if len(raw) < a.NonceSize()+a.Overhead() {
		return errReply(http.StatusBadRequest, "invalid ciphertext length")
	}
	pt, err := a.Open(nil, raw[:a.NonceSize()], raw[a.NonceSize():], nil)
	if err != nil {
		return errReply(http.StatusBadRequest, "cipher: message authentication failed")
	}
	return reply{status: 200, data: map[string]any{"plaintext": base64.StdEncoding.EncodeToString(pt)}}
}
