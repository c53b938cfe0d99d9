package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/opaqueid"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
)

func writeOpaqueSecret(t *testing.T) (string, *opaqueid.Codec) {
	t.Helper()
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, bytes.Repeat([]byte("k"), 32), 0o600); err != nil {
		t.Fatal(err)
	}
	codec, err := opaqueid.ReadSecretFile(secretFile)
	if err != nil {
		t.Fatal(err)
	}
	return secretFile, codec
}

// The tools' --key-uri (decrypt, inventory --encryption-config) read values
// a plugin stored under opaque key IDs with --opaque-key-ids, and only so.
func TestKeyURIReadsOpaqueKeyIDs(t *testing.T) {
	ctx := context.Background()
	secretFile, codec := writeOpaqueSecret(t)
	uri := "softkey://" + filepath.Join(t.TempDir(), "k.json")
	svc, err := softkey.Open(ctx, uri, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h, err := hierarchy.New(ctx, opaqueid.Wrap(svc, codec), hierarchy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	seed := bytes.Repeat([]byte{7}, 32)
	sealed, err := h.Encrypt(ctx, seed)
	h.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(sealed.KeyID, opaqueid.Prefix) {
		t.Fatalf("key_id %q is not opaque", sealed.KeyID)
	}
	req := &kmsservice.DecryptRequest{Ciphertext: sealed.Ciphertext, KeyID: sealed.KeyID, Annotations: sealed.Annotations}
	decryptWith := func(rf readerFlags) ([]byte, error) {
		p, err := rf.localPlugin(ctx, uri, keyservice.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		return p.Decrypt(ctx, "test", req)
	}
	if _, err := decryptWith(readerFlags{}); err == nil {
		t.Fatal("an opaque key_id decrypted without --opaque-key-ids")
	}
	got, err := decryptWith(readerFlags{opaqueSecret: secretFile})
	if err != nil || !bytes.Equal(got, seed) {
		t.Fatalf("with --opaque-key-ids: %v", err)
	}
}

// status --opaque-key-ids shows the readable key ID behind the plugin's
// opaque one.
func TestStatusShowsTheNameOfAnOpaqueKeyID(t *testing.T) {
	secretFile, codec := writeOpaqueSecret(t)
	svc, err := softkey.Open(context.Background(), "softkey://"+filepath.Join(t.TempDir(), "k.json"), keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	h, err := hierarchy.New(context.Background(), opaqueid.Wrap(svc, codec), hierarchy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	endpoint := serveOn(t, func(s *grpc.Server) { kmsapi.RegisterKeyManagementServiceServer(s, plugin.NewV2(h, plugin.Options{})) })
	run := func(args ...string) string {
		cmd := newStatusCmd()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetArgs(append([]string{"--plugin", endpoint}, args...))
		if err := cmd.Execute(); err != nil {
			t.Fatalf("status %v: %v: %s", args, err, out.String())
		}
		return out.String()
	}
	plain := run()
	if !strings.Contains(plain, "key_id:    "+opaqueid.Prefix) || strings.Contains(plain, "softkey:") {
		t.Fatalf("the plugin's key_id is not opaque:\n%s", plain)
	}
	named := run("--opaque-key-ids", secretFile)
	if !strings.Contains(named, "key name:  softkey:") {
		t.Fatalf("status --opaque-key-ids does not show the readable key ID:\n%s", named)
	}
}
