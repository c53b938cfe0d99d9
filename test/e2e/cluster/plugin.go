package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

// Plugin runs `kubekms serve` with a softkey keyring. Restarts reuse the same
// socket, keyring and log file.
type Plugin struct {
	Bin         string
	Socket      string // absolute path of the unix socket
	KeyURI      string
	MetricsAddr string
	LogPath     string
	StateFile   string // the plugin's local-KEK state, kept across restarts
	// Args are extra `kubekms serve` flags; Env extra environment
	// (NAME=value); Wrap, if set, wraps the command line (e.g. with nsenter,
	// to run beside a key service in a private network namespace).
	Args []string
	Env  []string
	Wrap func(cmd []string) []string
	t    testing.TB
	proc *Process
}

// NewPlugin prepares (does not start) a kubekms plugin owned by t. The socket
// lives in a short private temp dir: unix socket paths are limited to 107 bytes.
func NewPlugin(t testing.TB, bin string) (*Plugin, error) {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "kk")
	if err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	dir := t.TempDir()
	return &Plugin{
		Bin:         bin,
		Socket:      filepath.Join(sockDir, "kms.sock"),
		KeyURI:      "softkey://" + filepath.Join(dir, "keyring.json"),
		MetricsAddr: hostPort(FreePort(t)),
		LogPath:     filepath.Join(dir, "kubekms.log"),
		StateFile:   filepath.Join(dir, "local-kek-state.json"),
		t:           t,
	}, nil
}

// Endpoint is the socket as the apiserver's encryption config names it.
func (p *Plugin) Endpoint() string { return "unix://" + p.Socket }

// Start starts the plugin and waits until its Status answers healthz "ok".
func (p *Plugin) Start(ctx context.Context) error {
	cmd := append([]string{p.Bin, "serve",
		"--listen", p.Endpoint(),
		"--key-uri", p.KeyURI,
		"--metrics-addr", p.MetricsAddr,
		"--state-file", p.StateFile,
		"--log-format", "json",
	}, p.Args...)
	if p.Wrap != nil {
		cmd = p.Wrap(cmd)
	}
	proc, err := StartProcessEnv(p.t, "kubekms", p.LogPath, p.Env, cmd[0], cmd[1:]...)
	if err != nil {
		return err
	}
	p.proc = proc
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := p.Status(ctx)
		if err == nil && st.Healthz == "ok" {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("healthz %q", st.Healthz)
		}
		if exited, werr := proc.Exited(); exited {
			return fmt.Errorf("kubekms exited during start (%v): %s", werr, tailFile(p.LogPath, 10))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kubekms not ready after 30s: %w", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// CPU is the CPU time the current plugin process has used so far.
func (p *Plugin) CPU() time.Duration {
	if p.proc == nil {
		return 0
	}
	return p.proc.CPU()
}

// Stop stops the plugin gracefully (SIGTERM).
func (p *Plugin) Stop() error {
	if p.proc == nil {
		return nil
	}
	return p.proc.Stop(30 * time.Second)
}

// Kill9 kills the plugin with SIGKILL: no cleanup, a stale socket file stays.
func (p *Plugin) Kill9() {
	if p.proc != nil {
		p.proc.Kill()
	}
}

// Signal sends sig to the plugin's process group (e.g. SIGHUP: re-probe).
func (p *Plugin) Signal(sig syscall.Signal) {
	if p.proc != nil {
		p.proc.signal(sig)
	}
}

// Softkey runs `kubekms softkey ARGS...` on the plugin's keyring (rotate,
// disable --all, enable --version N, ...).
func (p *Plugin) Softkey(ctx context.Context, args ...string) error {
	cmd := append([]string{"softkey"}, args...)
	out, err := exec.CommandContext(ctx, p.Bin, append(cmd, "--key-uri", p.KeyURI)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kubekms %s: %w: %s", strings.Join(cmd, " "), err, out)
	}
	return nil
}

// Status calls the plugin's v2 Status over its socket.
func (p *Plugin) Status(ctx context.Context) (*kmsapi.StatusResponse, error) {
	conn, err := grpc.NewClient("unix://"+p.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial kubekms: %w", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	st, err := kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		return nil, fmt.Errorf("kubekms Status: %w", err)
	}
	return st, nil
}

// Rotate runs `kubekms softkey rotate` on the plugin's keyring.
func (p *Plugin) Rotate(ctx context.Context) error {
	out, err := exec.CommandContext(ctx, p.Bin, "softkey", "rotate", "--key-uri", p.KeyURI).CombinedOutput()
	if err != nil {
		return fmt.Errorf("kubekms softkey rotate: %w: %s", err, out)
	}
	return nil
}

// Metrics scrapes the plugin's Prometheus endpoint.
func (p *Plugin) Metrics(ctx context.Context) (Metrics, error) {
	return Scrape(ctx, "http://"+p.MetricsAddr+"/metrics")
}

// Metrics holds one scrape, by metric family name.
type Metrics map[string]*dto.MetricFamily

// Scrape fetches and parses a Prometheus text endpoint.
func Scrape(ctx context.Context, url string) (Metrics, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("scrape %s: %s: %s", url, resp.Status, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("parse metrics from %s: %w", url, err)
	}
	return fams, nil
}

// Sum adds up the counter or gauge values of every series of name whose
// labels include all of want. A missing family counts as zero.
func (m Metrics) Sum(name string, want map[string]string) float64 {
	fam, ok := m[name]
	if !ok {
		return 0
	}
	var sum float64
	for _, s := range fam.GetMetric() {
		if !hasLabels(s, want) {
			continue
		}
		switch {
		case s.GetCounter() != nil:
			sum += s.GetCounter().GetValue()
		case s.GetGauge() != nil:
			sum += s.GetGauge().GetValue()
		case s.GetUntyped() != nil:
			sum += s.GetUntyped().GetValue()
		}
	}
	return sum
}

func hasLabels(s *dto.Metric, want map[string]string) bool {
	for k, v := range want {
		found := false
		for _, l := range s.GetLabel() {
			if l.GetName() == k && l.GetValue() == v {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// PluginCounts are the plugin counters the suite reports.
type PluginCounts struct {
	V2Encrypt, V2Decrypt, V2Status float64 // OK v2 gRPC calls
	V1Encrypt, V1Decrypt           float64 // OK v1beta1 gRPC calls
	Failed                         float64 // gRPC calls with a code other than OK
	Wrap, Unwrap, Probe            float64 // remote key-service calls (any outcome)
}

// Counts reads the plugin's counters (since its process start).
func (p *Plugin) Counts(ctx context.Context) (PluginCounts, error) {
	m, err := p.Metrics(ctx)
	if err != nil {
		return PluginCounts{}, err
	}
	const grpcTotal = "kubekms_grpc_requests_total"
	const ksTotal = "kubekms_keyservice_calls_total"
	if _, ok := m[grpcTotal]; !ok {
		return PluginCounts{}, fmt.Errorf("kubekms metrics have no %s", grpcTotal)
	}
	ok := func(service, method string) float64 {
		return m.Sum(grpcTotal, map[string]string{"service": service, "method": method, "code": "OK"})
	}
	return PluginCounts{
		V2Encrypt: ok("v2", "Encrypt"),
		V2Decrypt: ok("v2", "Decrypt"),
		V2Status:  ok("v2", "Status"),
		V1Encrypt: ok("v1beta1", "Encrypt"),
		V1Decrypt: ok("v1beta1", "Decrypt"),
		Failed:    m.Sum(grpcTotal, nil) - m.Sum(grpcTotal, map[string]string{"code": "OK"}),
		Wrap:      m.Sum(ksTotal, map[string]string{"operation": "wrap"}),
		Unwrap:    m.Sum(ksTotal, map[string]string{"operation": "unwrap"}),
		Probe:     m.Sum(ksTotal, map[string]string{"operation": "probe"}),
	}, nil
}

// Sub returns the counts accumulated since before.
func (c PluginCounts) Sub(before PluginCounts) PluginCounts {
	return PluginCounts{
		V2Encrypt: c.V2Encrypt - before.V2Encrypt, V2Decrypt: c.V2Decrypt - before.V2Decrypt,
		V2Status: c.V2Status - before.V2Status, V1Encrypt: c.V1Encrypt - before.V1Encrypt,
		V1Decrypt: c.V1Decrypt - before.V1Decrypt, Failed: c.Failed - before.Failed,
		Wrap: c.Wrap - before.Wrap, Unwrap: c.Unwrap - before.Unwrap, Probe: c.Probe - before.Probe,
	}
}

// LogEntry is one JSON log line of an Encrypt or Decrypt.
type LogEntry struct {
	Msg     string `json:"msg"`
	Service string `json:"service"`
	UID     string `json:"uid"`
	KeyID   string `json:"key_id"`
	Method  string `json:"method"`
	Outcome string `json:"outcome"`
}

// OperationLog returns the plugin's JSON log lines that carry a method (all
// starts so far), and the raw log text for leak checks.
func (p *Plugin) OperationLog() ([]LogEntry, string, error) {
	f, err := os.Open(p.LogPath)
	if err != nil {
		return nil, "", fmt.Errorf("open kubekms log: %w", err)
	}
	defer f.Close()
	var entries []LogEntry
	var raw strings.Builder
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 4*1024*1024)
	for sc.Scan() {
		line := sc.Bytes()
		raw.Write(line)
		raw.WriteByte('\n')
		var e LogEntry
		if json.Unmarshal(line, &e) != nil || e.Method == "" {
			continue
		}
		entries = append(entries, e)
	}
	if err := sc.Err(); err != nil && !errors.Is(err, io.EOF) {
		return nil, "", fmt.Errorf("read kubekms log: %w", err)
	}
	return entries, raw.String(), nil
}
