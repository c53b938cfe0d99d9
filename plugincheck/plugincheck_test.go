package plugincheck_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
	"github.com/kubekms/kubekms/plugincheck"
)

// serve runs kubekms's plugin over the softkey keyring at ring.
func serve(t *testing.T, ring string) string {
	t.Helper()
	svc, err := softkey.Open(context.Background(), "softkey://"+ring, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h, err := hierarchy.New(context.Background(), svc, hierarchy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	dir, err := os.MkdirTemp("", "kkpc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	endpoint := "unix://" + filepath.Join(dir, "kms.sock")
	l, err := plugin.Listen(endpoint, plugin.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s := plugin.NewGRPCServer(h, plugin.Options{})
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return endpoint
}

// Plugins over the same keyring read each other's data; a plugin over
// another keyring is named for every pair it is in.
func TestCross(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared.json")
	a, b := serve(t, shared), serve(t, shared)
	other := serve(t, filepath.Join(dir, "other.json"))
	for _, ep := range []string{a, b, other} {
		rep, err := plugincheck.Check(ctx, ep, 0, true)
		if err != nil || len(rep.Problems) != 0 {
			t.Fatalf("Check %s: %v %v", ep, rep, err)
		}
	}
	if problems, err := plugincheck.Cross(ctx, []string{a, b}, 0); err != nil || len(problems) != 0 {
		t.Errorf("one keyring: %v %v", problems, err)
	}
	problems, err := plugincheck.Cross(ctx, []string{a, b, other}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) != 4 { // other cannot read a's and b's, they cannot read other's
		t.Errorf("problems = %q", problems)
	}
	for _, p := range problems {
		if !strings.Contains(p, "cannot decrypt") || !strings.Contains(p, other) {
			t.Errorf("problem %q", p)
		}
	}
}

// A kubekms whose key is revoked answers Status unhealthy with
// kubekms.io/writes-stopped: Check reports that (a problem, not an error),
// naming it as stopped writes.
func TestCheckWritesStopped(t *testing.T) {
	ctx := context.Background()
	ring := filepath.Join(t.TempDir(), "ring.json")
	if _, err := softkey.Create(ring); err != nil { // v1
		t.Fatal(err)
	}
	if _, err := softkey.SetDisabled(ring, 1, true); err != nil {
		t.Fatal(err)
	}
	rep, err := plugincheck.Check(ctx, serve(t, ring), 0, true)
	if err != nil {
		t.Fatalf("Check of a revoked plugin: %v", err)
	}
	if rep.KeyID != hierarchy.StoppedKeyID || rep.Healthz == "ok" || rep.UID != "" ||
		!strings.Contains(strings.Join(rep.Problems, "\n"), "writes stopped") {
		t.Errorf("report %+v", rep)
	}
}
