// Package cluster starts and stops the real parts of a Kubernetes control plane
// for the end-to-end suite: etcd, the kubekms plugin and kube-apiserver, each
// in its own process group on loopback, stopped in t.Cleanup also on failure.
package cluster

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/procstat"
	"github.com/kubekms/kubekms/internal/testutil"
)

// Process is one child process running in its own process group, with
// stdout and stderr appended to a log file.
type Process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
}

// StartProcess starts bin with args in a new process group, appending its
// output to logPath. The process is killed in t.Cleanup if still running, and
// the tail of its log is printed when the test failed.
func StartProcess(t testing.TB, name, logPath, bin string, args ...string) (*Process, error) {
	t.Helper()
	return StartProcessEnv(t, name, logPath, nil, bin, args...)
}

// StartProcessEnv is StartProcess with env (NAME=value) added to the
// environment.
func StartProcessEnv(t testing.TB, name, logPath string, env []string, bin string, args ...string) (*Process, error) {
	t.Helper()
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Own process group so a stop reaches every child; Pdeathsig so the
	// process dies with the test binary even if it is killed by -timeout.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{name: name, logPath: logPath, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Kill()
		if t.Failed() {
			t.Logf("---- last lines of %s log (%s) ----\n%s", name, logPath, tailFile(logPath, 40))
		}
	})
	return p, nil
}

// Exited reports whether the process has ended, and how.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// Stop sends SIGTERM to the process group and waits up to grace for the
// process to end, then kills the group.
func (p *Process) Stop(grace time.Duration) error {
	p.signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.Kill()
		return fmt.Errorf("%s did not stop within %s after SIGTERM; killed", p.name, grace)
	}
	p.signal(syscall.SIGKILL) // leftover children of the group
	return nil
}

// Kill sends SIGKILL to the process group and waits for the process to end.
func (p *Process) Kill() {
	p.signal(syscall.SIGKILL)
	<-p.done
}

func (p *Process) signal(sig syscall.Signal) {
	// A negative pid addresses the process group; ESRCH means it is gone.
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		_ = p.cmd.Process.Signal(sig)
	}
}

// LogPath is the file that holds the process's output.
func (p *Process) LogPath() string { return p.logPath }

// CPU is the user+system CPU time the process has used so far; 0 once it
// has ended.
func (p *Process) CPU() time.Duration {
	u, s := procstat.CPU(p.cmd.Process.Pid)
	return u + s
}

func tailFile(path string, lines int) string { return testutil.TailFile(path, lines) }

var portMu sync.Mutex
var portsGiven = map[int]bool{}

// FreePort returns a loopback TCP port that was free a moment ago and has not
// been handed out before in this process.
func FreePort(t testing.TB) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	for range 50 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("find a free port: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if !portsGiven[port] {
			portsGiven[port] = true
			return port
		}
	}
	t.Fatal("find a free port: no unused port after 50 tries")
	return 0
}

func hostPort(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
