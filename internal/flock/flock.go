// Package flock takes an flock(2) on an open file, waiting a bounded time
// for another process that holds a conflicting one.
package flock

import (
	"context"
	"errors"
	"os"
	"syscall"
	"time"
)

// ErrHeld is returned when another process held a conflicting lock for the
// whole wait.
var ErrHeld = errors.New("held by another process")

// retry is how often a held lock is tried again.
const retry = 20 * time.Millisecond

// Wait takes the lock how (syscall.LOCK_SH or syscall.LOCK_EX) on f. While
// another process holds a conflicting lock it retries, until wait has passed
// (ErrHeld) or ctx ends (ctx.Err()). Closing f releases the lock.
func Wait(ctx context.Context, f *os.File, how int, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			return err
		}
		if time.Now().After(deadline) {
			return ErrHeld
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(retry):
		}
	}
}
