//go:build e2e

package e2e

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/kubekms/kubekms/internal/testutil"
	kkmigrate "github.com/kubekms/kubekms/migrate" // aliased: this package has a func named migrate
	"github.com/kubekms/kubekms/snapshot"
)

var migrateObjects = flag.Int("e2e.migrate.objects", 300, "Secrets and ConfigMaps (each) written before the rotation in TestMigrate")

// TestMigrate writes Secrets and ConfigMaps, rotates the softkey key, waits
// until kube-apiserver writes under the new key_id, then migrates: Secrets
// with the `kubekms migrate` binary finding stale objects in etcd,
// ConfigMaps with the library listing them through the API, in two runs
// resumed from a state file, with Conflicts provoked on the real apiserver.
func TestMigrate(t *testing.T) {
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	c := startKMSCluster(ctx, t, b)
	w := newWritten()
	const ns = "e2e-migrate"
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	n := *migrateObjects
	start := time.Now()
	if err := migWriteObjects(ctx, c, w, ns, n); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %d secrets and %d configmaps in %s", n, n, time.Since(start).Round(time.Millisecond))
	oldKeyID, newKeyID := migRotate(ctx, t, c, w, ns)
	t.Logf("rotated: key_id %q -> %q", oldKeyID, newKeyID)

	t.Run("CLIFromEtcd", func(t *testing.T) { testMigrateCLIFromEtcd(ctx, t, b, c, w, newKeyID) })
	t.Run("CLIAllOnTerminal", func(t *testing.T) { testMigrateCLIAll(ctx, t, b, c) })
	t.Run("LibraryThroughAPIResumed", func(t *testing.T) { testMigrateResume(ctx, t, c, w, ns, newKeyID) })
}

// testMigrateCLIFromEtcd: `kubekms migrate --dry-run` lists the stale
// Secrets and changes nothing; `kubekms migrate` rewrites exactly those,
// leaves ConfigMaps alone, checks etcd and exits 0.
func testMigrateCLIFromEtcd(ctx context.Context, t *testing.T, b binaries, c *kmsCluster, w *written, newKeyID string) {
	kubeconfig := migKubeconfig(t, c)
	if out, err := exec.CommandContext(ctx, b.kubekms, "migrate", "--help").CombinedOutput(); err != nil {
		t.Fatalf("%s has no migrate command (is newMigrateCmd wired into the root command?): %v\n%s", b.kubekms, err, out)
	}
	staleSecrets := migStale(ctx, t, c, "/registry/secrets/", newKeyID)
	staleCMs := migStale(ctx, t, c, "/registry/configmaps/", newKeyID)
	if len(staleSecrets) == 0 || len(staleCMs) == 0 {
		t.Fatalf("nothing to migrate: %d stale secrets, %d stale configmaps", len(staleSecrets), len(staleCMs))
	}
	revsBefore := migModRevisions(ctx, t, c, "/registry/")
	args := []string{"migrate", "--kubeconfig", kubeconfig, "--resources", "secrets",
		"--etcd-endpoints", c.etcd.Endpoint, "--plugin", c.plugin.Endpoint(), "--qps", "0", "--concurrency", "4"}

	out, code := migRunCLI(ctx, t, b.kubekms, append(args, "--dry-run")...)
	if code != 0 {
		t.Fatalf("migrate --dry-run exited %d:\n%s", code, out)
	}
	if got := strings.Count(out, "would rewrite secrets/"); got != len(staleSecrets) {
		t.Errorf("--dry-run lists %d secrets, etcd has %d stale:\n%s", got, len(staleSecrets), out)
	}
	if changed := migChanged(revsBefore, migModRevisions(ctx, t, c, "/registry/")); len(changed) > 0 {
		t.Errorf("--dry-run changed %d etcd keys: %v", len(changed), changed[:min(5, len(changed))])
	}

	// A first run stops after 10 objects (--limit) and exits 2: stale remain.
	state := filepath.Join(t.TempDir(), "state.jsonl")
	args = append(args, "--state-file", state)
	start := time.Now()
	out, code = migRunCLI(ctx, t, b.kubekms, append(args, "--limit", "10")...)
	t.Logf("kubekms migrate --limit 10 output:\n%s", out)
	if code != 2 {
		t.Errorf("migrate --limit 10 exited %d, want 2 (stale objects remain)", code)
	}
	if want := fmt.Sprintf("Check of etcd: %d stale object(s) remain", len(staleSecrets)-10); !strings.Contains(out, want) {
		t.Errorf("migrate --limit 10 output lacks %q", want)
	}
	out, code = migRunCLI(ctx, t, b.kubekms, args...)
	elapsed := time.Since(start)
	t.Logf("kubekms migrate output:\n%s", out)
	if code != 0 {
		t.Fatalf("migrate exited %d", code)
	}
	if m := regexp.MustCompile(`Rewritten (\d+), unchanged (\d+),`).FindStringSubmatch(out); m == nil {
		t.Errorf("no summary line in the output")
	} else if m[1] != strconv.Itoa(len(staleSecrets)-10) || m[2] != "0" {
		t.Errorf("rewritten %s, unchanged %s; want the other %d stale secrets rewritten, 0 unchanged", m[1], m[2], len(staleSecrets)-10)
	}
	if !strings.Contains(out, "Check of etcd: 0 stale object(s) remain") {
		t.Errorf("the output does not report zero stale objects after the migration")
	}
	if left := migStale(ctx, t, c, "/registry/secrets/", newKeyID); len(left) > 0 {
		t.Errorf("%d secrets still stale in etcd: %v", len(left), left[:min(5, len(left))])
	}
	// Exactly the stale secrets were written (each once: a key has one mod
	// revision per write, and a second write would show in Rewritten); no
	// configmap was touched.
	changed := migChanged(revsBefore, migModRevisions(ctx, t, c, "/registry/"))
	got := map[string]bool{}
	for _, k := range changed {
		switch {
		case strings.HasPrefix(k, "/registry/configmaps/"):
			t.Errorf("migrate --resources secrets wrote %s", k)
		case strings.HasPrefix(k, "/registry/secrets/"):
			got[k] = true
		}
	}
	for _, k := range staleSecrets {
		if !got[k] {
			t.Errorf("stale %s was not rewritten", k)
		}
	}
	if len(got) != len(staleSecrets) {
		t.Errorf("%d secrets written, %d were stale", len(got), len(staleSecrets))
	}
	t.Logf("MEASURED migrate CLI (etcd plan, --concurrency 4, no rate limit, two runs): %d secrets in %s (%.0f objects/s, including plans and checks)",
		len(staleSecrets), elapsed.Round(time.Millisecond), float64(len(staleSecrets))/elapsed.Seconds())
	requireReadBack(ctx, t, c.api.Client, migOnly(w.snapshot(), "secrets/"), "after migrate of secrets")
}

// testMigrateCLIAll runs `kubekms migrate --all` (no etcd) on a terminal
// after the Secrets were migrated: it lists and updates every Secret, draws
// a progress bar, and the apiserver writes none of them (all are current).
func testMigrateCLIAll(ctx context.Context, t *testing.T, b binaries, c *kmsCluster) {
	scriptBin, err := exec.LookPath("script") // util-linux: runs a command on a pseudo-terminal
	if err != nil {
		testutil.Missing(t, "script (util-linux) not found: %v", err)
		return
	}
	revsBefore := migModRevisions(ctx, t, c, "/registry/secrets/")
	cmdline := strings.Join([]string{b.kubekms, "migrate", "--all", "--resources", "secrets",
		"--kubeconfig", migKubeconfig(t, c), "--qps", "0"}, "' '")
	out, code := migRunCLI(ctx, t, scriptBin, "-q", "-e", "-c", "'"+cmdline+"'", "/dev/null")
	t.Logf("kubekms migrate --all on a terminal: %q", out)
	if code != 0 {
		t.Fatalf("migrate --all exited %d", code)
	}
	for _, want := range []string{
		fmt.Sprintf("Planned all %d object(s) listed through the API: secrets=%d", len(revsBefore), len(revsBefore)),
		fmt.Sprintf("Rewritten 0, unchanged %d,", len(revsBefore)),
		"Not checked",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("migrate --all output lacks %q", want)
		}
	}
	if !regexp.MustCompile(`migrate\s+\d+%`).MatchString(out) {
		t.Errorf("no progress bar on the terminal")
	}
	if changed := migChanged(revsBefore, migModRevisions(ctx, t, c, "/registry/secrets/")); len(changed) > 0 {
		t.Errorf("no-op updates of current secrets were written to etcd: %v", changed[:min(5, len(changed))])
	}
}

// testMigrateResume: the library plans every ConfigMap through the API (the
// no-etcd path), stops after a third of them, and a second run with the
// same state file finishes: nothing rewritten twice, zero stale left.
// Three objects are changed between migrate's GET and UPDATE, so the real
// apiserver answers Conflict and migrate retries.
func testMigrateResume(ctx context.Context, t *testing.T, c *kmsCluster, w *written, ns, newKeyID string) {
	clients, err := kkmigrate.NewClients(c.api.Config)
	if err != nil {
		t.Fatal(err)
	}
	resources, err := kkmigrate.Resolve(clients.Mapper, []schema.GroupResource{{Resource: "configmaps"}})
	if err != nil {
		t.Fatal(err)
	}
	staleBefore := migStale(ctx, t, c, "/registry/configmaps/", newKeyID)
	if len(staleBefore) == 0 {
		t.Fatal("no stale configmaps to migrate")
	}
	statePath := filepath.Join(t.TempDir(), "migrate-state.jsonl")

	plan1, err := kkmigrate.PlanFromAPI(ctx, clients.Metadata, resources, 50) // small pages: exercise paging
	if err != nil {
		t.Fatal(err)
	}
	if plan1.FromEtcd || len(plan1.Targets) < len(staleBefore) {
		t.Fatalf("API plan has %d targets, etcd has %d stale configmaps", len(plan1.Targets), len(staleBefore))
	}
	limit := len(plan1.Targets) / 3
	disturb := &conflictOnce{Interface: clients.Dynamic, names: map[string]bool{}}
	for _, tg := range plan1.Targets[:3] {
		disturb.names[tg.Namespace+"/"+tg.Name] = true
	}
	state, err := kkmigrate.OpenState(statePath, newKeyID)
	if err != nil {
		t.Fatal(err)
	}
	revs0 := migModRevisions(ctx, t, c, "/registry/configmaps/")
	const qps = 200
	start := time.Now()
	res1, err := kkmigrate.Run(ctx, disturb, plan1, kkmigrate.Options{QPS: qps, Concurrency: 4, Limit: limit, State: state})
	took := time.Since(start)
	state.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("run 1 (limit %d of %d): %+v", limit, len(plan1.Targets), res1)
	if res1.Failed != 0 {
		t.Fatalf("run 1: %d failed: %v", res1.Failed, res1.Errors)
	}
	if got := res1.Rewritten + res1.Unchanged + res1.Deleted; got != limit || res1.NotAttempted != len(plan1.Targets)-limit {
		t.Errorf("run 1 handled %d (want the limit %d), left %d (want %d)", got, limit, res1.NotAttempted, len(plan1.Targets)-limit)
	}
	// The rate limit: a lower bound, which a correct limiter always meets
	// (a GET and an UPDATE per object and per retry; a burst of qps/10).
	requests := 2 * (limit + res1.ConflictsRetried)
	if minimum := time.Duration(float64(requests-qps/10) / qps * float64(time.Second)); took < minimum {
		t.Errorf("run 1 made %d requests in %s: faster than --qps %d allows (%s)", requests, took, qps, minimum)
	}
	t.Logf("MEASURED migrate library, API plan, QPS %d: %d objects (%d requests) in %s", qps, limit, requests, took.Round(time.Millisecond))
	if disturb.done() != 3 || res1.ConflictsRetried != 3 {
		t.Errorf("3 objects changed between GET and UPDATE: want 3 conflicts retried, got %d (%d changed)", res1.ConflictsRetried, disturb.done())
	}
	revs1 := migModRevisions(ctx, t, c, "/registry/configmaps/")
	written1 := migChanged(revs0, revs1)
	// Each stale object among the first `limit` was written once: by migrate,
	// or (the 3 disturbed ones) by the test just before migrate's update.
	if len(written1) != res1.Rewritten+3 {
		t.Errorf("run 1 reports %d rewritten (+3 disturbed), etcd shows %d keys written", res1.Rewritten, len(written1))
	}

	// Run 2: a fresh plan, the same state file, no limit.
	plan2, err := kkmigrate.PlanFromAPI(ctx, clients.Metadata, resources, 0)
	if err != nil {
		t.Fatal(err)
	}
	state, err = kkmigrate.OpenState(statePath, newKeyID)
	if err != nil {
		t.Fatal(err)
	}
	if state.Len() != res1.Rewritten {
		t.Errorf("state file holds %d objects, run 1 rewrote %d", state.Len(), res1.Rewritten)
	}
	start = time.Now()
	res2, err := kkmigrate.Run(ctx, clients.Dynamic, plan2, kkmigrate.Options{Concurrency: 4, State: state})
	took = time.Since(start)
	state.Close()
	t.Logf("MEASURED migrate library, API plan, no rate limit, concurrency 4: %d objects (%d rewritten, %d resumed) in %s",
		len(plan2.Targets), res2.Rewritten, res2.Resumed, took.Round(time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("run 2 (resumed): %+v", res2)
	if res2.Failed != 0 || res2.NotAttempted != 0 {
		t.Errorf("run 2: %d failed (%v), %d not attempted", res2.Failed, res2.Errors, res2.NotAttempted)
	}
	if res2.Resumed != res1.Rewritten {
		t.Errorf("run 2 skipped %d from the state file, run 1 rewrote %d", res2.Resumed, res1.Rewritten)
	}
	revs2 := migModRevisions(ctx, t, c, "/registry/configmaps/")
	written2 := migChanged(revs1, revs2)
	for _, k := range written2 {
		if revs1[k] != revs0[k] {
			t.Errorf("%s was written in run 1 and again in run 2", k)
		}
	}
	if len(written2) != res2.Rewritten {
		t.Errorf("run 2 reports %d rewritten, etcd shows %d keys written", res2.Rewritten, len(written2))
	}
	if total := res1.Rewritten + 3 + res2.Rewritten; total != len(staleBefore) {
		t.Errorf("%d stale configmaps before, %d written in total (%d + 3 disturbed + %d)", len(staleBefore), total, res1.Rewritten, res2.Rewritten)
	}

	// Zero stale: by migrate's own check and by the harness's decoding.
	src, err := snapshot.OpenEtcd(ctx, c.etcd.Client, "/registry/", 0)
	if err != nil {
		t.Fatal(err)
	}
	per, left, err := kkmigrate.Remaining(ctx, src, resources, kkmigrate.EtcdOptions{CurrentKeyID: newKeyID})
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Errorf("Remaining after the resumed migration: %v %v", per, left[:min(5, len(left))])
	}
	if still := migStale(ctx, t, c, "/registry/configmaps/", newKeyID); len(still) > 0 {
		t.Errorf("%d configmaps not under key_id %q: %v", len(still), newKeyID, still[:min(5, len(still))])
	}
	requireReadBack(ctx, t, c.api.Client, migOnly(w.snapshot(), "configmaps/"), "after the resumed migration of configmaps")
}

// migWriteObjects creates n Secrets and n ConfigMaps with 8 writers.
func migWriteObjects(ctx context.Context, c *kmsCluster, w *written, ns string, n int) error {
	idx := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for range 8 {
		wg.Go(func() {
			for i := range idx {
				v := fmt.Sprintf("migrate-plaintext-%d-%d", i, time.Now().UnixNano())
				err := errors.Join(
					createSecret(ctx, c.api.Client, w, ns, fmt.Sprintf("s-%04d", i), v),
					createConfigMap(ctx, c.api.Client, w, ns, fmt.Sprintf("c-%04d", i), v))
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	for i := range n {
		idx <- i
	}
	close(idx)
	wg.Wait()
	return errors.Join(errs...)
}

// migRotate runs `kubekms softkey rotate` and waits until the plugin reports
// the new key_id and a new Secret is stored under it (kube-apiserver polls
// Status about once a minute).
func migRotate(ctx context.Context, t *testing.T, c *kmsCluster, w *written, ns string) (string, string) {
	t.Helper()
	st, err := c.plugin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	oldKeyID := st.KeyId
	if err := c.plugin.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	var newKeyID string
	for deadline := time.Now().Add(time.Minute); newKeyID == ""; time.Sleep(500 * time.Millisecond) {
		st, err := c.plugin.Status(ctx)
		if err == nil && st.KeyId != oldKeyID {
			newKeyID = st.KeyId
		} else if time.Now().After(deadline) {
			t.Fatalf("plugin Status key_id still %q a minute after rotate (err %v)", oldKeyID, err)
		}
	}
	start := time.Now()
	for i := 0; ; i++ {
		name := fmt.Sprintf("probe-%d", i)
		if err := createSecret(ctx, c.api.Client, w, ns, name, "probe-"+randomHex(t, 8)); err != nil {
			t.Fatal(err)
		}
		s, err := c.etcd.ReadStored(ctx, "/registry/secrets/"+ns+"/"+name)
		if err != nil {
			t.Fatal(err)
		}
		if len(s) == 1 && s[0].KeyID() == newKeyID {
			t.Logf("kube-apiserver writes under the new key_id after %s", time.Since(start).Round(time.Second))
			return oldKeyID, newKeyID
		}
		if time.Since(start) > 3*time.Minute {
			t.Fatalf("new writes still not under key_id %q 3 minutes after rotation", newKeyID)
		}
		time.Sleep(3 * time.Second)
	}
}

// migStale lists the etcd keys under prefix not stored as KMS v2 under keyID.
func migStale(ctx context.Context, t *testing.T, c *kmsCluster, prefix, keyID string) []string {
	t.Helper()
	values, err := c.etcd.ReadStored(ctx, prefix)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, v := range values {
		if v.Object == nil || v.KeyID() != keyID {
			out = append(out, v.Key)
		}
	}
	return out
}

// migModRevisions maps every etcd key under prefix to its mod revision.
func migModRevisions(ctx context.Context, t *testing.T, c *kmsCluster, prefix string) map[string]int64 {
	t.Helper()
	src, err := c.etcd.Client.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	m := make(map[string]int64, len(src.Kvs))
	for _, kv := range src.Kvs {
		m[string(kv.Key)] = kv.ModRevision
	}
	return m
}

// migChanged lists the keys of after that are new or have another revision.
func migChanged(before, after map[string]int64) []string {
	var out []string
	for k, rev := range after {
		if before[k] != rev {
			out = append(out, k)
		}
	}
	return out
}

// migOnly keeps the written objects of one resource ("secrets/").
func migOnly(objs map[string]string, prefix string) map[string]string {
	out := map[string]string{}
	for k, v := range objs {
		if strings.HasPrefix(k, prefix) {
			out[k] = v
		}
	}
	return out
}

// migKubeconfig writes a kubeconfig for the test apiserver (loopback,
// self-signed certificate, the admin token).
func migKubeconfig(t *testing.T, c *kmsCluster) string { return writeKubeconfig(t, c.api.Config) }

// migRunCLI runs kubekms with args (bounded in time) and returns its output
// and exit code.
func migRunCLI(ctx context.Context, t *testing.T, bin string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exit):
		return string(out), exit.ExitCode()
	default:
		t.Fatalf("run kubekms %s: %v\n%s", strings.Join(args, " "), err, out)
		return "", -1
	}
}

// conflictOnce is the real dynamic client, except that the first UPDATE of
// each named object is preceded by another UPDATE of that object (a label
// change), so the apiserver answers the first one with Conflict.
type conflictOnce struct {
	dynamic.Interface
	mu        sync.Mutex
	names     map[string]bool // "namespace/name" still to disturb
	disturbed int
}

func (c *conflictOnce) take(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.names[key] {
		return false
	}
	delete(c.names, key)
	c.disturbed++
	return true
}

func (c *conflictOnce) done() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.disturbed
}

func (c *conflictOnce) Resource(gvr schema.GroupVersionResource) dynamic.NamespaceableResourceInterface {
	return conflictNR{c.Interface.Resource(gvr), c}
}

type conflictNR struct {
	dynamic.NamespaceableResourceInterface
	c *conflictOnce
}

func (n conflictNR) Namespace(ns string) dynamic.ResourceInterface {
	return conflictRI{n.NamespaceableResourceInterface.Namespace(ns), n.c, ns}
}

type conflictRI struct {
	dynamic.ResourceInterface
	c  *conflictOnce
	ns string
}

func (r conflictRI) Update(ctx context.Context, obj *unstructured.Unstructured, opts metav1.UpdateOptions, sub ...string) (*unstructured.Unstructured, error) {
	if r.c.take(r.ns + "/" + obj.GetName()) {
		other := obj.DeepCopy()
		labels := other.GetLabels()
		if labels == nil {
			labels = map[string]string{}
		}
		labels["e2e.kubekms.io/disturbed"] = "true"
		other.SetLabels(labels)
		if _, err := r.ResourceInterface.Update(ctx, other, metav1.UpdateOptions{}); err != nil {
			return nil, fmt.Errorf("disturb %s/%s: %w", r.ns, obj.GetName(), err)
		}
	}
	return r.ResourceInterface.Update(ctx, obj, opts, sub...)
}
