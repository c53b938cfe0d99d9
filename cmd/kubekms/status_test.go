package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/convergence"
	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
	"github.com/kubekms/kubekms/plugincheck"
)

func serveOn(t *testing.T, register func(*grpc.Server)) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "kkst")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	endpoint := "unix://" + filepath.Join(dir, "kms.sock")
	l, err := plugin.Listen(endpoint, plugin.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	register(s)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return endpoint
}

// serveKubekms serves kubekms's v2 plugin over the softkey keyring at ring.
func serveKubekms(t *testing.T, ring string) string {
	t.Helper()
	svc, err := softkey.Open(context.Background(), "softkey://"+ring, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() }) // stops its keyring watch
	h, err := hierarchy.New(context.Background(), svc, hierarchy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return serveOn(t, func(s *grpc.Server) { kmsapi.RegisterKeyManagementServiceServer(s, plugin.NewV2(h, plugin.Options{})) })
}

func TestStatusOfKubekms(t *testing.T) {
	endpoint := serveKubekms(t, filepath.Join(t.TempDir(), "k.json"))
	rep, err := plugincheck.Check(context.Background(), endpoint, 3*time.Second, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Problems) != 0 || rep.Healthz != "ok" || rep.UID == "" || !strings.HasPrefix(rep.KeyID, "softkey:") {
		t.Fatalf("report %+v", rep)
	}
}

// badPlugin breaks the apiserver's rules in the ways status must catch.
type badPlugin struct {
	kmsapi.UnimplementedKeyManagementServiceServer
}

func (badPlugin) Status(context.Context, *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	return &kmsapi.StatusResponse{Version: "v2", Healthz: "ok", KeyId: "key-1"}, nil
}

func (badPlugin) Encrypt(_ context.Context, r *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	return &kmsapi.EncryptResponse{Ciphertext: r.Plaintext, KeyId: "key-2",
		Annotations: map[string][]byte{"not_a_domain": []byte("x")}}, nil
}

func (badPlugin) Decrypt(context.Context, *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	return &kmsapi.DecryptResponse{Plaintext: []byte("other")}, nil
}

func TestStatusFindsProblems(t *testing.T) {
	endpoint := serveOn(t, func(s *grpc.Server) { kmsapi.RegisterKeyManagementServiceServer(s, badPlugin{}) })
	rep, err := plugincheck.Check(context.Background(), endpoint, 3*time.Second, true)
	if err != nil {
		t.Fatal(err)
	}
	all := strings.Join(rep.Problems, "\n")
	for _, want := range []string{"not a fully qualified domain name", "differs from Status", "different bytes"} {
		if !strings.Contains(all, want) {
			t.Errorf("problems lack %q:\n%s", want, all)
		}
	}
	// Through the command: exit code 2.
	cmd := newRootCmd()
	cmd.SetArgs([]string{"status", "--endpoint", endpoint, "-o", "json"})
	cmd.SetOut(&strings.Builder{})
	if err := cmd.Execute(); exitCode(err) != 2 {
		t.Fatalf("exit code %d (%v), want 2", exitCode(err), err)
	}
}

func TestStatusUnreachable(t *testing.T) {
	_, err := plugincheck.Check(context.Background(), "unix:///nonexistent/kubekms.sock", 300*time.Millisecond, true)
	if err == nil || exitCode(err) != 1 {
		t.Fatalf("unreachable plugin: %v", err)
	}
}

// A kubekms whose key is revoked reports kubekms.io/writes-stopped: the
// tools that need the current key_id (inventory, migrate) say so instead
// of taking it for a key; migrate waits on it as unsettled.
func TestCurrentKeyIDWritesStopped(t *testing.T) {
	ring := filepath.Join(t.TempDir(), "k.json")
	if _, err := softkey.Create(ring); err != nil {
		t.Fatal(err)
	}
	if _, err := softkey.SetDisabled(ring, 1, true); err != nil {
		t.Fatal(err)
	}
	endpoint := serveKubekms(t, ring)
	id, err := currentKeyID(context.Background(), endpoint, 3*time.Second)
	if !errors.Is(err, convergence.ErrWritesStopped) || id != "" || !strings.Contains(err.Error(), hierarchy.StoppedKeyID) {
		t.Errorf("currentKeyID = %q, %v", id, err)
	}
	if _, err := pluginsKeyID(context.Background(), []string{endpoint}, 3*time.Second, ""); !errors.Is(err, convergence.ErrUnsettled) {
		t.Errorf("pluginsKeyID: %v, want unsettled", err)
	}
}

// --rotated-from: plugins that still report the key_id rotated from are
// not settled (migrate waits), another key_id is.
func TestPluginsKeyIDRotatedFrom(t *testing.T) {
	endpoint := serveKubekms(t, filepath.Join(t.TempDir(), "k.json"))
	ctx := context.Background()
	id, err := pluginsKeyID(ctx, []string{endpoint, endpoint}, 3*time.Second, "")
	if err != nil || id == "" {
		t.Fatalf("pluginsKeyID = %q, %v", id, err)
	}
	if got, err := pluginsKeyID(ctx, []string{endpoint}, 3*time.Second, id); !errors.Is(err, convergence.ErrUnsettled) || got != "" {
		t.Errorf("still on the key rotated from: %q, %v", got, err)
	}
	if got, err := pluginsKeyID(ctx, []string{endpoint}, 3*time.Second, "softkey:older:v0"); err != nil || got != id {
		t.Errorf("rotated from another key: %q, %v", got, err)
	}
}
