//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/procstat"
	"github.com/kubekms/kubekms/internal/testutil"
)

var scaleN = flag.Int("e2e.scale", 0, "TestScaleTools: Secrets to write (0: skip the test; docs/performance.md uses 100000)")

// run is one timed command: wall time, CPU time and peak RSS from wait4
// (with the pages of a mapped snapshot file), and the peak of its anonymous
// memory (heap and stacks: what it holds itself), sampled.
type run struct {
	wall, cpu  time.Duration
	maxRSSKiB  int64
	maxAnonKiB int64
	out        string
}

func (r run) String() string {
	return fmt.Sprintf("%.1f s wall, %.1f s CPU, peak RSS %.0f MiB (anonymous %.0f MiB)", r.wall.Seconds(), r.cpu.Seconds(),
		float64(r.maxRSSKiB)/1024, float64(r.maxAnonKiB)/1024)
}

func usage(ps *os.ProcessState) (time.Duration, int64) {
	ru, ok := ps.SysUsage().(*syscall.Rusage)
	if !ok {
		return 0, 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), ru.Maxrss
}

// timed runs bin with args, bounded in time, and fails t unless it exits 0.
func timed(ctx context.Context, t *testing.T, bin string, args ...string) run {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	anon := procstat.SampleAnon(cmd.Process.Pid, 20*time.Millisecond)
	err := cmd.Wait()
	r := run{wall: time.Since(start), maxAnonKiB: anon.Stop(), out: out.String()}
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, tailOf(r.out))
	}
	r.cpu, r.maxRSSKiB = usage(cmd.ProcessState)
	return r
}

func tailOf(s string) string {
	if len(s) > 3000 {
		return "..." + s[len(s)-3000:]
	}
	return s
}

// TestScaleTools measures the operator tools on N Secrets (-e2e.scale) of a
// real cluster: inventory and decrypt of an etcd snapshot, then, after a key
// rotation each, `kubekms migrate` against the documented upstream way
// (`kubectl get secrets -A -o json | kubectl replace -f -`) on the same
// cluster. It prints a table. kubectl comes from `hack/cluster-bins.sh
// kubectl` (or KUBECTL=).
func TestScaleTools(t *testing.T) {
	n := *scaleN
	if n == 0 {
		t.Skip("opt-in measurement: -e2e.scale=N (docs/performance.md)")
	}
	b := needBinaries(t)
	kubectl := testutil.Binary(t, "KUBECTL", "kubectl")
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Hour)
	defer cancel()
	c := startKMSCluster(ctx, t, b)
	const ns = "e2e-scale"
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 256)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := writeSecrets(ctx, c.api.Client, ns, 0, n, payload); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %d Secrets in %s", n, time.Since(start).Round(time.Second))

	snap := filepath.Join(t.TempDir(), "etcd.db")
	rc, err := c.etcd.Client.Snapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(snap)
	if err != nil {
		t.Fatal(err)
	}
	size, err := io.Copy(f, rc)
	rc.Close()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}

	var tb strings.Builder
	fmt.Fprintf(&tb, "\n| what | %d Secrets | throughput |\n|---|---|---:|\n", n)
	row := func(format string, args ...any) { // logged at once too: a later failure keeps the rows measured
		line := fmt.Sprintf(format, args...)
		t.Logf("MEASURED row: %s", strings.TrimSpace(line))
		tb.WriteString(line)
	}
	inv := timed(ctx, t, b.kubekms, "inventory", "--snapshot", snap, "--plugin", c.plugin.Endpoint(), "-o", "json")
	if !strings.Contains(inv.out, fmt.Sprintf(`"objects": %d`, n)) && !strings.Contains(inv.out, fmt.Sprintf(`"objects":%d`, n)) {
		t.Errorf("inventory does not count %d objects:\n%s", n, tailOf(inv.out))
	}
	row("| `kubekms inventory --snapshot` (%d MB, headers only) | %s | %.0f keys/s, %.0f keys per CPU-s |\n",
		size>>20, inv, float64(n)/inv.wall.Seconds(), float64(n)/inv.cpu.Seconds())
	dir := filepath.Join(t.TempDir(), "recovered")
	dec := timed(ctx, t, b.kubekms, "decrypt", "--snapshot", snap, "--plugin", c.plugin.Endpoint(),
		"--resource", "secrets", "--namespace", ns, "--output-dir", dir)
	if got := countFiles(t, dir); got != n {
		t.Errorf("decrypt recovered %d manifests, want %d", got, n)
	}
	row("| `kubekms decrypt --snapshot --plugin` (to YAML files) | %s | %.0f objects/s |\n", dec, float64(n)/dec.wall.Seconds())

	// migrate: every Secret is stale after a rotation.
	w := newWritten()
	_, newKeyID := migRotate(ctx, t, c, w, ns)
	revs := migModRevisions(ctx, t, c, "/registry/secrets/"+ns+"/")
	mig := timed(ctx, t, b.kubekms, "migrate", "--kubeconfig", migKubeconfig(t, c), "--apiservers", c.api.Config.Host, "--resources", "secrets",
		"--etcd-endpoints", c.etcd.Endpoint, "--plugin", c.plugin.Endpoint(), "--qps", "0")
	migWrites := len(migChanged(revs, migModRevisions(ctx, t, c, "/registry/secrets/"+ns+"/")))
	if left := migStale(ctx, t, c, "/registry/secrets/"+ns+"/", newKeyID); len(left) > 0 {
		t.Errorf("%d Secrets stale after kubekms migrate", len(left))
	}
	rewritten := regexp.MustCompile(`Rewritten \d+, unchanged \d+`).FindString(mig.out)
	row("| `kubekms migrate` (etcd plan, 4 at once, no rate limit) | %s; %s; %d etcd writes | %.0f objects/s |\n",
		mig, rewritten, migWrites, float64(n)/mig.wall.Seconds())

	// kubectl: the same after the next rotation (its probe Secrets in a
	// namespace of their own: the first rotation's probes keep their names).
	const probeNS = ns + "-probes"
	if err := ensureNamespace(ctx, c.api.Client, probeNS); err != nil {
		t.Fatal(err)
	}
	_, newKeyID = migRotate(ctx, t, c, w, probeNS)
	revs = migModRevisions(ctx, t, c, "/registry/secrets/"+ns+"/")
	get, repl := kubectlReplace(ctx, t, kubectl, migKubeconfig(t, c))
	kcWrites := len(migChanged(revs, migModRevisions(ctx, t, c, "/registry/secrets/"+ns+"/")))
	if left := migStale(ctx, t, c, "/registry/secrets/"+ns+"/", newKeyID); len(left) > 0 {
		t.Errorf("%d Secrets stale after kubectl replace", len(left))
	}
	wall := max(get.wall, repl.wall)
	row("| `kubectl get secrets -A -o json \\| kubectl replace -f -` | %.1f s wall; get: %.1f s CPU, peak RSS %.0f MiB (anonymous %.0f); replace: %.1f s CPU, peak RSS %.0f MiB (anonymous %.0f); %d etcd writes | %.0f objects/s |\n",
		wall.Seconds(), get.cpu.Seconds(), float64(get.maxRSSKiB)/1024, float64(get.maxAnonKiB)/1024,
		repl.cpu.Seconds(), float64(repl.maxRSSKiB)/1024, float64(repl.maxAnonKiB)/1024, kcWrites, float64(n)/wall.Seconds())
	t.Logf("MEASURED operator tools at scale (%d Secrets of %d bytes, 2 CPUs, load %s):%s", n, len(payload), loadAvg(), tb.String())
}

// kubectlReplace runs `kubectl get secrets -A -o json | kubectl replace -f -`.
func kubectlReplace(ctx context.Context, t *testing.T, kubectl, kubeconfig string) (get, repl run) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Hour)
	defer cancel()
	g := exec.CommandContext(ctx, kubectl, "--kubeconfig", kubeconfig, "get", "secrets", "-A", "-o", "json")
	r := exec.CommandContext(ctx, kubectl, "--kubeconfig", kubeconfig, "replace", "-f", "-")
	pipe, err := g.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	r.Stdin = pipe
	var gErr, rOut strings.Builder
	g.Stderr = &gErr
	r.Stdout, r.Stderr = &rOut, &rOut
	start := time.Now()
	if err := g.Start(); err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	gAnon, rAnon := procstat.SampleAnon(g.Process.Pid, 20*time.Millisecond), procstat.SampleAnon(r.Process.Pid, 20*time.Millisecond)
	gw := g.Wait()
	get.wall, get.maxAnonKiB = time.Since(start), gAnon.Stop()
	rw := r.Wait()
	repl.wall, repl.maxAnonKiB = time.Since(start), rAnon.Stop()
	if gw != nil || rw != nil {
		t.Fatalf("kubectl get | kubectl replace: %v, %v\n%s\n%s", gw, rw, gErr.String(), tailOf(rOut.String()))
	}
	get.cpu, get.maxRSSKiB = usage(g.ProcessState)
	repl.cpu, repl.maxRSSKiB = usage(r.ProcessState)
	return get, repl
}

func countFiles(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			n++
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}
