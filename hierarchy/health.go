package hierarchy

import (
	"fmt"
	"time"

	"github.com/kubekms/kubekms/keyservice"
)

// StoppedKeyID is the key_id Status reports while kubekms will not seal new
// seeds (the key is revoked, or the key service has been unreachable for
// longer than the outage grace). It never names a real key, so it differs
// from the key_id of the apiserver's current write seed: kube-apiserver then
// stops extending that seed's write lifetime (it extends it on every Status
// whose key_id equals the seed's, whatever healthz says) and refuses writes
// when the lifetime (3 minutes) ends. When the key is usable again, Status
// reports the real key_id and the apiserver's writes resume without a restart.
const StoppedKeyID = "kubekms.io/writes-stopped"

// Mode is what the health state machine concluded from the probes.
type Mode int

const (
	// ModeStarting: the key service has not answered a probe yet.
	ModeStarting Mode = iota
	// ModeHealthy: the last probe succeeded.
	ModeHealthy
	// ModeOutage: probes fail with transient errors, within the outage
	// grace: kubekms keeps sealing and serving from its cache.
	ModeOutage
	// ModeUnreachable: probes have failed for longer than the outage grace
	// (or refused our configuration): kubekms cannot vouch for the key and
	// stops sealing and serving from its cache until a probe succeeds.
	ModeUnreachable
	// ModeRevoked: the key service says the current key is revoked.
	ModeRevoked
)

func (m Mode) String() string {
	switch m {
	case ModeStarting:
		return "starting"
	case ModeHealthy:
		return "healthy"
	case ModeOutage:
		return "outage"
	case ModeUnreachable:
		return "unreachable"
	case ModeRevoked:
		return "revoked"
	default:
		return fmt.Sprintf("mode(%d)", int(m))
	}
}

// healthMachine is the pure core of health, outage grace and revocation:
// its inputs are probe results and the clock, its outputs the Status answer
// and what to drop. It does no I/O and keeps no lock; Hierarchy serializes
// calls to it.
type healthMachine struct {
	grace time.Duration

	keyID     string // the key ID of the last successful probe
	lastCheck time.Time
	lastOK    time.Time
	lastErr   error
	revoked   bool
}

// probeEffect is what the hierarchy must do after a probe.
type probeEffect struct {
	// DropAll: the key is revoked; drop every cached local KEK.
	DropAll bool
	// KeyChanged: the remote key ID changed (OldKeyID -> the new one): seal
	// new seeds under a new local KEK.
	KeyChanged bool
	OldKeyID   string
	// Revoked and Restored mark the transitions into and out of revocation;
	// Recovered the first success after an outage.
	Revoked, Restored, Recovered bool
}

// observe records one probe: keyID and err as the key service answered at now.
func (m *healthMachine) observe(now time.Time, keyID string, err error) probeEffect {
	var eff probeEffect
	m.lastCheck = now
	if err == nil {
		eff.Restored = m.revoked
		eff.Recovered = m.lastErr != nil && !m.revoked
		if m.keyID != "" && m.keyID != keyID {
			eff.KeyChanged, eff.OldKeyID = true, m.keyID
		}
		m.keyID, m.lastOK, m.lastErr, m.revoked = keyID, now, nil, false
		return eff
	}
	m.lastErr = err
	if keyservice.Classify(err) == keyservice.ClassRevoked {
		eff.Revoked = !m.revoked
		eff.DropAll = true
		m.revoked = true
	}
	// Any other failure while revoked keeps the key revoked: only a successful
	// probe says it is usable again.
	return eff
}

// observeKeyID records a revocation answer about one key ID (an older
// version's check, or an unwrap): it returns whether to drop the local KEKs
// that keyID wrapped. A revoked older version does not change the mode.
func (m *healthMachine) observeKeyID(err error) (drop bool) {
	return err != nil && keyservice.Classify(err) == keyservice.ClassRevoked
}

// stale reports whether the last probe is older than maxAge.
func (m *healthMachine) stale(now time.Time, maxAge time.Duration) bool {
	return now.Sub(m.lastCheck) >= maxAge
}

// Verdict is the health as of one instant.
type Verdict struct {
	Mode Mode
	// OK is what Status's healthz says ("ok" or Reason).
	OK bool
	// Reason is why it is not OK, or a note while OK during an outage.
	Reason string
	// Usable: local KEKs may seal new seeds and open cached ones. False
	// while revoked or unreachable past the grace.
	Usable bool
	// RemoteKeyID is the key ID of the last successful probe.
	RemoteKeyID string
	// GraceRemaining is the outage grace left (the full grace when reachable).
	GraceRemaining time.Duration
	// LastOK is when the key service last answered a probe (zero if never).
	LastOK time.Time
}

func (m *healthMachine) verdict(now time.Time) Verdict {
	v := Verdict{RemoteKeyID: m.keyID, LastOK: m.lastOK}
	inGrace := !m.lastOK.IsZero() && now.Sub(m.lastOK) < m.grace
	switch {
	case m.revoked:
		v.Mode, v.Reason = ModeRevoked, "key revoked by the key service: "+short(m.lastErr)
	case m.lastErr == nil && m.keyID != "":
		v.Mode, v.OK, v.Usable, v.GraceRemaining = ModeHealthy, true, true, m.grace
	case m.lastOK.IsZero():
		v.Mode, v.Reason = ModeStarting, "key service not reached yet: "+short(m.lastErr)
	case keyservice.Classify(m.lastErr) == keyservice.ClassInvalid:
		// Not an outage: the key service refuses the configured key (a wrong
		// key type, a key ID it does not know). No grace applies.
		v.Mode = ModeUnreachable
		v.Reason = "key service refuses the configured key: " + short(m.lastErr)
	case inGrace:
		v.GraceRemaining = max(m.grace-now.Sub(m.lastOK), 0)
		v.Mode, v.OK, v.Usable = ModeOutage, true, true
		v.Reason = fmt.Sprintf("key service unreachable since %s, serving from cache; grace ends in %s: %s",
			m.lastOK.UTC().Format(time.RFC3339), v.GraceRemaining.Round(time.Second), short(m.lastErr))
	default:
		v.Mode = ModeUnreachable
		v.Reason = fmt.Sprintf("key service failing since %s, past the outage grace (%s): new writes and cached keys are refused until it answers: %s",
			m.lastOK.UTC().Format(time.RFC3339), m.grace, short(m.lastErr))
	}
	return v
}

// statusKeyID is the key_id Status reports: the key ID of the local KEK that
// Encrypt seals with now (currentKeyID, "" if there is none yet; Encrypt then
// makes one under the remote key), or StoppedKeyID when sealing is refused.
// Status and Encrypt must agree: the apiserver discards a new seed whose
// Encrypt key_id differs from Status's.
func (v Verdict) statusKeyID(currentKeyID string) string {
	switch {
	case !v.Usable:
		return StoppedKeyID
	case currentKeyID != "":
		return currentKeyID
	default:
		return v.RemoteKeyID
	}
}

// short trims an error for the healthz field.
func short(err error) string {
	if err == nil {
		return "no error recorded"
	}
	s := err.Error()
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}
