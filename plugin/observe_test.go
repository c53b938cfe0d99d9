package plugin_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/metrics"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
)

// callLog is a V2 service whose JSON log and metrics the test reads.
type callLog struct {
	v2   *plugin.V2
	logs *testutil.SyncBuffer
	reg  *prometheus.Registry
	req  *kmsapi.DecryptRequest
}

func newCallLog(t *testing.T, level slog.Level, opts plugin.Options) *callLog {
	t.Helper()
	svc, err := softkey.Open(context.Background(), "softkey://"+filepath.Join(t.TempDir(), "keyring.json"), keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Close() })
	h, err := hierarchy.New(context.Background(), svc, hierarchy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	c := &callLog{logs: &testutil.SyncBuffer{}, reg: prometheus.NewRegistry()}
	opts.Logger = slog.New(slog.NewJSONHandler(c.logs, &slog.HandlerOptions{Level: level}))
	opts.Metrics = metrics.New(c.reg)
	c.v2 = plugin.NewV2(h, opts)
	enc, err := c.v2.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: seed, Uid: "setup"})
	if err != nil {
		t.Fatal(err)
	}
	c.req = &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations}
	return c
}

// decrypt makes n Decrypt calls with uids prefix-0 .. prefix-(n-1).
func (c *callLog) decrypt(t *testing.T, prefix string, n int) {
	t.Helper()
	for i := range n {
		req := &kmsapi.DecryptRequest{Ciphertext: c.req.Ciphertext, KeyId: c.req.KeyId, Annotations: c.req.Annotations,
			Uid: fmt.Sprintf("%s-%d", prefix, i)}
		if _, err := c.v2.Decrypt(context.Background(), req); err != nil {
			t.Fatal(err)
		}
	}
}

// lines returns the logged Decrypt calls, by uid.
func (c *callLog) lines(t *testing.T) map[string]map[string]any {
	t.Helper()
	out := map[string]map[string]any{}
	sc := bufio.NewScanner(strings.NewReader(c.logs.String()))
	for sc.Scan() {
		var l map[string]any
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		if l["method"] == "Decrypt" {
			out[l["uid"].(string)] = l
		}
	}
	return out
}

// TestCallLogSamplesBursts: a burst of successful, fast calls logs the first
// 100 and then about 10 a second, and the next logged line counts the calls
// left out; a failed call is logged whatever the burst.
func TestCallLogSamplesBursts(t *testing.T) {
	c := newCallLog(t, slog.LevelInfo, plugin.Options{})
	const n = 1000
	start := time.Now()
	c.decrypt(t, "burst", n)
	elapsed := time.Since(start)
	bad := &kmsapi.DecryptRequest{Ciphertext: c.req.Ciphertext[:5], KeyId: c.req.KeyId, Annotations: c.req.Annotations, Uid: "bad-call"}
	if _, err := c.v2.Decrypt(context.Background(), bad); err == nil {
		t.Fatal("truncated ciphertext accepted")
	}
	lines := c.lines(t)
	// Calls 0..99 are the burst; the rate limiter refills 10 a second.
	for i := range 100 {
		if _, ok := lines[fmt.Sprintf("burst-%d", i)]; !ok {
			t.Fatalf("call burst-%d of the first 100 not logged", i)
		}
	}
	maxLogged := 100 + 1 + int(10*elapsed.Seconds()) + 1
	if len(lines) > maxLogged {
		t.Fatalf("%d of %d calls in %s logged: want the burst of 100 and ~10 a second (at most %d)", len(lines), n, elapsed, maxLogged)
	}
	failed, ok := lines["bad-call"]
	if !ok {
		t.Fatal("the failed call after the burst is not logged")
	}
	if failed["level"] != "WARN" || failed["outcome"] != "InvalidArgument" {
		t.Fatalf("failed call logged as %v", failed)
	}
	notLogged, _ := failed["calls_not_logged"].(float64)
	if want := float64(n - (len(lines) - 1)); notLogged != want {
		t.Fatalf("calls_not_logged = %v on the line after the burst, want %v", notLogged, want)
	}
}

// TestCallLogSlowAndDebug: a slow call is logged beyond the sample; at
// debug level every call is.
func TestCallLogSlowAndDebug(t *testing.T) {
	const n = 300
	slow := newCallLog(t, slog.LevelInfo, plugin.Options{SlowCall: time.Nanosecond})
	slow.decrypt(t, "slow", n)
	lines := slow.lines(t)
	if len(lines) != n {
		t.Fatalf("%d of %d calls slower than --log-slow logged, want all", len(lines), n)
	}
	if l := lines["slow-299"]; l["msg"] != "kms call slow" || l["level"] != "WARN" {
		t.Fatalf("slow call logged as %v", l)
	}

	debug := newCallLog(t, slog.LevelDebug, plugin.Options{})
	debug.decrypt(t, "debug", n)
	if got := len(debug.lines(t)); got != n {
		t.Fatalf("%d of %d calls logged at debug level, want all", got, n)
	}

	none := newCallLog(t, slog.LevelInfo, plugin.Options{LoggedCallsPerSecond: -1})
	none.decrypt(t, "none", 10)
	if got := len(none.lines(t)); got != 0 {
		t.Fatalf("%d calls logged with LoggedCallsPerSecond < 0, want none", got)
	}
}

// TestExemplarNamesLoggedCall: the latency histogram's exemplars carry only
// uids that the log has, so an exemplar always leads to a log line.
func TestExemplarNamesLoggedCall(t *testing.T) {
	c := newCallLog(t, slog.LevelInfo, plugin.Options{})
	c.decrypt(t, "ex", 1000)
	lines := c.lines(t)
	fams, err := c.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	exemplars := 0
	for _, f := range fams {
		if f.GetName() != "kubekms_grpc_request_duration_seconds" {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, b := range m.GetHistogram().GetBucket() {
				for _, l := range b.GetExemplar().GetLabel() {
					if l.GetName() != "uid" || !strings.HasPrefix(l.GetValue(), "ex-") {
						continue
					}
					exemplars++
					if _, ok := lines[l.GetValue()]; !ok {
						t.Errorf("exemplar uid %s has no log line", l.GetValue())
					}
				}
			}
		}
	}
	if exemplars == 0 {
		t.Fatal("no exemplar with a Decrypt uid")
	}
}
