package flock_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/flock"
)

func open(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// A lock another holder keeps is waited for, up to the bound (ErrHeld) or
// the context's end; once released it is taken; shared locks share.
func TestWait(t *testing.T) {
	path := filepath.Join(t.TempDir(), "lock")
	holder, waiter := open(t, path), open(t, path) // two open file descriptions: flock treats them as two holders
	ctx := context.Background()
	if err := flock.Wait(ctx, holder, syscall.LOCK_EX, time.Second); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := flock.Wait(ctx, waiter, syscall.LOCK_SH, 100*time.Millisecond); !errors.Is(err, flock.ErrHeld) {
		t.Fatalf("held exclusively: %v, want ErrHeld", err)
	}
	if waited := time.Since(start); waited < 100*time.Millisecond {
		t.Fatalf("gave up after %s, before the 100ms bound", waited)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := flock.Wait(cctx, waiter, syscall.LOCK_SH, time.Minute); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled context: %v, want context.Canceled", err)
	}
	go func() { time.Sleep(50 * time.Millisecond); holder.Close() }()
	if err := flock.Wait(ctx, waiter, syscall.LOCK_SH, 5*time.Second); err != nil {
		t.Fatalf("after the holder closed: %v", err)
	}
	if err := flock.Wait(ctx, open(t, path), syscall.LOCK_SH, 0); err != nil {
		t.Fatalf("a second shared lock: %v", err)
	}
}
