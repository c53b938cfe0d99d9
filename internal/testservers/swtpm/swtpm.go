// Package swtpm runs a real software TPM 2.0 (swtpm, from Debian's swtpm
// package) for tests, on a unix socket that speaks raw TPM commands, and
// runs tpm2-tools against it. Installed by hack/install-swtpm.sh.
package swtpm

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testutil"
)

// TPM is one swtpm process with its state folder; Stop and Start keep the
// state (persistent keys survive, PCRs reset as on a reboot).
type TPM struct {
	bin, dir string
	cmd      *exec.Cmd
	logs     bytes.Buffer
}

// Start starts swtpm, stopped when t ends. A missing swtpm or tpm2-tools is
// reported with testutil.Missing.
func Start(t testing.TB) *TPM {
	t.Helper()
	bin := testutil.Binary(t, "KUBEKMS_SWTPM", "swtpm")
	testutil.Binary(t, "", "tpm2_pcrextend")
	dir, err := os.MkdirTemp("", "swtpm") // short: unix socket paths allow 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &TPM{bin: bin, dir: dir}
	s.Start(t)
	t.Cleanup(s.stop)
	return s
}

// Socket is the TPM command socket (the key URI's device path).
func (s *TPM) Socket() string { return filepath.Join(s.dir, "sock") }

// Start starts (or restarts) swtpm on the same state.
func (s *TPM) Start(t testing.TB) {
	t.Helper()
	_ = os.Remove(s.Socket())
	_ = os.Remove(s.Socket() + ".ctrl")
	s.cmd = exec.Command(s.bin, "socket", "--tpm2", "--tpmstate", "dir="+s.dir,
		"--server", "type=unixio,path="+s.Socket(), "--ctrl", "type=unixio,path="+s.Socket()+".ctrl",
		"--flags", "not-need-init,startup-clear")
	s.cmd.Stdout, s.cmd.Stderr = &s.logs, &s.logs
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start swtpm: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		// The socket file exists from bind(); wait for listen().
		if c, err := net.Dial("unix", s.Socket()); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			s.stop()
			t.Fatalf("swtpm did not create its socket: %s", s.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop kills swtpm (the TPM is unreachable until Start).
func (s *TPM) Stop(testing.TB) { s.stop() }

func (s *TPM) stop() {
	if s.cmd == nil || s.cmd.ProcessState != nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	_ = s.cmd.Wait()
}

// Tool runs a tpm2-tools command (tpm2_pcrextend, tpm2_evictcontrol, ...)
// against this TPM and returns its output.
func (s *TPM) Tool(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "TPM2TOOLS_TCTI=swtpm:path="+s.Socket())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
