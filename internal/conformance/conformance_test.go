package conformance_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/conformance"
	"github.com/kubekms/kubekms/internal/testutil"
)

var kubekmsBin string

func TestMain(m *testing.M) { os.Exit(testutil.MainWithKubekms(m, &kubekmsBin)) }

// TestServe runs the conformance checks against `kubekms serve` with its
// defaults but for the folders.
func TestServe(t *testing.T) {
	dir, err := os.MkdirTemp("", "kkcf") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "kms.sock")
	cmd := exec.Command(kubekmsBin, "serve", "--listen", "unix://"+sock, "--key-uri", "softkey://"+filepath.Join(dir, "keyring.json"))
	logs := &testutil.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("kubekms log:\n%s", logs.String())
		}
	})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no socket after 20 s:\n%s", logs.String())
		}
	}
	conformance.Run(t, "unix://"+sock, "kubekms", kubekmsBin)
}
