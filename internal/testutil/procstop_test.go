package testutil

import (
	"os/exec"
	"syscall"
	"testing"
	"time"
)

func TestStopGroupWaitsForEveryThread(t *testing.T) {
	cmd := exec.Command("sh", "-c", "while :; do :; done & while :; do :; done")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pgid := cmd.Process.Pid
	t.Cleanup(func() {
		_ = syscall.Kill(-pgid, syscall.SIGCONT)
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	// Wait for the background loop to exist, so the group has two busy processes.
	for i := 0; i < 500; i++ {
		if n, _ := runningInGroup(pgid); n >= 2 {
			break
		}
		time.Sleep(2 * time.Millisecond)
	}
	if n, err := runningInGroup(pgid); err != nil || n < 2 {
		t.Fatalf("busy group: %d running threads (%v), want at least 2", n, err)
	}
	if err := StopGroup(pgid, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if n, err := runningInGroup(pgid); err != nil || n != 0 {
		t.Fatalf("after StopGroup: %d running threads (%v), want 0", n, err)
	}
}
