package testutil

import (
	"os"
	"syscall"
	"testing"
)

// File helpers for tests that make hostile files; each ends t on failure.

// Chmod sets p's mode.
func Chmod(t testing.TB, p string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

// Chown gives p to uid (and the group of the same number).
func Chown(t testing.TB, p string, uid int) {
	t.Helper()
	if err := os.Chown(p, uid, uid); err != nil {
		t.Fatal(err)
	}
}

// Mkfifo makes a named pipe (mode 0600) at p.
func Mkfifo(t testing.TB, p string) {
	t.Helper()
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
}

// Mkdir makes the folder p (mode 0700).
func Mkdir(t testing.TB, p string) {
	t.Helper()
	if err := os.Mkdir(p, 0o700); err != nil {
		t.Fatal(err)
	}
}

// WriteFile writes s to p (mode 0600 when it creates p).
func WriteFile(t testing.TB, p, s string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// CopyFile copies from's content to to (mode 0600 when it creates to).
func CopyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}
