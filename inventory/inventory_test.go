package inventory

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"path/filepath"
	"strings"
	"testing"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/snapshot"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

func TestParseKey(t *testing.T) {
	tests := []struct {
		key  string
		want Object
		ok   bool
	}{
		{"/registry/secrets/default/db", Object{"secrets", "default", "db"}, true},
		{"/registry/namespaces/default", Object{"namespaces", "", "default"}, true},
		{"/registry/services/specs/default/kubernetes", Object{"services", "default", "kubernetes"}, true},
		{"/registry/services/endpoints/default/kubernetes", Object{"endpoints", "default", "kubernetes"}, true},
		{"/registry/minions/node-1", Object{"nodes", "", "node-1"}, true},
		{"/registry/controllers/ns/rc1", Object{"replicationcontrollers", "ns", "rc1"}, true},
		{"/registry/ingress/ns/web", Object{"ingresses", "ns", "web"}, true},
		{"/registry/deployments/ns/web", Object{"deployments", "ns", "web"}, true},
		{"/registry/apiregistration.k8s.io/apiservices/v1.apps", Object{"apiservices.apiregistration.k8s.io", "", "v1.apps"}, true},
		{"/registry/cr.bar.com/foos/ns/cr1foo", Object{"foos.cr.bar.com", "ns", "cr1foo"}, true},
		{"/registry/apiextensions.k8s.io/customresourcedefinitions/foos.cr.bar.com", Object{"customresourcedefinitions.apiextensions.k8s.io", "", "foos.cr.bar.com"}, true},
		{"/registry/clustertrustbundles/example.com:signer:abc", Object{"clustertrustbundles", "", "example.com:signer:abc"}, true},
		{"/registry/ranges/serviceips", Object{"ranges", "", "serviceips"}, true},
		{"/registry/secrets", Object{}, false},
		{"/registry/secrets/", Object{}, false},
		{"/registry/example.com/", Object{}, false},
		{"/other/secrets/a/b", Object{}, false},
	}
	for _, tc := range tests {
		got, ok := ParseKey(tc.key, RegistryPrefix)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseKey(%q) = %+v, %v; want %+v, %v", tc.key, got, ok, tc.want, tc.ok)
		}
		// The allocation-free hot path names resources the same way.
		buf, ok2 := resourceKey(nil, []byte(tc.key), []byte(RegistryPrefix))
		if ok2 && !ok || ok && string(buf) != tc.want.Resource {
			t.Errorf("resourceKey(%q) = %q, %v; want %q", tc.key, buf, ok2, tc.want.Resource)
		}
	}
}

// sealer returns a Sealer whose seed is wrapped by an in-process test
// plugin (no gRPC: the header scan does not decrypt).
func sealer(t testing.TB, p kmsservice.Service, provider string) *envelope.Sealer {
	t.Helper()
	s, err := envelope.NewSealer(context.Background(), p, provider)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// fakeKMS is an in-process SeedEncrypter: inventory never decrypts, so the
// wrapped seed only has to look like one.
type fakeKMS struct{ keyID string }

func (f fakeKMS) Encrypt(_ context.Context, _ string, pt []byte) (*kmsservice.EncryptResponse, error) {
	// One annotation, as kubekms's plugin adds (its wrapped local KEK).
	return &kmsservice.EncryptResponse{Ciphertext: bytes.Clone(pt), KeyID: f.keyID,
		Annotations: map[string][]byte{"local-kek.kubekms.io": bytes.Repeat([]byte{1}, 60)}}, nil
}
func (f fakeKMS) Decrypt(context.Context, string, *kmsservice.DecryptRequest) ([]byte, error) {
	return nil, fmt.Errorf("not used")
}
func (f fakeKMS) Status(context.Context) (*kmsservice.StatusResponse, error) {
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: f.keyID}, nil
}

func TestScanCounts(t *testing.T) {
	old, cur := sealer(t, fakeKMS{"key-old"}, "kubekms"), sealer(t, fakeKMS{"key-new"}, "kubekms")
	seal := func(s *envelope.Sealer, key string) snapshottest.Op {
		v, err := s.Seal([]byte("k8s\x00payload"), []byte(key))
		if err != nil {
			t.Fatal(err)
		}
		return snapshottest.Op{Key: []byte(key), Value: v}
	}
	plain := func(key string) snapshottest.Op {
		return snapshottest.Op{Key: []byte(key), Value: []byte("k8s\x00plain")}
	}
	var ops []snapshottest.Op
	for i := range 5 {
		ops = append(ops, seal(old, fmt.Sprintf("/registry/secrets/a/old%d", i)))
	}
	for i := range 7 {
		ops = append(ops, seal(cur, fmt.Sprintf("/registry/secrets/a/new%d", i)))
	}
	ops = append(ops,
		plain("/registry/secrets/a/leaked"), // unencrypted in an encrypted resource
		plain("/registry/configmaps/a/c1"), plain("/registry/configmaps/a/c2"),
		snapshottest.Op{Key: []byte("/registry/secrets/b/aescbc"), Value: []byte("k8s:enc:aescbc:v1:key1:xxxx")},
		snapshottest.Op{Key: []byte("/registry/secrets/b/broken"), Value: []byte("k8s:enc:kms:v2:kubekms:\xff\xff")},
		seal(cur, "/registry/services/specs/default/kubernetes"),
		seal(old, "/registry/example.com/widgets/ns/w1"),
		// Rewritten: the old-key version is superseded by a new-key one.
		seal(old, "/registry/secrets/a/migrated"),
		seal(cur, "/registry/secrets/a/migrated"),
		// Deleted: not counted.
		seal(old, "/registry/secrets/a/deleted"),
		snapshottest.Op{Key: []byte("/registry/secrets/a/deleted"), Delete: true},
	)
	path := filepath.Join(t.TempDir(), "etcd.db")
	if err := snapshottest.Write(path, func(yield func(snapshottest.Op) bool) {
		for _, op := range ops {
			if !yield(op) {
				return
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	src, err := snapshot.OpenFile(context.Background(), path, []byte(RegistryPrefix))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var progressed int
	rep, err := Scan(context.Background(), src, Options{CurrentKeyID: "key-new", Progress: func(n int) { progressed = n }})
	if err != nil {
		t.Fatal(err)
	}
	secrets := rep.Resource("secrets")
	if secrets == nil {
		t.Fatalf("no secrets in %+v", rep.Resources)
	}
	wantSecrets := Counts{Objects: 16, Encrypted: 14, Unencrypted: 1, Plaintext: 1, Stale: 6, Unreadable: 1}
	if secrets.Counts != wantSecrets {
		t.Errorf("secrets counts %+v, want %+v", secrets.Counts, wantSecrets)
	}
	wantProviders := map[string]int{"kms-v2:kubekms": 13, "identity": 1, "aescbc:key1": 1}
	if !maps.Equal(secrets.Providers, wantProviders) {
		t.Errorf("secrets providers %v, want %v", secrets.Providers, wantProviders)
	}
	if want := map[string]int{"key-old": 5, "key-new": 8}; !maps.Equal(secrets.KeyIDs, want) {
		t.Errorf("secrets key ids %v, want %v", secrets.KeyIDs, want)
	}
	cms := rep.Resource("configmaps")
	if cms == nil || cms.Counts != (Counts{Objects: 2, Plaintext: 2}) {
		t.Errorf("configmaps %+v: plaintext in an unencrypted resource is not 'unencrypted'", cms)
	}
	if w := rep.Resource("widgets.example.com"); w == nil || w.Stale != 1 {
		t.Errorf("widgets.example.com %+v, want 1 stale", w)
	}
	if s := rep.Resource("services"); s == nil || s.Stale != 0 || s.Encrypted != 1 {
		t.Errorf("services %+v", s)
	}
	if rep.Totals.Objects != 20 || rep.Totals.Stale != 7 || rep.Totals.Unencrypted != 1 {
		t.Errorf("totals %+v", rep.Totals)
	}
	if progressed != 20 {
		t.Errorf("last progress %d, want 20", progressed)
	}

	var table, js bytes.Buffer
	if err := WriteTable(&table, rep); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(table.String(), "key-new=8 key-old=5") || !strings.Contains(table.String(), "TOTAL") {
		t.Errorf("table:\n%s", table.String())
	}
	if err := WriteJSON(&js, rep); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || back.Totals != rep.Totals {
		t.Errorf("JSON round trip: %v %+v", err, back.Totals)
	}

	// Without a current key_id staleness is not judged.
	rep2, err := Scan(context.Background(), src, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if rep2.Totals.Stale != 0 {
		t.Errorf("stale without a current key_id: %d", rep2.Totals.Stale)
	}
}

func TestNameKeyIDs(t *testing.T) {
	rep := &Report{CurrentKeyID: "opaque:cur", Resources: []*ResourceStats{
		{Resource: "secrets", KeyIDs: map[string]int{"opaque:old": 2, "readable": 1}},
	}}
	rep.NameKeyIDs(func(id string) string {
		if n, ok := strings.CutPrefix(id, "opaque:"); ok {
			return "arn:" + n
		}
		return id
	})
	want := map[string]string{"opaque:cur": "arn:cur", "opaque:old": "arn:old"}
	if fmt.Sprint(rep.KeyNames) != fmt.Sprint(want) {
		t.Fatalf("KeyNames = %v, want %v", rep.KeyNames, want)
	}
	var out bytes.Buffer
	if err := WriteTable(&out, rep); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "key_id opaque:old is arn:old") {
		t.Fatalf("table lacks the key names:\n%s", out.String())
	}
}

// The inventory of the benchmark's snapshot through the fast reader is the
// inventory through the reference reader (bbolt's cursor, proto.Unmarshal,
// a map of keys), field by field.
func TestScanFastReaderMatchesReference(t *testing.T) {
	const n = 30_000
	path := mixedSnapshot(t, n)
	ctx := context.Background()
	ref, err := snapshottest.Read(path, []byte(RegistryPrefix))
	if err != nil {
		t.Fatal(err)
	}
	want, err := Scan(ctx, ref, Options{CurrentKeyID: "key-new"})
	if err != nil {
		t.Fatal(err)
	}
	src, err := snapshot.OpenFile(ctx, path, []byte(RegistryPrefix))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	got, err := Scan(ctx, src, Options{CurrentKeyID: "key-new"})
	if err != nil {
		t.Fatal(err)
	}
	g, _ := json.Marshal(got)
	w, _ := json.Marshal(want)
	if !bytes.Equal(g, w) {
		t.Fatalf("fast reader:\n%s\nreference reader:\n%s", g, w)
	}
	if want.Totals.Objects != n || want.Totals.Stale == 0 || want.Totals.Plaintext == 0 {
		t.Fatalf("the fixture does not exercise the scan: %+v", want.Totals)
	}
}

// resourceKey knows every alias of keyAliases (its one-part ones are a
// switch, not a lookup).
func TestResourceKeyKnowsEveryAlias(t *testing.T) {
	for old, res := range keyAliases {
		key := RegistryPrefix + old + "/ns/name"
		if got, ok := resourceKey(nil, []byte(key), []byte(RegistryPrefix)); !ok || string(got) != res {
			t.Errorf("resourceKey(%q) = %q, %v; want %q", key, got, ok, res)
		}
	}
}
