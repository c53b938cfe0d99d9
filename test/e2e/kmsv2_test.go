//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// TestKMSv2Cluster runs one etcd + kubekms + kube-apiserver and walks it
// through the life of an encrypted cluster. The steps share state (objects
// written early must read back late), so they run in order.
func TestKMSv2Cluster(t *testing.T) {
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Minute)
	defer cancel()
	c := startKMSCluster(ctx, t, b)
	w := newWritten()

	t.Run("StoredEncrypted", func(t *testing.T) { testStoredEncrypted(ctx, t, c, w) })
	t.Run("APIServerRestart", func(t *testing.T) { testAPIServerRestart(ctx, t, c, w) })
	t.Run("PluginKill9UnderLoad", func(t *testing.T) { testPluginKill9UnderLoad(ctx, t, c, w) })
	t.Run("RotationWithoutRestart", func(t *testing.T) { testRotation(ctx, t, c, w) })
	t.Run("KMSv1ToV2", func(t *testing.T) { testKMSv1ToV2(ctx, t, c, w) })
}

// 1. Secrets and ConfigMaps are stored as k8s:enc:kms:v2:kubekms: with the
// plugin's key_id, and no plaintext reaches etcd or the plugin's log.
func testStoredEncrypted(ctx context.Context, t *testing.T, c *kmsCluster, w *written) {
	const ns, n = "e2e-stored", 10
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := createSecret(ctx, c.api.Client, w, ns, fmt.Sprintf("secret-%d", i), "secret-plaintext-"+randomHex(t, 12)); err != nil {
			t.Fatal(err)
		}
		if err := createConfigMap(ctx, c.api.Client, w, ns, fmt.Sprintf("cm-%d", i), "cm-plaintext-"+randomHex(t, 12)); err != nil {
			t.Fatal(err)
		}
	}
	st, err := c.plugin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	all := storedEncrypted(ctx, t, c.etcd)
	stored := storedByKey(all)
	objs := w.snapshot()
	for k, value := range objs {
		s, ok := stored[k]
		switch {
		case !ok:
			t.Errorf("%s: not in etcd", k)
		case s.Format != "kms-v2:kubekms":
			t.Errorf("%s: stored as %s, want k8s:enc:kms:v2:kubekms:", k, s.Format)
		case s.KeyID() != st.KeyId:
			t.Errorf("%s: stored key_id %q, plugin Status key_id %q", k, s.KeyID(), st.KeyId)
		case leaks(s.Raw, value):
			t.Errorf("%s: plaintext value found in etcd", k)
		}
	}
	formats := cluster.CountBy(all, func(s cluster.Stored) string { return s.Format })
	if len(formats) != 1 || formats["kms-v2:kubekms"] == 0 {
		t.Errorf("every Secret and ConfigMap in etcd should be kms v2 (kubekms), got %v", formats)
	}
	seeds, keks := seedStats(all)

	entries, rawLog, err := c.plugin.OperationLog()
	if err != nil {
		t.Fatal(err)
	}
	var enc int
	for _, e := range entries {
		if e.Method == "Encrypt" && e.Service == "v2" {
			enc++
			if e.UID == "" || e.KeyID == "" {
				t.Errorf("plugin log line for Encrypt lacks uid or key_id: %+v", e)
			}
		}
	}
	if enc == 0 {
		t.Errorf("plugin log has no v2 Encrypt line with uid/key_id/method/outcome")
	}
	for k, value := range objs {
		if strings.Contains(rawLog, value) {
			t.Errorf("%s: plaintext value found in the plugin log", k)
		}
	}
	counts, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Error(err)
	} else if counts.V2Encrypt < 1 {
		t.Errorf("plugin metrics: v2 Encrypt OK = %v, want >= 1", counts.V2Encrypt)
	}
	t.Logf("MEASURED stored: %d objects written via the API; etcd holds %d Secrets+ConfigMaps, formats %v, key_id %q; "+
		"%d distinct DEK seeds, %d distinct local KEKs (annotation sets); plugin v2 Encrypt calls %v (log lines %d), key-service wrap %v unwrap %v",
		len(objs), len(all), formats, st.KeyId, seeds, keks, counts.V2Encrypt, enc, counts.Wrap, counts.Unwrap)
}

// 2. After a kube-apiserver restart everything reads back, and the plugin
// sees few Decrypts and fewer remote unwraps.
func testAPIServerRestart(ctx context.Context, t *testing.T, c *kmsCluster, w *written) {
	before, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ready, err := c.api.Restart(ctx, c.opts)
	if err != nil {
		t.Fatal(err)
	}
	requireReadBack(ctx, t, c.api.Client, w.snapshot(), "after kube-apiserver restart")
	after, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d := after.Sub(before)
	seeds, keks := seedStats(storedEncrypted(ctx, t, c.etcd))
	t.Logf("MEASURED apiserver restart: ready in %s; stored seeds %d, local KEKs %d; plugin v2 Decrypt %v, Encrypt %v, failed calls %v; key-service unwrap %v, wrap %v",
		ready.Round(time.Millisecond), seeds, keks, d.V2Decrypt, d.V2Encrypt, d.Failed, d.Unwrap, d.Wrap)
	if d.V2Decrypt < 1 {
		t.Errorf("plugin saw %v v2 Decrypt calls after the restart; the restarted apiserver must decrypt its seeds through it", d.V2Decrypt)
	}
	if d.V2Decrypt > float64(maxDecryptsPerSeed*seeds) {
		t.Errorf("plugin saw %v Decrypt calls for %d stored seeds: want at most %d per seed (the apiserver caches seeds)", d.V2Decrypt, seeds, maxDecryptsPerSeed)
	}
	if d.Unwrap > float64(keks) {
		t.Errorf("key service saw %v unwrap calls for %d local KEKs: want at most one per local KEK", d.Unwrap, keks)
	}
	if d.Failed != 0 {
		t.Errorf("plugin answered %v calls with an error code", d.Failed)
	}
}

// 3. kill -9 of the plugin while a writer and a reader run: every write the
// API acknowledged, before, during and after the outage, reads back.
func testPluginKill9UnderLoad(ctx context.Context, t *testing.T, c *kmsCluster, w *written) {
	const ns = "e2e-load"
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	load := newWritten()
	var writeOK, writeFail, readOK, readFail, readWrong atomic.Int64
	var names []string // acknowledged secret names, for the reader
	var namesMu sync.Mutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // writer
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			name := fmt.Sprintf("load-%d", i)
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := createSecret(cctx, c.api.Client, load, ns, name, fmt.Sprintf("load-plaintext-%d-%x", i, rand.Uint64()))
			cancel()
			if err != nil {
				writeFail.Add(1)
				continue
			}
			writeOK.Add(1)
			namesMu.Lock()
			names = append(names, name)
			namesMu.Unlock()
			time.Sleep(20 * time.Millisecond)
		}
	}()
	go func() { // reader
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			namesMu.Lock()
			var name string
			if len(names) > 0 {
				name = names[rand.IntN(len(names))]
			}
			namesMu.Unlock()
			if name == "" {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			s, err := c.api.Client.CoreV1().Secrets(ns).Get(cctx, name, metav1.GetOptions{})
			cancel()
			switch {
			case err != nil:
				readFail.Add(1)
			case string(s.Data["value"]) != load.get("secrets/"+ns+"/"+name):
				readWrong.Add(1)
			default:
				readOK.Add(1)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	stopLoad := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopLoad()

	time.Sleep(3 * time.Second)
	beforeKill := writeOK.Load()
	c.plugin.Kill9()
	_, staleSocket := os.Stat(c.plugin.Socket)
	time.Sleep(5 * time.Second)
	duringOutage := writeOK.Load() - beforeKill
	if err := c.plugin.Start(ctx); err != nil {
		t.Fatalf("restart kubekms after kill -9 (socket file left behind: %v): %v", staleSocket == nil, err)
	}
	time.Sleep(5 * time.Second)
	stopLoad()
	t.Logf("MEASURED load: writes acknowledged %d (%d while the plugin was down), failed %d; reads ok %d, failed %d, wrong value %d",
		writeOK.Load(), duringOutage, writeFail.Load(), readOK.Load(), readFail.Load(), readWrong.Load())
	if writeOK.Load() == 0 {
		t.Fatal("the writer got no write acknowledged")
	}
	if readWrong.Load() != 0 {
		t.Errorf("%d reads returned a value other than the one written", readWrong.Load())
	}
	acked := load.snapshot()
	requireReadBack(ctx, t, c.api.Client, acked, "after plugin restart")

	// The restarted apiserver has no cached seeds: every read now goes
	// through the new plugin process, which must unwrap its local KEKs again.
	all := storedEncrypted(ctx, t, c.etcd)
	stored := storedByKey(all)
	for k := range acked {
		if s, ok := stored[k]; !ok || s.Format != "kms-v2:kubekms" {
			t.Errorf("%s: acknowledged but stored as %q in etcd", k, s.Format)
		}
	}
	seeds, keks := seedStats(all)
	before, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.api.Restart(ctx, c.opts); err != nil {
		t.Fatal(err)
	}
	for k, v := range w.snapshot() {
		acked[k] = v
	}
	requireReadBack(ctx, t, c.api.Client, acked, "after plugin kill -9 and apiserver restart")
	for k, v := range acked {
		if strings.HasPrefix(k, "secrets/"+ns+"/") {
			w.add("secrets", ns, strings.TrimPrefix(k, "secrets/"+ns+"/"), v)
		}
	}
	after, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d := after.Sub(before)
	t.Logf("MEASURED restarted plugin serving a restarted apiserver: stored seeds %d, local KEKs %d; v2 Decrypt %v, key-service unwrap %v (since plugin start: %v), failed calls %v",
		seeds, keks, d.V2Decrypt, d.Unwrap, after.Unwrap, d.Failed)
	if after.Unwrap > float64(keks) {
		t.Errorf("restarted plugin made %v unwrap calls for %d local KEKs: want at most one per local KEK", after.Unwrap, keks)
	}
	if d.Failed != 0 {
		t.Errorf("plugin answered %v calls with an error code", d.Failed)
	}
}

// 4. `kubekms softkey rotate` without restarting anything: new writes carry
// the new key_id within the apiserver's Status poll, old objects still read,
// and a storage migration leaves nothing under the old key_id.
func testRotation(ctx context.Context, t *testing.T, c *kmsCluster, w *written) {
	const ns = "e2e-rotation"
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	st, err := c.plugin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	oldKeyID := st.KeyId
	rotated := time.Now()
	if err := c.plugin.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	var newKeyID string
	for deadline := time.Now().Add(time.Minute); ; {
		st, err := c.plugin.Status(ctx)
		if err == nil && st.KeyId != oldKeyID {
			newKeyID = st.KeyId
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin Status key_id still %q a minute after `softkey rotate` (err %v)", oldKeyID, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	pluginSaw := time.Since(rotated)

	// The apiserver polls Status every minute; allow three.
	var probes int
	for deadline := time.Now().Add(3 * time.Minute); ; probes++ {
		name := fmt.Sprintf("probe-%d", probes)
		if err := createSecret(ctx, c.api.Client, w, ns, name, "rotation-plaintext-"+randomHex(t, 8)); err != nil {
			t.Fatal(err)
		}
		s, err := c.etcd.ReadStored(ctx, "/registry/secrets/"+ns+"/"+name)
		if err != nil {
			t.Fatal(err)
		}
		if len(s) == 1 && s[0].KeyID() == newKeyID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("new writes still not under the new key_id %q 3 minutes after rotation", newKeyID)
		}
		time.Sleep(5 * time.Second)
	}
	apiserverSaw := time.Since(rotated)
	requireReadBack(ctx, t, c.api.Client, w.snapshot(), "after rotation")

	byKeyBefore := cluster.CountBy(storedEncrypted(ctx, t, c.etcd), func(s cluster.Stored) string { return s.KeyID() })
	n, err := migrate(ctx, c.api.Client)
	if err != nil {
		t.Fatal(err)
	}
	all := storedEncrypted(ctx, t, c.etcd)
	byKeyAfter := cluster.CountBy(all, func(s cluster.Stored) string { return s.KeyID() })
	t.Logf("MEASURED rotation: plugin Status changed after %s; first write under the new key_id after %s (%d probe writes); "+
		"objects by key_id before migration %v, after rewriting %d objects %v", pluginSaw.Round(time.Millisecond),
		apiserverSaw.Round(time.Second), probes+1, byKeyBefore, n, byKeyAfter)
	if byKeyAfter[oldKeyID] != 0 {
		var left []string
		for _, s := range all {
			if s.KeyID() == oldKeyID {
				left = append(left, s.Key)
			}
		}
		sort.Strings(left)
		t.Errorf("%d objects still under the old key_id after migration: %v", len(left), left)
	}
	if byKeyAfter[newKeyID] != len(all) {
		t.Errorf("want every stored object under the new key_id %q, got %v", newKeyID, byKeyAfter)
	}
	requireReadBack(ctx, t, c.api.Client, w.snapshot(), "after migration")
}

// 5. KMS v1 -> v2 on the same kubekms socket: objects written by a kms v1
// provider read after switching to v2-first, and a migration rewrites them
// to v2 so the v1 provider can be dropped.
func testKMSv1ToV2(ctx context.Context, t *testing.T, c *kmsCluster, w *written) {
	const ns = "e2e-kmsv1"
	ep := c.plugin.Endpoint()
	v1First := cluster.StartOptions{FeatureGates: "KMSv1=true",
		EncryptionConfig: cluster.EncryptionConfig(cluster.KMSv1("kubekms-v1", ep), cluster.KMSv2("kubekms", ep), cluster.Identity)}
	v2First := cluster.StartOptions{FeatureGates: "KMSv1=true",
		EncryptionConfig: cluster.EncryptionConfig(cluster.KMSv2("kubekms", ep), cluster.KMSv1("kubekms-v1", ep), cluster.Identity)}

	before, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.api.Restart(ctx, v1First); err != nil {
		t.Fatal(err)
	}
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	v1objs := newWritten()
	for i := range 10 {
		v := "v1-plaintext-" + randomHex(t, 10)
		if err := createSecret(ctx, c.api.Client, v1objs, ns, fmt.Sprintf("v1-%d", i), v); err != nil {
			t.Fatal(err)
		}
		w.add("secrets", ns, fmt.Sprintf("v1-%d", i), v)
	}
	stored := storedByKey(storedEncrypted(ctx, t, c.etcd))
	for k, v := range v1objs.snapshot() {
		if s := stored[k]; s.Format != "kms-v1:kubekms-v1" || leaks(s.Raw, v) {
			t.Errorf("%s: stored as %q (plaintext leaked: %v), want k8s:enc:kms:v1:kubekms-v1:", k, s.Format, leaks(s.Raw, v))
		}
	}
	mid, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}

	if _, err := c.api.Restart(ctx, v2First); err != nil {
		t.Fatal(err)
	}
	requireReadBack(ctx, t, c.api.Client, w.snapshot(), "v2 first, v1 second")
	after, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := after.Sub(mid); d.V1Decrypt < 1 {
		t.Errorf("plugin saw %v v1beta1 Decrypt calls reading v1 objects after the switch", d.V1Decrypt)
	}
	n, err := migrate(ctx, c.api.Client)
	if err != nil {
		t.Fatal(err)
	}
	formats := cluster.CountBy(storedEncrypted(ctx, t, c.etcd), func(s cluster.Stored) string { return s.Format })
	if formats["kms-v1:kubekms-v1"] != 0 || len(formats) != 1 {
		t.Errorf("after migration want every object kms v2, got %v", formats)
	}

	// The v1 provider and the KMSv1 gate can now go.
	if _, err := c.api.Restart(ctx, c.opts); err != nil {
		t.Fatal(err)
	}
	requireReadBack(ctx, t, c.api.Client, w.snapshot(), "v2 only, after migration")
	d1, d2 := mid.Sub(before), after.Sub(mid)
	t.Logf("MEASURED kms v1 -> v2: with v1 first: v1beta1 Encrypt %v; after switching to v2 first: v1beta1 Decrypt %v, v2 Decrypt %v; "+
		"migration rewrote %d objects; stored formats after %v", d1.V1Encrypt, d2.V1Decrypt, d2.V2Decrypt, n, formats)
}
