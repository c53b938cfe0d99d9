package decrypt_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/kubekms/kubekms/decrypt"
	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/envelope/envelopetest"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/snapshot"
)

// startEtcd runs a real single-member etcd on 127.0.0.1 in a temp dir and
// returns a connected client. The process group is killed when the test ends.
func startEtcd(t *testing.T) *clientv3.Client {
	t.Helper()
	bin := testutil.Binary(t, "ETCD", "etcd")
	dir := t.TempDir()
	client := fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t))
	peer := fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t))
	cmd := exec.Command(bin,
		"--name", "kubekms-test",
		"--data-dir", filepath.Join(dir, "data"),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "kubekms-test="+peer,
		"--listen-metrics-urls", fmt.Sprintf("http://127.0.0.1:%d", testutil.FreePort(t)),
		"--unsafe-no-fsync", "--log-level", "error")
	logf, err := os.Create(filepath.Join(dir, "etcd.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
		logf.Close()
		if t.Failed() {
			if b, err := os.ReadFile(logf.Name()); err == nil {
				t.Logf("etcd log:\n%s", b)
			}
		}
	})
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{client}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := cli.Get(ctx, "health-probe")
		cancel()
		if err == nil {
			return cli
		}
		if time.Now().After(deadline) {
			t.Fatalf("etcd at %s not ready: %v", client, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestRealEtcdSnapshot writes the apiserver-encrypted fixture into a real
// etcd (with overwritten and deleted keys in its history), takes a
// snapshot through the maintenance API, and runs inventory and recovery on
// the snapshot file, and inventory on the live etcd.
func TestRealEtcdSnapshot(t *testing.T) {
	cli := startEtcd(t)
	f := newFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// History the readers must resolve: an older version of a key, and a
	// key that was deleted.
	if _, err := cli.Put(ctx, "/registry/secrets/team-a/old-0", "k8s:enc:kms:v2:kubekms:stale version"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, "/registry/secrets/team-a/gone", f.kvs[0].value); err != nil {
		t.Fatal(err)
	}
	for _, e := range f.kvs {
		if _, err := cli.Put(ctx, e.key, e.value); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cli.Delete(ctx, "/registry/secrets/team-a/gone"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, "/unrelated/key", "outside /registry/"); err != nil {
		t.Fatal(err)
	}

	snap := filepath.Join(t.TempDir(), "etcd.db")
	rc, err := cli.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(snap)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, rc); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}

	src, err := snapshot.OpenFile(ctx, snap, []byte(inventory.RegistryPrefix))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if src.Len() != len(f.kvs) {
		t.Errorf("snapshot has %d live keys under /registry/, want %d", src.Len(), len(f.kvs))
	}
	rep, err := inventory.Scan(ctx, src, inventory.Options{CurrentKeyID: f.plugin.CurrentKeyID()})
	if err != nil {
		t.Fatal(err)
	}
	checkInventory(t, rep)

	dir := filepath.Join(t.TempDir(), "recovered")
	sink, err := decrypt.NewDirSink(dir)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := decrypt.Run(ctx, src, envelope.NewOpener(envelopetest.Dial(t, f.endpoint)), sink, decrypt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	checkRecovered(t, f, dir, sum)

	// The same inventory from the live etcd, in small pages.
	live, err := snapshot.OpenEtcd(ctx, cli, inventory.RegistryPrefix, 3)
	if err != nil {
		t.Fatal(err)
	}
	if live.Len() != len(f.kvs) {
		t.Errorf("live etcd count %d, want %d", live.Len(), len(f.kvs))
	}
	rep, err = inventory.Scan(ctx, live, inventory.Options{CurrentKeyID: f.plugin.CurrentKeyID()})
	if err != nil {
		t.Fatal(err)
	}
	checkInventory(t, rep)
}
