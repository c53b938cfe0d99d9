//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	corev1 "k8s.io/api/core/v1"

	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// TestSnapshotTools: the real kube-apiserver writes Secrets through kubekms,
// the key is rotated (so two key_ids and a known number of stale objects), a
// value is corrupted in etcd, and the real etcd makes a snapshot. Then
// `kubekms inventory --snapshot` counts exactly, and `kubekms decrypt`
// recovers every Secret but the corrupted one, which it reports and skips.
func TestSnapshotTools(t *testing.T) {
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	c := startKMSCluster(ctx, t, b)
	w := newWritten()
	const ns = "e2e-snapshot"
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	const before, after = 12, 5
	for i := range before {
		if err := createSecret(ctx, c.api.Client, w, ns, fmt.Sprintf("old-%02d", i), "old-secret-"+randomHex(t, 8)); err != nil {
			t.Fatal(err)
		}
	}
	oldKeyID, newKeyID := migRotate(ctx, t, c, w, ns) // writes probe-N Secrets until one is under the new key_id
	for i := range after {
		if err := createSecret(ctx, c.api.Client, w, ns, fmt.Sprintf("new-%02d", i), "new-secret-"+randomHex(t, 8)); err != nil {
			t.Fatal(err)
		}
	}

	// Corrupt one value: a stored Secret copied under another key fails
	// authentication (the etcd key is the AES-GCM additional data).
	prefix := "/registry/secrets/" + ns + "/"
	src, err := c.etcd.Client.Get(ctx, prefix+"old-00")
	if err != nil || len(src.Kvs) != 1 {
		t.Fatalf("read old-00: %v", err)
	}
	corruptKey := prefix + "corrupted"
	if _, err := c.etcd.Client.Put(ctx, corruptKey, string(src.Kvs[0].Value)); err != nil {
		t.Fatal(err)
	}

	// What etcd holds, counted the slow way, to compare with the tools.
	stored, err := c.etcd.ReadStored(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	byKeyID := map[string]int{}
	for _, s := range stored {
		byKeyID[s.KeyID()]++
	}
	if byKeyID[oldKeyID] < before+1 || byKeyID[newKeyID] < after+1 {
		t.Fatalf("etcd holds %v; want >= %d under %s and >= %d under %s", byKeyID, before+1, oldKeyID, after+1, newKeyID)
	}

	snap := filepath.Join(t.TempDir(), "etcd.db")
	if err := cluster.SaveSnapshot(ctx, c.etcd.Client, snap); err != nil {
		t.Fatal(err)
	}

	// Inventory: headers only, exact counts per key_id, stale = the old key_id's.
	out, code := migRunCLI(ctx, t, b.kubekms, "inventory", "--snapshot", snap, "--plugin", c.plugin.Endpoint(), "-o", "json", "--fail-on-stale")
	if code != 2 {
		t.Fatalf("inventory --fail-on-stale exit %d, want 2 (stale objects exist):\n%s", code, out)
	}
	var rep inventory.Report
	// stdout's JSON report comes first; stderr's summary line follows it.
	if err := json.NewDecoder(strings.NewReader(out[strings.Index(out, "{"):])).Decode(&rep); err != nil {
		t.Fatalf("inventory JSON: %v\n%s", err, out)
	}
	var secrets *inventory.ResourceStats
	for _, r := range rep.Resources {
		if r.Resource == "secrets" {
			secrets = r
		}
	}
	if secrets == nil {
		t.Fatalf("inventory has no secrets: %s", out)
	}
	// The cluster's own Secrets (none in a bare apiserver) would add to both sides alike.
	allSecrets, err := c.etcd.ReadStored(ctx, "/registry/secrets/")
	if err != nil {
		t.Fatal(err)
	}
	wantByKeyID := map[string]int{}
	for _, s := range allSecrets {
		wantByKeyID[s.KeyID()]++
	}
	if secrets.Objects != len(allSecrets) || fmt.Sprint(secrets.KeyIDs) != fmt.Sprint(wantByKeyID) {
		t.Fatalf("inventory secrets: %d objects, key_ids %v; etcd has %d, %v", secrets.Objects, secrets.KeyIDs, len(allSecrets), wantByKeyID)
	}
	if rep.CurrentKeyID != newKeyID || secrets.Stale != wantByKeyID[oldKeyID] {
		t.Fatalf("inventory: current %q stale %d; want %q and %d", rep.CurrentKeyID, secrets.Stale, newKeyID, wantByKeyID[oldKeyID])
	}
	t.Logf("inventory of the snapshot: %d secrets, %d stale under %s, %d under %s", secrets.Objects, secrets.Stale, oldKeyID, wantByKeyID[newKeyID], newKeyID)

	// Decrypt: every Secret of the namespace but the corrupted one, as YAML.
	dir := filepath.Join(t.TempDir(), "recovered")
	out, code = migRunCLI(ctx, t, b.kubekms, "decrypt", "--snapshot", snap, "--plugin", c.plugin.Endpoint(),
		"--resource", "secrets", "--namespace", ns, "--output-dir", dir)
	if code != 2 || !strings.Contains(out, "corrupted") {
		t.Fatalf("decrypt exit %d, want 2 with the corrupted value reported:\n%s", code, out)
	}
	recovered, want := 0, 0
	for key, value := range w.snapshot() { // keys are "secrets/<ns>/<name>"
		name, ok := strings.CutPrefix(key, "secrets/"+ns+"/")
		if !ok {
			continue
		}
		want++
		path := filepath.Join(dir, "secrets", ns, name+".yaml")
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("secret %s not recovered: %v\n%s", name, err, out)
		}
		if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
			t.Fatalf("%s has mode %v, want 0600", path, st.Mode().Perm())
		}
		var s corev1.Secret
		if err := yaml.UnmarshalStrict(data, &s); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if s.Kind != "Secret" || s.Name != name || string(s.Data["value"]) != value {
			t.Fatalf("%s: kind %q name %q, data %v; want the value written through the API", path, s.Kind, s.Name, s.Data)
		}
		recovered++
	}
	if recovered != want || want < before+after+1 {
		t.Fatalf("recovered %d of %d Secrets written through the API (want at least %d)", recovered, want, before+after+1)
	}
	if _, err := os.Stat(filepath.Join(dir, "secrets", ns, "corrupted.yaml")); err == nil {
		t.Fatal("the corrupted value was written out")
	}
	t.Logf("decrypt recovered %d Secrets from the snapshot and reported the corrupted one", recovered)
}
