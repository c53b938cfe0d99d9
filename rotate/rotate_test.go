package rotate

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/convergence"
	"github.com/kubekms/kubekms/envelope/envelopetest"
)

// keyIDPlugin answers Status with whatever key_id it is set to (unhealthy
// for convergence.StoppedKeyID, as kubekms with a revoked key answers).
type keyIDPlugin struct {
	*envelopetest.Plugin
	keyID atomic.Pointer[string]
}

func (p *keyIDPlugin) set(id string) { p.keyID.Store(&id) }

func (p *keyIDPlugin) Status(context.Context) (*kmsservice.StatusResponse, error) {
	id := *p.keyID.Load()
	healthz := "ok"
	if id == convergence.StoppedKeyID {
		healthz = "key revoked"
	}
	return &kmsservice.StatusResponse{Version: "v2", Healthz: healthz, KeyID: id}, nil
}

func testRun(t *testing.T, p *keyIDPlugin, events *[]Event) *run {
	ep := envelopetest.Serve(t, p)
	cfg := Config{Plugins: []string{ep}, CallTimeout: 2 * time.Second, RotationTimeout: 10 * time.Second, ConvergenceTimeout: time.Second,
		Events: func(e Event) { *events = append(*events, e) }}
	return &run{cfg: cfg, st: &State{Version: stateVersion, FromKeyID: "k1"}, log: slog.New(slog.DiscardHandler)}
}

// A plugin that stops writing while the operator rotates the remote key
// reports kubekms.io/writes-stopped: that names no key, so it is neither
// the rotation nor a plugin on the new key.
func TestWritesStoppedIsNoRotation(t *testing.T) {
	t.Parallel()
	p := &keyIDPlugin{Plugin: envelopetest.NewPlugin()}
	p.set(convergence.StoppedKeyID)
	var events []Event
	r := testRun(t, p, &events)
	go func() {
		time.Sleep(1500 * time.Millisecond)
		p.set("k2")
	}()
	if err := r.rotate(t.Context()); err != nil {
		t.Fatal(err)
	}
	if r.st.ToKeyID != "k2" {
		t.Fatalf("the rotation was taken to be to %q", r.st.ToKeyID)
	}
	var said int
	for _, e := range events {
		if strings.Contains(e.Message, "writes stopped") {
			said++
		}
	}
	if said != 1 {
		t.Errorf("want the stopped plugin named once, events %+v", events)
	}

	p.set(convergence.StoppedKeyID)
	err := r.waitPlugins(t.Context())
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "writes stopped") {
		t.Errorf("waiting for plugins while one reports writes stopped: %v", err)
	}
}
