//go:build linux

// Package procstat reads a process's CPU time and memory from /proc, for the
// benchmarks and the scale suite: the figures docs/performance.md reports.
package procstat

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// clockTick is the unit of the CPU fields of /proc/PID/stat (USER_HZ 100).
const clockTick = 10 * time.Millisecond

// CPU is the user and system CPU time process pid has used so far
// (zeros once it has ended or when /proc cannot be read).
func CPU(pid int) (user, sys time.Duration) {
	f, ok := StatFields(fmt.Sprintf("/proc/%d/stat", pid))
	if !ok || len(f) < 13 {
		return 0, 0
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut) * clockTick, time.Duration(st) * clockTick
}

// StatFields are the fields of a /proc/PID/stat (or .../task/TID/stat) file
// after the command name, from the state on; ok is false when the file is
// gone or malformed. The name is in parentheses and may hold spaces.
func StatFields(path string) (fields []string, ok bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, false
	}
	return strings.Fields(string(b[i+1:])), true
}

// StatusKiB is a kB field of /proc/PID/status, such as VmHWM (peak resident
// set) or RssAnon (resident heap and stacks, without mapped files); 0 if
// unknown.
func StatusKiB(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb
		}
	}
	return 0
}

// AnonPeak samples a process's RssAnon every interval until Stop: the peak of
// the memory it holds itself, which a peak RSS (VmHWM, wait4's maxrss) mixes
// with the pages of files it maps, such as a bbolt snapshot.
type AnonPeak struct {
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	kib  int64
}

// SampleAnon starts sampling pid.
func SampleAnon(pid int, interval time.Duration) *AnonPeak {
	p := &AnonPeak{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			p.record(StatusKiB(pid, "RssAnon"))
			select {
			case <-p.stop:
				return
			case <-t.C:
			}
		}
	}()
	return p
}

func (p *AnonPeak) record(kib int64) {
	p.mu.Lock()
	p.kib = max(p.kib, kib)
	p.mu.Unlock()
}

// Stop ends the sampling and returns the largest RssAnon seen, in KiB.
func (p *AnonPeak) Stop() int64 {
	close(p.stop)
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.kib
}
