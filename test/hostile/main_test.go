// Package hostile drives the built kubekms binary the way a careless or
// hostile operator would: damaged and hostile files (keyring, state, socket,
// snapshot, PIN and token files), racing starts, signals, undecodable and
// forged requests, bad flags. Every case states its expected outcome (an exit
// code and a message, or a gRPC code) and, where ciphertexts were answered,
// that none is lost: a fresh plugin decrypts every one of them.
//
// docs/reliability.md lists the cases. Needs root (a second uid via chown and
// setpriv, network namespaces for local-kms), strace and the real parts of
// `make deps`.
package hostile

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/internal/testutil"
)

var bin string

func TestMain(m *testing.M) { os.Exit(testutil.MainWithKubekms(m, &bin)) }

// otherUID is the uid of "another user" (nobody).
const otherUID = 65534

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		testutil.Missing(t, "root (to act as a second user with chown and setpriv)")
	}
}

// shortDir is a private folder with a short path (unix socket paths are
// limited to 108 bytes), removed when t ends.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = os.Chmod(dir, 0o700)
		os.RemoveAll(dir)
	})
	return dir
}

// result is how one kubekms command ended.
type result struct {
	code           int
	stdout, stderr string
	took           time.Duration
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
}

// want is an expected end: an exit code and a text stderr (or stdout) holds.
type want struct {
	code int
	msg  string
}

func (r result) check(t *testing.T, w want) {
	t.Helper()
	if r.code != w.code || !strings.Contains(r.stderr+r.stdout, w.msg) {
		t.Fatalf("want exit %d saying %q; got %s", w.code, w.msg, r)
	}
	for _, bad := range []string{"panic:", "goroutine ", "SIGSEGV", "fatal error"} {
		if strings.Contains(r.stderr, bad) {
			t.Fatalf("crashed (%q): %s", bad, r)
		}
	}
}

// command builds a kubekms command that dies with the test binary.
func command(args ...string) *exec.Cmd {
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	return cmd
}

// kubekms runs one command; more than limit is a hang and fails the test.
func kubekms(t *testing.T, limit time.Duration, args ...string) result {
	t.Helper()
	return runCmd(t, limit, command(args...))
}

func runCmd(t *testing.T, limit time.Duration, cmd *exec.Cmd) result {
	t.Helper()
	return startCmd(t, cmd).wait(t, limit)
}

// running is a started command whose output is collected.
type running struct {
	cmd            *exec.Cmd
	start, end     time.Time // end: set when done is
	stdout, stderr testutil.SyncBuffer
	done           chan error
}

func startCmd(t *testing.T, cmd *exec.Cmd) *running {
	t.Helper()
	r := &running{cmd: cmd, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = &r.stdout, &r.stderr
	r.start = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := cmd.Wait()
		r.end = time.Now()
		r.done <- err
	}()
	return r
}

// wait waits for the end; more than limit since the start is a hang and
// fails the test.
func (r *running) wait(t *testing.T, limit time.Duration) result {
	t.Helper()
	var err error
	select {
	case err = <-r.done:
	case <-time.After(time.Until(r.start.Add(limit))):
		_ = syscall.Kill(-r.cmd.Process.Pid, syscall.SIGKILL)
		<-r.done
		t.Fatalf("%v hangs (killed after %s): stdout %s stderr %s", r.cmd.Args, limit, r.stdout.String(), r.stderr.String())
	}
	res := result{stdout: r.stdout.String(), stderr: r.stderr.String(), took: r.end.Sub(r.start)}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		res.code = ee.ExitCode()
	case errors.As(err, &ee):
		res.code = 128 + int(ee.Sys().(syscall.WaitStatus).Signal())
	default:
		t.Fatal(err)
	}
	return res
}

// server is a running `kubekms serve`.
type server struct {
	t       *testing.T
	cmd     *exec.Cmd
	socket  string
	metrics string // host:port, when started with metrics
	logs    *testutil.SyncBuffer
	done    chan struct{}
	err     error
	conn    *grpc.ClientConn
	kms     kmsapi.KeyManagementServiceClient
}

// serveArgs are the flags every test plugin gets.
func serveArgs(dir, keyURI string) []string {
	return []string{"serve", "--listen", "unix://" + filepath.Join(dir, "kms.sock"), "--key-uri", keyURI,
		"--state-file", filepath.Join(dir, "state.json"), "--log-format", "text", "--probe-interval", "1s"}
}

// startServe starts serve with args (see serveArgs) and waits until it
// answers a healthy Status. wrap, if set, wraps the command line.
func startServe(t *testing.T, args []string, env []string, wrap func([]string) []string) *server {
	t.Helper()
	s := startServeNoWait(t, args, env, wrap)
	s.waitHealthy(20 * time.Second)
	return s
}

func startServeNoWait(t *testing.T, args []string, env []string, wrap func([]string) []string) *server {
	t.Helper()
	argv := append([]string{bin}, args...)
	port := testutil.FreePort(t)
	metrics := fmt.Sprintf("127.0.0.1:%d", port)
	argv = append(argv, "--metrics-addr", metrics)
	if wrap != nil {
		argv = wrap(argv)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Env = append(cleanEnv(), env...)
	s := &server{t: t, cmd: cmd, logs: &testutil.SyncBuffer{}, done: make(chan struct{}), metrics: metrics}
	for i, a := range args {
		if a == "--listen" {
			s.socket = strings.TrimPrefix(args[i+1], "unix://")
		}
	}
	cmd.Stdout, cmd.Stderr = s.logs, s.logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.err = cmd.Wait(); close(s.done) }()
	t.Cleanup(func() { s.kill(syscall.SIGKILL) })
	conn, err := grpc.NewClient("unix://"+s.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	s.conn, s.kms = conn, kmsapi.NewKeyManagementServiceClient(conn)
	return s
}

// cleanEnv is the test's environment without AWS_ settings (the host's
// never leak into a plugin).
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AWS_") {
			env = append(env, kv)
		}
	}
	return env
}

func (s *server) exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// status asks for Status with a short deadline.
func (s *server) status() (*kmsapi.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return s.kms.Status(ctx, &kmsapi.StatusRequest{})
}

// waitHealthz waits until Status's healthz satisfies ok.
func (s *server) waitHealthz(limit time.Duration, what string, ok func(healthz string) bool) *kmsapi.StatusResponse {
	s.t.Helper()
	deadline := time.Now().Add(limit)
	for {
		if s.exited() {
			s.t.Fatalf("serve exited (%v) while waiting for %s: %s", s.err, what, s.logs)
		}
		if st, err := s.status(); err == nil && ok(st.Healthz) {
			return st
		}
		if time.Now().After(deadline) {
			st, err := s.status()
			s.t.Fatalf("no %s within %s: last Status %+v, %v\nlogs: %s", what, limit, st, err, s.logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *server) waitHealthy(limit time.Duration) *kmsapi.StatusResponse {
	s.t.Helper()
	return s.waitHealthz(limit, "healthy Status", func(h string) bool { return h == "ok" })
}

// kill signals the process group and waits for the end.
func (s *server) kill(sig syscall.Signal) {
	if s.exited() {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, sig)
	select {
	case <-s.done:
	case <-time.After(20 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	}
}

// answer is one Encrypt the plugin answered.
type answer struct {
	plain []byte
	resp  *kmsapi.EncryptResponse
}

// ledger keeps every answered Encrypt, to prove none is lost.
type ledger struct {
	mu      sync.Mutex
	answers []answer
}

// encrypt sends n Encrypts and records the answered ones; it returns how
// many failed, by gRPC code.
func (l *ledger) encrypt(s *server, n int) map[string]int {
	failed := map[string]int{}
	for range n {
		plain := make([]byte, 32)
		_, _ = rand.Read(plain)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		resp, err := s.kms.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: plain, Uid: "hostile-enc"})
		cancel()
		if err != nil {
			failed[status.Code(err).String()]++
			continue
		}
		l.mu.Lock()
		l.answers = append(l.answers, answer{plain, resp})
		l.mu.Unlock()
	}
	return failed
}

// keyIDs returns the distinct key IDs of the answers.
func (l *ledger) keyIDs() map[string]int {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int{}
	for _, a := range l.answers {
		out[a.resp.KeyId]++
	}
	return out
}

// verify decrypts every answer through s (a fresh plugin: no cache, no
// state) and fails the test for each one that does not come back.
func (l *ledger) verify(t *testing.T, s *server) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.answers) == 0 {
		t.Fatal("no ciphertext was answered: nothing proves that nothing is lost")
	}
	lost := 0
	var first error
	for _, a := range l.answers {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		got, err := s.kms.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: a.resp.Ciphertext, KeyId: a.resp.KeyId,
			Annotations: a.resp.Annotations, Uid: "hostile-check"})
		cancel()
		if err != nil || !bytes.Equal(got.GetPlaintext(), a.plain) {
			lost++
			if first == nil {
				first = fmt.Errorf("key_id %s: %v", a.resp.KeyId, err)
			}
		}
	}
	if lost > 0 {
		t.Fatalf("LOST %d of %d answered ciphertexts (first: %v)", lost, len(l.answers), first)
	}
	t.Logf("all %d answered ciphertexts decrypt with a fresh plugin", len(l.answers))
}

// freshServe starts a plugin with no state on keyURI in a new folder: the
// judge of a ledger.
func freshServe(t *testing.T, keyURI string, env []string, wrap func([]string) []string, extra ...string) *server {
	t.Helper()
	dir := shortDir(t)
	args := append(serveArgs(dir, keyURI), "--no-state")
	return startServe(t, append(args, extra...), env, wrap)
}

// softkeyURI is the key URI of a keyring in dir.
func softkeyURI(dir string) string { return "softkey://" + filepath.Join(dir, "keyring.json") }

// asOther runs a shell command as another user (uid 65534).
func asOther(t *testing.T, script string) {
	t.Helper()
	out, err := exec.Command("setpriv", "--reuid", fmt.Sprint(otherUID), "--regid", fmt.Sprint(otherUID), "--clear-groups",
		"sh", "-c", script).CombinedOutput()
	if err != nil {
		t.Fatalf("as uid %d: %s: %v: %s", otherUID, script, err, out)
	}
}
