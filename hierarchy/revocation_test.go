package hierarchy_test

import (
	"context"
	"errors"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

// TestRevocationStopsWritesAndReEnableResumes: while the key is revoked,
// Status reports StoppedKeyID (so kube-apiserver stops extending its write
// seed) and Encrypt is refused; when the key is enabled again, Status reports
// the real key_id again and Encrypt agrees with it, with no restart.
func TestRevocationStopsWritesAndReEnableResumes(t *testing.T) {
	f := newFixture(t)
	h := f.open(t, f.config())
	before := h.Status(context.Background())
	if !before.OK || before.KeyID == hierarchy.StoppedKeyID || before.Mode != hierarchy.ModeHealthy {
		t.Fatalf("before: %+v", before)
	}
	setDisabled(t, f.path, true)
	h.Refresh(context.Background())
	st := h.Status(context.Background())
	if st.OK || st.KeyID != hierarchy.StoppedKeyID || st.Mode != hierarchy.ModeRevoked {
		t.Fatalf("revoked: %+v, want not ok with key_id %q", st, hierarchy.StoppedKeyID)
	}
	if _, err := h.Encrypt(context.Background(), seed); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Encrypt while revoked: %v, want revoked", err)
	}
	setDisabled(t, f.path, false)
	h.Refresh(context.Background())
	after := h.Status(context.Background())
	if !after.OK || after.KeyID != before.KeyID {
		t.Fatalf("re-enabled: %+v, want ok with key_id %q", after, before.KeyID)
	}
	if s := encrypt(t, h); s.KeyID != after.KeyID {
		t.Fatalf("Encrypt key_id %q, Status %q", s.KeyID, after.KeyID)
	}
}

// TestOutagePastGraceRefuses: within the grace nothing changes for the
// apiserver (same key_id, Encrypt and cached Decrypt work); past it, kubekms
// cannot vouch for the key and refuses both as unavailable; when the key
// service answers again, everything works.
func TestOutagePastGraceRefuses(t *testing.T) {
	f := newFixture(t)
	h := f.open(t, f.config()) // grace 2 h
	s := encrypt(t, h)
	keyID := h.Status(context.Background()).KeyID
	if err := os.Rename(f.path, f.path+".away"); err != nil {
		t.Fatal(err)
	}
	f.clock.Add(time.Hour)
	h.Refresh(context.Background())
	if st := h.Status(context.Background()); !st.OK || st.KeyID != keyID || st.Mode != hierarchy.ModeOutage {
		t.Fatalf("outage in grace: %+v, want ok, key_id %q", st, keyID)
	}
	decrypt(t, h, s)
	decrypt(t, h, encrypt(t, h))
	f.clock.Add(time.Hour)
	st := h.Status(context.Background())
	if st.OK || st.KeyID != hierarchy.StoppedKeyID || st.Mode != hierarchy.ModeUnreachable {
		t.Fatalf("past the grace: %+v", st)
	}
	if _, err := h.Encrypt(context.Background(), seed); keyservice.Classify(err) != keyservice.ClassTransient {
		t.Fatalf("Encrypt past the grace: %v, want unavailable", err)
	}
	if _, err := h.Decrypt(context.Background(), s.KeyID, s.Ciphertext, s.Annotations); keyservice.Classify(err) != keyservice.ClassTransient {
		t.Fatalf("cached Decrypt past the grace: %v, want unavailable", err)
	}
	if err := os.Rename(f.path+".away", f.path); err != nil {
		t.Fatal(err)
	}
	h.Refresh(context.Background())
	if st := h.Status(context.Background()); !st.OK || st.KeyID != keyID {
		t.Fatalf("recovered: %+v", st)
	}
	decrypt(t, h, s)
	decrypt(t, h, encrypt(t, h))
}

// TestStatusAnswersWhileKeyServiceHangs: a probe that never answers must not
// hold Status past its budget: it answers from the last known state.
func TestStatusAnswersWhileKeyServiceHangs(t *testing.T) {
	f := newFixture(t)
	svc := keyservicetest.NewHangingProbe(f.svc)
	cfg := f.config()
	cfg.StatusBudget = 50 * time.Millisecond
	cfg.RemoteTimeout = time.Minute
	h, err := hierarchy.New(context.Background(), svc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	released := false
	t.Cleanup(func() {
		if !released {
			close(svc.Release)
		}
	})
	keyID := h.Status(context.Background()).KeyID
	svc.Hang.Store(true)
	f.clock.Add(2 * time.Hour) // the last probe is stale: Status starts one, which hangs
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st := h.Status(ctx)
	if ctx.Err() != nil {
		t.Fatal("Status waited for the hung probe until the caller's deadline")
	}
	if !st.OK || st.KeyID != keyID {
		t.Fatalf("Status during a hung probe: %+v, want the last known state (ok, %q)", st, keyID)
	}
	decrypt(t, h, encrypt(t, h)) // sealing does not wait for the probe either
	close(svc.Release)
	released = true
}

// notifyingService is a key service that reports changes (like the watched
// softkey keyring).
type notifyingService struct {
	keyservice.Service
	changed chan struct{}
}

func (s *notifyingService) Changed() <-chan struct{} { return s.changed }

// TestNotifierProbesAtOnce: a change the key service reports reaches Status
// without waiting for the probe interval (1 h here).
func TestNotifierProbesAtOnce(t *testing.T) {
	f := newFixture(t)
	svc := &notifyingService{Service: f.svc, changed: make(chan struct{}, 1)}
	cfg := f.config()
	h, err := hierarchy.New(context.Background(), svc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	before := h.Status(context.Background()).KeyID
	if _, err := softkey.Rotate(f.path); err != nil {
		t.Fatal(err)
	}
	svc.changed <- struct{}{}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := h.Status(context.Background())
		if st.KeyID != before {
			if !st.OK || st.KeyID != st.RemoteKeyID {
				t.Fatalf("after the change: %+v", st)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a reported change did not reach Status (the probe interval is 1 h)")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s := encrypt(t, h); s.KeyID == before {
		t.Fatal("Encrypt still seals under the old key")
	}
}

// wrapFailing fails Wrap while fail is set.
type wrapFailing struct {
	keyservice.Service
	fail atomic.Bool
}

func (s *wrapFailing) Wrap(ctx context.Context, p []byte) (keyservice.WrapResult, error) {
	if s.fail.Load() {
		return keyservice.WrapResult{}, keyservice.Transient("wrap", errors.New("connection reset"))
	}
	return s.Service.Wrap(ctx, p)
}

// TestEncryptAgreesWithStatus: when the remote key changed but no local KEK
// could be made under it yet, Status keeps the key_id that Encrypt seals
// under (the apiserver discards a seed whose key_ids disagree, and a changed
// key_id it cannot get a seed for would stop its writes).
func TestEncryptAgreesWithStatus(t *testing.T) {
	f := newFixture(t)
	svc := &wrapFailing{Service: f.svc}
	h, err := hierarchy.New(context.Background(), svc, f.config())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	old := h.Status(context.Background()).KeyID
	if _, err := softkey.Rotate(f.path); err != nil {
		t.Fatal(err)
	}
	svc.fail.Store(true)
	st := h.Refresh(context.Background())
	if st.RemoteKeyID == old || st.KeyID != old || !st.OK {
		t.Fatalf("remote rotated, wrap failing: %+v, want Status to keep %q", st, old)
	}
	if s := encrypt(t, h); s.KeyID != st.KeyID {
		t.Fatalf("Encrypt key_id %q, Status %q", s.KeyID, st.KeyID)
	}
	svc.fail.Store(false)
	st = h.Refresh(context.Background())
	if st.KeyID != st.RemoteKeyID || st.KeyID == old {
		t.Fatalf("wrap works again: %+v", st)
	}
	if s := encrypt(t, h); s.KeyID != st.KeyID {
		t.Fatalf("Encrypt key_id %q, Status %q", s.KeyID, st.KeyID)
	}
}
