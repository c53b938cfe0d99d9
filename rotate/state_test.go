package rotate

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestStateRoundTripAndOrder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.json")
	st, err := LoadState(path)
	if err != nil || st.Phase != PhaseStart || st.Version != stateVersion {
		t.Fatalf("missing file: %+v %v", st, err)
	}
	st.FromKeyID, st.Phase, st.Started = "k1", PhasePlugins, time.Unix(1700000000, 0).UTC()
	st.PluginSeconds = map[string]float64{"unix:///a.sock": 4.5}
	if err := st.save(path); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm()&0o077 != 0 {
		t.Errorf("state file mode %v", fi.Mode().Perm())
	}
	got, err := LoadState(path)
	if err != nil || got.FromKeyID != "k1" || got.Phase != PhasePlugins || got.PluginSeconds["unix:///a.sock"] != 4.5 || !got.Started.Equal(st.Started) {
		t.Fatalf("reloaded %+v %v", got, err)
	}
	for _, p := range []Phase{PhaseStart, PhasePreflight, PhaseRotated, PhasePlugins} {
		if !got.reached(p) {
			t.Errorf("phase %q not reached after %q", p, got.Phase)
		}
	}
	for _, p := range []Phase{PhaseConverged, PhaseMigrated, PhaseVerified, PhaseOldRetired, PhaseDone} {
		if got.reached(p) {
			t.Errorf("phase %q reached after %q", p, got.Phase)
		}
	}
	for name, content := range map[string]string{
		"not json":      "hello",
		"other version": `{"kubekms-rotate":7}`,
		"unknown phase": `{"kubekms-rotate":1,"phase":"dancing"}`,
		"no version":    `{"phase":"done"}`,
	} {
		p := filepath.Join(t.TempDir(), "s.json")
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := LoadState(p); err == nil || !strings.Contains(err.Error(), "state") {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

func TestConfigCheck(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{}, "state file"},
		{Config{StatePath: "s"}, "at least one plugin"},
		{Config{StatePath: "s", Plugins: []string{"unix:///x"}}, "required"},
	} {
		if err := tc.cfg.check(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.cfg, err, tc.want)
		}
	}
}
