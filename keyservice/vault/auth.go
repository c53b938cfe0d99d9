package vault

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
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

// session holds the client's token: it logs in (AppRole, Kubernetes) or
// reads the token file, renews the token at 2/3 of its TTL, and logs in
// again when the token can no longer be renewed. Tokens, secret IDs and JWTs
// are never logged or put into errors.
type session struct {
	client *api.Client
	cfg    Config
	log    *slog.Logger

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

	wake chan struct{}
}

// fileStamp is the token file's content. The file is small and requests
// are rare (one per local KEK, and probes), so it is simply read before each
// request: size and mtime can miss a rewrite within one clock tick.
type fileStamp string

func newSession(client *api.Client, cfg Config, log *slog.Logger) *session {
	return &session{client: client, cfg: cfg, log: log, wake: make(chan struct{}, 1)}
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
				return nil // keep using the token we have; the file may be mid-rotation
			}
			return &authError{err: err}
		}
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
	case AuthKubernetes:
		token, ttl, renewable, err = s.loginKubernetes(ctx)
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
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", fmt.Errorf("vault token-file: %w", err)
	}
	tok := string(bytes.TrimSpace(b))
	if tok == "" {
		return "", "", fmt.Errorf("vault token-file %s: %w", path, errEmptyFile)
	}
	return tok, fileStamp(tok), nil
}

func readSecretFile(what, path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("vault %s: %w", what, err)
	}
	v := string(bytes.TrimSpace(b))
	if v == "" {
		return "", fmt.Errorf("vault %s %s: %w", what, path, errEmptyFile)
	}
	return v, nil
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
	roleID, err := readSecretFile("role-id-file", s.cfg.RoleIDFile)
	if err != nil {
		return "", 0, false, err
	}
	body := map[string]any{"role_id": roleID}
	if s.cfg.SecretIDFile != "" {
		secretID, err := readSecretFile("secret-id-file", s.cfg.SecretIDFile)
		if err != nil {
			return "", 0, false, err
		}
		body["secret_id"] = secretID
	}
	return s.loginWith(ctx, body)
}

func (s *session) loginKubernetes(ctx context.Context) (string, time.Duration, bool, error) {
	// Read the JWT at every login: projected service-account tokens rotate.
	jwt, err := readSecretFile("jwt-file", s.cfg.JWTFile)
	if err != nil {
		return "", 0, false, err
	}
	return s.loginWith(ctx, map[string]any{"role": s.cfg.Role, "jwt": jwt})
}

func (s *session) loginWith(ctx context.Context, body map[string]any) (string, time.Duration, bool, error) {
	c, err := s.client.CloneWithHeaders()
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
// 403 from an expired or revoked token.
func (s *session) tokenWorks(ctx context.Context) bool {
	_, err := s.client.Auth().Token().LookupSelfWithContext(ctx)
	return !isStatus(err, 403)
}

// reauth handles a 403: when the token itself is no longer accepted it logs in
// again (or re-reads the token file) and says whether to retry the request.
func (s *session) reauth(ctx context.Context) (retry bool, err error) {
	if s.tokenWorks(ctx) {
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
		return false, fmt.Errorf("vault token-file %s: %w", s.cfg.TokenFile, errTokenInvalid)
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
