//go:build linux

// Command floor measures what users get from kubekms: the built binary as its
// own process, with the static pod's flags (JSON logs at info, metrics on),
// against the no-op KMS v2 plugin (bench/noop) in its own process on the same
// kind of unix socket. The client is the apiserver's own KMS v2 gRPC client
// (k8s.io/apiserver kmsv2.NewGRPCService), with 16 callers, in this process.
// Rounds are interleaved (noop, kubekms, kubekms, noop, ...) so drift in the
// machine's load hits both alike.
//
//	go run ./bench/floor -rounds 6 -duration 5s
//
// It prints a markdown table: throughput, p50 and p99 per server (median over
// rounds, with the range), their ratios (median of the per-round ratios), the
// CPU time each server spent per call (user and system), the bytes kubekms
// logged per call and the peak RSS of each server.
//
// With -baseline-env the baseline is not the no-op plugin but a second
// kubekms serve with that environment (e.g. GOGC=100): an A/B of a runtime
// setting, interleaved the same way.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/internal/procstat"
)

type config struct {
	kubekms, noop string
	rounds        int
	duration      time.Duration
	warmup        time.Duration
	callers       int
	methods       string
	serveArgs     string
	serveEnv      string
	baselineEnv   string
	noopArgs      string
	keep          bool
	only          string
	connect       string
	calls         int
	requestFile   string
}

func main() {
	var c config
	flag.StringVar(&c.kubekms, "kubekms", "", "kubekms binary (default: go build ./cmd/kubekms)")
	flag.StringVar(&c.noop, "noop", "", "no-op plugin binary (default: go build ./bench/noop)")
	flag.IntVar(&c.rounds, "rounds", 6, "measured rounds per server and method")
	flag.DurationVar(&c.duration, "duration", 5*time.Second, "length of one measured round")
	flag.DurationVar(&c.warmup, "warmup", time.Second, "unmeasured calls before each round")
	flag.IntVar(&c.callers, "callers", 16, "concurrent callers")
	flag.StringVar(&c.methods, "methods", "decrypt,encrypt", "methods to measure, in order")
	flag.StringVar(&c.serveArgs, "serve-args", "", "extra flags for kubekms serve, space-separated (e.g. --log-level=debug)")
	flag.StringVar(&c.serveEnv, "serve-env", "", "extra environment for kubekms serve, space-separated (e.g. GOGC=100)")
	flag.StringVar(&c.baselineEnv, "baseline-env", "", "compare with a second kubekms serve with this environment (space-separated, e.g. GOGC=100) instead of the no-op plugin")
	flag.StringVar(&c.noopArgs, "noop-args", "", "extra flags for the no-op plugin (-tuned: kubekms's gRPC and GC tuning)")
	flag.BoolVar(&c.keep, "keep", false, "keep the work folder (logs, keyring)")
	flag.StringVar(&c.only, "only", "", "measure only this server (noop or kubekms), e.g. to profile it with perf record -p")
	flag.StringVar(&c.connect, "connect", "", "only make -calls calls of each method to this running server (unix:///path.sock)")
	flag.IntVar(&c.calls, "calls", 10000, "calls per method with -connect")
	flag.StringVar(&c.requestFile, "request", "", "with -connect: send the Decrypt request saved in this file, or save the one made")
	flag.Parse()
	run := run
	if c.connect != "" {
		run = runCalls
	}
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "floor:", err)
		os.Exit(1)
	}
}

func run(c config) error {
	dir, err := os.MkdirTemp("", "kkfloor")
	if err != nil {
		return err
	}
	if c.keep {
		fmt.Fprintln(os.Stderr, "work folder:", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	if c.kubekms == "" {
		if c.kubekms, err = build(dir, "kubekms", "./cmd/kubekms"); err != nil {
			return err
		}
	}
	if c.noop == "" {
		if c.noop, err = build(dir, "noop", "./bench/noop"); err != nil {
			return err
		}
	}
	load0 := loadavg()

	port, err := freePort()
	if err != nil {
		return err
	}
	kkSock, noopSock := filepath.Join(dir, "kubekms.sock"), filepath.Join(dir, "noop.sock")
	logPath := filepath.Join(dir, "kubekms.log")
	// The static pod's flags (deploy/static-pod.yaml): JSON logs on stderr at
	// the default level, metrics on loopback.
	args := []string{"serve", "--listen", "unix://" + kkSock,
		"--key-uri", "softkey://" + filepath.Join(dir, "keyring.json"),
		"--state-file", filepath.Join(dir, "state.json"),
		"--metrics-addr", fmt.Sprintf("127.0.0.1:%d", port), "--log-format", "json"}
	args = append(args, strings.Fields(c.serveArgs)...)
	kk, err := start(c.kubekms, logPath, strings.Fields(c.serveEnv), args...)
	if err != nil {
		return err
	}
	defer kk.stop()
	baseName := "no-op plugin (bench/noop" + strings.Join(append([]string{""}, strings.Fields(c.noopArgs)...), " ") + ")"
	var np *proc
	if c.baselineEnv == "" {
		np, err = start(c.noop, filepath.Join(dir, "noop.log"), nil, append([]string{"-listen", "unix://" + noopSock}, strings.Fields(c.noopArgs)...)...)
	} else {
		// The same keyring (made by the first: wait for it), so it opens
		// kubekms's seals; its own state and port.
		baseName = "kubekms serve (defaults), " + c.baselineEnv
		if err := waitSocket(kkSock, kk); err != nil {
			return fmt.Errorf("kubekms: %w", err)
		}
		var port2 int
		if port2, err = freePort(); err != nil {
			return err
		}
		args2 := slices.Clone(args)
		args2[2] = "unix://" + noopSock
		args2[6] = filepath.Join(dir, "state-baseline.json")
		args2[8] = fmt.Sprintf("127.0.0.1:%d", port2)
		np, err = start(c.kubekms, filepath.Join(dir, "baseline.log"), strings.Fields(c.baselineEnv), args2...)
	}
	if err != nil {
		return err
	}
	defer np.stop()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	servers := []*server{{name: "noop", proc: np}, {name: "kubekms", proc: kk}}
	for _, s := range servers {
		sock := noopSock
		if s == servers[1] {
			sock = kkSock
		}
		if err := waitSocket(sock, s.proc); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
		// The apiserver's client: WaitForReady, 3 s per call, its metrics interceptor.
		if s.svc, err = kmsv2.NewGRPCService(ctx, "unix://"+sock, "floor-"+s.name, 3*time.Second); err != nil {
			return err
		}
		if err := waitReady(ctx, s); err != nil {
			return err
		}
	}

	ops, err := newOps(ctx, servers[1].svc, "")
	if err != nil {
		return err
	}
	log0 := fileSize(logPath)
	kkCalls := 0

	var tables []string
	for _, method := range strings.Split(c.methods, ",") {
		op, ok := ops[method]
		if !ok {
			return fmt.Errorf("-methods: unknown method %q (want decrypt, encrypt)", method)
		}
		res := map[string][]result{}
		for r := range c.rounds {
			order := servers
			if r%2 == 1 {
				order = []*server{servers[1], servers[0]}
			}
			for _, s := range order {
				if c.only != "" && s.name != c.only {
					continue
				}
				drive(s, op, c.callers, c.warmup)
				out, err := measure(s, op, c.callers, c.duration)
				if err != nil {
					return fmt.Errorf("%s %s: %w", s.name, method, err)
				}
				if s == servers[1] {
					kkCalls += out.calls
				}
				res[s.name] = append(res[s.name], out)
				fmt.Fprintf(os.Stderr, "round %d %-7s %-7s %8.0f calls/s  p50 %6.0f µs  p99 %6.0f µs  server CPU %5.1f µs/call (system %4.1f)  client CPU %5.1f µs/call\n",
					r+1, method, s.name, out.rate(), us(out.p50), us(out.p99), out.serverCPUPerCall(), out.serverSysPerCall(), out.clientCPUPerCall())
			}
		}
		tables = append(tables, table(method, c.callers, baseName, res["noop"], res["kubekms"]))
	}
	logged := fileSize(logPath) - log0
	load1 := loadavg()

	fmt.Printf("\n%d callers, %d interleaved rounds of %s per server and method; load average before %s, after %s\n\n",
		c.callers, c.rounds, c.duration, load0, load1)
	for _, t := range tables {
		fmt.Println(t)
	}
	fmt.Printf("kubekms logged %.1f bytes per measured call (%d bytes); peak RSS: kubekms %s, baseline %s\n",
		float64(logged)/float64(max(kkCalls, 1)), logged, kk.rss(), np.rss())
	return nil
}

type server struct {
	name string
	proc *proc
	svc  kmsservice.Service
}

type result struct {
	calls                         int
	wall                          time.Duration
	p50, p99                      time.Duration
	serverCPU, serverSys, selfCPU time.Duration
}

func (r result) rate() float64 { return float64(r.calls) / r.wall.Seconds() }

func (r result) serverCPUPerCall() float64 {
	return float64(r.serverCPU.Microseconds()) / float64(max(r.calls, 1))
}

func (r result) serverSysPerCall() float64 {
	return float64(r.serverSys.Microseconds()) / float64(max(r.calls, 1))
}

func (r result) clientCPUPerCall() float64 {
	return float64(r.selfCPU.Microseconds()) / float64(max(r.calls, 1))
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// drive runs op from callers goroutines for d, unmeasured.
func drive(s *server, op op, callers int, d time.Duration) {
	var wg sync.WaitGroup
	end := time.Now().Add(d)
	for g := range callers {
		wg.Go(func() {
			for i := g; time.Now().Before(end); i += callers {
				_ = op(s, i)
			}
		})
	}
	wg.Wait()
}

// measure runs op from callers goroutines for d and records every latency.
func measure(s *server, op op, callers int, d time.Duration) (result, error) {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		lat  []time.Duration
		errs []error
	)
	user0, sys0 := s.proc.cpu()
	self0 := selfCPU()
	start := time.Now()
	end := start.Add(d)
	for g := range callers {
		wg.Go(func() {
			local := make([]time.Duration, 0, 1<<14)
			var err error
			for i := g; ; i += callers {
				t0 := time.Now()
				if !t0.Before(end) {
					break
				}
				if err = op(s, i); err != nil {
					break
				}
				local = append(local, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, local...)
			if err != nil {
				errs = append(errs, err)
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	wall := time.Since(start)
	user1, sys1 := s.proc.cpu()
	s.proc.sampleAnon()
	out := result{calls: len(lat), wall: wall, serverCPU: user1 + sys1 - user0 - sys0, serverSys: sys1 - sys0, selfCPU: selfCPU() - self0}
	if len(errs) > 0 {
		return out, errors.Join(errs...)
	}
	if len(lat) == 0 {
		return out, errors.New("no call completed")
	}
	slices.Sort(lat)
	out.p50, out.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	return out, nil
}

// table renders one method's results: medians with ranges, and the median
// of the per-round ratios (round i of kubekms against round i of noop).
func table(method string, callers int, baseName string, noop, kk []result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "**%s**, %d callers\n\n", method, callers)
	fmt.Fprintf(&b, "| server | calls/s | p50 | p99 | server CPU per call | of which system |\n|---|---:|---:|---:|---:|---:|\n")
	for _, row := range []struct {
		name string
		rs   []result
	}{{baseName, noop}, {"kubekms serve (defaults)", kk}} {
		fmt.Fprintf(&b, "| %s | %s | %s µs | %s µs | %s µs | %s µs |\n", row.name,
			spread(row.rs, func(r result) float64 { return r.rate() }, "%.0f"),
			spread(row.rs, func(r result) float64 { return us(r.p50) }, "%.0f"),
			spread(row.rs, func(r result) float64 { return us(r.p99) }, "%.0f"),
			spread(row.rs, result.serverCPUPerCall, "%.1f"),
			spread(row.rs, result.serverSysPerCall, "%.1f"))
	}
	n := min(len(noop), len(kk))
	ratio := func(f func(result) float64) []float64 {
		out := make([]float64, n)
		for i := range n {
			out[i] = f(kk[i]) / f(noop[i])
		}
		return out
	}
	fmt.Fprintf(&b, "| **kubekms / baseline** | **%s** | **%s** | %s | %s | %s |\n",
		spreadOf(ratio(func(r result) float64 { return r.rate() }), "%.3f"),
		spreadOf(ratio(func(r result) float64 { return us(r.p50) }), "%.3f"),
		spreadOf(ratio(func(r result) float64 { return us(r.p99) }), "%.3f"),
		spreadOf(ratio(result.serverCPUPerCall), "%.2f"),
		spreadOf(ratio(result.serverSysPerCall), "%.2f"))
	return b.String()
}

func spread(rs []result, f func(result) float64, format string) string {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	return spreadOf(v, format)
}

// spreadOf is "median (min-max)".
func spreadOf(v []float64, format string) string {
	if len(v) == 0 {
		return "-"
	}
	s := slices.Clone(v)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return fmt.Sprintf(format+" ("+format+"-"+format+")", med, s[0], s[len(s)-1])
}

type op func(s *server, i int) error

// newOps returns the measured calls. Decrypt opens a seed that kubekms
// sealed: both servers get kubekms's Decrypt request, byte for byte. Each
// call carries its own uid, as the apiserver's do.
//
// With a request file, Decrypt sends the request saved there, or seals one
// with kk and saves it: so a -connect run against the no-op plugin sends
// what an earlier one sent to kubekms.
func newOps(ctx context.Context, kk kmsservice.Service, requestFile string) (map[string]op, error) {
	seed := make([]byte, 32)
	decReq := &kmsservice.DecryptRequest{}
	if b, err := os.ReadFile(requestFile); requestFile != "" && err == nil {
		if err := json.Unmarshal(b, decReq); err != nil {
			return nil, fmt.Errorf("%s: %w", requestFile, err)
		}
	} else {
		enc, err := kk.Encrypt(ctx, uuid.NewString(), seed)
		if err != nil {
			return nil, fmt.Errorf("kubekms Encrypt: %w", err)
		}
		decReq = &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID, Annotations: enc.Annotations}
		ann := 0
		for k, v := range enc.Annotations {
			ann += len(k) + len(v)
		}
		fmt.Fprintf(os.Stderr, "Encrypt answer: ciphertext %d bytes, key_id %d bytes, annotations %d bytes\n", len(enc.Ciphertext), len(enc.KeyID), ann)
		if requestFile != "" {
			b, _ := json.Marshal(decReq)
			if err := os.WriteFile(requestFile, b, 0o600); err != nil {
				return nil, err
			}
		}
	}
	uids := make([]string, 4096)
	for i := range uids {
		uids[i] = uuid.NewString()
	}
	return map[string]op{
		"decrypt": func(s *server, i int) error {
			_, err := s.svc.Decrypt(ctx, uids[i%len(uids)], decReq)
			return err
		},
		"encrypt": func(s *server, i int) error {
			_, err := s.svc.Encrypt(ctx, uids[i%len(uids)], seed)
			return err
		},
	}, nil
}

// runCalls makes exactly n calls of each method to a running server (for
// instruction counts: run the server under valgrind --tool=callgrind and
// zero its counters before, dump them after).
func runCalls(c config) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	svc, err := kmsv2.NewGRPCService(ctx, c.connect, "floor", 60*time.Second)
	if err != nil {
		return err
	}
	s := &server{name: c.connect, svc: svc}
	ops, err := newOps(ctx, svc, c.requestFile)
	if err != nil {
		return err
	}
	for _, method := range strings.Split(c.methods, ",") {
		f, ok := ops[method]
		if !ok {
			return fmt.Errorf("-methods: unknown method %q (want decrypt, encrypt)", method)
		}
		var wg sync.WaitGroup
		var failed atomic.Int64
		start := time.Now()
		for g := range c.callers {
			wg.Go(func() {
				for i := g; i < c.calls; i += c.callers {
					if f(s, i) != nil {
						failed.Add(1)
					}
				}
			})
		}
		wg.Wait()
		fmt.Printf("%s: %d calls in %s, %d failed\n", method, c.calls, time.Since(start).Round(time.Millisecond), failed.Load())
	}
	return nil
}

// waitSocket waits for the server's socket file, so the client's first dial
// finds it.
func waitSocket(path string, p *proc) error {
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		if err := p.exited(); err != nil {
			return fmt.Errorf("exited: %v: %s", err, tail(p.log))
		}
	}
	return fmt.Errorf("no socket %s after 30 s", path)
}

func waitReady(ctx context.Context, s *server) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := s.svc.Status(cctx)
		cancel()
		if err == nil && st.Healthz == "ok" {
			return nil
		}
		if exited := s.proc.exited(); exited != nil {
			return fmt.Errorf("%s exited: %v: %s", s.name, exited, tail(s.proc.log))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after 30 s: %v %v", s.name, st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func build(dir, name, pkg string) (string, error) {
	out := filepath.Join(dir, name)
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build %s (run from the repo root): %w\n%s", pkg, err, b)
	}
	return out, nil
}

// proc is a server process that dies with this one.
type proc struct {
	cmd        *exec.Cmd
	log        string
	done       chan struct{}
	err        error
	maxAnonKiB int64
}

// start runs bin with args, and env added to this process's environment.
func start(bin, logPath string, env []string, args ...string) (*proc, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	return p, nil
}

func (p *proc) exited() error {
	select {
	case <-p.done:
		if p.err == nil {
			return errors.New("exit 0")
		}
		return p.err
	default:
		return nil
	}
}

func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// cpu is the process's user and system CPU time so far.
func (p *proc) cpu() (user, sys time.Duration) { return procstat.CPU(p.cmd.Process.Pid) }

// rss is the peak resident set (VmHWM) of the process, and the largest
// anonymous part (heap, stacks: RssAnon, without the binary's mapped pages)
// seen at the end of a measured round.
func (p *proc) rss() string {
	return fmt.Sprintf("%.1f MiB (anonymous %.1f MiB)", float64(p.status("VmHWM"))/1024, float64(p.maxAnonKiB)/1024)
}

// sampleAnon records the current RssAnon.
func (p *proc) sampleAnon() { p.maxAnonKiB = max(p.maxAnonKiB, p.status("RssAnon")) }

// status is a kB field of /proc/PID/status (0 if unknown).
func (p *proc) status(field string) int64 { return procstat.StatusKiB(p.cmd.Process.Pid, field) }

func selfCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	return strings.Join(f[:min(3, len(f))], " ")
}

func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

func tail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, 1<<16))
	if len(b) > 1000 {
		b = b[len(b)-1000:]
	}
	return string(b)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
