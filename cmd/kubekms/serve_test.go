package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"testing"
	"time"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope/kmsclient"

	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestServe runs `kubekms serve` in-process: socket mode, a round trip with
// the uid, metrics and probe endpoints, the GC target, then a graceful stop
// that removes the socket.
func TestServe(t *testing.T) {
	t.Setenv("GOGC", "") // unset: serve sets its own GC target
	defer debug.SetGCPercent(100)
	dir, err := os.MkdirTemp("", "kksv")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "run", "kms.sock")
	keyring := filepath.Join(dir, "keyring.json")
	addr := fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := newRootCmd()
	cmd.SetArgs([]string{"serve", "--listen", "unix://" + sock, "--key-uri", "softkey://" + keyring,
		"--state-file", filepath.Join(dir, "state.json"), "--metrics-addr", addr})
	logs := &strings.Builder{}
	cmd.SetErr(logs)
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()

	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no socket")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := debug.SetGCPercent(serveGOGC); got != serveGOGC {
		t.Errorf("GC percent %d while serving without GOGC, want %d", got, serveGOGC)
	}
	if st, _ := os.Stat(sock); st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v", st.Mode().Perm())
	}
	c, err := kmsclient.Dial("unix://"+sock, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	enc, err := c.Encrypt(ctx, "serve-test-uid", []byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Decrypt(ctx, "serve-test-uid", &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID, Annotations: enc.Annotations}); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/livez", "/readyz", "/healthz"} {
		if code, body := get(t, "http://"+addr+path); code != 200 || strings.TrimSpace(body) != "ok" {
			t.Errorf("%s: %d %q", path, code, body)
		}
	}
	_, metrics := get(t, "http://"+addr+"/metrics")
	for _, want := range []string{
		`kubekms_grpc_requests_total{code="OK",method="Decrypt",service="v2"} 1`,
		`kubekms_grpc_request_duration_seconds_bucket{code="OK",method="Encrypt",service="v2"`,
		`kubekms_keyservice_calls_total{operation="wrap",outcome="ok"} 1`,
		`kubekms_keyservice_call_duration_seconds_bucket{operation="probe"`,
		`kubekms_local_kek_cache_size 1`,
		`kubekms_local_kek_created_total{reason="startup"} 1`,
		`kubekms_key_id_info{key_id_hash="sha256:`,
		`kubekms_healthy 1`,
		`kubekms_outage_grace_remaining_seconds 3600`,
		`kubekms_local_kek_uses`,
		`kubekms_local_kek_age_seconds`,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/metrics", nil)
	req.Header.Set("Accept", "application/openmetrics-text; version=1.0.0")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	om, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(om), `# {uid="serve-test-uid"}`) {
		t.Error("OpenMetrics latency histogram lacks the uid exemplar")
	}
	if !strings.Contains(logs.String(), `"uid":"serve-test-uid"`) {
		t.Error("logs lack the uid")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left after shutdown: %v", err)
	}
}

func TestMetricsAddrDefaultsToLoopback(t *testing.T) {
	for in, want := range map[string]string{
		":9595":          "127.0.0.1:9595",
		"127.0.0.1:9595": "127.0.0.1:9595",
		"0.0.0.0:9595":   "0.0.0.0:9595",
		"[::1]:9595":     "[::1]:9595",
	} {
		if got := loopbackDefault(in); got != want {
			t.Errorf("loopbackDefault(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestServeSIGHUPReprobes: SIGHUP makes a running serve re-probe its key
// service at once and log the outcome, instead of ending the process. The
// probe interval is 1 h, so only the re-probe can show the rotation.
func TestServeSIGHUPReprobes(t *testing.T) {
	dir, err := os.MkdirTemp("", "kkhup")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "run", "kms.sock")
	keyring := filepath.Join(dir, "keyring.json")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := newRootCmd()
	cmd.SetArgs([]string{"serve", "--listen", "unix://" + sock, "--key-uri", "softkey://" + keyring,
		"--no-state", "--probe-interval", "1h", "--revocation-bound", "1h"})
	logs := &testutil.SyncBuffer{}
	cmd.SetErr(logs)
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !ok() {
			select {
			case err := <-done:
				t.Fatalf("serve ended while waiting for %s: %v\n%s", what, err, logs)
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s:\n%s", what, logs)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor("serving log line", func() bool { return strings.Contains(logs.String(), `"msg":"serving"`) })
	ring, err := softkey.Rotate(keyring)
	if err != nil {
		t.Fatal(err)
	}
	newKeyID := ring.KeyID(ring.Primary)
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor("re-probe log line", func() bool {
		return strings.Contains(logs.String(), "SIGHUP: re-probing the key service") &&
			strings.Contains(logs.String(), `"msg":"re-probed the key service"`) &&
			strings.Contains(logs.String(), `"key_id":"`+newKeyID+`"`)
	})
	c, err := kmsclient.Dial("unix://"+sock, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil || st.KeyID != newKeyID {
		t.Fatalf("Status after SIGHUP: %+v %v, want key_id %q", st, err, newKeyID)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("serve: %v", err)
	}
}
