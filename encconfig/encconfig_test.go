package encconfig_test

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	utilfeature "k8s.io/apiserver/pkg/util/feature"

	"github.com/kubekms/kubekms/encconfig"
	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/envelope/envelopetest"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/localplugin"
	"github.com/kubekms/kubekms/snapshot"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

func key32() string {
	k := make([]byte, 32)
	_, _ = rand.Read(k)
	return base64.StdEncoding.EncodeToString(k)
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// config renders an EncryptionConfiguration for secrets and
// deployments.apps with providers in order.
func config(providers ...string) string {
	var b strings.Builder
	b.WriteString("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n- resources: [secrets, deployments.apps]\n  providers:\n")
	for _, p := range providers {
		b.WriteString("  - " + p + "\n")
	}
	return b.String()
}

// The apiserver's own transformers write values under every kind of
// provider, one configuration after another (as a cluster whose config
// changed over time); encconfig reads all of them back from an etcd
// snapshot with the final configuration, judges staleness as the apiserver
// does, and classifies what it cannot read.
func TestReadEveryProvider(t *testing.T) {
	ctx := context.Background()
	if err := utilfeature.DefaultMutableFeatureGate.Set("KMSv1=true"); err != nil { // for the writer
		t.Fatal(err)
	}
	epA := envelopetest.Serve(t, envelopetest.NewPlugin())
	epB := envelopetest.Serve(t, envelopetest.NewPlugin())
	epC := envelopetest.Serve(t, envelopetest.NewPlugin())
	// kubekms itself, in this process, over a softkey keyring: it serves
	// KMS v1 for the deprecated provider.
	ring := "softkey://" + filepath.Join(t.TempDir(), "keyring.json")
	reg := keyservice.NewRegistry()
	reg.Register(softkey.Scheme, softkey.Open)
	kk, err := localplugin.Open(ctx, reg, ring, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kk.Close() })
	epKK, err := kk.Serve()
	if err != nil {
		t.Fatal(err)
	}

	cbc, gcm, sbox := key32(), key32(), key32()
	providers := map[string]string{
		"kmsB":      fmt.Sprintf("kms: {apiVersion: v2, name: kmsB, endpoint: %q}", epB),
		"kmsA":      fmt.Sprintf("kms: {apiVersion: v2, name: kmsA, endpoint: %q}", epA),
		"kmsC":      fmt.Sprintf("kms: {apiVersion: v2, name: kmsC, endpoint: %q}", epC),
		"kmsv1":     fmt.Sprintf("kms: {apiVersion: v1, name: kubekms-v1, endpoint: %q, cachesize: 10}", epKK),
		"aescbc":    fmt.Sprintf("aescbc: {keys: [{name: cbc1, secret: %s}]}", cbc),
		"aesgcm":    fmt.Sprintf("aesgcm: {keys: [{name: gcm1, secret: %s}]}", gcm),
		"secretbox": fmt.Sprintf("secretbox: {keys: [{name: sb1, secret: %s}]}", sbox),
		"sbOther":   fmt.Sprintf("secretbox: {keys: [{name: sb9, secret: %s}]}", key32()),
		"identity":  "identity: {}",
	}
	var ops []snapshottest.Op
	want := map[string]string{} // etcd key -> plaintext
	write := func(provider string, keys ...string) {
		t.Helper()
		tctx, cancel := context.WithCancel(ctx)
		defer cancel()
		ec, err := encryptionconfig.LoadEncryptionConfig(tctx, writeFile(t, "w.yaml", config(providers[provider])), false, "writer")
		if err != nil {
			t.Fatalf("%s: %v", provider, err)
		}
		st := encryptionconfig.StaticTransformers(ec.Transformers)
		for _, k := range keys {
			gr := schema.GroupResource{Resource: "secrets"}
			if strings.Contains(k, "/deployments/") {
				gr = schema.GroupResource{Group: "apps", Resource: "deployments"}
			}
			plain := "k8s\x00" + provider + ":" + k
			v, err := st.TransformerForResource(gr).TransformToStorage(ctx, []byte(plain), value.DefaultContext(k))
			if err != nil {
				t.Fatalf("%s: write %s: %v", provider, k, err)
			}
			ops = append(ops, snapshottest.Op{Key: []byte(k), Value: v})
			want[k] = plain
		}
	}
	write("identity", "/registry/secrets/ns/plain")
	write("aescbc", "/registry/secrets/ns/cbc", "/registry/deployments/ns/cbc")
	write("aesgcm", "/registry/secrets/ns/gcm")
	write("secretbox", "/registry/secrets/ns/sbox")
	write("kmsv1", "/registry/secrets/ns/v1")
	write("kmsA", "/registry/secrets/ns/a1", "/registry/secrets/ns/a2")
	write("kmsB", "/registry/secrets/ns/b1", "/registry/deployments/ns/b2")
	// What the final config cannot read.
	write("kmsC", "/registry/secrets/ns/unknown-kms")
	write("sbOther", "/registry/secrets/ns/unknown-key")
	delete(want, "/registry/secrets/ns/unknown-kms")
	delete(want, "/registry/secrets/ns/unknown-key")
	for _, op := range ops {
		if string(op.Key) == "/registry/secrets/ns/gcm" { // the AES-GCM value under another key: fails authentication
			ops = append(ops, snapshottest.Op{Key: []byte("/registry/secrets/ns/moved"), Value: op.Value})
		}
	}

	snap := filepath.Join(t.TempDir(), "etcd.db")
	if err := snapshottest.Write(snap, slices.Values(ops)); err != nil {
		t.Fatal(err)
	}
	src, err := snapshot.OpenFile(ctx, snap, []byte("/registry/"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()

	// The final config names a socket that does not exist for the v1
	// provider: it is pointed at kubekms's socket by Options.Endpoints.
	final := strings.Replace(config(providers["kmsB"], providers["kmsA"], providers["kmsv1"], providers["aescbc"],
		providers["aesgcm"], providers["secretbox"], providers["identity"]), epKK, "unix:///nonexistent/kms.sock", 1)
	finalPath := writeFile(t, "final.yaml", final)
	r, err := encconfig.Load(ctx, finalPath, encconfig.Options{Endpoints: map[string]string{"kubekms-v1": epKK}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if names, err := encconfig.KMSProviderNames(finalPath); err != nil || strings.Join(names, ",") != "kmsB,kmsA,kubekms-v1" {
		t.Errorf("KMSProviderNames = %v, %v", names, err)
	}

	fails := map[string]error{}
	var read []string
	err = src.Each(ctx, func(key, val []byte) error {
		out, stale, _, err := r.Read(ctx, val, key)
		k := string(key)
		if err != nil {
			fails[k] = err
			return nil
		}
		read = append(read, k)
		if string(out) != want[k] {
			t.Errorf("%s: read %q, want %q", k, out, want[k])
		}
		current := k == "/registry/secrets/ns/b1" || k == "/registry/deployments/ns/b2"
		if stale == current {
			t.Errorf("%s: stale = %v", k, stale)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(read) != len(want) {
		t.Errorf("read %d values, want %d: %v (failures %v)", len(read), len(want), read, fails)
	}
	for k, class := range map[string]error{
		"/registry/secrets/ns/unknown-kms": envelope.ErrUnknownProvider,
		"/registry/secrets/ns/unknown-key": envelope.ErrUnknownProvider,
		"/registry/secrets/ns/moved":       envelope.ErrTampered,
	} {
		if !errors.Is(fails[k], class) {
			t.Errorf("%s: err = %v, want %v", k, fails[k], class)
		}
	}
	if len(fails) != 3 {
		t.Errorf("failures %v", fails)
	}

	if _, err := encconfig.Load(ctx, finalPath, encconfig.Options{Endpoints: map[string]string{"nope": epA}}); err == nil ||
		!strings.Contains(err.Error(), `no KMS provider named "nope" (it has: kmsB, kmsA, kubekms-v1)`) {
		t.Errorf("an unknown provider name: %v", err)
	}
	if _, err := encconfig.Load(ctx, writeFile(t, "bad.yaml", final+"  bogus: 1\n"), encconfig.Options{}); err == nil {
		t.Error("a config with an unknown field was loaded")
	}
}

// A KMS v2 provider whose plugin is gone: the apiserver's transformer has
// no seed (its plugin never answered Status and Encrypt), so its values are
// unreadable for the "key unavailable" reason; the others still read.
func TestKMSPluginUnavailable(t *testing.T) {
	ctx := context.Background()
	ep := envelopetest.Serve(t, envelopetest.NewPlugin())
	tctx, cancel := context.WithCancel(ctx)
	ec, err := encryptionconfig.LoadEncryptionConfig(tctx, writeFile(t, "w.yaml",
		config(fmt.Sprintf("kms: {apiVersion: v2, name: gone, endpoint: %q}", ep))), false, "writer")
	if err != nil {
		t.Fatal(err)
	}
	key := "/registry/secrets/a/b"
	v, err := encryptionconfig.StaticTransformers(ec.Transformers).TransformerForResource(schema.GroupResource{Resource: "secrets"}).
		TransformToStorage(ctx, []byte("k8s\x00x"), value.DefaultContext(key))
	cancel()
	if err != nil {
		t.Fatal(err)
	}

	cfg := config(`kms: {apiVersion: v2, name: gone, endpoint: "unix:///nonexistent/kms.sock", timeout: 1s}`,
		fmt.Sprintf("aescbc: {keys: [{name: k, secret: %s}]}", key32()), "identity: {}")
	r, err := encconfig.Load(ctx, writeFile(t, "c.yaml", cfg), encconfig.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, _, _, err := r.Read(ctx, v, []byte(key)); !errors.Is(err, envelope.ErrKeyUnavailable) {
		t.Errorf("kms v2 value of an absent plugin: %v", err)
	}
	out, stale, _, err := r.Read(ctx, []byte("k8s\x00plain"), []byte("/registry/secrets/a/p"))
	if err != nil || string(out) != "k8s\x00plain" || !stale {
		t.Errorf("identity value: %q %v %v", out, stale, err)
	}
}
