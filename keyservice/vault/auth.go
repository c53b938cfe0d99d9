package vault

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"
)

var errEmptyFile = errors.New("file is empty")

// TTLNever is what TokenTTL reports for a token without expiry (a root token).
const TTLNever time.Duration = -1

// minRefreshWait keeps a token that is close to its end from turning the
// refresh loop into a busy loop.
const minRefreshWait = 500 * time.Millisecond

// session holds the client's token: it logs in (AppRole, Kubernetes, JWT,
// TLS certificate) or
// reads the token file, renews the token at 2/3 of its TTL, and logs in
// again when the token can no longer be renewed. Tokens, secret IDs and JWTs
// are never logged or put into errors.
type session struct {
	client     *api.Client
	certClient *api.Client // auth=cert: logs in on a fresh connection each time
	cert       *clientCert // auth=cert: the certificate both clients present
	cfg        Config
	log        *slog.Logger

	loginMu sync.Mutex // one login at a time

	mu        sync.Mutex
	token     string        // empty until the first login; never logged
	ttl       time.Duration // at the last login or renewal; 0: never expires
	loginTTL  time.Duration
	obtained  time.Time
	renewable bool
	capped    bool      // renewal stopped extending the token (max TTL): log in again
	retryAt   time.Time // after a failed refresh
	failures  int
	fileStamp fileStamp // token-file mode: the file content the token came from
	fileErr   string    // the last token-file problem logged, so it is logged once

	wake chan struct{}
}

// fileStamp is the token file's content. The file is small and requests
// are rare (one per local KEK, and probes), so it is simply read before each
// request: size and mtime can miss a rewrite within one clock tick.
type fileStamp string

func newSession(client, certClient *api.Client, cert *clientCert, cfg Config, log *slog.Logger) *session {
	return &session{client: client, certClient: certClient, cert: cert, cfg: cfg, log: log, wake: make(chan struct{}, 1)}
}

// TokenTTL is the remaining lifetime of the current token: 0 when there is
// none (or it has run out), TTLNever when it does not expire.
func (s *session) TokenTTL() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.token == "":
		return 0
	case s.ttl == 0:
		return TTLNever
	}
	return max(0, time.Until(s.obtained.Add(s.ttl)))
}

// warnFile logs a token-file problem once (nil: the file is fine again).
func (s *session) warnFile(err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	s.mu.Lock()
	changed := msg != s.fileErr
	s.fileErr = msg
	s.mu.Unlock()
	if changed && err != nil {
		s.log.Warn("vault token file refused; keeping the token in use", "err", err)
	}
}

func (s *session) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// ensure makes sure a token is set before a request: it logs in when there
// is none, and in token-file mode picks up a rewritten file.
func (s *session) ensure(ctx context.Context) error {
	s.mu.Lock()
	have := s.token != ""
	stamp := s.fileStamp
	s.mu.Unlock()
	if s.cfg.Auth == AuthToken {
		_, now, err := readTokenFile(s.cfg.TokenFile)
		if err != nil {
			if have {
				// Keep using the token we have: the file may be
				// mid-rotation, or was replaced by someone it must not
				// come from.
				s.warnFile(err)
				return nil
			}
			return &authError{err: err}
		}
		s.warnFile(nil)
		if have && stamp == now {
			return nil
		}
	} else if have {
		return nil
	}
	return s.login(ctx, false, stamp, have)
}

// login obtains a fresh token. Unless force is set it does nothing when
// another caller got one meanwhile: seenStamp and seenToken are what the
// caller saw before deciding to log in.
func (s *session) login(ctx context.Context, force bool, seenStamp fileStamp, seenToken bool) error {
	s.loginMu.Lock()
	defer s.loginMu.Unlock()
	if !force {
		s.mu.Lock()
		done := s.fileStamp != seenStamp || (s.token != "") != seenToken
		s.mu.Unlock()
		if done {
			return nil
		}
	}
	if err := s.loginLocked(ctx); err != nil {
		var ue *url.Error
		var ne net.Error
		network := errors.As(err, &ue) || errors.As(err, &ne) ||
			errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)
		return &authError{err: err, network: network}
	}
	return nil
}

func (s *session) loginLocked(ctx context.Context) error {
	var (
		token     string
		ttl       time.Duration
		renewable bool
		stamp     fileStamp
		err       error
	)
	switch s.cfg.Auth {
	case AuthToken:
		token, stamp, err = readTokenFile(s.cfg.TokenFile)
		if err != nil {
			return err
		}
		// Learn the token's TTL; it is also the check that the token works.
		ttl, renewable, err = s.lookupSelf(ctx, token)
		if err != nil {
			// Keep the new token anyway so requests use what the file
			// says, and look it up again soon. Its TTL is unknown: report
			// it as run out (ttl 0 would mean "never expires").
			s.client.SetToken(token)
			s.mu.Lock()
			s.token, s.fileStamp, s.ttl, s.obtained = token, stamp, time.Nanosecond, time.Now()
			s.retryAt = time.Now().Add(time.Second)
			s.mu.Unlock()
			s.poke()
			return err
		}
	case AuthAppRole:
		token, ttl, renewable, err = s.loginAppRole(ctx)
	case AuthKubernetes, AuthJWT:
		token, ttl, renewable, err = s.loginJWT(ctx)
	case AuthCert:
		token, ttl, renewable, err = s.loginCert(ctx)
	default:
		return fmt.Errorf("vault auth method %q is not supported", s.cfg.Auth)
	}
	if err != nil {
		return err
	}
	s.client.SetToken(token)
	s.mu.Lock()
	s.token, s.ttl, s.loginTTL, s.renewable, s.obtained = token, ttl, ttl, renewable, time.Now()
	s.fileStamp, s.capped, s.retryAt, s.failures = stamp, false, time.Time{}, 0
	s.mu.Unlock()
	s.log.Info("vault token obtained", "auth", s.cfg.Auth, "ttl", ttl, "renewable", renewable)
	s.poke()
	return nil
}

func readTokenFile(path string) (string, fileStamp, error) {
	tok, err := readFile("token-file", path, secretFile)
	if err != nil {
		return "", "", err
	}
	return tok, fileStamp(tok), nil
}

// lookupSelf asks the server about token (auth/token/lookup-self).
func (s *session) lookupSelf(ctx context.Context, token string) (time.Duration, bool, error) {
	c, err := s.client.CloneWithHeaders()
	if err != nil {
		return 0, false, err
	}
	c.SetToken(token)
	sec, err := c.Auth().Token().LookupSelfWithContext(ctx)
	if err != nil {
		if isStatus(err, 403) {
			return 0, false, fmt.Errorf("vault token-file %s: %w", s.cfg.TokenFile, errTokenInvalid)
		}
		return 0, false, fmt.Errorf("vault token lookup: %w", tidy(err))
	}
	ttl, err := sec.TokenTTL()
	if err != nil {
		return 0, false, fmt.Errorf("vault token lookup: %w", err)
	}
	renewable, err := sec.TokenIsRenewable()
	if err != nil {
		return 0, false, fmt.Errorf("vault token lookup: %w", err)
	}
	return ttl, renewable, nil
}

func (s *session) loginAppRole(ctx context.Context) (string, time.Duration, bool, error) {
	roleID, err := readFile("role-id-file", s.cfg.RoleIDFile, publicFile)
	if err != nil {
		return "", 0, false, err
	}
	body := map[string]any{"role_id": roleID}
	if s.cfg.SecretIDFile != "" {
		secretID, err := readFile("secret-id-file", s.cfg.SecretIDFile, secretFile)
		if err != nil {
			return "", 0, false, err
		}
		body["secret_id"] = secretID
	}
	return s.loginWith(ctx, s.client, body)
}

// loginJWT serves auth=kubernetes and auth=jwt: both post a role and a JWT.
func (s *session) loginJWT(ctx context.Context) (string, time.Duration, bool, error) {
	// Read the JWT at every login: projected service-account tokens and
	// workload-identity tokens rotate.
	jwt, err := readFile("jwt-file", s.cfg.JWTFile, publicFile)
	if err != nil {
		return "", 0, false, err
	}
	return s.loginWith(ctx, s.client, map[string]any{"role": s.cfg.Role, "jwt": jwt})
}

// loginCert logs in with the TLS client certificate. It reads the
// certificate files again, and the login client opens a new connection for
// every login, so a renewed certificate is what the next login presents.
func (s *session) loginCert(ctx context.Context) (string, time.Duration, bool, error) {
	if err := s.cert.load(); err != nil {
		return "", 0, false, err
	}
	body := map[string]any{}
	if s.cfg.Role != "" {
		body["name"] = s.cfg.Role
	}
	return s.loginWith(ctx, s.certClient, body)
}

func (s *session) loginWith(ctx context.Context, client *api.Client, body map[string]any) (string, time.Duration, bool, error) {
	c, err := client.CloneWithHeaders()
	if err != nil {
		return "", 0, false, err
	}
	c.ClearToken() // a login must not present the old token
	path := "auth/" + s.cfg.AuthMount + "/login"
	sec, err := c.Logical().WriteWithContext(ctx, path, body)
	if err != nil {
		return "", 0, false, fmt.Errorf("vault %s login: %w", s.cfg.Auth, tidy(err))
	}
	if sec == nil || sec.Auth == nil || sec.Auth.ClientToken == "" {
		return "", 0, false, fmt.Errorf("vault %s login: the response has no token", s.cfg.Auth)
	}
	return sec.Auth.ClientToken, time.Duration(sec.Auth.LeaseDuration) * time.Second, sec.Auth.Renewable, nil
}

// tidy shortens the client's multi-line response errors, keeping the type
// for errors.As.
func tidy(err error) error {
	var re *api.ResponseError
	if errors.As(err, &re) {
		return &tidyError{re: re, msg: responseError(re).Error()}
	}
	return err
}

type tidyError struct {
	re  *api.ResponseError
	msg string
}

func (e *tidyError) Error() string { return e.msg }
func (e *tidyError) Unwrap() error { return e.re }

// tokenWorks reports whether the server still accepts the current token
// (lookup-self is allowed by Vault's default policy). It tells a key-policy
// 403 from an expired or revoked token. When the server does not answer the
// lookup, it cannot tell: that is an error (transient), never "works".
func (s *session) tokenWorks(ctx context.Context) (bool, error) {
	_, err := s.client.Auth().Token().LookupSelfWithContext(ctx)
	switch {
	case err == nil:
		return true, nil
	case isStatus(err, 403):
		return false, nil
	}
	return false, &authError{err: fmt.Errorf("vault token lookup after a 403: %w", tidy(err)), network: !isResponse(err)}
}

func isResponse(err error) bool {
	var re *api.ResponseError
	return errors.As(err, &re)
}

// reauth handles a 403: when the token itself is no longer accepted it logs in
// again (or re-reads the token file) and says whether to retry the request.
func (s *session) reauth(ctx context.Context) (retry bool, err error) {
	works, err := s.tokenWorks(ctx)
	if err != nil {
		return false, err
	}
	if works {
		return false, nil // the token is fine: the key's policy denies us
	}
	s.log.Warn("vault token rejected; authenticating again", "auth", s.cfg.Auth)
	s.mu.Lock()
	oldToken := s.token
	s.mu.Unlock()
	if err := s.login(ctx, true, "", false); err != nil {
		return false, err
	}
	s.mu.Lock()
	changed := s.token != oldToken
	s.mu.Unlock()
	if !changed {
		return false, &authError{err: fmt.Errorf("vault token-file %s: %w", s.cfg.TokenFile, errTokenInvalid)}
	}
	return true, nil
}

// run keeps the token alive until ctx ends.
func (s *session) run(ctx context.Context) {
	for {
		wait, ok := s.nextRefresh()
		var timer *time.Timer
		var fire <-chan time.Time
		if ok {
			timer = time.NewTimer(wait)
			fire = timer.C
		}
		select {
		case <-ctx.Done():
		case <-s.wake:
		case <-fire:
			fire = nil
		}
		if timer != nil {
			timer.Stop()
		}
		if ctx.Err() != nil {
			return
		}
		if fire != nil || !ok {
			continue // woken up: recompute the schedule
		}
		if err := s.refresh(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			s.mu.Lock()
			s.failures++
			backoff := min(time.Second<<min(s.failures-1, 6), time.Minute)
			s.retryAt = time.Now().Add(backoff)
			s.mu.Unlock()
			s.log.Warn("vault token refresh failed", "auth", s.cfg.Auth, "retry_in", backoff, "err", err)
		}
	}
}

// nextRefresh says how long to wait before the next renewal or login; ok is
// false when nothing is due (a token without expiry, or no token yet in
// token-file mode, where requests read the file).
func (s *session) nextRefresh() (time.Duration, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	switch {
	case !s.retryAt.IsZero():
		return max(0, s.retryAt.Sub(now)), true
	case s.token == "":
		return 0, true
	case s.ttl == 0:
		return 0, false
	}
	renewAt := s.obtained.Add(s.ttl * 2 / 3)
	return max(minRefreshWait, renewAt.Sub(now)), true
}

// refresh renews the token, or logs in again when it cannot be renewed.
func (s *session) refresh(ctx context.Context) error {
	s.mu.Lock()
	token, renewable, capped, stamp := s.token, s.renewable, s.capped, s.fileStamp
	s.retryAt = time.Time{}
	s.mu.Unlock()
	if token == "" {
		return s.login(ctx, false, stamp, false) // unless a request got there first
	}
	if !renewable || capped {
		return s.login(ctx, true, "", false)
	}
	sec, err := s.client.Auth().Token().RenewSelfWithContext(ctx, 0)
	if err != nil {
		if isStatus(err, 403) || isStatus(err, 400) {
			// Expired, revoked or no longer renewable: start over.
			return s.login(ctx, true, "", false)
		}
		return fmt.Errorf("vault token renewal: %w", tidy(err))
	}
	if sec == nil || sec.Auth == nil {
		return errors.New("vault token renewal: the response has no auth data")
	}
	newTTL := time.Duration(sec.Auth.LeaseDuration) * time.Second
	s.mu.Lock()
	s.obtained, s.renewable, s.failures = time.Now(), sec.Auth.Renewable, 0
	// When renewal no longer gives half the login TTL the token is near its
	// max TTL: log in again (token-file mode re-reads the file).
	s.capped = newTTL < s.loginTTL/2
	s.ttl = max(newTTL, time.Nanosecond) // 0 here means "ends now", not "never"
	s.mu.Unlock()
	s.log.Debug("vault token renewed", "ttl", newTTL)
	return nil
}
