package vault

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Auth methods a key URI can name with auth=.
const (
	AuthToken      = "token"
	AuthAppRole    = "approle"
	AuthKubernetes = "kubernetes"
	// AuthJWT logs in with a JWT from a file (a workload-identity agent's
	// token): for static pods, which have no service-account token.
	AuthJWT = "jwt"
	// AuthCert logs in with a TLS client certificate (https only): for
	// static pods and hosts with a machine certificate.
	AuthCert = "cert"
)

// authMethods lists the auth= values, for messages.
const authMethods = "token, approle, kubernetes, jwt or cert"

// DefaultJWTFile is where Kubernetes mounts a pod's service-account token.
const DefaultJWTFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"

// DefaultPort is used when a key URI names no port.
const DefaultPort = "8200"

// maxURILen bounds the key URI so the key IDs built from it stay far below
// the KMS v2 limit of 1 kB.
const maxURILen = 2048

// Schemes returns the key-URI schemes this backend serves: hcvault (plain
// http, for loopback and test servers) and hcvault+https / vault+https.
func Schemes() []string { return []string{"hcvault", "hcvault+https", "vault+https"} }

// Config is a parsed key URI.
type Config struct {
	// Address is the server's base URL, e.g. "https://vault.example:8200".
	Address string
	// Mount is the transit mount path ("transit", "kms/transit").
	Mount string
	// Key is the transit key name.
	Key string
	// Namespace is sent as X-Vault-Namespace (Vault Enterprise, OpenBao).
	Namespace string
	// CAFile is a PEM bundle that replaces the system roots (https only).
	CAFile string

	// Auth is AuthToken, AuthAppRole, AuthKubernetes, AuthJWT or AuthCert.
	Auth string
	// AuthMount is the path the auth method is mounted at (default: its name).
	AuthMount string
	// TokenFile holds the token for AuthToken; it is re-read when it changes.
	TokenFile string
	// RoleIDFile and SecretIDFile hold the AppRole credentials.
	RoleIDFile, SecretIDFile string
	// Role is the Kubernetes or JWT auth role (required), or the cert auth
	// role to log in against (optional); JWTFile holds the service-account
	// token or JWT.
	Role, JWTFile string
	// CertFile and KeyFile are the PEM client certificate (chain) and key
	// for AuthCert, read at every TLS handshake so a renewed certificate is
	// used from the next login on.
	CertFile, KeyFile string
}

// KeyPath is the key's identity used in key IDs: "[namespace/]mount/name".
func (c Config) KeyPath() string {
	p := c.Mount + "/" + c.Key
	if c.Namespace != "" {
		p = c.Namespace + "/" + p
	}
	return p
}

var queryKeys = map[string]bool{
	"auth": true, "token-file": true, "role-id-file": true, "secret-id-file": true,
	"role": true, "jwt-file": true, "auth-mount": true, "namespace": true, "ca-file": true,
	"cert-file": true, "key-file": true,
}

// ParseURI parses a Vault Transit key URI:
//
//	hcvault://host:8200/transit/keys/<name>?token-file=/path        (http)
//	vault+https://host:8200/kms/transit/keys/<name>?auth=approle&... (https)
//
// The path before "/keys/" is the transit mount. Query options: auth
// (token|approle|kubernetes|jwt|cert), token-file, role-id-file,
// secret-id-file, role, jwt-file, cert-file, key-file, auth-mount, namespace,
// ca-file. Credentials are only ever read from files, never taken from the URI.
func ParseURI(uri string) (Config, error) {
	var c Config
	if len(uri) > maxURILen {
		return c, fmt.Errorf("vault key URI is %d bytes long, the limit is %d", len(uri), maxURILen)
	}
	u, err := url.Parse(uri)
	if err != nil {
		return c, fmt.Errorf("parse vault key URI: %w", err)
	}
	var httpScheme string
	switch strings.ToLower(u.Scheme) {
	case "hcvault":
		httpScheme = "http"
	case "hcvault+https", "vault+https":
		httpScheme = "https"
	default:
		return c, fmt.Errorf("vault key URI scheme %q: want one of %s", u.Scheme, strings.Join(Schemes(), ", "))
	}
	if u.Opaque != "" {
		return c, errors.New("vault key URI must look like hcvault://host:8200/transit/keys/<name>")
	}
	if u.User != nil {
		return c, errors.New("vault key URI must not carry credentials; use token-file= or another auth= method")
	}
	if u.Fragment != "" || strings.Contains(uri, "#") {
		return c, errors.New("vault key URI must not have a #fragment")
	}
	host := u.Hostname()
	if host == "" {
		return c, errors.New("vault key URI has no host")
	}
	port := u.Port()
	if port == "" {
		if strings.HasSuffix(u.Host, ":") {
			return c, errors.New("vault key URI has an empty port")
		}
		port = DefaultPort
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return c, fmt.Errorf("vault key URI port %q is not a port number", port)
	}
	c.Address = httpScheme + "://" + net.JoinHostPort(host, port)

	c.Mount, c.Key, err = parseKeyPath(u.Path)
	if err != nil {
		return c, err
	}
	if err := c.parseQuery(u.RawQuery, httpScheme); err != nil {
		return c, err
	}
	if len(c.KeyPath()) > 512 {
		return c, errors.New("vault namespace, mount and key name are longer than 512 bytes together")
	}
	return c, nil
}

// parseKeyPath splits "/<mount>/keys/<name>".
func parseKeyPath(p string) (mount, name string, err error) {
	const want = "path /<transit mount>/keys/<key name>"
	if !strings.HasPrefix(p, "/") {
		return "", "", fmt.Errorf("vault key URI has no %s", want)
	}
	segs := strings.Split(p[1:], "/")
	if len(segs) < 3 || segs[len(segs)-2] != "keys" {
		return "", "", fmt.Errorf("vault key URI path %q: want %s", p, want)
	}
	for _, s := range segs {
		if err := checkSegment(s); err != nil {
			return "", "", fmt.Errorf("vault key URI path %q: %w", p, err)
		}
	}
	return strings.Join(segs[:len(segs)-2], "/"), segs[len(segs)-1], nil
}

// checkSegment admits what Vault's name patterns admit and nothing that could
// change the request path: letters, digits, '_', '-', '.'; no "." or "..".
func checkSegment(s string) error {
	if s == "" {
		return errors.New("empty path segment")
	}
	if s == "." || s == ".." {
		return fmt.Errorf("path segment %q is not allowed", s)
	}
	if len(s) > 128 {
		return fmt.Errorf("path segment is %d bytes long, the limit is 128", len(s))
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.') {
			return fmt.Errorf("path segment %q has character %q (allowed: letters, digits, _ - .)", s, r)
		}
	}
	return nil
}

func checkPath(name, p string) error {
	for _, s := range strings.Split(p, "/") {
		if err := checkSegment(s); err != nil {
			return fmt.Errorf("%s %q: %w", name, p, err)
		}
	}
	return nil
}

func (c *Config) parseQuery(raw, httpScheme string) error {
	q, err := url.ParseQuery(raw)
	if err != nil {
		return fmt.Errorf("vault key URI query: %w", err)
	}
	for k, v := range q {
		if !queryKeys[k] {
			known := make([]string, 0, len(queryKeys))
			for k := range queryKeys {
				known = append(known, k)
			}
			sort.Strings(known)
			return fmt.Errorf("vault key URI option %q is unknown (known: %s)", k, strings.Join(known, ", "))
		}
		if len(v) != 1 {
			return fmt.Errorf("vault key URI option %q is given %d times", k, len(v))
		}
		if v[0] == "" {
			return fmt.Errorf("vault key URI option %q is empty", k)
		}
	}
	get := q.Get
	c.Auth = get("auth")
	if c.Auth == "" {
		c.Auth = AuthToken
	}
	c.TokenFile, c.RoleIDFile, c.SecretIDFile = get("token-file"), get("role-id-file"), get("secret-id-file")
	c.Role, c.JWTFile, c.AuthMount = get("role"), get("jwt-file"), get("auth-mount")
	c.CertFile, c.KeyFile = get("cert-file"), get("key-file")
	c.CAFile = get("ca-file")
	c.Namespace = strings.Trim(get("namespace"), "/")
	if q.Has("namespace") {
		if err := checkPath("namespace", c.Namespace); err != nil {
			return err
		}
	}
	if c.CAFile != "" && httpScheme != "https" {
		return errors.New("vault key URI option ca-file needs an https scheme (vault+https://)")
	}

	// Options that belong to another auth method are mistakes, not no-ops.
	for _, o := range []struct {
		opt     string
		methods []string
	}{
		{"token-file", []string{AuthToken}}, {"role-id-file", []string{AuthAppRole}},
		{"secret-id-file", []string{AuthAppRole}}, {"role", []string{AuthKubernetes, AuthJWT, AuthCert}},
		{"jwt-file", []string{AuthKubernetes, AuthJWT}}, {"cert-file", []string{AuthCert}},
		{"key-file", []string{AuthCert}},
	} {
		if q.Has(o.opt) && !slices.Contains(o.methods, c.Auth) {
			return fmt.Errorf("vault key URI option %s needs auth=%s (auth is %s)", o.opt, strings.Join(o.methods, " or auth="), c.Auth)
		}
	}
	switch c.Auth {
	case AuthToken:
		if c.TokenFile == "" {
			return errors.New("vault key URI with auth=token needs token-file=/path/to/token")
		}
		if c.AuthMount != "" {
			return errors.New("vault key URI option auth-mount does not apply to auth=token")
		}
	case AuthAppRole:
		if c.RoleIDFile == "" {
			return errors.New("vault key URI with auth=approle needs role-id-file=/path")
		}
	case AuthKubernetes:
		if c.Role == "" {
			return errors.New("vault key URI with auth=kubernetes needs role=<vault role>")
		}
		if c.JWTFile == "" {
			c.JWTFile = DefaultJWTFile
		}
	case AuthJWT:
		if c.Role == "" {
			return errors.New("vault key URI with auth=jwt needs role=<vault role>")
		}
		if c.JWTFile == "" {
			return errors.New("vault key URI with auth=jwt needs jwt-file=/path/to/jwt")
		}
	case AuthCert:
		if c.CertFile == "" || c.KeyFile == "" {
			return errors.New("vault key URI with auth=cert needs cert-file=/path and key-file=/path (the client certificate and its key)")
		}
		if httpScheme != "https" {
			return errors.New("vault key URI with auth=cert needs an https scheme (vault+https://): client certificates need TLS")
		}
	default:
		return fmt.Errorf("vault key URI auth=%q: want %s", c.Auth, authMethods)
	}
	if c.Auth != AuthToken {
		if c.AuthMount == "" {
			c.AuthMount = c.Auth
		}
		c.AuthMount = strings.Trim(c.AuthMount, "/")
		if err := checkPath("auth-mount", c.AuthMount); err != nil {
			return err
		}
	}
	if c.Role != "" {
		if err := checkSegment(c.Role); err != nil {
			return fmt.Errorf("vault key URI role: %w", err)
		}
	}
	for _, f := range []struct{ opt, path string }{
		{"token-file", c.TokenFile}, {"role-id-file", c.RoleIDFile}, {"secret-id-file", c.SecretIDFile},
		{"jwt-file", c.JWTFile}, {"ca-file", c.CAFile}, {"cert-file", c.CertFile}, {"key-file", c.KeyFile},
	} {
		if f.path != "" && !filepath.IsAbs(f.path) {
			return fmt.Errorf("vault key URI option %s=%q must be an absolute path", f.opt, f.path)
		}
	}
	return nil
}
