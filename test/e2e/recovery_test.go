//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/test/e2e/cluster"
)

func staticKeyProvider(kind, name string) cluster.Provider {
	k := make([]byte, 32)
	_, _ = rand.Read(k)
	return cluster.Provider(fmt.Sprintf("- %s:\n    keys:\n    - name: %s\n      secret: %s\n", kind, name, base64.StdEncoding.EncodeToString(k)))
}

// TestRecoveryEncryptionConfig: the real kube-apiserver writes Secrets and
// ConfigMaps under aescbc, then secretbox, then a KMS v2 provider, then a
// second KMS v2 provider (another plugin, another keyring), its
// EncryptionConfiguration growing at each step as an operator's would.
// From the real etcd's snapshot, `kubekms decrypt --encryption-config`
// (the apiserver's own transformers) recovers every object, first with the
// two plugins running, then with none running (--key-uri PROVIDER=URI);
// `kubekms inventory --encryption-config` judges staleness as the
// apiserver does; `decrypt --key-uri` without the config reads what
// kubekms itself encrypted under that key service.
func TestRecoveryEncryptionConfig(t *testing.T) {
	t.Parallel()
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	etcd, err := cluster.StartEtcd(ctx, t, b.etcd)
	if err != nil {
		t.Fatal(err)
	}
	pa, err := cluster.NewPlugin(t, b.kubekms)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := cluster.NewPlugin(t, b.kubekms)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*cluster.Plugin{pa, pb} {
		if err := p.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	api, err := cluster.NewAPIServer(t, b.apiserver, etcd.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	cbc, sbox := staticKeyProvider("aescbc", "cbc-1"), staticKeyProvider("secretbox", "sbox-1")
	kmsA, kmsB := cluster.KMSv2("kms-a", pa.Endpoint()), cluster.KMSv2("kms-b", pb.Endpoint())
	stages := []struct {
		name      string
		prefix    string
		providers []cluster.Provider
	}{
		{"cbc", "k8s:enc:aescbc:v1:cbc-1:", []cluster.Provider{cbc, cluster.Identity}},
		{"sbox", "k8s:enc:secretbox:v1:sbox-1:", []cluster.Provider{sbox, cbc, cluster.Identity}},
		{"kms-a", "k8s:enc:kms:v2:kms-a:", []cluster.Provider{kmsA, sbox, cbc, cluster.Identity}},
		{"kms-b", "k8s:enc:kms:v2:kms-b:", []cluster.Provider{kmsB, kmsA, sbox, cbc, cluster.Identity}},
	}
	w := newWritten()
	const ns, per = "e2e-recovery", 4
	for i, st := range stages {
		opts := cluster.StartOptions{EncryptionConfig: cluster.EncryptionConfig(st.providers...)}
		if i == 0 {
			_, err = api.Start(ctx, opts)
		} else {
			_, err = api.Restart(ctx, opts)
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := ensureNamespace(ctx, api.Client, ns); err != nil {
			t.Fatal(err)
		}
		for j := range per {
			if err := createSecret(ctx, api.Client, w, ns, fmt.Sprintf("s-%s-%d", st.name, j), fmt.Sprintf("secret-%s-%d-%s", st.name, j, randomHex(t, 8))); err != nil {
				t.Fatal(err)
			}
		}
		if err := createConfigMap(ctx, api.Client, w, ns, "cm-"+st.name, "config-"+st.name+"-"+randomHex(t, 8)); err != nil {
			t.Fatal(err)
		}
		got, err := etcd.Client.Get(ctx, "/registry/secrets/"+ns+"/s-"+st.name+"-0")
		if err != nil || len(got.Kvs) != 1 || !strings.HasPrefix(string(got.Kvs[0].Value), st.prefix) {
			t.Fatalf("stage %s: the Secret is not stored under %q (%v)", st.name, st.prefix, err)
		}
	}
	finalConfig := filepath.Join(t.TempDir(), "encryption-config.yaml")
	if err := os.WriteFile(finalConfig, []byte(cluster.EncryptionConfig(stages[len(stages)-1].providers...)), 0o600); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(t.TempDir(), "etcd.db")
	if err := cluster.SaveSnapshot(ctx, etcd.Client, snap); err != nil {
		t.Fatal(err)
	}
	if err := api.Stop(); err != nil { // recovery needs no apiserver
		t.Fatal(err)
	}
	objs := w.snapshot()

	// 1. With the config and the plugins it names.
	dir := filepath.Join(t.TempDir(), "with-plugins")
	out, code := migRunCLI(ctx, t, b.kubekms, "decrypt", "--snapshot", snap, "--encryption-config", finalConfig,
		"--namespace", ns, "--output-dir", dir)
	if code != 0 {
		t.Fatalf("decrypt --encryption-config: exit %d\n%s", code, out)
	}
	checkRecovered(t, dir, ns, objs, out)

	// 2. No plugin running: the config's KMS providers served in-process
	// from their key services.
	for _, p := range []*cluster.Plugin{pa, pb} {
		if err := p.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	keyURIs := []string{"--key-uri", "kms-a=" + pa.KeyURI, "--key-uri", "kms-b=" + pb.KeyURI}
	dir = filepath.Join(t.TempDir(), "no-plugin")
	out, code = migRunCLI(ctx, t, b.kubekms, append([]string{"decrypt", "--snapshot", snap, "--encryption-config", finalConfig,
		"--namespace", ns, "--output-dir", dir}, keyURIs...)...)
	if code != 0 {
		t.Fatalf("decrypt --encryption-config --key-uri, no plugin running: exit %d\n%s", code, out)
	}
	checkRecovered(t, dir, ns, objs, out)

	// 3. The apiserver's own staleness: only what kms-b wrote is current.
	out, code = migRunCLI(ctx, t, b.kubekms, append([]string{"inventory", "--snapshot", snap, "--encryption-config", finalConfig, "-o", "json"}, keyURIs...)...)
	if code != 0 {
		t.Fatalf("inventory --encryption-config: exit %d\n%s", code, out)
	}
	var rep inventory.Report
	if err := json.NewDecoder(strings.NewReader(out[strings.Index(out, "{"):])).Decode(&rep); err != nil {
		t.Fatalf("inventory JSON: %v\n%s", err, out)
	}
	secrets := rep.Resource("secrets")
	if rep.ReadWith == "" || secrets == nil || secrets.Unreadable != 0 || secrets.Stale != 3*per || secrets.Providers["kms-v2:kms-b"] != per {
		t.Fatalf("inventory --encryption-config: %s", out)
	}

	// 4. kubekms's own reader with one key service and no config: what
	// kms-a's plugin encrypted is recovered, the rest reported.
	dir = filepath.Join(t.TempDir(), "key-uri")
	out, code = migRunCLI(ctx, t, b.kubekms, "decrypt", "--snapshot", snap, "--key-uri", pa.KeyURI, "--resource", "secrets",
		"--namespace", ns, "--output-dir", dir)
	if code != 2 || !strings.Contains(out, "unsupported provider") || !strings.Contains(out, "key unavailable") {
		t.Fatalf("decrypt --key-uri of one of the two keyrings: exit %d\n%s", code, out)
	}
	onlyA := map[string]string{}
	for k, v := range objs {
		if strings.HasPrefix(k, "secrets/"+ns+"/s-kms-a-") {
			onlyA[k] = v
		}
	}
	checkRecovered(t, dir, ns, onlyA, out)
	if entries, _ := os.ReadDir(filepath.Join(dir, "secrets", ns)); len(entries) != per {
		t.Errorf("decrypt --key-uri wrote %d Secrets, want the %d of kms-a", len(entries), per)
	}
}

// checkRecovered reads every expected manifest from dir and compares it
// with what was written through the API.
func checkRecovered(t *testing.T, dir, ns string, objs map[string]string, out string) {
	t.Helper()
	n := 0
	for key, value := range objs {
		parts := strings.SplitN(key, "/", 3)
		if parts[1] != ns {
			continue
		}
		path := filepath.Join(dir, parts[0], ns, parts[2]+".yaml")
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%s not recovered: %v\n%s", key, err, out)
		}
		var got string
		switch parts[0] {
		case "secrets":
			var s corev1.Secret
			if err := yaml.UnmarshalStrict(data, &s); err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			got = string(s.Data["value"])
		case "configmaps":
			var cm corev1.ConfigMap
			if err := yaml.UnmarshalStrict(data, &cm); err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			got = cm.Data["value"]
		}
		if got != value {
			t.Fatalf("%s: recovered value differs from what was written", key)
		}
		n++
	}
	t.Logf("%s: %d objects recovered with their values", filepath.Base(dir), n)
}
