//go:build linux

package procstat

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestSelf reads this process: it has used CPU, is resident and holds an
// anonymous heap that a 64 MiB allocation raises.
func TestSelf(t *testing.T) {
	pid := os.Getpid()
	end := time.Now().Add(50 * time.Millisecond)
	for time.Now().Before(end) { // burn a little CPU
	}
	if u, s := CPU(pid); u+s <= 0 {
		t.Fatalf("CPU of this process: user %s, system %s", u, s)
	}
	if hwm := StatusKiB(pid, "VmHWM"); hwm <= 0 {
		t.Fatalf("VmHWM %d kB", hwm)
	}
	if got := StatusKiB(pid, "NoSuchField"); got != 0 {
		t.Fatalf("unknown field: %d, want 0", got)
	}
	p := SampleAnon(pid, time.Millisecond)
	before := StatusKiB(pid, "RssAnon")
	buf := make([]byte, 64<<20)
	for i := range buf {
		buf[i] = 1
	}
	time.Sleep(20 * time.Millisecond)
	peak := p.Stop()
	if peak < before+60<<10 {
		t.Fatalf("anonymous peak %d KiB after touching 64 MiB (before: %d KiB)", peak, before)
	}
	runtime.KeepAlive(buf)
	if u, s := CPU(1 << 30); u != 0 || s != 0 {
		t.Fatalf("CPU of no process: %s %s", u, s)
	}
}

func TestStatFieldsAfterAnAwkwardName(t *testing.T) {
	p := filepath.Join(t.TempDir(), "stat")
	if err := os.WriteFile(p, []byte("42 (a b) c)) T 1 42 42 0\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, ok := StatFields(p)
	if !ok || strings.Join(f, " ") != "T 1 42 42 0" {
		t.Fatalf("StatFields = %q, %v; want the fields after the last ')'", f, ok)
	}
	if _, ok := StatFields(filepath.Join(t.TempDir(), "gone")); ok {
		t.Fatal("StatFields of a missing file: ok")
	}
}
