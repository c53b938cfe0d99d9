// Package interop_test checks kubekms's envelope code against the real
// k8s.io/apiserver transformer in both directions.
package interop_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"

	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/envelope/envelopetest"
)

func write(t *testing.T, tr value.Transformer, key string, plaintext []byte) []byte {
	t.Helper()
	out, err := tr.TransformToStorage(context.Background(), plaintext, value.DefaultContext(key))
	if err != nil {
		t.Fatalf("apiserver TransformToStorage(%s): %v", key, err)
	}
	return out
}

// What the real apiserver transformer writes, we read: across a key
// rotation, with one plugin call per seed.
func TestApiserverWritesKubekmsReads(t *testing.T) {
	plugin := envelopetest.NewPlugin()
	endpoint := envelopetest.Serve(t, plugin)
	const provider = "interop-read"

	type stored struct {
		key, keyID string
		plain, val []byte
	}
	var all []stored
	for round := range 2 {
		if round == 1 {
			plugin.Rotate()
		}
		// A fresh transformer makes its seed at start from Status's key_id,
		// as a restarted apiserver does.
		tr := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets)
		for i := range 50 {
			key := fmt.Sprintf("/registry/secrets/ns%d/s%d", round, i)
			plain := fmt.Appendf(nil, "k8s\x00secret %d of round %d", i, round)
			all = append(all, stored{key, plugin.CurrentKeyID(), plain, write(t, tr, key, plain)})
		}
	}

	callsBefore := plugin.DecryptCalls()
	op := envelope.NewOpener(envelopetest.Dial(t, endpoint))
	for _, s := range all {
		h, err := envelope.ParseHeader(s.val)
		if err != nil {
			t.Fatalf("ParseHeader(%s): %v", s.key, err)
		}
		want := envelope.Header{Kind: envelope.KindKMSv2, Provider: provider, KeyID: s.keyID,
			DEKSourceType:  kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED,
			AnnotationKeys: []string{envelopetest.AnnotationKey}}
		if fmt.Sprint(h) != fmt.Sprint(want) {
			t.Fatalf("header of %s = %+v, want %+v", s.key, h, want)
		}
		got, h2, err := op.Open(context.Background(), s.val, []byte(s.key))
		if err != nil {
			t.Fatalf("Open(%s): %v", s.key, err)
		}
		if !bytes.Equal(got, s.plain) {
			t.Fatalf("Open(%s) = %q, want %q", s.key, got, s.plain)
		}
		if h2.KeyID != s.keyID {
			t.Fatalf("Open header key_id %q, want %q", h2.KeyID, s.keyID)
		}
	}
	if n := op.PluginCalls(); n != 2 {
		t.Errorf("plugin Decrypt calls for 100 values under 2 seeds = %d, want 2", n)
	}
	if n := plugin.DecryptCalls() - callsBefore; n != 2 {
		t.Errorf("plugin saw %d Decrypt calls, want 2", n)
	}
}

// What we write, the real apiserver transformer reads, and it reports it
// stale exactly when our key_id is not its current one.
func TestKubekmsWritesApiserverReads(t *testing.T) {
	plugin := envelopetest.NewPlugin()
	endpoint := envelopetest.Serve(t, plugin)
	const provider = "interop-write"
	client := envelopetest.Dial(t, endpoint)
	ctx := context.Background()

	if _, err := client.Status(ctx); err != nil {
		t.Fatalf("Status: %v", err)
	}
	sealer, err := envelope.NewSealer(ctx, client, provider)
	if err != nil {
		t.Fatal(err)
	}
	if sealer.KeyID() != "key-1" {
		t.Fatalf("sealer key_id %q", sealer.KeyID())
	}
	tr := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets)
	key := "/registry/secrets/default/db-password"
	plain := []byte("k8s\x00hunter2")
	val, err := sealer.Seal(plain, []byte(key))
	if err != nil {
		t.Fatal(err)
	}
	got, stale, err := tr.TransformFromStorage(ctx, val, value.DefaultContext(key))
	if err != nil {
		t.Fatalf("apiserver TransformFromStorage: %v", err)
	}
	if !bytes.Equal(got, plain) || stale {
		t.Fatalf("apiserver read %q stale=%v, want %q stale=false", got, stale, plain)
	}
	// Same value under another etcd key: the AAD check must reject it.
	if _, _, err := tr.TransformFromStorage(ctx, val, value.DefaultContext("/registry/secrets/default/other")); err == nil {
		t.Fatal("apiserver accepted our value under a different etcd key")
	}

	// After a rotation the apiserver (restarted) reads our old value as stale.
	plugin.Rotate()
	tr2 := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets)
	got, stale, err = tr2.TransformFromStorage(ctx, val, value.DefaultContext(key))
	if err != nil || !bytes.Equal(got, plain) || !stale {
		t.Fatalf("after rotation: %q stale=%v err=%v, want plaintext, stale=true", got, stale, err)
	}
}

// The legacy AES_GCM_KEY mode (a single DEK, no HKDF) is still readable.
func TestLegacyAESGCMKeyRead(t *testing.T) {
	const provider = "interop-legacy"
	t.Cleanup(encryptionconfig.SetKDFForTests(provider, false))
	plugin := envelopetest.NewPlugin()
	endpoint := envelopetest.Serve(t, plugin)
	tr := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets)
	key := "/registry/secrets/kube-system/legacy"
	plain := []byte("k8s\x00legacy dek")
	val := write(t, tr, key, plain)

	h, err := envelope.ParseHeader(val)
	if err != nil {
		t.Fatal(err)
	}
	if h.DEKSourceType != kmstypes.EncryptedDEKSourceType_AES_GCM_KEY {
		t.Fatalf("DEK source type %v, want AES_GCM_KEY", h.DEKSourceType)
	}
	got, _, err := envelope.NewOpener(envelopetest.Dial(t, endpoint)).Open(context.Background(), val, []byte(key))
	if err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("Open = %q, %v", got, err)
	}
}

// Tampering, a wrong etcd key and a destroyed key version are reported
// with their class, and a failed seed is not asked for again.
func TestOpenFailures(t *testing.T) {
	plugin := envelopetest.NewPlugin()
	endpoint := envelopetest.Serve(t, plugin)
	client := envelopetest.Dial(t, endpoint)
	ctx := context.Background()
	sealer, err := envelope.NewSealer(ctx, client, "fail")
	if err != nil {
		t.Fatal(err)
	}
	key := []byte("/registry/secrets/a/b")
	val, err := sealer.Seal([]byte("payload"), key)
	if err != nil {
		t.Fatal(err)
	}

	op := envelope.NewOpener(client)
	if _, _, err := op.Open(ctx, val, []byte("/registry/secrets/a/c")); !errors.Is(err, envelope.ErrTampered) {
		t.Errorf("wrong etcd key: %v, want ErrTampered", err)
	}
	bad := bytes.Clone(val)
	bad[len(bad)-1] ^= 1 // last byte of the GCM tag
	if _, _, err := op.Open(ctx, bad, key); !errors.Is(err, envelope.ErrTampered) {
		t.Errorf("flipped tag bit: %v, want ErrTampered", err)
	}
	if got, _, err := op.Open(ctx, val, key); err != nil || string(got) != "payload" {
		t.Errorf("intact value: %q, %v", got, err)
	}

	plugin.Forget(sealer.KeyID())
	op2 := envelope.NewOpener(client)
	for range 3 {
		if _, _, err := op2.Open(ctx, val, key); !errors.Is(err, envelope.ErrKeyUnavailable) {
			t.Fatalf("destroyed key: %v, want ErrKeyUnavailable", err)
		}
	}
	if n := op2.PluginCalls(); n != 1 {
		t.Errorf("plugin calls for a failed seed read 3 times = %d, want 1", n)
	}
}
