package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"

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

func TestStatusOfKubekms(t *testing.T) {
	svc, err := softkey.Open(context.Background(), "softkey://"+filepath.Join(t.TempDir(), "k.json"), keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h, err := hierarchy.New(context.Background(), svc, hierarchy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	endpoint := serveOn(t, func(s *grpc.Server) { kmsapi.RegisterKeyManagementServiceServer(s, plugin.NewV2(h, plugin.Options{})) })
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
