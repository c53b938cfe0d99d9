// Package vaultserver runs a real HashiCorp Vault server for tests: not the
// dev mode, but a server with file storage that is initialized (one unseal
// key) and unsealed, so it keeps its keys, policies and tokens across a
// restart, and can be sealed, stopped, paused and started again on the same
// port. It listens on 127.0.0.1 only, on a free port, plain http or (with
// Options.TLS) https with a test CA that also signs client certificates.
//
// The binary comes from $VAULT_BIN, the kubekms cache (hack/vault-bin.sh
// builds it there) or PATH; without one the test fails under
// KUBEKMS_REQUIRE_REAL=1 and skips otherwise. Every process is killed when
// the test ends, also on failure, and dies with the test binary.
package vaultserver

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kubekms/kubekms/internal/testutil"
)

// startTimeout bounds one start (process up, initialized or unsealed, active).
const startTimeout = 90 * time.Second

// Options select what New starts.
type Options struct {
	// TLS serves https with a certificate from CA (client certificates are
	// requested, for cert auth); otherwise plain http.
	TLS bool
}

// Server is one Vault server process and its storage.
type Server struct {
	// Dir holds the config, storage, audit log and server log.
	Dir string
	// CA signed the server's certificate (TLS only).
	CA *CA

	t         testing.TB
	bin       string
	port      int
	tls       bool
	config    string
	logPath   string
	auditPath string
	unsealKey string
	root      string

	mu   sync.Mutex
	proc *exec.Cmd
	done chan struct{}
}

// Binary returns the vault binary, reporting it Missing when there is none.
func Binary(t testing.TB) string {
	t.Helper()
	return testutil.Binary(t, "VAULT_BIN", "vault")
}

// New starts, initializes and unseals a server, with a file audit device
// (see Requests). It is stopped when t ends.
func New(t testing.TB, opts Options) *Server {
	t.Helper()
	s := &Server{t: t, bin: Binary(t), Dir: t.TempDir(), port: testutil.FreePort(t), tls: opts.TLS}
	s.logPath = filepath.Join(s.Dir, "vault.log")
	s.auditPath = filepath.Join(s.Dir, "audit.log")
	s.config = filepath.Join(s.Dir, "vault.hcl")
	listener := "tls_disable = true"
	if s.tls {
		s.CA = NewCA(t, s.Dir, "ca")
		cert, key := filepath.Join(s.Dir, "server.crt"), filepath.Join(s.Dir, "server.key")
		s.CA.Issue(t, cert, key, "vault-test", ServerCert)
		listener = fmt.Sprintf("tls_cert_file = %q\n  tls_key_file = %q\n  tls_min_version = \"tls12\"", cert, key)
	}
	conf := fmt.Sprintf(`storage "file" {
  path = %q
}
listener "tcp" {
  address = "127.0.0.1:%d"
  %s
}
api_addr = %q
disable_mlock = true
ui = false
log_level = "info"
`, filepath.Join(s.Dir, "data"), s.port, listener, s.URL())
	if err := os.WriteFile(s.config, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			t.Logf("---- last lines of the vault server log (%s) ----\n%s", s.logPath, testutil.TailFile(s.logPath, 30))
		}
	})
	s.launch(t)
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	s.waitHealth(ctx, t, func(h *api.HealthResponse) bool { return !h.Initialized })
	init, err := s.client(t, "").Sys().InitWithContext(ctx, &api.InitRequest{SecretShares: 1, SecretThreshold: 1})
	if err != nil {
		t.Fatalf("vault init: %v", err)
	}
	s.unsealKey, s.root = init.Keys[0], init.RootToken
	s.Unseal(t)
	err = s.Admin(t).Sys().EnableAuditWithOptionsWithContext(ctx, "file", &api.EnableAuditOptions{
		Type: "file", Options: map[string]string{"file_path": s.auditPath, "log_raw": "false"},
	})
	if err != nil {
		t.Fatalf("vault enable audit: %v", err)
	}
	return s
}

// Addr is host:port.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.port) }

// URL is the server's base URL.
func (s *Server) URL() string {
	if s.tls {
		return "https://" + s.Addr()
	}
	return "http://" + s.Addr()
}

// RootToken is the initial root token.
func (s *Server) RootToken() string { return s.root }

// KeyURI returns a kubekms key URI for a transit key on this server:
// hcvault:// (http) or vault+https:// with ca-file= (TLS), then query.
func (s *Server) KeyURI(mount, key, query string) string {
	scheme := "hcvault"
	if s.tls {
		scheme = "vault+https"
		query += "&ca-file=" + s.CA.CertFile
	}
	return fmt.Sprintf("%s://%s/%s/keys/%s?%s", scheme, s.Addr(), mount, key, query)
}

// Admin returns a client with the root token. Nothing comes from VAULT_*
// variables but what api.NewClient reads, and the token is set explicitly.
func (s *Server) Admin(t testing.TB) *api.Client { return s.client(t, s.root) }

func (s *Server) client(t testing.TB, token string) *api.Client {
	t.Helper()
	transport := http.DefaultTransport.(*http.Transport).Clone()
	if s.tls {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(s.CA.PEM)
		transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	c, err := api.NewClient(&api.Config{Address: s.URL(), HttpClient: &http.Client{Transport: transport}, Timeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	c.ClearNamespace()
	c.SetToken(token)
	return c
}

// launch starts the server process.
func (s *Server) launch(t testing.TB) {
	t.Helper()
	logFile, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(s.bin, "server", "-config="+s.config)
	// No VAULT_* of the host, and a private HOME (token helper files).
	cmd.Env = []string{"HOME=" + s.Dir, "PATH=" + os.Getenv("PATH")}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		t.Fatalf("start %s: %v", s.bin, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(done)
	}()
	s.mu.Lock()
	s.proc, s.done = cmd, done
	s.mu.Unlock()
}

// waitHealth polls sys/health until ready says the state is the wanted
// one; it fails t when the process exits or the context ends first.
func (s *Server) waitHealth(ctx context.Context, t testing.TB, ready func(*api.HealthResponse) bool) {
	t.Helper()
	c := s.client(t, "")
	var last error
	for {
		hctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		h, err := c.Sys().HealthWithContext(hctx)
		cancel()
		if err == nil && ready(h) {
			return
		}
		if err != nil {
			last = err
		} else {
			last = fmt.Errorf("health %+v", *h)
		}
		s.mu.Lock()
		done := s.done
		s.mu.Unlock()
		select {
		case <-done:
			t.Fatalf("vault server exited: %s", testutil.TailFile(s.logPath, 20))
		case <-ctx.Done():
			t.Fatalf("vault server not ready: %v\n%s", last, testutil.TailFile(s.logPath, 20))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Unseal unseals the server and waits until it is active.
func (s *Server) Unseal(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	s.waitHealth(ctx, t, func(h *api.HealthResponse) bool { return h.Initialized })
	st, err := s.client(t, "").Sys().UnsealWithContext(ctx, s.unsealKey)
	if err != nil {
		t.Fatalf("vault unseal: %v", err)
	}
	if st.Sealed {
		t.Fatalf("vault still sealed after unseal: %+v", st)
	}
	s.waitHealth(ctx, t, func(h *api.HealthResponse) bool { return h.Initialized && !h.Sealed && !h.Standby })
}

// Seal seals the server: it keeps running and answers 503 "Vault is sealed".
func (s *Server) Seal(t testing.TB) {
	t.Helper()
	if err := s.Admin(t).Sys().Seal(); err != nil {
		t.Fatalf("vault seal: %v", err)
	}
}

// Stop stops the server with SIGTERM (storage stays) and waits for it.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	proc, done := s.proc, s.done
	s.mu.Unlock()
	if proc == nil {
		return
	}
	_ = syscall.Kill(-proc.Process.Pid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		s.kill()
		t.Fatal("vault server did not stop within 30 s of SIGTERM; killed")
	}
	s.mu.Lock()
	s.proc = nil
	s.mu.Unlock()
}

// Start starts a stopped server again on the same port and storage, and
// unseals it.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	s.launch(t)
	s.Unseal(t)
}

// Pause stops the process with SIGSTOP: connections are accepted by the
// kernel but never answered. Resume undoes it.
func (s *Server) Pause(t testing.TB) {
	t.Helper()
	testutil.PauseGroup(t, "vault server", s.pid(t))
}

// Resume continues a paused server (SIGCONT).
func (s *Server) Resume(t testing.TB) {
	t.Helper()
	testutil.ResumeGroup(t, "vault server", s.pid(t))
}

// pid is the running server's process group.
func (s *Server) pid(t testing.TB) int {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		t.Fatal("vault server is not running")
	}
	return s.proc.Process.Pid
}

func (s *Server) kill() {
	s.mu.Lock()
	proc, done := s.proc, s.done
	s.proc = nil
	s.mu.Unlock()
	if proc == nil {
		return
	}
	_ = syscall.Kill(-proc.Process.Pid, syscall.SIGCONT)
	_ = syscall.Kill(-proc.Process.Pid, syscall.SIGKILL)
	<-done
}

// Requests counts the requests to path (e.g. "auth/token/renew-self",
// "auth/approle/login") in the server's audit log, successful or not.
func (s *Server) Requests(t testing.TB, path string) int {
	t.Helper()
	f, err := os.Open(s.auditPath)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0
		}
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 4*1024*1024)
	for sc.Scan() {
		var e struct {
			Type    string `json:"type"`
			Request struct {
				Path string `json:"path"`
			} `json:"request"`
		}
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Type == "request" && e.Request.Path == path {
			n++
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// Write writes data to path with the root token.
func (s *Server) Write(t testing.TB, path string, data map[string]any) *api.Secret {
	t.Helper()
	sec, err := s.Admin(t).Logical().Write(path, data)
	if err != nil {
		t.Fatalf("vault write %s: %v", path, err)
	}
	return sec
}

// EnableAuth enables the auth method at mount.
func (s *Server) EnableAuth(t testing.TB, mount, method string) {
	t.Helper()
	if err := s.Admin(t).Sys().EnableAuthWithOptions(mount, &api.EnableAuthOptions{Type: method}); err != nil {
		t.Fatalf("enable %s auth at %s: %v", method, mount, err)
	}
}

// RevokeLogins revokes every token that logins at the auth mount issued.
func (s *Server) RevokeLogins(t testing.TB, mount string) {
	t.Helper()
	s.Write(t, "sys/leases/revoke-prefix/auth/"+mount+"/login", nil)
}
