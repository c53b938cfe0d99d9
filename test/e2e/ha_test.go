//go:build e2e

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/kubekms/kubekms/convergence"
	"github.com/kubekms/kubekms/internal/testservers/localkms"
	"github.com/kubekms/kubekms/rotate"
	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// One AWS KMS key service (local-kms) for the whole control plane; the
// "rotation" an operator makes is re-pointing the alias to another key.
const (
	haKeyA  = "0a7e1f52-6b3c-4d2e-9f10-1a2b3c4d5e01"
	haKeyB  = "0a7e1f52-6b3c-4d2e-9f10-1a2b3c4d5e02"
	haKeyC  = "0a7e1f52-6b3c-4d2e-9f10-1a2b3c4d5e03"
	haAlias = "alias/kubekms-e2e-ha"
	haNodes = 3
)

// haCluster is a control plane of three nodes: a 3-member etcd, and per
// node a kube-apiserver (its own hostname, so its own identity) with its
// own `kubekms serve`; the plugins share one AWS KMS key in local-kms, which
// binds every interface and so runs in a private network namespace, with
// the plugins started in it (nsenter); the apiservers reach them over their
// unix sockets.
type haCluster struct {
	etcd       *cluster.EtcdCluster
	kms        *localkms.Server
	plugins    []*cluster.Plugin
	apis       []*cluster.APIServer
	hosts      []string
	urls       []string
	kubeconfig string
	w          *written
}

func startHA(ctx context.Context, t *testing.T, b binaries) *haCluster {
	t.Helper()
	start := time.Now()
	h := &haCluster{w: newWritten()}
	h.kms = localkms.Start(t, localkms.Seed{AESKeys: []string{haKeyA, haKeyB, haKeyC}, Aliases: map[string]string{haAlias: haKeyA}})
	var err error
	if h.etcd, err = cluster.StartEtcdCluster(ctx, t, b.etcd, haNodes); err != nil {
		t.Fatal(err)
	}
	env := localkms.ClientEnv(filepath.Join(t.TempDir(), "no-aws-config"))
	ns := h.kms.NetNS()
	var opts []cluster.StartOptions
	for i := range haNodes {
		p, err := cluster.NewPlugin(t, b.kubekms)
		if err != nil {
			t.Fatal(err)
		}
		p.KeyURI = "awskms:///" + haAlias + "?endpoint=" + h.kms.Endpoint()
		// Different probe intervals per node (5, 10, 15 s; the default is
		// 30 s): the nodes see a rotation at different times, as in a real
		// control plane, while the suite stays short.
		p.Args = []string{"--cluster-name", "e2e-ha", "--probe-interval", fmt.Sprintf("%ds", 5*(i+1))}
		p.Env = env
		p.Wrap = func(cmd []string) []string { return append([]string{"nsenter", "--net=" + ns, "--"}, cmd...) }
		if err := p.Start(ctx); err != nil {
			t.Fatal(err)
		}
		h.plugins = append(h.plugins, p)
		var api *cluster.APIServer
		if i == 0 {
			api, err = cluster.NewAPIServer(t, b.apiserver, h.etcd.URLs())
		} else {
			api, err = cluster.NewAPIServerPeer(t, b.apiserver, h.etcd.URLs(), h.apis[0])
		}
		if err != nil {
			t.Fatal(err)
		}
		h.apis = append(h.apis, api)
		h.urls = append(h.urls, api.Config.Host)
		h.hosts = append(h.hosts, fmt.Sprintf("kubekms-e2e-node-%d", i+1))
		opts = append(opts, cluster.StartOptions{
			EncryptionConfig: cluster.EncryptionConfig(cluster.KMSv2("kubekms", p.Endpoint()), cluster.Identity),
			Hostname:         h.hosts[i],
		})
	}
	ready, err := cluster.StartAll(ctx, h.apis, opts)
	if err != nil {
		t.Fatal(err)
	}
	h.kubeconfig = writeKubeconfig(t, h.apis[0].Config)
	t.Logf("HA control plane up in %s: etcd %v, apiservers %v (ready after %v)", time.Since(start).Round(time.Second), h.etcd.Endpoints, h.urls, ready)
	return h
}

func writeKubeconfig(t *testing.T, cfg *rest.Config) string {
	t.Helper()
	c := clientcmdapi.NewConfig()
	c.Clusters["e2e"] = &clientcmdapi.Cluster{Server: cfg.Host, InsecureSkipTLSVerify: true}
	c.AuthInfos["admin"] = &clientcmdapi.AuthInfo{Token: cfg.BearerToken}
	c.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "admin"}
	c.CurrentContext = "e2e"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*c, path); err != nil {
		t.Fatal(err)
	}
	return path
}

func (h *haCluster) pluginEndpoints() string {
	var eps []string
	for _, p := range h.plugins {
		eps = append(eps, p.Endpoint())
	}
	return strings.Join(eps, ",")
}

// common are the flags every tool gets to find this cluster.
func (h *haCluster) common() []string {
	return []string{"--kubeconfig", h.kubeconfig, "--apiservers", strings.Join(h.urls, ",")}
}

func (h *haCluster) observer() *convergence.Observer {
	return &convergence.Observer{Kube: h.apis[0].Client, Config: h.apis[0].Config, URLs: h.urls}
}

func (h *haCluster) keyIDs(ctx context.Context) ([]string, error) {
	out := make([]string, len(h.plugins))
	for i, p := range h.plugins {
		st, err := p.Status(ctx)
		if err != nil {
			return nil, err
		}
		out[i] = st.KeyId
	}
	return out, nil
}

func (h *haCluster) repoint(ctx context.Context, t *testing.T, keyID string) time.Time {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if _, err := h.kms.AdminClient().UpdateAlias(cctx, &kms.UpdateAliasInput{AliasName: aws.String(haAlias), TargetKeyId: aws.String(keyID)}); err != nil {
		t.Fatalf("UpdateAlias %s -> %s: %v", haAlias, keyID, err)
	}
	return time.Now()
}

// measureRotation records, from `since`, when each plugin reports newKeyID
// (Status over its socket, every 200 ms) and when each apiserver writes
// under it (its metrics and KMS check, read every second). It returns when
// all did or ctx ends.
func (h *haCluster) measureRotation(ctx context.Context, since time.Time, oldKeyID string) (plugins []time.Duration, apis map[string]time.Duration, newKeyID string, err error) {
	plugins = make([]time.Duration, len(h.plugins))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, p := range h.plugins {
		wg.Go(func() {
			for ctx.Err() == nil {
				if st, err := p.Status(ctx); err == nil && st.KeyId != oldKeyID {
					mu.Lock()
					plugins[i], newKeyID = time.Since(since), st.KeyId
					mu.Unlock()
					return
				}
				time.Sleep(200 * time.Millisecond)
			}
		})
	}
	o := h.observer()
	target := func(ctx context.Context) (string, error) {
		mu.Lock()
		defer mu.Unlock()
		if newKeyID == "" {
			return "", fmt.Errorf("%w: no plugin sees the new key yet", convergence.ErrUnsettled)
		}
		return newKeyID, nil
	}
	waitStart := time.Now()
	conv, err := o.Wait(ctx, target, convergence.WaitOptions{Timeout: 4 * time.Minute, Interval: time.Second})
	wg.Wait()
	if err != nil {
		return nil, nil, "", fmt.Errorf("the apiservers did not converge: %w", err)
	}
	apis = map[string]time.Duration{}
	for name, d := range conv.Times {
		apis[name] = waitStart.Sub(since) + d
	}
	return plugins, apis, newKeyID, nil
}

func (h *haCluster) printTimes(t *testing.T, what string, plugins []time.Duration, apis map[string]time.Duration) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "MEASURED %s (seconds after the key service's change)\n", what)
	fmt.Fprintf(&b, "MEASURED | node | plugin probe interval | plugin reports the new key_id | apiserver writes under it |\n")
	fmt.Fprintf(&b, "MEASURED |---|---:|---:|---:|\n")
	for i := range h.plugins {
		var api time.Duration
		for name, d := range apis {
			if strings.Contains(name, h.hosts[i]) {
				api = d
			}
		}
		fmt.Fprintf(&b, "MEASURED | %s | %d s | %.1f | %.1f |\n", h.hosts[i], 5*(i+1), plugins[i].Seconds(), api.Seconds())
	}
	t.Log("\n" + b.String())
}

// storedUnder counts the Secrets etcd holds per KMS key_id.
func (h *haCluster) storedUnder(ctx context.Context, t *testing.T, ns string) map[string]int {
	t.Helper()
	e := &cluster.Etcd{Client: h.etcd.Client}
	values, err := e.ReadStored(ctx, "/registry/secrets/"+ns+"/")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int{}
	for _, v := range values {
		out[v.KeyID()]++
	}
	return out
}

// readEverywhere reads every written object through every apiserver.
func (h *haCluster) readEverywhere(ctx context.Context, t *testing.T, objs map[string]string, when string) {
	t.Helper()
	for i, a := range h.apis {
		requireReadBack(ctx, t, a.Client, objs, fmt.Sprintf("%s, through %s", when, h.hosts[i]))
	}
}

// TestHA runs a control plane of three apiservers, three plugins and one
// shared AWS KMS key through what a production rotation meets: reads
// across nodes, `kubekms status --cluster`, a rotation measured per node
// with `kubekms migrate` run right after it, the guided `kubekms rotate`
// (interrupted and resumed), a second rotation refused while objects are
// stale, and a plugin and the key service killed under load.
func TestHA(t *testing.T) {
	t.Parallel()
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 25*time.Minute)
	defer cancel()
	h := startHA(ctx, t, b)
	const ns = "e2e-ha"
	if err := ensureNamespace(ctx, h.apis[0].Client, ns); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name string
		fn   func(context.Context, *testing.T, binaries, *haCluster, string)
	}{
		{"CrossNodeReads", testHACrossNodeReads},
		{"StatusCluster", testHAStatusCluster},
		{"RotationThenMigrateAtOnce", testHARotationThenMigrate},
		{"GuidedRotationResumed", testHAGuidedRotation},
		{"SecondRotationRefusedWhileStale", testHASecondRotationRefused},
		{"PluginAndKeyServiceKilledUnderLoad", testHAKillUnderLoad},
	}
	for _, s := range steps {
		if !t.Run(s.name, func(t *testing.T) { s.fn(ctx, t, b, h, ns) }) {
			return // later steps build on earlier ones
		}
	}
}

// Objects written through each apiserver read back through every other:
// every plugin unwraps the local KEKs every other made.
func testHACrossNodeReads(ctx context.Context, t *testing.T, _ binaries, h *haCluster, ns string) {
	const perNode = 50 // 150 Secrets, as in the trial that found the migrate race
	for i, a := range h.apis {
		for j := range perNode {
			if err := createSecret(ctx, a.Client, h.w, ns, fmt.Sprintf("n%d-%03d", i+1, j), fmt.Sprintf("node-%d-value-%d-%x", i+1, j, rand.Uint64())); err != nil {
				t.Fatal(err)
			}
		}
	}
	h.readEverywhere(ctx, t, h.w.snapshot(), "written on every node")
	ids, err := h.keyIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := h.storedUnder(ctx, t, ns); got[ids[0]] != haNodes*perNode {
		t.Errorf("etcd holds %v, want all %d Secrets under %s", got, haNodes*perNode, ids[0])
	}
}

func runStatus(ctx context.Context, t *testing.T, bin string, args ...string) (*convergence.Report, string, int) {
	t.Helper()
	out, code := migRunCLI(ctx, t, bin, append([]string{"status", "--cluster", "-o", "json"}, args...)...)
	var rep convergence.Report
	if i := strings.Index(out, "{"); i < 0 || json.NewDecoder(strings.NewReader(out[i:])).Decode(&rep) != nil {
		t.Fatalf("status --cluster JSON: exit %d\n%s", code, out)
	}
	return &rep, out, code
}

// `kubekms status --cluster` finds the three identities and their key_id
// (JSON and text), and says "no agreement" when it reaches only one of
// the three apiservers that hold identity leases.
func testHAStatusCluster(ctx context.Context, t *testing.T, b binaries, h *haCluster, _ string) {
	ids, err := h.keyIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	rep, out, code := runStatus(ctx, t, b.kubekms, append(h.common(), "--plugin", h.plugins[0].Endpoint())...)
	if code != 0 || !rep.Agreed || rep.KeyID != ids[0] || len(rep.Apiservers) != haNodes || len(rep.Leases) != haNodes {
		t.Fatalf("status --cluster: exit %d\n%s", code, out)
	}
	var hosts []string
	for _, a := range rep.Apiservers {
		hosts = append(hosts, a.Hostname)
		if a.Identity == "" || a.IDHash != convergence.HashKeyID(a.Identity) || !a.KMSHealthy || a.KeyIDHash != convergence.HashKeyID(ids[0]) {
			t.Errorf("apiserver %+v", a)
		}
	}
	sort.Strings(hosts)
	if !slices.Equal(hosts, h.hosts) {
		t.Errorf("hostnames %v, want %v", hosts, h.hosts)
	}
	text, code := migRunCLI(ctx, t, b.kubekms, append([]string{"status", "--cluster"}, h.common()...)...)
	if code != 0 || !strings.Contains(text, "agreement: yes: all 3 apiserver(s) (3 live identity lease(s))") {
		t.Errorf("status --cluster text: exit %d\n%s", code, text)
	}

	// (--apiservers endpoints is covered by convergence's unit tests only:
	// the API refuses loopback addresses in the kubernetes Service's
	// EndpointSlices, and the suite's apiservers listen on loopback only.)
	rep, out, code = runStatus(ctx, t, b.kubekms, "--kubeconfig", h.kubeconfig, "--apiservers", "kubeconfig")
	if code != 2 || rep.Agreed || !strings.Contains(strings.Join(rep.Problems, "\n"), "holds a live identity lease but was not read") {
		t.Errorf("status --cluster reaching one of three apiservers: exit %d\n%s", code, out)
	}
}

// The key service's alias is re-pointed; as soon as one plugin sees the new
// key, `kubekms migrate` runs. It must not report success early: it waits
// until every apiserver writes under the new key_id (or refuses, naming the
// laggards; then a rerun finishes), and ends with 0 stale in etcd. The
// test measures, per node, when the plugin and the apiserver switched.
func testHARotationThenMigrate(ctx context.Context, t *testing.T, b binaries, h *haCluster, ns string) {
	ids, err := h.keyIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	oldKeyID := ids[0]
	var plugins []time.Duration
	var apis map[string]time.Duration
	var newKeyID string
	var measureErr error
	since := h.repoint(ctx, t, haKeyB)
	measured := make(chan struct{})
	go func() {
		defer close(measured)
		plugins, apis, newKeyID, measureErr = h.measureRotation(ctx, since, oldKeyID)
	}()
	var lagging []string // plugins still on the old key when the first saw the new one
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		ids, err := h.keyIDs(ctx)
		if err == nil && slices.ContainsFunc(ids, func(id string) bool { return id != oldKeyID }) {
			for i, id := range ids {
				if id == oldKeyID {
					lagging = append(lagging, h.plugins[i].Endpoint())
				}
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no plugin saw the re-pointed alias within a minute")
		}
	}
	base := append(append([]string{"migrate"}, h.common()...), "--resources", "secrets,configmaps", "--etcd-endpoints", strings.Join(h.etcd.Endpoints, ","))

	// With a bound too short for the rotation to reach every node: a
	// refusal naming the laggards, nothing rewritten.
	out, code := migRunCLI(ctx, t, b.kubekms, append(slices.Clone(base), "--plugin", h.pluginEndpoints(), "--convergence-timeout", "1s")...)
	t.Logf("kubekms migrate --convergence-timeout 1s right after the first plugin saw the rotation: exit %d\n%s", code, out)
	if code != 0 && (code != 2 || !strings.Contains(out, "refusing to migrate") || !strings.Contains(out, "apiserver-") || strings.Contains(out, "Rewritten")) {
		t.Fatalf("want exit 2, a refusal naming the laggards and nothing rewritten")
	}

	// Asked through a plugin that still reports the old key (the trial's
	// "0 stale" with exit 0: then the plugin and every apiserver agree on
	// the old key, and nothing is stale under it yet), migrate says so and
	// names --rotated-from; with it, it waits until that plugin and every
	// apiserver use the new key, then migrates to it.
	asked := h.pluginEndpoints()
	if len(lagging) > 0 {
		asked = lagging[0]
		out, code = migRunCLI(ctx, t, b.kubekms, append(slices.Clone(base), "--plugin", asked, "--dry-run", "--skip-convergence-check")...)
		t.Logf("kubekms migrate --dry-run through a plugin still on the old key: exit %d\n%s", code, out)
		if code != 0 || (strings.Contains(out, "Planned 0 stale") && !strings.Contains(out, "--rotated-from "+oldKeyID)) {
			t.Errorf("0 stale under the old key without the note naming --rotated-from")
		}
	}
	startMigrate := time.Now()
	out, code = migRunCLI(ctx, t, b.kubekms, append(slices.Clone(base), "--plugin", asked, "--rotated-from", oldKeyID, "--convergence-timeout", "3m")...)
	t.Logf("kubekms migrate --plugin %s (%d plugin(s) lagged): exit %d after %s\n%s", asked, len(lagging), code, time.Since(startMigrate).Round(time.Second), out)
	if code != 0 {
		t.Fatalf("migrate exit %d", code)
	}
	<-measured
	if measureErr != nil {
		t.Fatal(measureErr)
	}
	if !strings.Contains(out, "Convergence: all 3 apiserver(s) write under "+newKeyID) || !strings.Contains(out, "Check of etcd: 0 stale object(s) remain") {
		t.Errorf("migrate output lacks the convergence or the final check:\n%s", out)
	}
	got := h.storedUnder(ctx, t, ns)
	if got[oldKeyID] != 0 || got[newKeyID] != len(migOnly(h.w.snapshot(), "secrets/")) {
		t.Errorf("after migrate etcd holds %v; want every Secret under %s", got, newKeyID)
	}
	h.printTimes(t, "rotation A -> B, measured by the test (each apiserver's /readyz read every second)", plugins, apis)
	h.readEverywhere(ctx, t, h.w.snapshot(), "after the migration")
}

// rotateEvents runs `kubekms rotate -o json`, calls onEvent for each event
// line as it comes, and returns the events, the final result and the exit code.
func rotateRun(ctx context.Context, t *testing.T, bin string, args []string, onEvent func(rotate.Event)) ([]rotate.Event, *rotate.State, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 8*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"rotate", "-o", "json"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var events []rotate.Event
	var result struct {
		Phase string        `json:"phase"`
		Error string        `json:"error"`
		State *rotate.State `json:"state"`
	}
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if strings.Contains(string(line), `"phase":"result"`) {
			if err := json.Unmarshal(line, &result); err != nil {
				t.Errorf("result line %s: %v", line, err)
			}
			continue
		}
		var e rotate.Event
		if err := json.Unmarshal(line, &e); err != nil {
			t.Errorf("event line %q: %v", line, err)
			continue
		}
		t.Logf("rotate: %s %s", e.Phase, e.Message)
		events = append(events, e)
		if onEvent != nil {
			onEvent(e)
		}
	}
	err = cmd.Wait()
	code := 0
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatalf("kubekms rotate: %v", err)
	}
	if result.Error != "" {
		t.Logf("rotate result error: %s", result.Error)
	}
	return events, result.State, result.Error + "\n" + stderr.String(), code
}

// `kubekms rotate` end to end with the key in the remote service: it
// waits for the operator to re-point the alias; a first run with a 1 s
// convergence bound stops (exit 2) and a rerun with the same state file
// resumes, waits for every plugin and apiserver, migrates and verifies.
func testHAGuidedRotation(ctx context.Context, t *testing.T, b binaries, h *haCluster, ns string) {
	ids, err := h.keyIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(t.TempDir(), "rotate-state.json")
	args := append(h.common(), "--etcd-endpoints", strings.Join(h.etcd.Endpoints, ","), "--plugin", h.pluginEndpoints(),
		"--state-file", state, "--rotation-timeout", "3m")
	var repointed time.Time
	events, st, errText, code := rotateRun(ctx, t, b.kubekms, append(args, "--convergence-timeout", "1s"), func(e rotate.Event) {
		if e.Phase == rotate.PhaseRotated && strings.Contains(e.Message, "waiting") && repointed.IsZero() {
			repointed = h.repoint(ctx, t, haKeyC) // the operator's rotation
		}
	})
	// Stopped waiting for the plugins (or, if all three probed within the
	// second, for the apiservers, whose KMS check reruns at most every 20 s).
	if code != 2 || st == nil || (st.Phase != rotate.PhaseRotated && st.Phase != rotate.PhasePlugins) || st.FromKeyID != ids[0] || repointed.IsZero() {
		t.Fatalf("first run: exit %d, state %+v, %d events\n%s", code, st, len(events), errText)
	}
	if events[0].Phase != rotate.PhasePreflight || !strings.Contains(events[0].Message, "3 plugin(s) healthy and reading each other's data, all 3 apiserver(s)") {
		t.Errorf("preflight event: %+v", events[0])
	}
	events, st, errText, code = rotateRun(ctx, t, b.kubekms, append(args, "--convergence-timeout", "3m"), nil)
	if code != 0 || st == nil || !st.Done() {
		t.Fatalf("resumed run: exit %d, state %+v\n%s", code, st, errText)
	}
	if !strings.Contains(events[0].Message, `resuming the rotation`) {
		t.Errorf("the rerun did not resume: %+v", events[0])
	}
	nowIDs, err := h.keyIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.ToKeyID != nowIDs[0] || st.ToKeyID == st.FromKeyID || st.Stale != 0 || len(st.PluginSeconds) != haNodes || len(st.ApiserverSeconds) != haNodes {
		t.Errorf("final state %+v (plugins report %v)", st, nowIDs)
	}
	if got := h.storedUnder(ctx, t, ns); got[st.ToKeyID] != len(migOnly(h.w.snapshot(), "secrets/")) || len(got) != 1 {
		t.Errorf("after the guided rotation etcd holds %v", got)
	}
	var b2 strings.Builder
	fmt.Fprintf(&b2, "MEASURED guided rotation B -> C (kubekms rotate; seconds after the alias was re-pointed, as the state file records them)\n")
	for _, ep := range slices.Sorted(mapsKeys(st.PluginSeconds)) {
		fmt.Fprintf(&b2, "MEASURED plugin %s: %.1f s\n", ep, st.PluginSeconds[ep])
	}
	for _, a := range slices.Sorted(mapsKeys(st.ApiserverSeconds)) {
		fmt.Fprintf(&b2, "MEASURED apiserver %s: %.1f s\n", a, st.ApiserverSeconds[a])
	}
	fmt.Fprintf(&b2, "MEASURED migrated %d stale objects (Secrets and ConfigMaps); whole rotation %s\n", st.Rewritten, st.Finished.Sub(st.Started).Round(time.Second))
	t.Log("\n" + b2.String())
	h.readEverywhere(ctx, t, h.w.snapshot(), "after the guided rotation")
}

func mapsKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// A rotation to another key leaves every object stale until migrated:
// `kubekms rotate` then refuses to start another (exit 2), and `kubekms
// migrate` on the converged cluster brings it to 0 stale.
func testHASecondRotationRefused(ctx context.Context, t *testing.T, b binaries, h *haCluster, ns string) {
	ids, err := h.keyIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	since := h.repoint(ctx, t, haKeyA)
	_, _, newKeyID, err := h.measureRotation(ctx, since, ids[0])
	if err != nil {
		t.Fatal(err)
	}
	args := append(h.common(), "--etcd-endpoints", strings.Join(h.etcd.Endpoints, ","), "--plugin", h.pluginEndpoints(),
		"--state-file", filepath.Join(t.TempDir(), "rotate-state.json"))
	_, _, errText, code := rotateRun(ctx, t, b.kubekms, args, nil)
	if code != 2 || !strings.Contains(errText, "still stale") || !strings.Contains(errText, "--force") {
		t.Fatalf("a rotation with stale objects: exit %d\n%s", code, errText)
	}
	// --force goes past the stale objects (and then waits for a rotation
	// that does not come, bounded here).
	forced := append(slices.Clone(args[:len(args)-2]), "--state-file", filepath.Join(t.TempDir(), "forced.json"), "--force", "--rotation-timeout", "2s")
	events, st, errText, code := rotateRun(ctx, t, b.kubekms, forced, nil)
	if code != 2 || st == nil || st.Phase != rotate.PhasePreflight || st.Stale == 0 || len(events) == 0 ||
		!strings.Contains(events[0].Message, "preflight ok") || !strings.Contains(errText, "no plugin saw a new key_id") {
		t.Fatalf("a forced rotation with stale objects: exit %d, state %+v\n%s", code, st, errText)
	}
	// A softkey keyring rotated from one node of three: refused before
	// anything changes (the path is never read).
	perNode := append(slices.Clone(args), "--key-uri", "softkey://"+filepath.Join(t.TempDir(), "keyring.json"))
	if _, _, errText, code = rotateRun(ctx, t, b.kubekms, perNode, nil); code != 2 || !strings.Contains(errText, "the cluster has 3 apiservers") {
		t.Fatalf("a per-node softkey rotation on three apiservers: exit %d\n%s", code, errText)
	}
	margs := append([]string{"migrate"}, append(h.common(), "--resources", "secrets,configmaps", "--etcd-endpoints", strings.Join(h.etcd.Endpoints, ","),
		"--plugin", h.pluginEndpoints())...)
	if out, code := migRunCLI(ctx, t, b.kubekms, margs...); code != 0 || !strings.Contains(out, "Check of etcd: 0 stale") {
		t.Fatalf("migrate: exit %d\n%s", code, out)
	}
	if got := h.storedUnder(ctx, t, ns); len(got) != 1 || got[newKeyID] == 0 {
		t.Errorf("etcd holds %v", got)
	}
}

// Writers on every node and cross-node readers run while one plugin is
// killed with SIGKILL (restarted 10 s later) and then the key service is
// down for 10 s: every write the API acknowledged reads back through every
// apiserver afterwards.
func testHAKillUnderLoad(ctx context.Context, t *testing.T, _ binaries, h *haCluster, ns string) {
	load := newWritten()
	var writeOK, writeFail, readOK, readFail atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var namesMu sync.Mutex
	var names []string
	for i, a := range h.apis {
		wg.Go(func() { // writer through node i
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				name := fmt.Sprintf("load-n%d-%d", i+1, j)
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				err := createSecret(cctx, a.Client, load, ns, name, fmt.Sprintf("load-%d-%d-%x", i, j, rand.Uint64()))
				cancel()
				if err != nil {
					writeFail.Add(1)
					continue
				}
				writeOK.Add(1)
				namesMu.Lock()
				names = append(names, name)
				namesMu.Unlock()
				time.Sleep(30 * time.Millisecond)
			}
		})
		wg.Go(func() { // reader through node i of what any node wrote
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
				ok, _ := readBack(cctx, a.Client, map[string]string{"secrets/" + ns + "/" + name: load.get("secrets/" + ns + "/" + name)})
				cancel()
				if ok == 1 {
					readOK.Add(1)
				} else {
					readFail.Add(1)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
	pause := func(d time.Duration) {
		select {
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	pause(3 * time.Second)
	h.plugins[1].Kill9()
	t.Logf("killed the plugin of %s (SIGKILL) after %d writes", h.hosts[1], writeOK.Load())
	pause(10 * time.Second)
	if err := h.plugins[1].Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("restarted it after %d writes", writeOK.Load())
	pause(3 * time.Second)
	h.kms.Stop(t)
	t.Logf("stopped the key service (local-kms) after %d writes", writeOK.Load())
	pause(10 * time.Second)
	h.kms.Start(t)
	t.Logf("started the key service again after %d writes", writeOK.Load())
	pause(5 * time.Second)
	close(stop)
	wg.Wait()
	t.Logf("MEASURED under load: %d writes acknowledged, %d refused; %d cross-node reads ok, %d failed", writeOK.Load(), writeFail.Load(), readOK.Load(), readFail.Load())
	if writeOK.Load() < 100 {
		t.Errorf("only %d writes were acknowledged: the load did not run", writeOK.Load())
	}
	acked := load.snapshot()
	h.readEverywhere(ctx, t, acked, "acknowledged under load")
	for k, v := range acked {
		h.w.add("secrets", ns, strings.TrimPrefix(k, "secrets/"+ns+"/"), v)
	}
	ids, err := h.keyIDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := h.storedUnder(ctx, t, ns)
	if got[ids[0]] != len(migOnly(h.w.snapshot(), "secrets/")) {
		t.Errorf("etcd holds %v, want every Secret under %s", got, ids[0])
	}
}
