package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/metrics"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/opaqueid"
	"github.com/kubekms/kubekms/plugin"
)

type serveFlags struct {
	listen, socketMode, socketGroup string
	allowInsecureDir                bool
	keyURI, stateFile, clusterName  string
	keyIDSuffix                     string
	opaqueKeyIDSecret               string
	hier                            hierarchy.Config
	metricsAddr                     string
	otlpEndpoint                    string
	otlpInsecure                    bool
	logFormat, logLevel             string
	logSlow                         time.Duration
	logCallsPerSecond               float64
	shutdownGrace                   time.Duration
	noState                         bool
	newKeyring                      bool
}

func newServeCmd() *cobra.Command {
	var f serveFlags
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the KMS v2 (and v1beta1) plugin on a unix socket",
		Long: `Run the KMS plugin. Seeds from the apiserver are sealed with a local KEK (AES-256-GCM);
the key service named by --key-uri wraps only the local KEK. The default key service is an
embedded keyring file (softkey), created on first use. Once the state file names a keyring,
serve refuses to start without it (restore it, or pass --new-keyring to start a new one).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runServe(cmd.Context(), cmd, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.listen, "listen", defaultListen(), "unix socket to serve on: unix:///path.sock or unix:///@abstract")
	fl.StringVar(&f.socketMode, "socket-mode", "0600", "mode of the socket file (octal)")
	fl.StringVar(&f.socketGroup, "socket-group", "", "group (name or gid) owning the socket file")
	fl.BoolVar(&f.allowInsecureDir, "allow-insecure-socket-dir", false, "start even if the socket's folder is writable by other users")
	fl.StringVar(&f.keyURI, "key-uri", defaultKeyURI(), "remote key service holding the key-encrypting key (softkey:///abs/path.json, ...)")
	fl.StringVar(&f.stateFile, "state-file", "",
		"file keeping the wrapped current local KEK across restarts (saves remote calls); default: beside a softkey keyring, else in the user's state folder, else none")
	fl.BoolVar(&f.noState, "no-state", false, "keep no local KEK state across restarts")
	fl.StringVar(&f.clusterName, "cluster-name", "", "cluster name, bound into wrapped keys where the key service supports it")
	fl.StringVar(&f.keyIDSuffix, "key-id-suffix", "", "suffix for key IDs of key services with invisible rotation (AWS KMS)")
	fl.StringVar(&f.opaqueKeyIDSecret, "opaque-key-ids", "", "secret file (32+ bytes): store opaque key IDs instead of the key service's own (ARNs, resource names, token serials)")
	// Bounds: --max-uses at most 2^30 seals per local KEK (far below the 2^32
	// random-nonce limit of AES-GCM); the rest must be positive.
	uint64Var(fl, &f.hier.MaxUses, "max-uses", 1<<21, 1, 1<<30, "seeds sealed by one local KEK before a new one is made")
	durationVar(fl, &f.hier.MaxAge, "max-age", 7*24*time.Hour, "age after which a new local KEK is made")
	intVar(fl, &f.hier.CacheSize, "cache-size", 1000, 1, 1<<24, "unwrapped local KEKs kept in memory")
	durationVar(fl, &f.hier.ProbeInterval, "probe-interval", hierarchy.DefaultProbeInterval,
		"how often the key service is probed (a cheap key read, never an encrypt); kube-apiserver asks for Status about every 20 s")
	durationVar(fl, &f.hier.OutageGrace, "outage-grace", time.Hour, "how long to serve from cache while the key service is unreachable")
	durationVar(fl, &f.hier.RevocationBound, "revocation-bound", time.Minute, "longest time to drop local KEKs after the key is revoked")
	intVar(fl, &f.hier.SealFormat, "seal-format", hierarchy.SealFormatInline, hierarchy.SealFormatAnnotation, hierarchy.SealFormatInline,
		"ciphertext format written: 3 carries the wrapped local KEK inside the ciphertext (no annotation: cheaper for the apiserver), "+
			"2 in an annotation, readable by kubekms before format 3 (use it while a rolling upgrade still runs older plugins); both are always read")
	intVar(fl, &f.hier.MaxConcurrentRemote, "max-concurrent-remote", 16, 1, 4096, "concurrent remote key-service calls")
	fl.BoolVar(&f.newKeyring, "new-keyring", false, "softkey: start a NEW keyring although the state file names one that is missing "+
		"(data under the old keyring becomes unreadable; restore the old keyring instead if you can)")
	fl.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics and /healthz /livez /readyz on this address (\":9595\" means 127.0.0.1:9595); off when empty")
	fl.StringVar(&f.otlpEndpoint, "otlp-endpoint", "", "export OpenTelemetry traces over OTLP/gRPC to host:port; off when empty")
	fl.BoolVar(&f.otlpInsecure, "otlp-insecure", true, "send OTLP without TLS (for a collector on loopback)")
	fl.StringVar(&f.logFormat, "log-format", "json", "log format: json or text")
	fl.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	durationVar(fl, &f.logSlow, "log-slow", plugin.DefaultSlowCall, "log every KMS call that takes at least this long (warn)")
	fl.Float64Var(&f.logCallsPerSecond, "log-calls-per-second", plugin.DefaultLoggedCallsPerSecond,
		"successful, fast KMS calls logged per method and second at info, after a burst of 100 (0: none; failed and slow calls are always logged, every call at --log-level=debug)")
	durationVar(fl, &f.shutdownGrace, "shutdown-grace", 10*time.Second, "time for in-flight calls to finish on SIGTERM")
	return cmd
}

// serveGOGC is the GC target of serve unless the GOGC environment variable
// sets one. The live heap is small (~4 MB, mostly the dependencies' tables)
// and every call allocates ~5 KB in gRPC, so at Go's default of 100 the
// collector ran every ~600 calls and was the largest cost kubekms added over
// a no-op plugin: 400 cuts the instructions per Decrypt by 29% for ~16 MiB
// more anonymous memory (docs/performance.md, 1c).
const serveGOGC = 400

func runServe(ctx context.Context, cmd *cobra.Command, f serveFlags) error {
	log, err := newLogger(cmd.ErrOrStderr(), f.logFormat, f.logLevel)
	if err != nil {
		return err
	}
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(serveGOGC)
	}
	if f.logCallsPerSecond < 0 {
		return fmt.Errorf("--log-calls-per-second %v: want a rate >= 0", f.logCallsPerSecond)
	}
	if f.keyURI == "" {
		return errNoKeyURI
	}
	mode, err := strconv.ParseUint(f.socketMode, 8, 32)
	if err != nil || mode > 0o777 {
		return fmt.Errorf("--socket-mode %q: want an octal mode like 0600", f.socketMode)
	}
	sockOpts := plugin.SocketOptions{Mode: os.FileMode(mode), Group: f.socketGroup, AllowInsecureDir: f.allowInsecureDir}
	if err := plugin.CheckEndpoint(f.listen, sockOpts); err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	if f.metricsAddr != "" {
		exposed, err := checkListenAddr(f.metricsAddr)
		if err != nil {
			return fmt.Errorf("--metrics-addr: %w", err)
		}
		if exposed {
			log.Warn("--metrics-addr binds a non-loopback address: metrics and the /healthz /livez /readyz probes are "+
				"reachable from other hosts, without authentication. Use 127.0.0.1:PORT (or :PORT) unless a firewall "+
				"or network policy keeps them in", "metrics_addr", f.metricsAddr)
		}
	}
	if f.otlpEndpoint != "" {
		if _, _, err := net.SplitHostPort(f.otlpEndpoint); err != nil {
			return fmt.Errorf("--otlp-endpoint %q: want host:port: %w", f.otlpEndpoint, err)
		}
	}
	stateFile := f.stateFile
	if stateFile == "" && !f.noState {
		if stateFile = currentUser().stateFile(f.keyURI); stateFile == "" {
			log.Info("keeping no local KEK state across restarts: no --state-file and no state folder of this user's")
		}
	}
	useState := !f.noState && stateFile != ""
	var prior *hierarchy.State
	if useState {
		if prior, err = readState(ctx, stateFile, log); err != nil {
			return err
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := metrics.New(reg)

	opts := keyservice.Options{Logger: log, ClusterName: f.clusterName, KeyIDSuffix: f.keyIDSuffix, NewKey: f.newKeyring}
	if prior != nil {
		opts.PriorKeyID, opts.PriorKeyIDFrom = prior.KeyID, stateFile
	}
	svc, err := newRegistry().Open(ctx, f.keyURI, opts)
	if err != nil {
		return err
	}
	defer svc.Close()
	if ttl, ok := svc.(interface{ TokenTTL() time.Duration }); ok {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "kubekms", Name: "keyservice_token_ttl_seconds",
			Help: "Remaining TTL of the key service's auth token (-1: never expires).",
		}, func() float64 {
			if d := ttl.TokenTTL(); d >= 0 {
				return d.Seconds()
			}
			return -1
		}))
	}

	if f.opaqueKeyIDSecret != "" {
		codec, err := opaqueid.ReadSecretFile(f.opaqueKeyIDSecret)
		if err != nil {
			return err
		}
		// After the TokenTTL check above: the wrapper hides backend extras.
		svc = opaqueid.Wrap(svc, codec)
	}

	tracer, stopTracing, err := newTracer(ctx, f.otlpEndpoint, f.otlpInsecure)
	if err != nil {
		return err
	}
	defer stopTracing()

	cfg := f.hier
	cfg.Logger, cfg.Metrics, cfg.Tracer = log, m, tracer
	if useState {
		cfg.State = hierarchy.FileState{Path: stateFile}
	}
	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	h, err := hierarchy.New(startCtx, svc, cfg)
	cancel()
	if err != nil {
		return err
	}
	defer h.Close()

	l, err := plugin.Listen(f.listen, sockOpts)
	if err != nil {
		return err
	}
	perSecond := f.logCallsPerSecond
	if perSecond == 0 {
		perSecond = -1 // plugin.Options: zero means the default
	}
	srv := plugin.NewGRPCServer(h, plugin.Options{Logger: log, Metrics: m, Tracer: tracer, Version: version,
		SlowCall: f.logSlow, LoggedCallsPerSecond: perSecond})

	if f.metricsAddr != "" {
		stopHTTP, err := serveHTTP(f.metricsAddr, reg, h, log)
		if err != nil {
			l.Close()
			return err
		}
		defer stopHTTP()
	}
	stopHUP := reprobeOnSIGHUP(h, log)
	defer stopHUP()
	st := h.Status(ctx)
	log.Info("serving", "socket", f.listen, "key_uri", redactURI(f.keyURI), "key_id", st.KeyID, "healthz_ok", st.OK, "reason", st.Reason, "version", version)
	err = plugin.Serve(ctx, srv, l, f.shutdownGrace)
	log.Info("stopped", "socket", f.listen)
	return err
}

// reprobeOnSIGHUP makes SIGHUP re-probe the key service at once (and log
// the outcome) instead of ending the process: after an operator changed the
// key, its new state reaches Status without waiting for the probe interval.
func reprobeOnSIGHUP(h *hierarchy.Hierarchy, log *slog.Logger) (stop func()) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-quit:
				return
			case <-hup:
			}
			log.Info("SIGHUP: re-probing the key service")
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			st := h.Refresh(ctx)
			cancel()
			log.Info("re-probed the key service", "mode", st.Mode.String(), "healthz_ok", st.OK, "key_id", st.KeyID,
				"remote_key_id", st.RemoteKeyID, "reason", st.Reason)
		}
	}()
	return func() {
		signal.Stop(hup)
		close(quit)
		<-done
	}
}

// redactURI drops the query of a key URI (it may name PIN or token sources).
func redactURI(uri string) string {
	for i, c := range uri {
		if c == '?' {
			return uri[:i] + "?..."
		}
	}
	return uri
}

// serveHTTP serves metrics and the probe endpoints: /livez (the process
// runs), /readyz (a local seal and open succeed: the plugin can encrypt now)
// and /healthz (the same answer as the gRPC Status).
func serveHTTP(addr string, reg *prometheus.Registry, h *hierarchy.Hierarchy, log interface {
	Error(string, ...any)
}) (stop func(), err error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg, EnableOpenMetrics: true}))
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		st := h.Status(r.Context())
		if !st.OK {
			http.Error(w, st.Reason, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := h.SelfTest(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	l, err := net.Listen("tcp", loopbackDefault(addr))
	if err != nil {
		return nil, fmt.Errorf("--metrics-addr: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server failed", "error", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	}, nil
}

// readState reads the saved local KEK state for the key ID it names (the
// proof that a key existed, for the key service). A state file that is not a
// regular file is refused (a FIFO would hang the start); one that cannot be
// parsed is no proof (the hierarchy makes a new local KEK, as before).
func readState(ctx context.Context, path string, log *slog.Logger) (*hierarchy.State, error) {
	st, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("--state-file: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("--state-file %s is not a regular file (mode %v): remove it or name another path", path, st.Mode())
	}
	s, err := hierarchy.FileState{Path: path}.Load(ctx)
	if err != nil {
		log.Warn("cannot read the local KEK state; it proves nothing about the key", "error", err)
		return nil, nil
	}
	return s, nil
}

// checkListenAddr checks a host:port (an empty host means loopback) and
// reports whether it is reachable from other hosts.
func checkListenAddr(addr string) (exposed bool, err error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false, fmt.Errorf("%q: want host:port or :port: %w", addr, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return false, fmt.Errorf("%q: port %q is not a number from 0 to 65535", addr, port)
	}
	if host == "" || host == "localhost" {
		return false, nil
	}
	ip := net.ParseIP(host)
	return ip == nil || !ip.IsLoopback(), nil
}

// loopbackDefault binds an address without a host (":9595") to loopback:
// metrics and probes stay on the node unless a host is named explicitly
// (e.g. "0.0.0.0:9595").
func loopbackDefault(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host != "" {
		return addr
	}
	return net.JoinHostPort("127.0.0.1", port)
}
