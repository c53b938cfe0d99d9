//go:build linux

package procstat

import (
	"os"
	"runtime"
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
