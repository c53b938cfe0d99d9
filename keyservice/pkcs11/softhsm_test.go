package pkcs11

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testservers/softhsm"
	"github.com/kubekms/kubekms/keyservice"
)

// The private SoftHSM2 token these tests run on comes from
// internal/testservers/softhsm, which documents the environment variables it
// reads; hack/install-softhsm.sh installs what it needs.

const (
	testPIN   = softhsm.PIN
	testLabel = softhsm.KeyLabel
)

// softHSM is one private SoftHSM2 installation (see softhsm.Token).
type softHSM struct {
	*softhsm.Token
	pinFile string
}

func newSoftHSM(t testing.TB) *softHSM {
	t.Helper()
	tk := softhsm.Start(t)
	return &softHSM{Token: tk, pinFile: tk.PINFile}
}

func (h *softHSM) keygen(label string, extra ...string) int { return h.Keygen(label, extra...) }
func (h *softHSM) deleteKey(id int)                         { h.DeleteKey(id) }
func (h *softHSM) deleteAll()                               { h.DeleteAll() }
func (h *softHSM) stop()                                    { h.Remove() }
func (h *softHSM) start()                                   { h.Reinsert() }

// uri returns a key URI for this HSM with extra path attributes and query
// attributes appended.
func (h *softHSM) uri(path, query string) string { return h.URI(path, query) }

func (h *softHSM) open(t testing.TB, uri string, opts keyservice.Options) *Service {
	t.Helper()
	svc, err := Open(context.Background(), uri, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = svc.Close() })
	return svc.(*Service)
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitProbe polls Probe until it succeeds (the module re-initializes at most
// once per reinitInterval).
func waitProbe(t testing.TB, svc keyservice.Service) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		id, err := svc.Probe(testCtx(t))
		if err == nil {
			return id
		}
		if time.Now().After(deadline) {
			t.Fatalf("Probe did not recover: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func mustClass(t testing.TB, what string, err error, want keyservice.Class) {
	t.Helper()
	if got := keyservice.Classify(err); got != want {
		t.Fatalf("%s: class %v, want %v (err: %v)", what, got, want, err)
	}
}

func hasSecret(err error, secrets ...string) bool {
	if err == nil {
		return false
	}
	for _, s := range secrets {
		if strings.Contains(err.Error(), s) {
			return true
		}
	}
	return false
}
