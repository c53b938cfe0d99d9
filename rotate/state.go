package rotate

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/google/renameio/v2"
)

// Phase is a step of a guided rotation, in this order.
type Phase string

// The phases. A state file records the last one completed.
const (
	PhaseStart      Phase = ""            // nothing done yet
	PhasePreflight  Phase = "preflight"   // plugins healthy and cross-readable, apiservers agree, nothing stale
	PhaseRotated    Phase = "rotated"     // the new key exists (made here, or seen after the operator made it)
	PhasePlugins    Phase = "plugins"     // every plugin given reports the new key_id
	PhaseConverged  Phase = "converged"   // every apiserver writes under it
	PhaseMigrated   Phase = "migrated"    // the stale objects were rewritten
	PhaseVerified   Phase = "verified"    // an inventory of etcd finds 0 stale objects
	PhaseOldRetired Phase = "old-retired" // the old key version was disabled (softkey) after the grace
	PhaseDone       Phase = "done"
)

var order = []Phase{PhaseStart, PhasePreflight, PhaseRotated, PhasePlugins, PhaseConverged, PhaseMigrated, PhaseVerified, PhaseOldRetired, PhaseDone}

func (p Phase) index() int {
	for i, q := range order {
		if q == p {
			return i
		}
	}
	return -1
}

// stateVersion is the "kubekms-rotate" field of a state file.
const stateVersion = 1

// State is a rotation's progress, kept in the state file so that a run
// interrupted at any point resumes where it stopped.
type State struct {
	Version int       `json:"kubekms-rotate"`
	Phase   Phase     `json:"phase"`
	Started time.Time `json:"started"`
	// FromKeyID is the key_id every plugin and apiserver used before; ToKeyID
	// the new one (set once rotated).
	FromKeyID string `json:"fromKeyID"`
	ToKeyID   string `json:"toKeyID,omitempty"`
	// Softkey rotations: the keyring and its primary before and after.
	Keyring     string `json:"keyring,omitempty"`
	FromVersion int    `json:"fromVersion,omitempty"`
	ToVersion   int    `json:"toVersion,omitempty"`
	// Rotated is when the new key was made or first seen.
	Rotated time.Time `json:"rotated,omitzero"`
	// PluginSeconds and ApiserverSeconds: per plugin endpoint and per
	// apiserver, seconds from Rotated until it was seen on the new key_id.
	PluginSeconds    map[string]float64 `json:"pluginSeconds,omitempty"`
	ApiserverSeconds map[string]float64 `json:"apiserverSeconds,omitempty"`
	Resources        []string           `json:"resources,omitempty"`
	// Migration counts.
	Planned   int `json:"planned"`
	Rewritten int `json:"rewritten"`
	Unchanged int `json:"unchanged"`
	Resumed   int `json:"resumed"`
	// Stale is the number of stale objects the last inventory found.
	Stale    int       `json:"stale"`
	Verified time.Time `json:"verified,omitzero"`
	// RetireAt is when the old version may be disabled (Verified + grace).
	RetireAt time.Time `json:"retireAt,omitzero"`
	Retired  time.Time `json:"retired,omitzero"`
	Finished time.Time `json:"finished,omitzero"`
}

// Done reports whether the rotation finished.
func (s *State) Done() bool { return s.Phase == PhaseDone }

// reached reports whether phase p was completed.
func (s *State) reached(p Phase) bool { return s.Phase.index() >= p.index() }

// LoadState reads a state file; a missing file is a new State.
func LoadState(path string) (*State, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return &State{Version: stateVersion}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("rotation state: %w", err)
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil || s.Version == 0 {
		return nil, fmt.Errorf("%s is not a kubekms rotation state file", path)
	}
	if s.Version != stateVersion {
		return nil, fmt.Errorf("rotation state %s has version %d, want %d", path, s.Version, stateVersion)
	}
	if s.Phase.index() < 0 {
		return nil, fmt.Errorf("rotation state %s: unknown phase %q", path, s.Phase)
	}
	return &s, nil
}

// save writes the state atomically (temp file, fsync, rename), mode 0600.
func (s *State) save(path string) error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	if err := renameio.WriteFile(path, append(data, '\n'), 0o600); err != nil {
		return fmt.Errorf("rotation state: %w", err)
	}
	return nil
}
