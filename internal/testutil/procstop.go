package testutil

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/procstat"
)

// StopGroup sends SIGSTOP to the process group pgid and waits until every
// thread of every process in the group has stopped. kill(2) returns before
// the threads stop: a request sent in between can still be answered, which
// made tests that pause a server flaky on a loaded machine.
func StopGroup(pgid int, timeout time.Duration) error {
	if err := syscall.Kill(-pgid, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("stop process group %d: %w", pgid, err)
	}
	deadline := time.Now().Add(timeout)
	for {
		running, err := runningInGroup(pgid)
		if err != nil {
			return err
		}
		if running == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("process group %d: %d threads still running %v after SIGSTOP", pgid, running, timeout)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// runningInGroup counts the threads of processes in group pgid that are not
// stopped (state T) or gone (Z, X).
func runningInGroup(pgid int) (int, error) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, fmt.Errorf("list processes: %w", err)
	}
	running := 0
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		_, group, ok := procStat(filepath.Join("/proc", p.Name(), "stat"))
		if !ok || group != pgid {
			continue
		}
		tasks, err := os.ReadDir(filepath.Join("/proc", p.Name(), "task"))
		if err != nil {
			continue // the process exited
		}
		for _, task := range tasks {
			s, _, ok := procStat(filepath.Join("/proc", p.Name(), "task", task.Name(), "stat"))
			if ok && !strings.ContainsRune("TtZX", rune(s)) {
				running++
			}
		}
	}
	return running, nil
}

// procStat reads the state and process group from a /proc stat file; ok is
// false if the file is gone or malformed.
func procStat(path string) (state byte, pgrp int, ok bool) {
	f, ok := procstat.StatFields(path)
	if !ok || len(f) < 3 || len(f[0]) != 1 {
		return 0, 0, false
	}
	g, err := strconv.Atoi(f[2])
	if err != nil {
		return 0, 0, false
	}
	return f[0][0], g, true
}

// PauseGroup stops the process group of a test server (StopGroup), or fails
// the test; name says which server in the message.
func PauseGroup(t testing.TB, name string, pgid int) {
	t.Helper()
	if err := StopGroup(pgid, 10*time.Second); err != nil {
		t.Fatalf("pause %s: %v", name, err)
	}
}

// ResumeGroup continues a paused process group (SIGCONT), or fails the test.
func ResumeGroup(t testing.TB, name string, pgid int) {
	t.Helper()
	if err := syscall.Kill(-pgid, syscall.SIGCONT); err != nil {
		t.Fatalf("resume %s: %v", name, err)
	}
}
