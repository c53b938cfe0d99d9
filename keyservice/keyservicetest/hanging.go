package keyservicetest

import (
	"context"
	"sync/atomic"

	"github.com/kubekms/kubekms/keyservice"
)

// HangingProbe wraps a real Service; while Hang is set, Probe blocks until
// Release is closed or its context ends, like a key service that stopped
// answering (SIGSTOP). Create it with NewHangingProbe.
type HangingProbe struct {
	keyservice.Service
	Hang    atomic.Bool
	Release chan struct{}
}

// NewHangingProbe wraps svc; it does not hang until Hang is set.
func NewHangingProbe(svc keyservice.Service) *HangingProbe {
	return &HangingProbe{Service: svc, Release: make(chan struct{})}
}

// Probe hangs while Hang is set, then delegates.
func (s *HangingProbe) Probe(ctx context.Context) (string, error) {
	if s.Hang.Load() {
		select {
		case <-s.Release:
		case <-ctx.Done():
			return "", keyservice.Transient("probe", ctx.Err())
		}
	}
	return s.Service.Probe(ctx)
}
