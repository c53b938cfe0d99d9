// Package testutil holds helpers shared by tests that use real parts
// (SoftHSM2, local-kms, etcd, kube-apiserver).
package testutil

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"google.golang.org/grpc/mem"
)

// RequireRealEnv is the variable that `make test` and CI set: when it is "1",
// a missing real part fails the test instead of skipping it, so CI can never
// silently skip a real-part suite.
const RequireRealEnv = "KUBEKMS_REQUIRE_REAL"

// CacheDir is where the project's scripts put the binaries they build
// (local-kms, etcd, kube-apiserver): $KUBEKMS_CACHE or ~/.cache/kubekms.
func CacheDir() string {
	if d := os.Getenv("KUBEKMS_CACHE"); d != "" {
		return d
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".cache", "kubekms")
	}
	return filepath.Join(os.TempDir(), "kubekms-cache")
}

// Missing reports a real part that is not installed: a failure under
// KUBEKMS_REQUIRE_REAL=1, a skip otherwise.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv(RequireRealEnv) == "1" {
		t.Fatalf("real part missing (%s=1): "+format, append([]any{RequireRealEnv}, args...)...)
	}
	t.Skipf("real part missing (run `make test` to install it): "+format, args...)
}

// Binary finds an executable: the path in envVar if set, else name in the
// cache's bin folder, else name on PATH. It reports it Missing otherwise.
func Binary(t testing.TB, envVar, name string) string {
	t.Helper()
	if envVar != "" {
		if p := os.Getenv(envVar); p != "" {
			if _, err := os.Stat(p); err != nil {
				t.Fatalf("%s=%s: %v", envVar, p, err)
			}
			return p
		}
	}
	if p := filepath.Join(CacheDir(), "bin", name); isExec(p) {
		return p
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	Missing(t, "%s not found (set %s, or put it in %s/bin)", name, envVar, CacheDir())
	return ""
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0
}

// BuildKubekms builds ./cmd/kubekms into dir and returns the binary's path.
// Tests that drive the real binary (interop, soak) use it from TestMain.
func BuildKubekms(dir string) (string, error) {
	bin := filepath.Join(dir, "kubekms")
	cmd := exec.Command("go", "build", "-o", bin, "github.com/kubekms/kubekms/cmd/kubekms")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build kubekms: %w", err)
	}
	return bin, nil
}

// SyncBuffer collects output (logs) written from several goroutines or
// processes; String is safe to call while writes go on.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// FreePort returns a TCP port that was free on 127.0.0.1 a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// MainWithKubekms is a TestMain body for packages that drive the real
// binary: it builds ./cmd/kubekms into a temp folder, stores its path in
// *bin, runs the tests and removes the folder. It returns the exit code.
func MainWithKubekms(m *testing.M, bin *string) int {
	dir, err := os.MkdirTemp("", "kubekms-test-bin")
	if err == nil {
		*bin, err = BuildKubekms(dir)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	return m.Run()
}

// TailFile returns the last lines of a log file (or why it cannot be read),
// for a failed test's output.
func TailFile(path string, lines int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	parts := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return string(bytes.Join(parts, []byte("\n")))
}

// RawCodec is a gRPC client codec that sends and receives raw bytes (a
// *[]byte), for tests that send requests a protobuf encoder would refuse to
// make: grpc.ForceCodecV2(testutil.RawCodec{}).
type RawCodec struct{}

// Marshal sends *v as it is.
func (RawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}

// Unmarshal stores the raw answer in *v.
func (RawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}

// Name is the content subtype the server expects.
func (RawCodec) Name() string { return "proto" }
