package migrate

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// stateVersion is the "kubekms-migrate" field of a state file's first line.
const stateVersion = 1

// stateHeader is the first line of a state file.
type stateHeader struct {
	Version int `json:"kubekms-migrate"`
	// KeyID is the key_id the objects were migrated to ("" if unknown).
	KeyID string `json:"keyID,omitempty"`
}

// stateEntry is one line per object whose rewrite the apiserver stored.
type stateEntry struct {
	Key             string `json:"key"`
	ResourceVersion string `json:"rv"`
}

// State is the resume file of a migration: a JSON header line, then one
// line per rewritten object, appended as each rewrite succeeds, so a rerun
// after a crash or Ctrl-C skips what was done. Lines are not fsynced: a
// process crash loses nothing, a power loss at most the last lines (those
// objects are then rewritten again, which is harmless).
type State struct {
	mu   sync.Mutex
	f    *os.File
	w    *bufio.Writer
	done map[string]string // key -> resourceVersion after the rewrite
}

// OpenState opens or creates the state file at path for a migration to
// keyID (may be empty when unknown). An existing file made for another
// non-empty key_id is refused: its objects were rewritten to a key that is
// no longer current. A torn last line (a crash mid-write) is dropped.
func OpenState(path, keyID string) (*State, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state file: %w", err)
	}
	s := &State{f: f, done: map[string]string{}}
	good, err := s.load(path, keyID)
	if err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Truncate(good); err != nil {
		f.Close()
		return nil, fmt.Errorf("state file %s: drop torn last line: %w", path, err)
	}
	if _, err := f.Seek(good, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("state file %s: %w", path, err)
	}
	s.w = bufio.NewWriter(f)
	if good == 0 {
		line, _ := json.Marshal(stateHeader{Version: stateVersion, KeyID: keyID})
		if err := s.writeLine(line); err != nil {
			f.Close()
			return nil, err
		}
	}
	return s, nil
}

// load reads the file and returns the length of its well-formed part.
func (s *State) load(path, keyID string) (int64, error) {
	data, err := io.ReadAll(s.f)
	if err != nil {
		return 0, fmt.Errorf("read state file %s: %w", path, err)
	}
	var good int64
	for lineNo := 1; len(data) > 0; lineNo++ {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break // torn last line: no newline yet
		}
		line := data[:i]
		if lineNo == 1 {
			var h stateHeader
			if err := json.Unmarshal(line, &h); err != nil || h.Version == 0 {
				return 0, fmt.Errorf("%s is not a kubekms migrate state file", path)
			}
			if h.Version != stateVersion {
				return 0, fmt.Errorf("state file %s has version %d, want %d", path, h.Version, stateVersion)
			}
			if h.KeyID != "" && keyID != "" && h.KeyID != keyID {
				return 0, fmt.Errorf("state file %s is from a migration to key_id %q but the current key_id is %q: "+
					"remove it or give another --state-file", path, h.KeyID, keyID)
			}
		} else {
			var e stateEntry
			if err := json.Unmarshal(line, &e); err != nil || e.Key == "" {
				if len(data) == i+1 {
					break // a torn last line that happens to end in a newline
				}
				return 0, fmt.Errorf("state file %s line %d is corrupt", path, lineNo)
			}
			s.done[e.Key] = e.ResourceVersion
		}
		good += int64(i + 1)
		data = data[i+1:]
	}
	return good, nil
}

// Done reports whether key was rewritten by an earlier run (or this one).
func (s *State) Done(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.done[key]
	return ok
}

// Len is the number of objects recorded as done.
func (s *State) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.done)
}

// Record appends a rewritten object.
func (s *State) Record(key, resourceVersion string) error {
	line, err := json.Marshal(stateEntry{Key: key, ResourceVersion: resourceVersion})
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done[key] = resourceVersion
	return s.writeLine(line)
}

func (s *State) writeLine(line []byte) error {
	s.w.Write(line)
	s.w.WriteByte('\n')
	if err := s.w.Flush(); err != nil { // one write(2) per line: survives a process crash
		return fmt.Errorf("write state file: %w", err)
	}
	return nil
}

// Close closes the file.
func (s *State) Close() error {
	if s == nil || s.f == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	err := errors.Join(s.w.Flush(), s.f.Close())
	s.f = nil
	return err
}
