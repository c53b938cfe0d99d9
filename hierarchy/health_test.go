package hierarchy

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/keyservice"
)

// The health machine, transition by transition. It is pure: these tests
// drive it with probe answers and a clock value, nothing else.

var (
	t0           = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	errDown      = keyservice.Transient("probe", errors.New("connection refused"))
	errRevoked   = keyservice.Revoked("probe", errors.New("key is disabled"))
	errRefused   = keyservice.Invalid("probe", errors.New("key is not an AES key"))
	errUnknown   = errors.New("something nobody classified")
	graceForTest = time.Hour
)

func healthy(t *testing.T, keyID string) *healthMachine {
	t.Helper()
	m := &healthMachine{grace: graceForTest}
	if eff := m.observe(t0, keyID, nil); eff != (probeEffect{}) {
		t.Fatalf("first success: effect %+v, want none", eff)
	}
	return m
}

func wantVerdict(t *testing.T, v Verdict, mode Mode, ok, usable bool) {
	t.Helper()
	if v.Mode != mode || v.OK != ok || v.Usable != usable {
		t.Fatalf("verdict %+v, want mode %v ok=%v usable=%v", v, mode, ok, usable)
	}
}

func TestHealthStarting(t *testing.T) {
	m := &healthMachine{grace: graceForTest}
	v := m.verdict(t0)
	wantVerdict(t, v, ModeStarting, false, false)
	if got := v.statusKeyID(""); got != StoppedKeyID {
		t.Fatalf("status key_id before any probe: %q, want %q", got, StoppedKeyID)
	}
	// Failures before the first success get no grace: there is nothing to
	// vouch for yet.
	m.observe(t0, "", errDown)
	v = m.verdict(t0.Add(time.Second))
	wantVerdict(t, v, ModeStarting, false, false)
	if !strings.Contains(v.Reason, "not reached yet") || !strings.Contains(v.Reason, "connection refused") {
		t.Fatalf("reason %q", v.Reason)
	}
}

func TestHealthOK(t *testing.T) {
	m := healthy(t, "k1")
	v := m.verdict(t0.Add(10 * 24 * time.Hour)) // no probe for days: still the last answer
	wantVerdict(t, v, ModeHealthy, true, true)
	if v.GraceRemaining != graceForTest || v.Reason != "" {
		t.Fatalf("healthy: %+v", v)
	}
	if got := v.statusKeyID(""); got != "k1" {
		t.Fatalf("no local KEK yet: status key_id %q, want the remote k1 (Encrypt makes one under it)", got)
	}
	if got := v.statusKeyID("k1"); got != "k1" {
		t.Fatalf("status key_id %q", got)
	}
}

func TestHealthOutageInGrace(t *testing.T) {
	m := healthy(t, "k1")
	if eff := m.observe(t0.Add(time.Minute), "", errDown); eff.DropAll || eff.Revoked {
		t.Fatalf("an outage drops nothing: %+v", eff)
	}
	v := m.verdict(t0.Add(10 * time.Minute))
	wantVerdict(t, v, ModeOutage, true, true)
	if v.GraceRemaining != 50*time.Minute {
		t.Fatalf("grace remaining %v, want 50m (from the last success)", v.GraceRemaining)
	}
	if !strings.Contains(v.Reason, "serving from cache") {
		t.Fatalf("note %q", v.Reason)
	}
	// Writes go on under the same key_id: the apiserver keeps its write seed.
	if got := v.statusKeyID("k1"); got != "k1" {
		t.Fatalf("status key_id during an outage in grace: %q, want k1", got)
	}
	// An unclassified error is an outage too.
	m.observe(t0.Add(11*time.Minute), "", errUnknown)
	wantVerdict(t, m.verdict(t0.Add(11*time.Minute)), ModeOutage, true, true)
}

func TestHealthOutagePastGrace(t *testing.T) {
	m := healthy(t, "k1")
	m.observe(t0.Add(time.Minute), "", errDown)
	v := m.verdict(t0.Add(graceForTest)) // the grace runs from the last success
	wantVerdict(t, v, ModeUnreachable, false, false)
	if got := v.statusKeyID("k1"); got != StoppedKeyID {
		t.Fatalf("status key_id past the grace: %q, want %q", got, StoppedKeyID)
	}
	if !strings.Contains(v.Reason, "past the outage grace") {
		t.Fatalf("reason %q", v.Reason)
	}
}

func TestHealthRecovery(t *testing.T) {
	m := healthy(t, "k1")
	m.observe(t0.Add(time.Minute), "", errDown)
	at := t0.Add(2 * graceForTest)
	wantVerdict(t, m.verdict(at), ModeUnreachable, false, false)
	eff := m.observe(at, "k1", nil)
	if !eff.Recovered || eff.Restored || eff.KeyChanged || eff.DropAll {
		t.Fatalf("recovery effect %+v", eff)
	}
	v := m.verdict(at)
	wantVerdict(t, v, ModeHealthy, true, true)
	if v.statusKeyID("k1") != "k1" {
		t.Fatal("recovered: wrong key_id")
	}
}

func TestHealthRevoked(t *testing.T) {
	m := healthy(t, "k1")
	eff := m.observe(t0.Add(time.Minute), "", errRevoked)
	if !eff.DropAll || !eff.Revoked {
		t.Fatalf("revocation effect %+v, want drop all", eff)
	}
	v := m.verdict(t0.Add(time.Minute))
	wantVerdict(t, v, ModeRevoked, false, false)
	if got := v.statusKeyID("k1"); got != StoppedKeyID {
		t.Fatalf("status key_id while revoked: %q, want %q (so the apiserver's write seed expires)", got, StoppedKeyID)
	}
	// Revoked again: still drop (anything cached since), but not a new transition.
	if eff := m.observe(t0.Add(2*time.Minute), "", errRevoked); !eff.DropAll || eff.Revoked {
		t.Fatalf("second revoked probe: %+v", eff)
	}
}

func TestHealthOutageAfterRevocationStaysRevoked(t *testing.T) {
	m := healthy(t, "k1")
	m.observe(t0.Add(time.Minute), "", errRevoked)
	// The key service becomes unreachable: nothing says the key is back.
	if eff := m.observe(t0.Add(2*time.Minute), "", errDown); eff.DropAll || eff.Restored {
		t.Fatalf("outage after revocation: %+v", eff)
	}
	wantVerdict(t, m.verdict(t0.Add(3*time.Minute)), ModeRevoked, false, false)
}

func TestHealthReEnabled(t *testing.T) {
	m := healthy(t, "k1")
	m.observe(t0.Add(time.Minute), "", errRevoked)
	eff := m.observe(t0.Add(5*time.Minute), "k1", nil)
	if !eff.Restored || eff.Recovered || eff.KeyChanged {
		t.Fatalf("re-enable effect %+v", eff)
	}
	v := m.verdict(t0.Add(5 * time.Minute))
	wantVerdict(t, v, ModeHealthy, true, true)
	// No local KEK survived the revocation: Status names the remote key, the
	// same key_id as the apiserver's write seed, which resumes writing.
	if got := v.statusKeyID(""); got != "k1" {
		t.Fatalf("status key_id after re-enable: %q, want k1", got)
	}
}

func TestHealthRotated(t *testing.T) {
	m := healthy(t, "k1")
	eff := m.observe(t0.Add(time.Minute), "k2", nil)
	if !eff.KeyChanged || eff.OldKeyID != "k1" || eff.DropAll {
		t.Fatalf("rotation effect %+v", eff)
	}
	v := m.verdict(t0.Add(time.Minute))
	wantVerdict(t, v, ModeHealthy, true, true)
	if v.RemoteKeyID != "k2" {
		t.Fatalf("remote key %q", v.RemoteKeyID)
	}
	// Until the new local KEK exists, Status keeps the key_id Encrypt seals
	// under (the apiserver discards a seed whose key_ids disagree).
	if got := v.statusKeyID("k1"); got != "k1" {
		t.Fatalf("status key_id before the new local KEK: %q, want k1", got)
	}
	if got := v.statusKeyID("k2"); got != "k2" {
		t.Fatalf("status key_id after the new local KEK: %q, want k2", got)
	}
}

func TestHealthRefusedKeyHasNoGrace(t *testing.T) {
	m := healthy(t, "k1")
	m.observe(t0.Add(time.Minute), "", errRefused)
	v := m.verdict(t0.Add(time.Minute))
	wantVerdict(t, v, ModeUnreachable, false, false)
	if !strings.Contains(v.Reason, "refuses the configured key") {
		t.Fatalf("reason %q", v.Reason)
	}
}

func TestHealthOldVersionRevoked(t *testing.T) {
	m := healthy(t, "k2")
	if !m.observeKeyID(keyservice.Revoked("check", errors.New("version 1 disabled"))) {
		t.Fatal("a revoked older version must drop its local KEKs")
	}
	if m.observeKeyID(errDown) || m.observeKeyID(nil) || m.observeKeyID(errRefused) {
		t.Fatal("only a revocation drops local KEKs")
	}
	// Writes under the current version are untouched.
	wantVerdict(t, m.verdict(t0.Add(time.Minute)), ModeHealthy, true, true)
}

func TestHealthStale(t *testing.T) {
	m := healthy(t, "k1")
	if m.stale(t0.Add(19*time.Second), 20*time.Second) {
		t.Fatal("a 19 s old probe is fresh for a 20 s interval")
	}
	if !m.stale(t0.Add(20*time.Second), 20*time.Second) {
		t.Fatal("a 20 s old probe is stale for a 20 s interval")
	}
}
