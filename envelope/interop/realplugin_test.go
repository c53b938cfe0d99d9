package interop_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"k8s.io/apiserver/pkg/storage/value"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/envelope/envelopetest"
	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
)

// startKubekms runs kubekms's own plugin (softkey keyring -> hierarchy ->
// gRPC server) on a fresh socket and returns its endpoint and keyring path.
func startKubekms(t *testing.T) (endpoint, keyring string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "kk") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	keyring = filepath.Join(dir, "keyring.json")
	svc, err := softkey.Open(context.Background(), "softkey://"+keyring, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() }) // stops its keyring watch
	log := slog.New(slog.DiscardHandler)
	h, err := hierarchy.New(context.Background(), svc, hierarchy.Config{Logger: log, ProbeInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	endpoint = "unix://" + filepath.Join(dir, "kms.sock")
	l, err := plugin.Listen(endpoint, plugin.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := plugin.NewGRPCServer(h, plugin.Options{Logger: log})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- plugin.Serve(ctx, srv, l, 5*time.Second) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("plugin.Serve: %v", err)
		}
		h.Close()
	})
	return endpoint, keyring
}

// The same interop in both directions with kubekms's real plugin (its
// key_id and wrapped-KEK annotations), across a softkey rotation.
func TestRealPluginInterop(t *testing.T) {
	endpoint, keyring := startKubekms(t)
	client := envelopetest.Dial(t, endpoint)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const provider = "kubekms"

	type stored struct{ key, keyID, plain, val string }
	var all []stored
	for round := range 2 {
		if round == 1 {
			st, err := client.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := softkey.Rotate(keyring); err != nil {
				t.Fatal(err)
			}
			for { // the plugin notices the new primary on its next probe
				now, err := client.Status(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if now.KeyID != st.KeyID {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		st, err := client.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		tr := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets)
		for i := range 20 {
			key := fmt.Sprintf("/registry/secrets/ns%d/s%d", round, i)
			plain := fmt.Sprintf("k8s\x00secret %d/%d", round, i)
			all = append(all, stored{key, st.KeyID, plain, string(write(t, tr, key, []byte(plain)))})
		}
	}
	if all[0].keyID == all[len(all)-1].keyID {
		t.Fatal("rotation did not change the key_id")
	}

	op := envelope.NewOpener(client)
	for _, s := range all {
		got, h, err := op.Open(ctx, []byte(s.val), []byte(s.key))
		if err != nil {
			t.Fatalf("Open(%s): %v", s.key, err)
		}
		if string(got) != s.plain || h.KeyID != s.keyID || h.Provider != provider {
			t.Fatalf("Open(%s) = %q key_id %q, want %q key_id %q", s.key, got, h.KeyID, s.plain, s.keyID)
		}
	}
	if n := op.PluginCalls(); n != 2 {
		t.Errorf("plugin Decrypt calls %d, want 2 (one per seed)", n)
	}

	sealer, err := envelope.NewSealer(ctx, client, provider)
	if err != nil {
		t.Fatal(err)
	}
	tr := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets)
	key := "/registry/secrets/default/written-by-kubekms"
	val, err := sealer.Seal([]byte("k8s\x00ours"), []byte(key))
	if err != nil {
		t.Fatal(err)
	}
	got, stale, err := tr.TransformFromStorage(ctx, val, value.DefaultContext(key))
	if err != nil || !bytes.Equal(got, []byte("k8s\x00ours")) || stale {
		t.Fatalf("apiserver read %q stale=%v err=%v", got, stale, err)
	}
}
