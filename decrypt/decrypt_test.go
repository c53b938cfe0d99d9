package decrypt_test

import (
	"bytes"
	"context"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kubekms/kubekms/decrypt"
	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/envelope/envelopetest"
	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/snapshot"
	"github.com/kubekms/kubekms/snapshot/snapshottest"
)

func writeSnapshot(t *testing.T, kvs []kv) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "etcd.db")
	err := snapshottest.Write(path, func(yield func(snapshottest.Op) bool) {
		for _, e := range kvs {
			if !yield(snapshottest.Op{Key: []byte(e.key), Value: []byte(e.value)}) {
				return
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// checkInventory asserts the exact counts of the fixture.
func checkInventory(t *testing.T, rep *inventory.Report) {
	t.Helper()
	s := rep.Resource("secrets")
	if s == nil {
		t.Fatalf("no secrets in report %+v", rep.Resources)
	}
	want := inventory.Counts{Objects: 11, Encrypted: 11, Stale: fixtureOldSecrets}
	if s.Counts != want {
		t.Errorf("secrets %+v, want %+v", s.Counts, want)
	}
	if w := map[string]int{"key-1": fixtureOldSecrets, "key-2": fixtureNewSecrets + 1}; !maps.Equal(s.KeyIDs, w) {
		t.Errorf("secrets key ids %v, want %v", s.KeyIDs, w)
	}
	if w := map[string]int{"kms-v2:kubekms": 11}; !maps.Equal(s.Providers, w) {
		t.Errorf("secrets providers %v, want %v", s.Providers, w)
	}
	if c := rep.Resource("configmaps"); c == nil || c.Counts != (inventory.Counts{Objects: 3, Plaintext: 3}) {
		t.Errorf("configmaps %+v", c)
	}
	if w := rep.Resource("widgets.example.com"); w == nil || w.Plaintext != 1 {
		t.Errorf("widgets.example.com %+v", w)
	}
}

// checkRecovered asserts that every fixture object but the tampered one was
// written, with 0600/0700 permissions and the right content.
func checkRecovered(t *testing.T, f *fixture, dir string, sum *decrypt.Summary) {
	t.Helper()
	if sum.Selected != len(f.kvs) || sum.Written != len(f.kvs)-1 {
		t.Errorf("selected %d written %d, want %d and %d", sum.Selected, sum.Written, len(f.kvs), len(f.kvs)-1)
	}
	if len(sum.Failures) != 1 || sum.Failures[0].Key != f.tampered || sum.Failures[0].Reason != decrypt.ReasonTampered {
		t.Errorf("failures %+v, want only %s as tampered", sum.Failures, f.tampered)
	}
	if sum.PluginCalls != 2 {
		t.Errorf("plugin calls %d, want 2 (one per seed)", sum.PluginCalls)
	}
	var sec corev1.Secret
	b, err := os.ReadFile(filepath.Join(dir, "secrets", "team-a", "old-3.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &sec); err != nil {
		t.Fatal(err)
	}
	if sec.APIVersion != "v1" || sec.Kind != "Secret" || sec.Name != "old-3" || string(sec.Data["password"]) != "pw-old-3" {
		t.Errorf("recovered secret: %s", b)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "widgets.example.com", "team-a", "w1.yaml")); err != nil || !bytes.Contains(b, []byte("kind: Widget")) {
		t.Errorf("recovered custom resource: %s %v", b, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "secrets", "team-b", "tampered.yaml")); !os.IsNotExist(err) {
		t.Errorf("tampered object was written: %v", err)
	}
	err = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		want := os.FileMode(0o600)
		if fi.IsDir() {
			want = 0o700
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s has mode %v, want %v", p, fi.Mode().Perm(), want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestRecoverFromSnapshotFile(t *testing.T) {
	f := newFixture(t)
	path := writeSnapshot(t, f.kvs)
	ctx := context.Background()
	src, err := snapshot.OpenFile(ctx, path, []byte(inventory.RegistryPrefix))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()

	rep, err := inventory.Scan(ctx, src, inventory.Options{CurrentKeyID: f.plugin.CurrentKeyID()})
	if err != nil {
		t.Fatal(err)
	}
	checkInventory(t, rep)

	out := filepath.Join(t.TempDir(), "recovered")
	sink, err := decrypt.NewDirSink(out)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := decrypt.Run(ctx, src, envelope.NewOpener(envelopetest.Dial(t, f.endpoint)), sink, decrypt.Options{})
	if err != nil {
		t.Fatal(err)
	}
	checkRecovered(t, f, out, sum)

	// A destroyed key version: its objects are reported, the others recovered.
	f.plugin.Forget("key-1")
	var stream bytes.Buffer
	sum, err = decrypt.Run(ctx, src, envelope.NewOpener(envelopetest.Dial(t, f.endpoint)), decrypt.StreamSink{W: &stream},
		decrypt.Options{Resource: "secrets"})
	if err != nil {
		t.Fatal(err)
	}
	byReason := sum.ByReason()
	if sum.Selected != 11 || sum.Written != fixtureNewSecrets || byReason[decrypt.ReasonKeyUnavailable] != fixtureOldSecrets || byReason[decrypt.ReasonTampered] != 1 {
		t.Errorf("after forgetting key-1: %+v by reason %v", sum, byReason)
	}
	if n := strings.Count(stream.String(), "---\n"); n != fixtureNewSecrets {
		t.Errorf("stream has %d documents, want %d", n, fixtureNewSecrets)
	}
	if strings.Contains(stream.String(), "pw-old-") {
		t.Error("stream contains an object whose key was destroyed")
	}
}

func TestSelection(t *testing.T) {
	f := newFixture(t)
	src, err := snapshot.OpenFile(context.Background(), writeSnapshot(t, f.kvs), []byte(inventory.RegistryPrefix))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var stream bytes.Buffer
	sum, err := decrypt.Run(context.Background(), src, envelope.NewOpener(envelopetest.Dial(t, f.endpoint)), decrypt.StreamSink{W: &stream},
		decrypt.Options{Resource: "secrets", Namespace: "team-b", Name: "new-2"})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Selected != 1 || sum.Written != 1 || sum.PluginCalls != 1 || !strings.Contains(stream.String(), "name: new-2") {
		t.Errorf("selection: %+v\n%s", sum, stream.String())
	}
}

func TestDirSinkRefusesSharedDirectory(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := decrypt.NewDirSink(dir); err == nil {
		t.Fatal("a world-readable output directory was accepted")
	}
	sink, err := decrypt.NewDirSink(filepath.Join(dir, "new"))
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []inventory.Object{{Resource: "secrets", Namespace: "..", Name: "x"}, {Resource: "secrets", Name: "a/b"}} {
		if err := sink.Write(bad, []byte("x")); err == nil {
			t.Errorf("unsafe object %+v was written", bad)
		}
	}
}
