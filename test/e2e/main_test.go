//go:build e2e

// Package e2e runs kubekms against a real kube-apiserver and etcd: what is
// stored, restarts of either side, rotation, KMS v1 -> v2, and cold-start
// cost. Run with `make e2e`; binaries come from hack/cluster-bins.sh.
package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/manifests"
	"github.com/kubekms/kubekms/test/e2e/cluster"
)

var secretsN = flag.Int("e2e.secrets", 2000, "Secrets written for the cold-start comparison")

// Binaries the suite runs. KUBE_APISERVER, ETCD and KUBEKMS name prebuilt
// ones; otherwise kube-apiserver and etcd come from the cache that
// hack/cluster-bins.sh fills, and kubekms is built from this repo once.
type binaries struct{ apiserver, etcd, kubekms string }

var (
	buildOnce sync.Once
	builtPath string
	buildErr  error
	buildDir  string
)

func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

func needBinaries(t *testing.T) binaries {
	t.Helper()
	b := binaries{
		apiserver: testutil.Binary(t, "KUBE_APISERVER", "kube-apiserver"),
		etcd:      testutil.Binary(t, "ETCD", "etcd"),
	}
	if p := os.Getenv("KUBEKMS"); p != "" {
		b.kubekms = p
		return b
	}
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "kubekms-e2e-bin")
		if buildErr != nil {
			return
		}
		builtPath = filepath.Join(buildDir, "kubekms")
		cmd := exec.Command("go", "build", "-o", builtPath, "./cmd/kubekms")
		cmd.Dir = filepath.Join("..", "..") // the repo root, from test/e2e
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/kubekms: %w\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	b.kubekms = builtPath
	return b
}

// kmsCluster is etcd + kubekms + kube-apiserver with a kms v2 provider.
type kmsCluster struct {
	etcd   *cluster.Etcd
	plugin *cluster.Plugin
	api    *cluster.APIServer
	opts   cluster.StartOptions
	ready  time.Duration // first start to /readyz
}

func startKMSCluster(ctx context.Context, t *testing.T, b binaries) *kmsCluster {
	t.Helper()
	return startKMSClusterWith(ctx, t, b, nil)
}

// startKMSClusterOn runs the plugin on keyURI ("": its own softkey keyring).
func startKMSClusterOn(ctx context.Context, t *testing.T, b binaries, keyURI string) *kmsCluster {
	t.Helper()
	return startKMSClusterWith(ctx, t, b, func(p *cluster.Plugin) {
		if keyURI != "" {
			p.KeyURI = keyURI
		}
	})
}

// startKMSClusterWith is startKMSCluster with setup applied to the plugin
// before its first start (e.g. a Wrap that runs another plugin binary).
func startKMSClusterWith(ctx context.Context, t *testing.T, b binaries, setup func(*cluster.Plugin)) *kmsCluster {
	t.Helper()
	etcd, err := cluster.StartEtcd(ctx, t, b.etcd)
	if err != nil {
		t.Fatal(err)
	}
	plugin, err := cluster.NewPlugin(t, b.kubekms)
	if err != nil {
		t.Fatal(err)
	}
	if setup != nil {
		setup(plugin)
	}
	if err := plugin.Start(ctx); err != nil {
		t.Fatal(err)
	}
	api, err := cluster.NewAPIServer(t, b.apiserver, etcd.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	c := &kmsCluster{etcd: etcd, plugin: plugin, api: api, opts: renderedOptions(t, plugin, "secrets", "configmaps")}
	c.ready, err = api.Start(ctx, c.opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cluster up: etcd %s, kubekms %s, kube-apiserver %s ready in %s", etcd.Endpoint, plugin.Socket, api.Config.Host, c.ready.Round(time.Millisecond))
	return c
}

// renderedOptions starts kube-apiserver with what `kubekms manifests` renders
// for this plugin's socket and resources (the EncryptionConfiguration and the
// apiserver's flags), so that what we ship is what the suite tests.
func renderedOptions(t *testing.T, plugin *cluster.Plugin, resources ...string) cluster.StartOptions {
	t.Helper()
	dep, err := manifests.Render(manifests.Options{
		Socket:    plugin.Socket,
		Resources: resources,
		EncConfig: filepath.Join(t.TempDir(), "encryption-config.yaml"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dep.Options.EncConfig, dep.EncryptionConfig(), 0o600); err != nil {
		t.Fatal(err)
	}
	return cluster.StartOptions{ExtraArgs: dep.APIServerFlags()}
}

// buildNoopPlugin builds the no-op KMS v2 plugin (bench/noop) into a
// temporary folder of t.
func buildNoopPlugin(t *testing.T) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "noop")
	cmd := exec.Command("go", "build", "-o", out, "./bench/noop")
	cmd.Dir = filepath.Join("..", "..")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./bench/noop: %v\n%s", err, b)
	}
	return out
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
