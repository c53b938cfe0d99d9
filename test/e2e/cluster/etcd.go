package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Etcd is a single-member etcd on loopback with its data in a temp dir.
type Etcd struct {
	Endpoint string
	Client   *clientv3.Client
	proc     *Process
}

// StartEtcd starts etcd (without fsync: test data only) and waits until it
// answers. It is stopped in t.Cleanup.
func StartEtcd(ctx context.Context, t testing.TB, bin string) (*Etcd, error) {
	t.Helper()
	dir := t.TempDir()
	client := "http://" + hostPort(FreePort(t))
	peer := "http://" + hostPort(FreePort(t))
	proc, err := StartProcess(t, "etcd", filepath.Join(dir, "etcd.log"), bin,
		"--name=e2e",
		"--data-dir="+filepath.Join(dir, "data"),
		"--listen-client-urls="+client,
		"--advertise-client-urls="+client,
		"--listen-peer-urls="+peer,
		"--initial-advertise-peer-urls="+peer,
		"--initial-cluster=e2e="+peer,
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{client},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	t.Cleanup(func() { cli.Close() })
	e := &Etcd{Endpoint: client, Client: cli, proc: proc}
	deadline := time.Now().Add(30 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err = cli.Status(cctx, client)
		cancel()
		if err == nil {
			return e, nil
		}
		if exited, werr := proc.Exited(); exited {
			return nil, fmt.Errorf("etcd exited during start (%v); log %s", werr, proc.LogPath())
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("etcd not ready after 30s: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
