//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
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

// TestColdStartEconomics writes N Secrets (-e2e.secrets) across several
// apiserver starts (each a new DEK seed) and two key rotations (each a new
// local KEK), restarts the plugin and the apiserver, and LISTs them all: with
// kubekms, with the no-op KMS v2 plugin (bench/noop -echo: what the
// apiserver's KMS v2 path costs with any plugin), and with the identity and
// aescbc providers (the same N Secrets, the same restart). It prints a
// markdown table.
func TestColdStartEconomics(t *testing.T) {
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), time.Hour)
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
	var kms, noopKMS, ident, aescbc coldStartResult
	t.Run("kubekms", func(t *testing.T) { kms = coldStartKMS(ctx, t, b, n, payload, "") })
	t.Run("noop-plugin", func(t *testing.T) { noopKMS = coldStartKMS(ctx, t, b, n, payload, noop) })
	t.Run("identity", func(t *testing.T) {
		ident = coldStartStatic(ctx, t, b, n, payload, "identity (no encryption)", cluster.Identity)
	})
	t.Run("aescbc", func(t *testing.T) {
		aescbc = coldStartStatic(ctx, t, b, n, payload, "aescbc (static key in the config)", cluster.AESCBC("k1", aesKey))
	})

	var tb strings.Builder
	fmt.Fprintf(&tb, "\n| provider | Secrets | stored DEK seeds | local KEKs | restart to /readyz | apiserver CPU to /readyz | plugin CPU | LIST all Secrets | plugin Decrypt calls | key-service unwrap calls |\n")
	fmt.Fprintf(&tb, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, r := range []coldStartResult{kms, noopKMS, ident, aescbc} {
		if r.name == "" {
			continue
		}
		seeds, keks, plug, dec, unw := "-", "-", "-", "-", "-"
		if r.encrypted {
			seeds, plug = fmt.Sprint(r.seeds), fmt.Sprintf("%.2f s", r.plugCPU.Seconds())
		}
		if r.counted {
			keks, dec, unw = fmt.Sprint(r.localKEKs), fmt.Sprint(r.decrypt), fmt.Sprint(r.unwrap)
		}
		fmt.Fprintf(&tb, "| %s | %d | %s | %s | %.2f s | %.2f s | %s | %d ms (%d items) | %s | %s |\n",
			r.name, r.secrets, seeds, keks, r.ready.Seconds(), r.apiCPU.Seconds(), plug, r.list.Milliseconds(), r.listed, dec, unw)
	}
	if ident.ready > 0 {
		ratio := func(r coldStartResult) string {
			return fmt.Sprintf("%.2fx (CPU %.2fx)", r.ready.Seconds()/ident.ready.Seconds(), r.apiCPU.Seconds()/ident.apiCPU.Seconds())
		}
		fmt.Fprintf(&tb, "\nrestart to /readyz against identity: kubekms %s, no-op plugin %s, aescbc %s\n",
			ratio(kms), ratio(noopKMS), ratio(aescbc))
	}
	t.Logf("MEASURED cold start (%d Secrets of %d bytes, written across %d apiserver starts, median of %d restarts, 2 CPUs, load %s):%s",
		n, len(payload), coldStartRounds, *coldRestarts, loadAvg(), tb.String())
}

// coldStartKMS runs the kms v2 rows: kubekms on softkey, or with noop set
// that no-op plugin binary (-echo: it hands the apiserver's seed back, so no
// local KEKs, no rotation and no metrics).
func coldStartKMS(ctx context.Context, t *testing.T, b binaries, n int, payload []byte, noop string) coldStartResult {
	c := startKMSClusterWith(ctx, t, b, func(p *cluster.Plugin) {
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
	for _, s := range all {
		if strings.HasPrefix(s.Key, "/registry/secrets/"+ns+"/") && (s.Format != "kms-v2:kubekms" || leaks(s.Raw, string(payload))) {
			t.Fatalf("%s: stored as %s or with plaintext", s.Key, s.Format)
		}
	}

	// A cold start of the control plane: the plugin restarts too, so its
	// counters (since process start) cover exactly the apiserver's start.
	// Repeated -e2e.coldstart.restarts times; the median is reported.
	var readies, lists, apiCPUs, plugCPUs []time.Duration
	var list time.Duration
	var listed int
	for range *coldRestarts {
		if err := c.api.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := c.plugin.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := c.plugin.Start(ctx); err != nil {
			t.Fatal(err)
		}
		ready, err := c.api.Start(ctx, c.opts)
		if err != nil {
			t.Fatal(err)
		}
		apiCPUs, plugCPUs = append(apiCPUs, c.api.CPU()), append(plugCPUs, c.plugin.CPU())
		t.Logf("restart: /readyz after %s, apiserver CPU %s, plugin CPU %s", ready.Round(time.Millisecond), apiCPUs[len(apiCPUs)-1], plugCPUs[len(plugCPUs)-1])
		list, listed = listSecrets(ctx, t, c.api.Client, ns, n, payload)
		readies, lists = append(readies, ready), append(lists, list)
	}
	r := coldStartResult{name: "kms v2 (kubekms, softkey)", secrets: n, seeds: seeds, localKEKs: keks,
		ready: median(readies), apiCPU: median(apiCPUs), plugCPU: median(plugCPUs),
		list: median(lists), listed: listed, encrypted: true}
	if noop != "" {
		r.name = "kms v2 (no-op plugin, bench/noop -echo)"
		return r
	}
	d, err := c.plugin.Counts(ctx)
	if err != nil {
		t.Fatal(err)
	}
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
	r.decrypt, r.unwrap, r.counted = d.V2Decrypt, d.Unwrap, true
	return r
}

// coldStartStatic writes the same Secrets with a provider that needs no
// plugin (identity, aescbc), restarts the apiserver and LISTs them.
func coldStartStatic(ctx context.Context, t *testing.T, b binaries, n int, payload []byte, name string, p cluster.Provider) coldStartResult {
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
	var readies, lists, cpus []time.Duration
	var listed int
	for range *coldRestarts {
		ready, err := api.Restart(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		cpus = append(cpus, api.CPU())
		t.Logf("restart: /readyz after %s, apiserver CPU %s", ready.Round(time.Millisecond), cpus[len(cpus)-1])
		var list time.Duration
		list, listed = listSecrets(ctx, t, api.Client, ns, n, payload)
		readies, lists = append(readies, ready), append(lists, list)
	}
	return coldStartResult{name: name, secrets: n, ready: median(readies), apiCPU: median(cpus), list: median(lists), listed: listed}
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
