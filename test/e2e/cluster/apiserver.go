package cluster

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// APIServer is a kube-apiserver on loopback that keeps its port, certificates,
// service-account key and admin token across restarts, so one client works
// for every start.
type APIServer struct {
	Bin    string
	Etcd   string // etcd client URL
	Port   int
	Client kubernetes.Interface
	Config *rest.Config

	t      testing.TB
	dir    string
	token  string
	proc   *Process
	starts int
}

// NewAPIServer prepares (does not start) a kube-apiserver owned by t.
func NewAPIServer(t testing.TB, bin, etcdURL string) (*APIServer, error) {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "certs"), 0o700); err != nil {
		return nil, err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("service-account key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(filepath.Join(dir, "sa.key"), keyPEM, 0o600); err != nil {
		return nil, err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("service-account public key: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o600); err != nil {
		return nil, err
	}
	tok := make([]byte, 16)
	if _, err := rand.Read(tok); err != nil {
		return nil, err
	}
	token := hex.EncodeToString(tok)
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(token+",admin,admin,system:masters\n"), 0o600); err != nil {
		return nil, err
	}
	port := FreePort(t)
	cfg := &rest.Config{
		Host:            "https://" + hostPort(port),
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}, // self-signed serving cert on loopback
		QPS:             1000,
		Burst:           2000,
		Timeout:         60 * time.Second,
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return &APIServer{Bin: bin, Etcd: etcdURL, Port: port, Client: client, Config: cfg, t: t, dir: dir, token: token}, nil
}

// StartOptions select what one apiserver start uses.
type StartOptions struct {
	EncryptionConfig string   // EncryptionConfiguration YAML; empty = no encryption
	FeatureGates     string   // e.g. "KMSv1=true"
	ExtraArgs        []string // appended last
	// WaitPath is the endpoint Start waits for (default "/readyz"); e.g.
	// "/livez?exclude=kms-providers" to start while the plugin is unhealthy.
	WaitPath string
	// Hostname, when set, runs kube-apiserver in its own UTS namespace with
	// this hostname: its identity (lease name, apiserver_id_hash) derives
	// from the hostname, so several apiservers on one machine need one each.
	Hostname string
}

// Start starts kube-apiserver and waits for /readyz; it returns the time from
// process start to ready.
func (a *APIServer) Start(ctx context.Context, opts StartOptions) (time.Duration, error) {
	if a.proc != nil {
		if exited, _ := a.proc.Exited(); !exited {
			return 0, fmt.Errorf("kube-apiserver already running")
		}
	}
	a.starts++
	args := []string{
		"--etcd-servers=" + a.Etcd,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", a.Port),
		"--cert-dir=" + filepath.Join(a.dir, "certs"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + filepath.Join(a.dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(a.dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--token-auth-file=" + filepath.Join(a.dir, "tokens.csv"),
		"--authorization-mode=AlwaysAllow",
		"--endpoint-reconciler-type=none",
	}
	if opts.EncryptionConfig != "" {
		path := filepath.Join(a.dir, fmt.Sprintf("encryption-%d.yaml", a.starts))
		if err := os.WriteFile(path, []byte(opts.EncryptionConfig), 0o600); err != nil {
			return 0, err
		}
		args = append(args, "--encryption-provider-config="+path)
	}
	if opts.FeatureGates != "" {
		args = append(args, "--feature-gates="+opts.FeatureGates)
	}
	args = append(args, opts.ExtraArgs...)
	logPath := filepath.Join(a.dir, fmt.Sprintf("kube-apiserver-%d.log", a.starts))
	start := time.Now()
	bin := a.Bin
	if opts.Hostname != "" {
		args = append([]string{"--uts", "--", "sh", "-c", `hostname "$0" && exec "$@"`, opts.Hostname, a.Bin}, args...)
		bin = "unshare"
	}
	proc, err := StartProcess(a.t, "kube-apiserver", logPath, bin, args...)
	if err != nil {
		return 0, err
	}
	a.proc = proc
	if err := a.waitReady(ctx, opts.WaitPath, 3*time.Minute); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// Stop stops kube-apiserver with SIGTERM. Stop it before etcd, or its
// shutdown waits for etcd for minutes.
func (a *APIServer) Stop() error {
	if a.proc == nil {
		return nil
	}
	return a.proc.Stop(90 * time.Second)
}

// Restart stops and starts kube-apiserver; it returns the time to ready.
func (a *APIServer) Restart(ctx context.Context, opts StartOptions) (time.Duration, error) {
	if err := a.Stop(); err != nil {
		return 0, err
	}
	return a.Start(ctx, opts)
}

// CertDir holds the serving certificate kube-apiserver generated
// (apiserver.crt: the certificate and the CA that signed it).
func (a *APIServer) CertDir() string { return filepath.Join(a.dir, "certs") }

// CPU is the CPU time the current kube-apiserver process has used so far.
func (a *APIServer) CPU() time.Duration {
	if a.proc == nil {
		return 0
	}
	return a.proc.CPU()
}

// LogPath is the log of the current (last) start.
func (a *APIServer) LogPath() string {
	if a.proc == nil {
		return ""
	}
	return a.proc.LogPath()
}

// Get asks the apiserver for path (e.g. "/readyz", "/livez?exclude=kms-providers")
// as the admin and returns the HTTP status code and body.
func (a *APIServer) Get(ctx context.Context, path string) (int, string, error) {
	hc := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, // loopback, self-signed
	}
	defer hc.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.Config.Host+path, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := hc.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64*1024))
	return resp.StatusCode, string(body), nil
}

func (a *APIServer) waitReady(ctx context.Context, path string, bound time.Duration) error {
	if path == "" {
		path = "/readyz"
	}
	hc := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}, // loopback, self-signed
	}
	defer hc.CloseIdleConnections()
	deadline := time.Now().Add(bound)
	last := "no answer"
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.Config.Host+path, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Authorization", "Bearer "+a.token)
		resp, err := hc.Do(req)
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 8192))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, failedChecks(string(body)))
		} else {
			last = err.Error()
		}
		if exited, werr := a.proc.Exited(); exited {
			return fmt.Errorf("kube-apiserver exited during start (%v): %s", werr, tailFile(a.proc.LogPath(), 15))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver not ready after %s: %s", bound, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// failedChecks keeps the failing lines of a /readyz answer.
func failedChecks(body string) string {
	var bad []string
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "[-]") {
			bad = append(bad, l)
		}
	}
	if len(bad) == 0 {
		return strings.TrimSpace(body)
	}
	return strings.Join(bad, "; ")
}

// Provider is one entry of an EncryptionConfiguration provider list.
type Provider string

// KMSv2 is a kms provider speaking the v2 API.
func KMSv2(name, endpoint string) Provider {
	return Provider(fmt.Sprintf("- kms:\n    apiVersion: v2\n    name: %s\n    endpoint: %s\n    timeout: 3s\n", name, endpoint))
}

// KMSv1 is a kms provider speaking the deprecated v1 API (needs KMSv1=true).
func KMSv1(name, endpoint string) Provider {
	return Provider(fmt.Sprintf("- kms:\n    apiVersion: v1\n    name: %s\n    endpoint: %s\n    cachesize: 1000\n    timeout: 3s\n", name, endpoint))
}

// AESCBC is an aescbc provider with one 32-byte key.
func AESCBC(name string, key []byte) Provider {
	return Provider(fmt.Sprintf("- aescbc:\n    keys:\n    - name: %s\n      secret: %s\n", name, base64.StdEncoding.EncodeToString(key)))
}

// Identity stores plaintext (and reads unencrypted data).
const Identity Provider = "- identity: {}\n"

// EncryptionConfig renders an EncryptionConfiguration for secrets and
// configmaps with the providers in order (the first one writes).
func EncryptionConfig(providers ...Provider) string {
	var b strings.Builder
	b.WriteString("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources:\n  - secrets\n  - configmaps\n  providers:\n")
	for _, p := range providers {
		for _, l := range strings.SplitAfter(string(p), "\n") {
			if l != "" {
				b.WriteString("  " + l)
			}
		}
	}
	return b.String()
}
