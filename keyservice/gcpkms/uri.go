package gcpkms

import (
	"fmt"
	"net"
	"net/url"
	"regexp"
	"strings"
)

// Scheme is the key-URI scheme of this backend.
const Scheme = "gcpkms"

const uriForm = "gcpkms:///projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY, optionally followed by ?endpoint="

// KeyURI is a parsed gcpkms key URI.
type KeyURI struct {
	// Key is the CryptoKey's resource name.
	Key string
	// Endpoint is a custom Cloud KMS endpoint: host:port (TLS, Application
	// Default Credentials; a Private Service Connect endpoint) or
	// http://LOOPBACK:port (plaintext and no credentials, for a local proxy
	// or the tests' stand-in; only loopback addresses are accepted).
	Endpoint string
}

// Plaintext reports whether Endpoint is a plaintext loopback endpoint.
func (u KeyURI) Plaintext() bool { return strings.HasPrefix(u.Endpoint, "http://") }

// Address is the endpoint's host:port.
func (u KeyURI) Address() string { return strings.TrimPrefix(u.Endpoint, "http://") }

var (
	// Project IDs (also domain-scoped, "example.com:proj") or numbers.
	projectRE  = regexp.MustCompile(`^([a-z][a-z0-9.-]{0,62}:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$|^[0-9]{1,20}$`)
	locationRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,62}$`)
	idRE       = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,63}$`)
	hostRE     = regexp.MustCompile(`^[a-zA-Z0-9.-]{1,253}$`)
)

// ParseURI parses
//
//	gcpkms:///projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY[?endpoint=...]
func ParseURI(uri string) (KeyURI, error) {
	scheme, rest, ok := strings.Cut(uri, ":")
	if !ok || !strings.EqualFold(scheme, Scheme) {
		return KeyURI{}, fmt.Errorf("key URI: scheme is not %s: want %s", Scheme, uriForm)
	}
	rest, ok = strings.CutPrefix(rest, "///")
	if !ok {
		return KeyURI{}, fmt.Errorf("key URI: want three slashes after %q: %s", Scheme+":", uriForm)
	}
	if strings.Contains(rest, "#") {
		return KeyURI{}, fmt.Errorf("key URI: a fragment (#) is not allowed")
	}
	key, query, _ := strings.Cut(rest, "?")
	if err := checkKeyName(key); err != nil {
		return KeyURI{}, fmt.Errorf("key URI: %w", err)
	}
	u := KeyURI{Key: key}
	if query == "" {
		return u, nil
	}
	values, err := url.ParseQuery(query)
	if err != nil {
		return KeyURI{}, fmt.Errorf("key URI: query: %w", err)
	}
	for name, vals := range values {
		if len(vals) != 1 || vals[0] == "" {
			return KeyURI{}, fmt.Errorf("key URI: option %s= must be given once, not empty", name)
		}
		switch name {
		case "endpoint":
			if err := checkEndpoint(vals[0]); err != nil {
				return KeyURI{}, fmt.Errorf("key URI: %w", err)
			}
			u.Endpoint = vals[0]
		default:
			return KeyURI{}, fmt.Errorf("key URI: unknown option %q (want endpoint)", name)
		}
	}
	return u, nil
}

// checkKeyName checks a CryptoKey resource name.
func checkKeyName(key string) error {
	p := strings.Split(key, "/")
	if len(p) != 8 || p[0] != "projects" || p[2] != "locations" || p[4] != "keyRings" || p[6] != "cryptoKeys" {
		return fmt.Errorf("%q is not a CryptoKey resource name: want %s", key, uriForm)
	}
	switch {
	case !projectRE.MatchString(p[1]):
		return fmt.Errorf("project %q is not a project ID or number", p[1])
	case !locationRE.MatchString(p[3]):
		return fmt.Errorf("location %q is not a location name", p[3])
	case !idRE.MatchString(p[5]):
		return fmt.Errorf("key ring %q: want 1 to 63 of a-z A-Z 0-9 _ -", p[5])
	case !idRE.MatchString(p[7]):
		return fmt.Errorf("crypto key %q: want 1 to 63 of a-z A-Z 0-9 _ -", p[7])
	}
	return nil
}

func checkEndpoint(v string) error {
	hostPort := v
	if rest, ok := strings.CutPrefix(v, "http://"); ok {
		hostPort = rest
	} else if strings.Contains(v, "://") {
		return fmt.Errorf("endpoint=%q: want host:port (TLS) or http://127.0.0.1:port (plaintext, loopback only)", v)
	}
	host, port, err := net.SplitHostPort(hostPort)
	if err != nil || port == "" || host == "" || !hostRE.MatchString(strings.Trim(host, "[]:")) && net.ParseIP(host) == nil {
		return fmt.Errorf("endpoint=%q: want host:port", v)
	}
	if hostPort != v { // plaintext: loopback only
		ip := net.ParseIP(host)
		if host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return fmt.Errorf("endpoint=%q: a plaintext (http://) endpoint must be a loopback address", v)
		}
	}
	return nil
}

// versionKey returns the CryptoKey of a CryptoKeyVersion name, or false.
func versionKey(version string) (string, bool) {
	key, n, ok := strings.Cut(version, "/cryptoKeyVersions/")
	if !ok || n == "" || strings.Trim(n, "0123456789") != "" || checkKeyName(key) != nil {
		return "", false
	}
	return key, true
}
