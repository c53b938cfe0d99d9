package vault

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/hashicorp/vault/api"

	"github.com/kubekms/kubekms/keyservice"
)

// errTokenInvalid marks a token the server no longer accepts (expired,
// revoked). It is an authentication problem, not a revoked key, so it stays
// unclassified: the hierarchy keeps its cached KEKs and does not shred them.
var errTokenInvalid = errors.New("vault token is invalid or expired")

// authError is a failed login, token-file read or token lookup.
type authError struct {
	err     error
	network bool // the request did not get an HTTP response
}

func (e *authError) Error() string { return e.err.Error() }
func (e *authError) Unwrap() error { return e.err }

// responseError turns the client's multi-line *api.ResponseError into one
// line. Vault's error texts carry no tokens or plaintext.
func responseError(re *api.ResponseError) error {
	path := re.URL
	if u, err := url.Parse(re.URL); err == nil {
		path = u.Path
	}
	msg := strings.Join(errorLines(re.Errors), "; ")
	if msg == "" {
		msg = http.StatusText(re.StatusCode)
	}
	return fmt.Errorf("%s %s: HTTP %d: %s", re.HTTPMethod, path, re.StatusCode, msg)
}

// errorLines flattens Vault's error texts, which often read
// "1 error occurred:\n\t* permission denied\n\n", to their messages.
func errorLines(errs []string) []string {
	var out []string
	for _, e := range errs {
		for _, l := range strings.Split(e, "\n") {
			l = strings.TrimPrefix(strings.TrimSpace(l), "* ")
			if l == "" || strings.HasSuffix(l, "error occurred:") || strings.HasSuffix(l, "errors occurred:") {
				continue
			}
			out = append(out, l)
		}
	}
	return out
}

func isStatus(err error, code int) bool {
	var re *api.ResponseError
	return errors.As(err, &re) && re.StatusCode == code
}

// classify maps a Vault client error to a keyservice class:
//   - unreachable, timeouts, 412, 429, 5xx (503 = sealed or standby) -> transient
//   - 403 permission denied, 404, "encryption key not found", a ciphertext
//     version below min_decryption_version -> revoked
//   - other 400s (tampered or foreign ciphertext) -> invalid
func classify(op string, err error) error {
	if err == nil {
		return nil
	}
	var ke *keyservice.Error
	if errors.As(err, &ke) {
		return err
	}
	var ae *authError
	if errors.As(err, &ae) {
		// A server or network problem during login is transient; a rejected
		// login or token is a configuration problem: unclassified, never
		// "revoked", so cached KEKs are not shredded over a bad secret ID.
		var re *api.ResponseError
		if errors.As(err, &re) && (re.StatusCode == http.StatusTooManyRequests || re.StatusCode >= 500) ||
			!errors.As(err, &re) && !errors.Is(err, errTokenInvalid) && ae.network {
			return keyservice.Transient(op, err)
		}
		return fmt.Errorf("key service %s: %w", op, err)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return keyservice.Transient(op, err)
	}
	var re *api.ResponseError
	if !errors.As(err, &re) {
		// Everything else the client returns is a transport failure
		// (refused, reset, DNS, TLS handshake, unreadable response).
		return keyservice.Transient(op, err)
	}
	msg := strings.ToLower(strings.Join(re.Errors, " "))
	short := responseError(re)
	switch {
	case re.StatusCode == http.StatusTooManyRequests, re.StatusCode == http.StatusPreconditionFailed,
		re.StatusCode >= 500:
		return keyservice.Transient(op, short)
	case re.StatusCode == http.StatusForbidden, re.StatusCode == http.StatusNotFound:
		return keyservice.Revoked(op, short)
	case re.StatusCode == http.StatusBadRequest:
		if strings.Contains(msg, "encryption key not found") || strings.Contains(msg, "policy not found") ||
			strings.Contains(msg, "disallowed by policy") {
			return keyservice.Revoked(op, short)
		}
		return keyservice.Invalid(op, short)
	default:
		return fmt.Errorf("key service %s: %w", op, short)
	}
}
