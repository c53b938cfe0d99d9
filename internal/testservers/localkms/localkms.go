// Package localkms runs local-kms (github.com/nsmithuk/local-kms), a real AWS
// KMS API server, for tests.
//
// local-kms always binds all interfaces, so it runs inside a private network
// namespace: a holder process (`unshare --net`, loopback up) keeps the
// namespace alive, and local-kms is started in it with `nsenter`, so it can be
// stopped and restarted on the same address. The test process stays in its
// own namespace and reaches the server with a dialer that opens its sockets
// inside the private one (setns on a locked OS thread). Nothing outside the
// namespace can connect to the server.
//
// Needs root (or CAP_SYS_ADMIN) and unshare, nsenter and ip; the local-kms
// binary comes from $LOCAL_KMS, the kubekms cache (hack/install-local-kms.sh)
// or PATH.
package localkms

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"golang.org/x/sys/unix"

	"github.com/kubekms/kubekms/internal/testutil"
)

const (
	// Region and Account are what the server puts in its key ARNs.
	Region  = "eu-west-2"
	Account = "111122223333"
	// Port is the server's port inside its private namespace, where nothing
	// else listens.
	Port = 4599
	// AccessKeyID and SecretAccessKey are dummy static test credentials
	// (local-kms does not check signatures).
	AccessKeyID     = "AKIAKUBEKMSLOCALTEST"
	SecretAccessKey = "local-kms-test-secret-not-a-real-one"

	startTimeout = 30 * time.Second
)

// Seed is the server's initial keys and aliases.
type Seed struct {
	// AESKeys are the IDs (UUIDs) of symmetric encryption keys; each gets
	// BackingKeys random versions (at least 1).
	AESKeys     []string
	BackingKeys int
	// HMACKeys are the IDs of HMAC_256 keys (a key that cannot encrypt).
	HMACKeys []string
	// Aliases maps "alias/NAME" to a key ID.
	Aliases map[string]string
}

// Server is one local-kms process in its own network namespace.
type Server struct {
	bin, dataDir, seedPath, logPath string

	holder   *exec.Cmd
	holderIn io.WriteCloser
	nsPath   string

	mu   sync.Mutex
	proc *exec.Cmd
	done chan struct{}
}

// Start starts local-kms with seed and stops it (and its namespace) when the
// test ends. It reports a missing binary or tool with testutil.Missing.
func Start(t testing.TB, seed Seed) *Server {
	t.Helper()
	bin := testutil.Binary(t, "LOCAL_KMS", "local-kms")
	for _, tool := range []string{"unshare", "nsenter", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			testutil.Missing(t, "%s not found (apt-get install util-linux iproute2)", tool)
		}
	}
	dir := t.TempDir()
	s := &Server{
		bin:      bin,
		dataDir:  filepath.Join(dir, "data"),
		seedPath: filepath.Join(dir, "seed.yaml"),
		logPath:  filepath.Join(dir, "local-kms.log"),
	}
	if err := os.MkdirAll(s.dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(s.seedPath, seed.yaml(), 0o600); err != nil {
		t.Fatal(err)
	}
	s.startHolder(t)
	t.Cleanup(func() {
		if t.Failed() {
			s.logTail(t)
		}
	})
	s.Start(t)
	t.Cleanup(func() { s.stop() })
	return s
}

func (seed Seed) yaml() []byte {
	var b bytes.Buffer
	b.WriteString("Keys:\n  Symmetric:\n    Aes:\n")
	n := max(seed.BackingKeys, 1)
	for _, id := range seed.AESKeys {
		fmt.Fprintf(&b, "      - Metadata:\n          KeyId: %s\n        BackingKeys:\n", id)
		for range n {
			fmt.Fprintf(&b, "          - %s\n", randomHex())
		}
	}
	if len(seed.HMACKeys) > 0 {
		b.WriteString("    Hmac:\n")
		for _, id := range seed.HMACKeys {
			fmt.Fprintf(&b, "      - Metadata:\n          KeyId: %s\n          KeyUsage: GENERATE_VERIFY_MAC\n          KeySpec: HMAC_256\n        BackingKeys:\n          - %s\n", id, randomHex())
		}
	}
	if len(seed.Aliases) > 0 {
		b.WriteString("Aliases:\n")
		for alias, id := range seed.Aliases {
			fmt.Fprintf(&b, "  - AliasName: %s\n    TargetKeyId: %s\n", alias, id)
		}
	}
	return b.Bytes()
}

func randomHex() string {
	k := make([]byte, 32)
	_, _ = rand.Read(k) // never fails (crypto/rand)
	return hex.EncodeToString(k)
}

// startHolder creates the private network namespace, held open by a process
// that exits when its stdin closes (so also when the test binary dies).
func (s *Server) startHolder(t testing.TB) {
	t.Helper()
	cmd := exec.Command("unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo ready && exec cat")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start network namespace holder: %v", err)
	}
	s.holder, s.holderIn = cmd, stdin
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != "ready" {
			err = fmt.Errorf("unexpected output %q", line)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			_ = cmd.Wait()
			msg := strings.TrimSpace(stderr.String())
			if os.Geteuid() != 0 {
				testutil.Missing(t, "a private network namespace for local-kms needs root: %v: %s", err, msg)
			}
			t.Fatalf("create a private network namespace (unshare --net): %v: %s", err, msg)
		}
	case <-time.After(startTimeout):
		t.Fatal("network namespace holder did not start")
	}
	s.nsPath = fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid)
	// Guard the isolation itself: the server must never share our network.
	if same, err := sameFile(s.nsPath, "/proc/self/ns/net"); err != nil || same {
		t.Fatalf("local-kms network namespace %s is not private (same as ours: %v, %v)", s.nsPath, same, err)
	}
}

func sameFile(a, b string) (bool, error) {
	sa, err := os.Stat(a)
	if err != nil {
		return false, err
	}
	sb, err := os.Stat(b)
	if err != nil {
		return false, err
	}
	return os.SameFile(sa, sb), nil
}

// Start starts local-kms (again, after Stop) on the same data and address.
func (s *Server) Start(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		t.Fatal("local-kms is already running")
	}
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("nsenter", "--net="+s.nsPath, "--", s.bin)
	cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"KMS_DATA_PATH=" + s.dataDir,
		"KMS_SEED_PATH=" + s.seedPath,
		"PORT=" + strconv.Itoa(Port),
		"KMS_REGION=" + Region,
		"KMS_ACCOUNT_ID=" + Account,
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start local-kms: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.proc, s.done = cmd, done

	deadline := time.Now().Add(startTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := s.DialContext(ctx, "tcp", s.addr())
		cancel()
		if err == nil {
			_ = c.Close()
			return
		}
		select {
		case <-done:
			s.proc = nil
			t.Fatalf("local-kms exited at start (log: %s)", s.logPath)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("local-kms did not listen within %v: %v (log: %s)", startTimeout, err, s.logPath)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop kills local-kms; its namespace and data stay, so Start brings the
// same keys back on the same address.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
}

// Pause stops local-kms with SIGSTOP: connections stay open and every call
// hangs, as with a key service that stopped answering. Resume continues it.
func (s *Server) Pause(t testing.TB) {
	t.Helper()
	testutil.PauseGroup(t, "local-kms", s.pid(t))
}

// Resume continues a paused local-kms (SIGCONT).
func (s *Server) Resume(t testing.TB) {
	t.Helper()
	testutil.ResumeGroup(t, "local-kms", s.pid(t))
}

// pid is the running server's process group.
func (s *Server) pid(t testing.TB) int {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		t.Fatal("local-kms is not running")
	}
	return s.proc.Process.Pid
}

func (s *Server) stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		return nil
	}
	_ = syscall.Kill(-s.proc.Process.Pid, syscall.SIGKILL)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		return errors.New("local-kms did not exit after SIGKILL")
	}
	s.proc = nil
	return nil
}

func (s *Server) logTail(t testing.TB) {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return
	}
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	t.Logf("local-kms log tail:\n%s", b)
}

func (s *Server) addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(Port)) }

// Endpoint is the server's URL, reachable only through HTTPClient, or from
// a process started in the server's namespace (see NetNS).
func (s *Server) Endpoint() string { return "http://" + s.addr() }

// NetNS is the path of the server's network namespace: a separate process
// reaches Endpoint when started with `nsenter --net=NetNS() -- cmd ...`.
func (s *Server) NetNS() string { return s.nsPath }

// ClientEnv is the environment (NAME=value) that points an AWS SDK client in
// a separate process at the static test credentials and the test region,
// and at nothing else: no shared config files, no instance metadata, no
// endpoint or CA bundle from the caller's environment (the caller drops
// every other AWS_ variable, such as AWS_CA_BUNDLE, from what it passes on).
// noFile is a path that does not exist.
func ClientEnv(noFile string) []string {
	return []string{
		"AWS_ACCESS_KEY_ID=" + AccessKeyID,
		"AWS_SECRET_ACCESS_KEY=" + SecretAccessKey,
		"AWS_REGION=" + Region,
		"AWS_CONFIG_FILE=" + noFile,
		"AWS_SHARED_CREDENTIALS_FILE=" + noFile,
		"AWS_EC2_METADATA_DISABLED=true",
	}
}

// Forward listens on 127.0.0.1 (a free port) in the caller's namespace and
// relays each connection to the server through DialContext, for code that
// cannot be given HTTPClient (a Service opened from its key URI alone). It
// returns the forwarder's URL and stops it when the test ends. The relay
// adds one loopback hop to every request.
func (s *Server) Forward(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("local-kms forwarder: %v", err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	track := func(c net.Conn, add bool) bool {
		mu.Lock()
		defer mu.Unlock()
		if add && conns == nil {
			return false
		}
		if add {
			conns[c] = true
		} else if conns != nil {
			delete(conns, c)
		}
		return true
	}
	t.Cleanup(func() {
		_ = l.Close()
		mu.Lock()
		for c := range conns {
			_ = c.Close()
		}
		conns = nil
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			in, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { s.relay(in, track) })
		}
	})
	return "http://" + l.Addr().String()
}

func (s *Server) relay(in net.Conn, track func(net.Conn, bool) bool) {
	defer in.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	out, err := s.DialContext(ctx, "tcp", s.addr())
	cancel()
	if err != nil {
		return
	}
	defer out.Close()
	if !track(in, true) || !track(out, true) {
		return
	}
	defer track(in, false)
	defer track(out, false)
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go pipe(out, in)
	go pipe(in, out)
	<-done
	<-done
}

// KeyARN returns the ARN of a seeded key.
func KeyARN(keyID string) string {
	return fmt.Sprintf("arn:aws:kms:%s:%s:key/%s", Region, Account, keyID)
}

// HTTPClient returns a new HTTP client (with its own connection pool) whose
// connections open in the server's namespace. It ignores proxy settings.
func (s *Server) HTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		Proxy:               nil,
		DialContext:         s.DialContext,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
	}}
}

// DialContext dials 127.0.0.1 inside the server's network namespace.
func (s *Server) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if host != "127.0.0.1" || (network != "tcp" && network != "tcp4") {
		return nil, fmt.Errorf("local-kms dialer: only tcp to 127.0.0.1, not %s %s", network, addr)
	}
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The socket is created in the network namespace of the calling OS
		// thread, so this goroutine keeps its thread while it is switched.
		runtime.LockOSThread()
		c, restored, err := dialInNamespace(ctx, s.nsPath, network, addr)
		if restored {
			runtime.UnlockOSThread()
		} // else the runtime discards the thread when the goroutine ends
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func dialInNamespace(ctx context.Context, nsPath, network, addr string) (c net.Conn, restored bool, err error) {
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, true, err
	}
	defer self.Close()
	target, err := os.Open(nsPath)
	if err != nil {
		return nil, true, fmt.Errorf("local-kms network namespace: %w", err)
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, true, fmt.Errorf("enter local-kms network namespace: %w", err)
	}
	var d net.Dialer
	c, err = d.DialContext(ctx, network, addr)
	if rerr := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); rerr != nil {
		if c != nil {
			_ = c.Close()
		}
		return nil, false, fmt.Errorf("leave local-kms network namespace: %w", rerr)
	}
	return c, true, err
}

// AdminClient returns a KMS client with static test credentials for the
// tests' own calls (UpdateAlias, DisableKey, ...).
func (s *Server) AdminClient() *kms.Client {
	return kms.New(kms.Options{
		Region:           Region,
		BaseEndpoint:     aws.String(s.Endpoint()),
		Credentials:      credentials.NewStaticCredentialsProvider(AccessKeyID, SecretAccessKey, ""),
		HTTPClient:       s.HTTPClient(),
		RetryMaxAttempts: 1,
	})
}
