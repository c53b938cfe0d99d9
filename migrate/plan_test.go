package migrate

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/storage/value"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/envelope/envelopetest"
	"github.com/kubekms/kubekms/snapshot"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

var (
	secrets    = Resource{GVR: schema.GroupVersionResource{Version: "v1", Resource: "secrets"}, Namespaced: true}
	configmaps = Resource{GVR: schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}, Namespaced: true}
	widgets    = Resource{GVR: schema.GroupVersionResource{Group: "example.com", Version: "v1", Resource: "widgets"}, Namespaced: true}
	deploys    = Resource{GVR: schema.GroupVersionResource{Group: "apps", Version: "v1", Resource: "deployments"}, Namespaced: true}
	gadgets    = Resource{GVR: schema.GroupVersionResource{Group: "example.com", Version: "v1", Resource: "gadgets"}} // cluster-scoped
)

// Stale must say "rewrite" exactly when the real apiserver transformer reads
// a value as stale (with plaintext included: the apiserver rewrites an
// identity value in an encrypted resource too).
func TestStaleAgreesWithApiserver(t *testing.T) {
	ctx := context.Background()
	plugin := envelopetest.NewPlugin()
	endpoint := envelopetest.Serve(t, plugin)
	const provider = "migrate-test"
	type stored struct{ key, val []byte }
	var all []stored
	write := func(tr value.Transformer, key string) {
		v, err := tr.TransformToStorage(ctx, []byte("k8s\x00"+key), value.DefaultContext(key))
		if err != nil {
			t.Fatalf("apiserver TransformToStorage: %v", err)
		}
		all = append(all, stored{[]byte(key), v})
	}
	old := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets)
	write(old, "/registry/secrets/a/old")
	all = append(all, stored{[]byte("/registry/secrets/a/plain"), []byte("k8s\x00plain")})
	plugin.Rotate()
	cur := envelopetest.Apiserver(t, endpoint, provider, envelopetest.Secrets) // a restarted apiserver: key-2
	write(cur, "/registry/secrets/a/new")

	for _, s := range all {
		_, apiStale, err := cur.TransformFromStorage(ctx, s.val, value.DefaultContext(string(s.key)))
		if err != nil {
			t.Fatalf("%s: apiserver read: %v", s.key, err)
		}
		h, err := envelope.ParseHeader(s.val)
		if err != nil {
			t.Fatalf("%s: %v", s.key, err)
		}
		if got := Stale(h, plugin.CurrentKeyID(), true); got != apiStale {
			t.Errorf("%s: Stale = %v, apiserver stale = %v", s.key, got, apiStale)
		}
	}
	if Stale(envelope.Header{Kind: envelope.KindIdentity}, "key-2", false) {
		t.Error("plaintext planned without IncludePlaintext")
	}
	if !Stale(envelope.Header{Kind: envelope.KindAESCBC, Provider: "k1"}, "key-2", false) {
		t.Error("an aescbc value is not stale under a KMS v2 key")
	}
}

// fakeKMS is an in-process SeedEncrypter with a fixed key_id: planning
// reads only headers, so the wrapped seed only has to look like one.
type fakeKMS struct{ keyID string }

func (f fakeKMS) Encrypt(_ context.Context, _ string, pt []byte) (*kmsservice.EncryptResponse, error) {
	return &kmsservice.EncryptResponse{Ciphertext: append([]byte(nil), pt...), KeyID: f.keyID}, nil
}

func TestPlanFromEtcd(t *testing.T) {
	ctx := context.Background()
	seal := func(keyID, key string) snapshottest.Op {
		s, err := envelope.NewSealer(ctx, fakeKMS{keyID}, "kubekms")
		if err != nil {
			t.Fatal(err)
		}
		v, err := s.Seal([]byte("k8s\x00x"), []byte(key))
		if err != nil {
			t.Fatal(err)
		}
		return snapshottest.Op{Key: []byte(key), Value: v}
	}
	plain := func(key string) snapshottest.Op {
		return snapshottest.Op{Key: []byte(key), Value: []byte("k8s\x00plain")}
	}
	ops := []snapshottest.Op{
		seal("old", "/registry/secrets/a/s-old"),
		seal("new", "/registry/secrets/a/s-new"),
		plain("/registry/secrets/b/s-plain"),
		{Key: []byte("/registry/secrets/b/s-aescbc"), Value: []byte("k8s:enc:aescbc:v1:key1:xxxx")},
		{Key: []byte("/registry/secrets/b/s-broken"), Value: []byte("k8s:enc:kms:v2:kubekms:\xff\xff")},
		seal("old", "/registry/secrets/no-namespace"), // a namespaced resource needs ns/name
		seal("old", "/registry/configmaps/a/c-old"),   // not selected
		seal("old", "/registry/example.com/widgets/ns/w-old"),
		seal("old", "/registry/deployments/ns/d-old"), // apps, stored without its group
		seal("old", "/registry/example.com/gadgets/g-old"),
		seal("old", "/registry/secrets/a/s-migrated"),
		seal("new", "/registry/secrets/a/s-migrated"), // superseded by a current version
		seal("old", "/registry/secrets/a/s-deleted"),
		{Key: []byte("/registry/secrets/a/s-deleted"), Delete: true},
		seal("old", "/other-prefix/secrets/a/x"),
	}
	path := filepath.Join(t.TempDir(), "etcd.db")
	if err := snapshottest.Write(path, slices.Values(ops)); err != nil {
		t.Fatal(err)
	}
	src, err := snapshot.OpenFile(ctx, path, []byte("/registry/"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	resources := []Resource{secrets, widgets, deploys, gadgets}

	keys := func(p *Plan) []string {
		var out []string
		for _, t := range p.Targets {
			out = append(out, t.Key())
		}
		slices.Sort(out)
		return out
	}
	for _, tc := range []struct {
		plaintext bool
		want      []string
	}{
		{false, []string{"deployments.apps/ns/d-old", "gadgets.example.com//g-old", "secrets/a/s-old", "secrets/b/s-aescbc", "widgets.example.com/ns/w-old"}},
		{true, []string{"deployments.apps/ns/d-old", "gadgets.example.com//g-old", "secrets/a/s-old", "secrets/b/s-aescbc", "secrets/b/s-plain", "widgets.example.com/ns/w-old"}},
	} {
		t.Run(fmt.Sprintf("plaintext=%v", tc.plaintext), func(t *testing.T) {
			plan, err := PlanFromEtcd(ctx, src, resources, EtcdOptions{CurrentKeyID: "new", IncludePlaintext: tc.plaintext})
			if err != nil {
				t.Fatal(err)
			}
			if got := keys(plan); !slices.Equal(got, tc.want) {
				t.Errorf("planned\n  %v\nwant\n  %v", got, tc.want)
			}
			slices.Sort(plan.Unreadable)
			if want := []string{"/registry/secrets/b/s-broken", "/registry/secrets/no-namespace"}; !slices.Equal(plan.Unreadable, want) {
				t.Errorf("unreadable %v, want %v", plan.Unreadable, want)
			}
			// s-new and s-migrated are current; everything selected is seen once.
			if wantCurrent := 2 + btoi(!tc.plaintext); plan.Current != wantCurrent {
				t.Errorf("current = %d, want %d", plan.Current, wantCurrent)
			}
			if plan.Seen != len(plan.Targets)+plan.Current+len(plan.Unreadable) {
				t.Errorf("seen %d != planned %d + current %d + unreadable %d", plan.Seen, len(plan.Targets), plan.Current, len(plan.Unreadable))
			}
			for _, tg := range plan.Targets {
				if tg.Resource.Namespaced != (tg.Namespace != "") {
					t.Errorf("%s: namespace %q for namespaced=%v", tg.Key(), tg.Namespace, tg.Resource.Namespaced)
				}
			}
		})
	}

	per, left, err := Remaining(ctx, src, []Resource{configmaps, secrets}, EtcdOptions{CurrentKeyID: "new"})
	if err != nil {
		t.Fatal(err)
	}
	if per["configmaps"] != 1 || per["secrets"] != 2 || len(left) != 3 {
		t.Errorf("Remaining = %v %v, want configmaps=1 secrets=2", per, left)
	}

	if _, err := PlanFromEtcd(ctx, src, resources, EtcdOptions{}); err == nil || !strings.Contains(err.Error(), "current key_id") {
		t.Errorf("plan without a current key_id: err = %v", err)
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestParseResources(t *testing.T) {
	got, err := ParseResources([]string{"secrets", " configmaps ", "deployments.apps", "secrets", "", "widgets.example.com"})
	if err != nil {
		t.Fatal(err)
	}
	want := []schema.GroupResource{{Resource: "secrets"}, {Resource: "configmaps"}, {Group: "apps", Resource: "deployments"}, {Group: "example.com", Resource: "widgets"}}
	if !slices.Equal(got, want) {
		t.Errorf("ParseResources = %v, want %v", got, want)
	}
	for _, bad := range [][]string{nil, {""}, {"Secrets"}, {"secrets/status"}, {"widgets.Example..com"}} {
		if _, err := ParseResources(bad); err == nil {
			t.Errorf("ParseResources(%q) accepted", bad)
		}
	}
}
