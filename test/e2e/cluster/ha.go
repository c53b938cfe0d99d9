package cluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// EtcdCluster is an n-member etcd on loopback.
type EtcdCluster struct {
	Endpoints []string // client URLs, one per member
	Client    *clientv3.Client
	procs     []*Process
}

// URLs is the --etcd-servers value for kube-apiserver.
func (e *EtcdCluster) URLs() string { return strings.Join(e.Endpoints, ",") }

// StartEtcdCluster starts n etcd members that form one cluster (without
// fsync: test data only) and waits until every member answers. They are
// stopped in t.Cleanup.
func StartEtcdCluster(ctx context.Context, t testing.TB, bin string, n int) (*EtcdCluster, error) {
	t.Helper()
	type member struct{ name, client, peer, dir string }
	members := make([]member, n)
	var initial []string
	for i := range members {
		m := member{name: fmt.Sprintf("e2e-%d", i), client: "http://" + hostPort(FreePort(t)),
			peer: "http://" + hostPort(FreePort(t)), dir: t.TempDir()}
		members[i] = m
		initial = append(initial, m.name+"="+m.peer)
	}
	e := &EtcdCluster{}
	for _, m := range members {
		proc, err := StartProcess(t, "etcd "+m.name, filepath.Join(m.dir, "etcd.log"), bin,
			"--name="+m.name,
			"--data-dir="+filepath.Join(m.dir, "data"),
			"--listen-client-urls="+m.client,
			"--advertise-client-urls="+m.client,
			"--listen-peer-urls="+m.peer,
			"--initial-advertise-peer-urls="+m.peer,
			"--initial-cluster="+strings.Join(initial, ","),
			"--initial-cluster-state=new",
			"--initial-cluster-token=kubekms-e2e",
			"--unsafe-no-fsync",
			"--log-level=warn",
		)
		if err != nil {
			return nil, err
		}
		e.procs = append(e.procs, proc)
		e.Endpoints = append(e.Endpoints, m.client)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: e.Endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	t.Cleanup(func() { cli.Close() })
	e.Client = cli
	deadline := time.Now().Add(60 * time.Second)
	for _, ep := range e.Endpoints {
		for {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			st, err := cli.Status(cctx, ep)
			cancel()
			if err == nil && st.Leader != 0 {
				break
			}
			for i, p := range e.procs {
				if exited, werr := p.Exited(); exited {
					return nil, fmt.Errorf("etcd member %d exited during start (%v); log %s", i, werr, p.LogPath())
				}
			}
			if time.Now().After(deadline) {
				return nil, fmt.Errorf("etcd member %s not ready after 60s: %v", ep, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return e, nil
}

// NewAPIServerPeer prepares (does not start) another kube-apiserver of the
// same control plane as peer: the same service-account key pair and admin
// token (so one client and one kubeconfig work on every apiserver), its
// own port, certificates and logs.
func NewAPIServerPeer(t testing.TB, bin, etcdURLs string, peer *APIServer) (*APIServer, error) {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "certs"), 0o700); err != nil {
		return nil, err
	}
	for _, f := range []string{"sa.key", "sa.pub", "tokens.csv"} {
		data, err := os.ReadFile(filepath.Join(peer.dir, f))
		if err != nil {
			return nil, err
		}
		if err := os.WriteFile(filepath.Join(dir, f), data, 0o600); err != nil {
			return nil, err
		}
	}
	port := FreePort(t)
	cfg := rest.CopyConfig(peer.Config)
	cfg.Host = "https://" + hostPort(port)
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return &APIServer{Bin: bin, Etcd: etcdURLs, Port: port, Client: client, Config: cfg, t: t, dir: dir, token: peer.token}, nil
}

// StartAll starts the apiservers at once (each with its own options) and
// returns each one's time to ready.
func StartAll(ctx context.Context, apis []*APIServer, opts []StartOptions) ([]time.Duration, error) {
	ready := make([]time.Duration, len(apis))
	errs := make([]error, len(apis))
	var wg sync.WaitGroup
	for i, a := range apis {
		wg.Go(func() { ready[i], errs[i] = a.Start(ctx, opts[i]) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return ready, fmt.Errorf("kube-apiserver %d: %w", i, err)
		}
	}
	return ready, nil
}
