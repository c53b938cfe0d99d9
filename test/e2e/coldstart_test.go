//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// coldStartRounds is how many apiserver starts the Secrets are written
// across: each start makes a new DEK seed, as in a long-lived cluster.
const coldStartRounds = 4

// coldStartResult is one row of the cold-start table.
type coldStartResult struct {
	name             string
	secrets          int
	seeds, localKEKs int
	ready            time.Duration
	apiCPU, plugCPU  time.Duration // CPU used from process start to /readyz
	list             time.Duration
	listed           int
	decrypt, unwrap  float64
	encrypted        bool // a kms v2 row: seeds and local KEKs are counted
	counted          bool // kubekms: its metrics count the calls
}

// coldTarget is one provider's cluster, written and stopped, ready for cold
// starts: etcd keeps running, the apiserver (and plugin) start only for a
// measurement, so the providers can take turns.
type coldTarget struct {
	row    coldStartResult
	etcd   *cluster.Etcd
	api    *cluster.APIServer
	plugin *cluster.Plugin // nil for identity and aescbc
	opts   cluster.StartOptions
	// check, for kubekms, checks the plugin's counters after a cold start.
	check func(t *testing.T, d cluster.PluginCounts)

	readies, lists, apiCPUs, plugCPUs []time.Duration
}

// TestColdStartEconomics writes N Secrets (-e2e.secrets) across several
// apiserver starts (each a new DEK seed) and two key rotations (each a new
// local KEK), then measures cold starts of the plugin and the apiserver,
// each followed by a LIST of them all: with kubekms (seal format 3, the
// default, and format 2, its wrapped local KEK in an annotation), with the
// no-op KMS v2 plugin (bench/noop -echo: what the apiserver's KMS v2 path
// costs with any plugin), and with the identity and aescbc providers (the
// same N Secrets). Every provider is written first; then the cold starts
// take turns (-e2e.coldstart.restarts rounds, the order rotated each round),
// so a change of the machine's load hits every row alike. It prints a
// markdown table of the medians.
func TestColdStartEconomics(t *testing.T) {
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Hour)
	defer cancel()
	n := *secretsN
	if n < coldStartRounds {
		t.Fatalf("-e2e.secrets=%d: want at least %d", n, coldStartRounds)
	}
	payload := make([]byte, 256)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	aesKey := make([]byte, 32)
	if _, err := rand.Read(aesKey); err != nil {
		t.Fatal(err)
	}
	noop := buildNoopPlugin(t)
	ident := coldStartStatic(ctx, t, b, n, payload, "identity (no encryption)", cluster.Identity)
	targets := []*coldTarget{
		coldStartKMS(ctx, t, b, n, payload, "kms v2 (kubekms, softkey, seal format 3)", ""),
		coldStartKMS(ctx, t, b, n, payload, "kms v2 (kubekms, softkey, --seal-format=2)", "", "--seal-format=2"),
		coldStartKMS(ctx, t, b, n, payload, "kms v2 (no-op plugin, bench/noop -echo)", noop),
		ident,
		coldStartStatic(ctx, t, b, n, payload, "aescbc (static key in the config)", cluster.AESCBC("k1", aesKey)),
	}
	for round := range *coldRestarts {
		for i := range targets {
			c := targets[(round+i)%len(targets)]
			c.coldStart(ctx, t, n, payload)
		}
	}

	var tb strings.Builder
	fmt.Fprintf(&tb, "\n| provider | Secrets | stored DEK seeds | local KEKs | restart to /readyz | apiserver CPU to /readyz | plugin CPU | LIST all Secrets | plugin Decrypt calls | key-service unwrap calls |\n")
	fmt.Fprintf(&tb, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, c := range targets {
		r := c.result()
		seeds, keks, plug, dec, unw := "-", "-", "-", "-", "-"
		if r.encrypted {
			seeds, plug = fmt.Sprint(r.seeds), fmt.Sprintf("%.2f s", r.plugCPU.Seconds())
		}
		if r.counted {
			keks, dec, unw = fmt.Sprint(r.localKEKs), fmt.Sprint(r.decrypt), fmt.Sprint(r.unwrap)
		}
		fmt.Fprintf(&tb, "| %s | %d | %s | %s | %.2f s (%.2f-%.2f) | %.2f s | %s | %d ms (%d items) | %s | %s |\n",
			r.name, r.secrets, seeds, keks, r.ready.Seconds(), slices.Min(c.readies).Seconds(), slices.Max(c.readies).Seconds(),
			r.apiCPU.Seconds(), plug, r.list.Milliseconds(), r.listed, dec, unw)
	}
	base := ident.result()
	fmt.Fprintf(&tb, "\nrestart to /readyz against identity (apiserver CPU in brackets):")
	for _, c := range targets {
		r := c.result()
		fmt.Fprintf(&tb, " %s %.2fx (%.2fx);", r.name, r.ready.Seconds()/base.ready.Seconds(), r.apiCPU.Seconds()/base.apiCPU.Seconds())
	}
	t.Logf("MEASURED cold start (%d Secrets of %d bytes, written across %d apiserver starts, median of %d interleaved restarts, %d CPUs, load %s):%s",
		n, len(payload), coldStartRounds, *coldRestarts, runtime.NumCPU(), loadAvg(), tb.String())
}

// coldStartKMS writes the kms v2 rows' Secrets: kubekms on softkey (with
// extra serve flags), or with noop set that no-op plugin binary (-echo: it
// hands the apiserver's seed back, so no local KEKs, no rotation and no
// metrics). It leaves the apiserver and the plugin stopped.
func coldStartKMS(ctx context.Context, t *testing.T, b binaries, n int, payload []byte, name, noop string, flags ...string) *coldTarget {
	t.Helper()
	c := startKMSClusterWith(ctx, t, b, func(p *cluster.Plugin) {
		p.Args = append(p.Args, flags...)
		if noop != "" {
			p.Wrap = func([]string) []string { return []string{noop, "-listen", p.Endpoint(), "-echo"} }
		}
	})
	const ns = "e2e-cold"
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	for round := range coldStartRounds {
		if round%2 == 1 && noop == "" { // a new remote key version, so a new local KEK
			if err := c.plugin.Rotate(ctx); err != nil {
				t.Fatal(err)
			}
			if err := c.plugin.Stop(); err != nil {
				t.Fatal(err)
			}
			if err := c.plugin.Start(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if round > 0 {
			if _, err := c.api.Restart(ctx, c.opts); err != nil {
				t.Fatal(err)
			}
		}
		lo, hi := round*n/coldStartRounds, (round+1)*n/coldStartRounds
		if err := writeSecrets(ctx, c.api.Client, ns, lo, hi, payload); err != nil {
			t.Fatal(err)
		}
	}
	all := storedEncrypted(ctx, t, c.etcd)
	seeds, keks := seedStats(all)
	wantFormat := byte(3)
	if slices.Contains(flags, "--seal-format=2") {
		wantFormat = 2
	}
	for _, s := range all {
		if !strings.HasPrefix(s.Key, "/registry/secrets/"+ns+"/") {
			continue
		}
		if s.Format != "kms-v2:kubekms" || leaks(s.Raw, string(payload)) {
			t.Fatalf("%s: stored as %s or with plaintext", s.Key, s.Format)
		}
		if src := s.Object.GetEncryptedDEKSource(); noop == "" && (len(src) == 0 || src[0] != wantFormat) {
			t.Fatalf("%s: the encrypted seed is not kubekms seal format %d", s.Key, wantFormat)
		}
	}
	if err := c.api.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := c.plugin.Stop(); err != nil {
		t.Fatal(err)
	}
	ct := &coldTarget{row: coldStartResult{name: name, secrets: n, seeds: seeds, localKEKs: keks, encrypted: true},
		etcd: c.etcd, api: c.api, plugin: c.plugin, opts: c.opts}
	if noop != "" {
		return ct
	}
	ct.row.counted = true
	ct.check = func(t *testing.T, d cluster.PluginCounts) {
		if d.V2Decrypt < 1 || d.V2Decrypt > float64(maxDecryptsPerSeed*seeds) {
			t.Errorf("cold start made %v Decrypt calls for %d stored seeds: want between 1 and %d per seed", d.V2Decrypt, seeds, maxDecryptsPerSeed)
		}
		if d.V2Decrypt >= float64(n) {
			t.Errorf("cold start made %v Decrypt calls for %d Secrets: the apiserver should decrypt seeds, not objects", d.V2Decrypt, n)
		}
		if d.Unwrap < 1 || d.Unwrap > float64(keks) {
			t.Errorf("restarted plugin made %v key-service unwrap calls for %d local KEKs: want at least one and at most one per local KEK", d.Unwrap, keks)
		}
		if d.Failed != 0 {
			t.Errorf("plugin answered %v calls with an error code", d.Failed)
		}
	}
	return ct
}

// coldStartStatic writes the same Secrets with a provider that needs no
// plugin (identity, aescbc) and leaves the apiserver stopped.
func coldStartStatic(ctx context.Context, t *testing.T, b binaries, n int, payload []byte, name string, p cluster.Provider) *coldTarget {
	t.Helper()
	etcd, err := cluster.StartEtcd(ctx, t, b.etcd)
	if err != nil {
		t.Fatal(err)
	}
	api, err := cluster.NewAPIServer(t, b.apiserver, etcd.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	opts := cluster.StartOptions{EncryptionConfig: cluster.EncryptionConfig(p)}
	if _, err := api.Start(ctx, opts); err != nil {
		t.Fatal(err)
	}
	const ns = "e2e-cold"
	if err := ensureNamespace(ctx, api.Client, ns); err != nil {
		t.Fatal(err)
	}
	if err := writeSecrets(ctx, api.Client, ns, 0, n, payload); err != nil {
		t.Fatal(err)
	}
	if err := api.Stop(); err != nil {
		t.Fatal(err)
	}
	return &coldTarget{row: coldStartResult{name: name, secrets: n}, etcd: etcd, api: api, opts: opts}
}

// coldStart starts the plugin (its counters then cover exactly this start)
// and the apiserver, waits for /readyz (every watch cache filled: all N
// Secrets read and decrypted), LISTs the Secrets, and stops both again.
func (c *coldTarget) coldStart(ctx context.Context, t *testing.T, n int, payload []byte) {
	t.Helper()
	if c.plugin != nil {
		if err := c.plugin.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	ready, err := c.api.Start(ctx, c.opts)
	if err != nil {
		t.Fatal(err)
	}
	c.readies, c.apiCPUs = append(c.readies, ready), append(c.apiCPUs, c.api.CPU())
	var plugCPU time.Duration
	if c.plugin != nil {
		plugCPU = c.plugin.CPU()
		c.plugCPUs = append(c.plugCPUs, plugCPU)
	}
	t.Logf("%s: /readyz after %s, apiserver CPU %s, plugin CPU %s (load %s)", c.row.name, ready.Round(time.Millisecond),
		c.apiCPUs[len(c.apiCPUs)-1], plugCPU, loadAvg())
	list, listed := listSecrets(ctx, t, c.api.Client, "e2e-cold", n, payload)
	c.lists, c.row.listed = append(c.lists, list), listed
	if c.check != nil {
		d, err := c.plugin.Counts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		c.check(t, d)
		c.row.decrypt, c.row.unwrap = max(c.row.decrypt, d.V2Decrypt), max(c.row.unwrap, d.Unwrap)
	}
	if err := c.api.Stop(); err != nil {
		t.Fatal(err)
	}
	if c.plugin != nil {
		if err := c.plugin.Stop(); err != nil {
			t.Fatal(err)
		}
	}
}

// result is the row with the medians of the cold starts so far.
func (c *coldTarget) result() coldStartResult {
	r := c.row
	r.ready, r.apiCPU, r.list = median(c.readies), median(c.apiCPUs), median(c.lists)
	if len(c.plugCPUs) > 0 {
		r.plugCPU = median(c.plugCPUs)
	}
	return r
}

var coldRestarts = flag.Int("e2e.coldstart.restarts", 1, "TestColdStartEconomics: cold starts per provider (the median is reported)")

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// writeSecrets creates Secrets cold-lo .. cold-(hi-1) with 8 writers.
func writeSecrets(ctx context.Context, c kubernetes.Interface, ns string, lo, hi int, payload []byte) error {
	idx := make(chan int)
	errs := make(chan error, 8)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				_, err := c.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cold-%d", i)},
					Data:       map[string][]byte{"payload": payload},
				}, metav1.CreateOptions{})
				if err != nil {
					errs <- fmt.Errorf("create secret cold-%d: %w", i, err)
					return
				}
			}
		}()
	}
	var err error
feed:
	for i := lo; i < hi; i++ {
		select {
		case idx <- i:
		case err = <-errs:
			break feed
		}
	}
	close(idx)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return err
}

// listSecrets LISTs the namespace once, timed, and checks every item.
func listSecrets(ctx context.Context, t *testing.T, c kubernetes.Interface, ns string, n int, payload []byte) (time.Duration, int) {
	t.Helper()
	start := time.Now()
	l, err := c.CoreV1().Secrets(ns).List(ctx, metav1.ListOptions{})
	took := time.Since(start)
	if err != nil {
		t.Fatalf("list secrets: %v", err)
	}
	if len(l.Items) != n {
		t.Errorf("LIST returned %d Secrets, want %d", len(l.Items), n)
	}
	for _, s := range l.Items {
		if string(s.Data["payload"]) != string(payload) {
			t.Errorf("secret %s: payload differs from what was written", s.Name)
			break
		}
	}
	return took, len(l.Items)
}
