package migrate

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestStateResume(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.jsonl")
	s, err := OpenState(path, "key-2")
	if err != nil {
		t.Fatal(err)
	}
	if s.Len() != 0 || s.Done("secrets/a/x") {
		t.Fatal("a new state file has entries")
	}
	for _, k := range []string{"secrets/a/x", "secrets/a/y"} {
		if err := s.Record(k, "42"); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	// A crash mid-write leaves a torn last line: it is dropped, and lines
	// appended afterwards are read back.
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"key":"secrets/a/to`)
	f.Close()
	s, err = OpenState(path, "key-2")
	if err != nil {
		t.Fatal(err)
	}
	if !s.Done("secrets/a/x") || !s.Done("secrets/a/y") || s.Done("secrets/a/to") || s.Len() != 2 {
		t.Fatalf("after reopen: len %d, x %v, y %v", s.Len(), s.Done("secrets/a/x"), s.Done("secrets/a/y"))
	}
	if err := s.Record("configmaps/a/z", "43"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = OpenState(path, "") // a run that does not know the key_id may resume
	if err != nil {
		t.Fatal(err)
	}
	if s.Len() != 3 || !s.Done("configmaps/a/z") {
		t.Fatalf("after the torn line was replaced: len %d", s.Len())
	}
	s.Close()
	data, _ := os.ReadFile(path)
	if n := strings.Count(string(data), "\n"); n != 4 || !strings.HasSuffix(string(data), "\n") {
		t.Errorf("state file has %d lines, want header + 3:\n%s", n, data)
	}

	// Another key_id: those rewrites went to a key that is no longer current.
	if _, err := OpenState(path, "key-3"); err == nil || !strings.Contains(err.Error(), `"key-2"`) {
		t.Errorf("state for key-2 opened for key-3: %v", err)
	}
}

func TestStateRejectsOtherFiles(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"not-state":      "hello\n",
		"other-version":  `{"kubekms-migrate":9}` + "\n",
		"corrupt-middle": `{"kubekms-migrate":1}` + "\n" + "garbage\n" + `{"key":"secrets/a/b","rv":"1"}` + "\n",
	} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if s, err := OpenState(path, "k"); err == nil {
			s.Close()
			t.Errorf("%s: opened", name)
		}
		if got, _ := os.ReadFile(path); string(got) != content {
			t.Errorf("%s: a refused file was changed", name)
		}
	}
}
