//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/testservers/localkms"
	"github.com/kubekms/kubekms/internal/testservers/softhsm"
	"github.com/kubekms/kubekms/internal/testservers/swtpm"
	"github.com/kubekms/kubekms/keyservice/tpm"
	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// What kube-apiserver 1.37 does with a plugin's answers (k8s.io/apiserver
// v0.37.2, encryptionconfig/config.go): every Status whose key_id equals the
// write seed's extends the seed's write lifetime to now + 3 min; a failed
// Status is retried every 10 s. kubekms's probe loop runs every 20 s by
// default; a softkey change on this node is seen at once (the keyring is
// watched).
const (
	apiserverWriteTTL    = 3 * time.Minute
	apiserverFailedRetry = 10 * time.Second
	defaultProbeLoop     = hierarchy.DefaultProbeInterval
	// slack covers process scheduling on a loaded 2-core machine and the
	// writer's own 1 s period.
	slack = 15 * time.Second
)

// TestRevocation runs the revocation and outage scenarios, each on its own
// cluster, in parallel (each waits out the apiserver's 3-minute write TTL).
func TestRevocation(t *testing.T) {
	b := needBinaries(t)
	for _, kb := range revocableBackends() {
		t.Run("revoke and re-enable/"+kb.name, func(t *testing.T) { t.Parallel(); testRevokeReEnable(t, b, kb) })
	}
	for _, vb := range versionedBackends() {
		t.Run("revoke an old version only/"+vb.name, func(t *testing.T) { t.Parallel(); testRevokeOldVersion(t, b, vb) })
	}
	for _, ob := range outageBackends() {
		t.Run("outage longer than the write TTL/"+ob.name, func(t *testing.T) { t.Parallel(); testOutageInGrace(t, b, ob) })
	}
}

// startCluster starts etcd, the plugin p (already configured) and an
// apiserver using it, with a "kubelet" that asks /readyz every second as
// kubeadm's readiness probe does (each ask may run the KMS check, cached
// 20 s when ok and 3 s when failing).
func startCluster(ctx context.Context, t *testing.T, b binaries, p *cluster.Plugin) *kmsCluster {
	t.Helper()
	etcd, err := cluster.StartEtcd(ctx, t, b.etcd)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(ctx); err != nil {
		t.Fatal(err)
	}
	api, err := cluster.NewAPIServer(t, b.apiserver, etcd.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	c := &kmsCluster{etcd: etcd, plugin: p, api: api,
		// Secrets only, so an apiserver started while the key is revoked still
		// finishes its own start-up writes (ConfigMaps in kube-system).
		opts: renderedOptions(t, p, "secrets")}
	if c.ready, err = api.Start(ctx, c.opts); err != nil {
		t.Fatal(err)
	}
	kctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for kctx.Err() == nil {
			_, _, _ = api.Get(kctx, "/readyz")
			select {
			case <-kctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

// writer creates a Secret every second and records when each create was
// acknowledged or refused.
type writer struct {
	c    *kmsCluster
	ns   string
	w    *written
	stop chan struct{}
	done chan struct{}

	mu     sync.Mutex
	events []writeEvent
}

type writeEvent struct {
	at  time.Time
	err error
}

func startWriter(ctx context.Context, t *testing.T, c *kmsCluster, ns string, w *written) *writer {
	t.Helper()
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	wr := &writer{c: c, ns: ns, w: w, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(wr.done)
		for i := 0; ; i++ {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			err := createSecret(cctx, c.api.Client, w, ns, fmt.Sprintf("w-%d", i), fmt.Sprintf("value-%d-%x", i, rand.Uint64()))
			cancel()
			wr.mu.Lock()
			wr.events = append(wr.events, writeEvent{time.Now(), err})
			wr.mu.Unlock()
			select {
			case <-wr.stop:
				return
			case <-time.After(time.Second):
			}
		}
	}()
	t.Cleanup(wr.close)
	return wr
}

func (wr *writer) close() {
	select {
	case <-wr.stop:
	default:
		close(wr.stop)
	}
	<-wr.done
}

// waitFor returns the first write event after since whose outcome is ok
// (refused=false) or refused (refused=true), waiting up to bound.
func (wr *writer) waitFor(t *testing.T, since time.Time, refused bool, bound time.Duration) (writeEvent, bool) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		wr.mu.Lock()
		for _, e := range wr.events {
			if e.at.After(since) && (e.err != nil) == refused {
				wr.mu.Unlock()
				return e, true
			}
		}
		wr.mu.Unlock()
		if time.Now().After(deadline) {
			return writeEvent{}, false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// outcomes counts acknowledged and refused writes in [from, to).
func (wr *writer) outcomes(from, to time.Time) (ok, refused int, firstErr error) {
	wr.mu.Lock()
	defer wr.mu.Unlock()
	for _, e := range wr.events {
		if e.at.Before(from) || !e.at.Before(to) {
			continue
		}
		if e.err != nil {
			refused++
			if firstErr == nil {
				firstErr = e.err
			}
		} else {
			ok++
		}
	}
	return ok, refused, firstErr
}

// waitPluginKeyID waits until the plugin's Status reports keyID (or, with
// not=true, anything else) and returns when it did.
func waitPluginKeyID(ctx context.Context, t *testing.T, p *cluster.Plugin, keyID string, not bool, bound time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		st, err := p.Status(ctx)
		if err == nil && (st.KeyId == keyID) != not {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin Status did not report key_id %s%q within %s (last: %+v, %v)", map[bool]string{true: "other than "}[not], keyID, bound, st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// revocableBackend is a key service whose key an operator can revoke (and,
// where the service allows, enable again) while kubekms runs on it.
type revocableBackend struct {
	name string
	// setup configures p (key URI, flags, environment) and returns the
	// operator's revoke and enable actions (enable nil: revocation is final).
	setup func(t *testing.T, p *cluster.Plugin) (revoke, enable func(ctx context.Context) error)
	// detect bounds how long kubekms takes to see the change.
	detect time.Duration
}

func revocableBackends() []revocableBackend {
	return append([]revocableBackend{
		{name: "softkey", detect: defaultProbeLoop, setup: func(t *testing.T, p *cluster.Plugin) (func(context.Context) error, func(context.Context) error) {
			return func(ctx context.Context) error { return p.Softkey(ctx, "disable", "--all") },
				func(ctx context.Context) error { return p.Softkey(ctx, "enable", "--all") }
		}},
		{name: "awskms DisableKey", detect: defaultProbeLoop, setup: func(t *testing.T, p *cluster.Plugin) (func(context.Context) error, func(context.Context) error) {
			const key = "4b9d2e61-7a3c-4f58-9e1d-2c6b8a0f3e47"
			srv := localkms.Start(t, localkms.Seed{AESKeys: []string{key}})
			onLocalKMS(t, p, srv, key)
			admin := srv.AdminClient()
			return func(ctx context.Context) error {
					_, err := admin.DisableKey(ctx, &kms.DisableKeyInput{KeyId: aws.String(key)})
					return err
				}, func(ctx context.Context) error {
					_, err := admin.EnableKey(ctx, &kms.EnableKeyInput{KeyId: aws.String(key)})
					return err
				}
		}},
		{name: "pkcs11 key deleted", detect: defaultProbeLoop, setup: func(t *testing.T, p *cluster.Plugin) (func(context.Context) error, func(context.Context) error) {
			tk := softhsm.StartForProcesses(t)
			tk.Keygen(softhsm.KeyLabel)
			p.KeyURI = tk.URI(";object="+softhsm.KeyLabel, "")
			p.Args = append(p.Args, "--cluster-name", "e2e-revocation")
			p.Env = append(p.Env, tk.Env()...)
			return func(context.Context) error { tk.DeleteAll(); return nil }, nil
		}},
		{name: "tpm PCR policy broken", detect: defaultProbeLoop, setup: func(t *testing.T, p *cluster.Plugin) (func(context.Context) error, func(context.Context) error) {
			// A real swtpm; the key is bound to PCR 16 (the debug PCR, which
			// locality 0 may reset): extending it is what a changed boot
			// chain does to PCR 7, resetting it undoes that.
			tp := swtpm.Start(t)
			p.KeyURI = "tpm://" + tp.Socket() + "?handle=0x81000100-0x8100010f&pcrs=16"
			if _, err := tpm.Provision(context.Background(), p.KeyURI, "e2e"); err != nil {
				t.Fatalf("provision the TPM key: %v", err)
			}
			return func(context.Context) error {
					tp.Tool(t, "tpm2_pcrextend", "16:sha256="+strings.Repeat("ab", 32))
					return nil
				},
				func(context.Context) error { tp.Tool(t, "tpm2_pcrreset", "16"); return nil }
		}},
	}, vaultRevocableBackends()...)
}

// versionedBackend is a key service that can revoke an old key version
// while the current one stays usable.
type versionedBackend struct {
	name string
	// setup configures p and returns the operator's rotation and the
	// revocation of version 1 (the version before the first rotation).
	setup func(t *testing.T, p *cluster.Plugin) (rotate, revokeV1 func(ctx context.Context) error)
}

func versionedBackends() []versionedBackend {
	return append([]versionedBackend{
		{name: "softkey disable --version 1", setup: func(t *testing.T, p *cluster.Plugin) (func(context.Context) error, func(context.Context) error) {
			return func(ctx context.Context) error { return p.Softkey(ctx, "rotate") },
				func(ctx context.Context) error { return p.Softkey(ctx, "disable", "--version", "1") }
		}},
	}, vaultVersionedBackends()...)
}

// onLocalKMS points p at key in local-kms: the plugin runs in the server's
// private network namespace, its socket (a file) is reachable from here.
func onLocalKMS(t *testing.T, p *cluster.Plugin, srv *localkms.Server, key string) {
	t.Helper()
	p.KeyURI = "awskms:///" + localkms.KeyARN(key) + "?endpoint=" + srv.Endpoint()
	p.Args = append(p.Args, "--cluster-name", "e2e-"+strings.ReplaceAll(strings.ToLower(t.Name()), "/", "-"))
	p.Env = append(p.Env, localkms.ClientEnv(filepath.Join(t.TempDir(), "no-aws-config"))...)
	ns := srv.NetNS()
	p.Wrap = func(cmd []string) []string { return append([]string{"nsenter", "--net=" + ns, "--"}, cmd...) }
}

// testRevokeReEnable: an operator's revocation (softkey disable --all, AWS
// DisableKey, deleting the HSM key, breaking a TPM key's PCR policy) stops
// the apiserver's writes within the bound; re-enabling resumes them with no
// restart; an apiserver restarted while the key is revoked cannot read what
// is under it, and can again once the key is enabled.
func testRevokeReEnable(t *testing.T, b binaries, kb revocableBackend) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	p, err := cluster.NewPlugin(t, b.kubekms)
	if err != nil {
		t.Fatal(err)
	}
	revoke, enable := kb.setup(t, p)
	c := startCluster(ctx, t, b, p)
	const ns = "revoke"
	acked := newWritten()
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if err := createSecret(ctx, c.api.Client, acked, ns, fmt.Sprintf("pre-%d", i), fmt.Sprintf("pre-value-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	st, err := p.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	keyID := st.KeyId
	wr := startWriter(ctx, t, c, ns, acked)
	time.Sleep(3 * time.Second)

	// Revoke.
	revoked := time.Now()
	if err := revoke(ctx); err != nil {
		t.Fatal(err)
	}
	seen := waitPluginKeyID(ctx, t, p, hierarchy.StoppedKeyID, false, kb.detect+slack)
	bound := kb.detect + apiserverWriteTTL + slack
	stopped, ok := wr.waitFor(t, revoked, true, bound+time.Minute)
	if !ok {
		t.Fatalf("the apiserver still accepted writes %s after the key was revoked (bound %s)", bound+time.Minute, bound)
	}
	t.Logf("MEASURED %s revocation: plugin reported %q after %.1f s; first refused write after %.1f s (bound %s = detection %s + apiserver write TTL %s + slack %s): %v",
		kb.name, hierarchy.StoppedKeyID, seen.Sub(revoked).Seconds(), stopped.at.Sub(revoked).Seconds(), bound, kb.detect, apiserverWriteTTL, slack, stopped.err)
	if d := stopped.at.Sub(revoked); d > bound {
		t.Errorf("writes stopped %.1f s after revocation, over the bound %s", d.Seconds(), bound)
	}
	if !strings.Contains(stopped.err.Error(), "expired") && !strings.Contains(stopped.err.Error(), "Internal") {
		t.Logf("refused write's error: %v", stopped.err)
	}
	time.Sleep(5 * time.Second)
	if okAfter, _, _ := wr.outcomes(stopped.at.Add(time.Second), time.Now()); okAfter != 0 {
		t.Errorf("%d writes were acknowledged after the first refusal while the key stayed revoked", okAfter)
	}
	// Honestly: the running apiserver still serves reads from the seeds it
	// has cached (and its watch cache), without asking the plugin.
	if okReads, problems := readBack(ctx, c.api.Client, map[string]string{"secrets/" + ns + "/pre-0": "pre-value-0"}); okReads != 1 {
		t.Logf("while revoked, a running apiserver's cached read failed: %v", problems)
	} else {
		t.Logf("MEASURED while revoked, the running apiserver still reads objects whose seed it cached (its own cache)")
	}

	if enable == nil {
		// Revocation is final (a deleted HSM key): a restarted apiserver
		// reads nothing under it.
		wr.close()
		restartRevoked(ctx, t, c, acked.snapshot())
		return
	}

	// Re-enable: writes resume on their own.
	enabled := time.Now()
	if err := enable(ctx); err != nil {
		t.Fatal(err)
	}
	waitPluginKeyID(ctx, t, p, keyID, false, kb.detect+slack)
	resumeBound := kb.detect + apiserverFailedRetry + slack
	resumed, ok := wr.waitFor(t, enabled, false, resumeBound+time.Minute)
	if !ok {
		t.Fatalf("writes did not resume within %s of re-enabling the key", resumeBound+time.Minute)
	}
	t.Logf("MEASURED %s re-enable: first acknowledged write after %.1f s (bound %s = detection + apiserver retry %s + slack)",
		kb.name, resumed.at.Sub(enabled).Seconds(), resumeBound, apiserverFailedRetry)
	if d := resumed.at.Sub(enabled); d > resumeBound {
		t.Errorf("writes resumed %.1f s after re-enabling, over the bound %s", d.Seconds(), resumeBound)
	}
	time.Sleep(3 * time.Second)
	wr.close()

	// Revoke, then restart the apiserver: nothing under the key reads.
	if err := revoke(ctx); err != nil {
		t.Fatal(err)
	}
	waitPluginKeyID(ctx, t, p, hierarchy.StoppedKeyID, false, kb.detect+slack)
	all := acked.snapshot()
	restartRevoked(ctx, t, c, all)
	enabled = time.Now()
	if err := enable(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(resumeBound + time.Minute)
	for {
		if okReads, _ := readBack(ctx, c.api.Client, all); okReads == len(all) {
			break
		}
		if time.Now().After(deadline) {
			requireReadBack(ctx, t, c.api.Client, all, "after re-enabling the key")
			t.Fatal("objects did not read again after re-enabling the key")
		}
		time.Sleep(time.Second)
	}
	t.Logf("MEASURED after re-enabling: all %d acknowledged objects read again after %.1f s, with no restart", len(all), time.Since(enabled).Seconds())
	if err := createSecret(ctx, c.api.Client, acked, ns, "after-enable", "y"); err != nil {
		t.Errorf("write after re-enabling: %v", err)
	}
}

// restartRevoked restarts the apiserver while the key is revoked: none of
// objs reads and no write is accepted.
func restartRevoked(ctx context.Context, t *testing.T, c *kmsCluster, objs map[string]string) {
	t.Helper()
	restartOpts := c.opts
	restartOpts.WaitPath = "/livez?exclude=kms-providers"
	if _, err := c.api.Restart(ctx, restartOpts); err != nil {
		t.Fatal(err)
	}
	if okReads, _ := readBack(ctx, c.api.Client, objs); okReads != 0 {
		t.Errorf("after an apiserver restart with the key revoked, %d of %d objects under it still read", okReads, len(objs))
	} else {
		t.Logf("MEASURED after an apiserver restart with the key revoked: 0 of %d objects read", len(objs))
	}
	if err := createSecret(ctx, c.api.Client, newWritten(), "default", "while-revoked", "x"); err == nil {
		t.Error("a restarted apiserver wrote under a revoked key")
	}
}

// testRevokeOldVersion: revoking only an old key version (softkey disable
// --version, Vault's min_decryption_version) leaves writes going (past the
// apiserver's 3-minute TTL); after an apiserver restart the objects under the
// old version are unreadable, the others read.
func testRevokeOldVersion(t *testing.T, b binaries, vb versionedBackend) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	p, err := cluster.NewPlugin(t, b.kubekms)
	if err != nil {
		t.Fatal(err)
	}
	rotate, revokeV1 := vb.setup(t, p)
	c := startCluster(ctx, t, b, p)
	const ns = "old-version"
	old, current := newWritten(), newWritten()
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if err := createSecret(ctx, c.api.Client, old, ns, fmt.Sprintf("v1-%d", i), fmt.Sprintf("v1-value-%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	st, err := p.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v1 := st.KeyId
	if err := rotate(ctx); err != nil {
		t.Fatal(err)
	}
	waitPluginKeyID(ctx, t, p, v1, true, defaultProbeLoop+slack)
	st, err = p.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	v2 := st.KeyId
	// Wait until the apiserver writes under v2 (its next Status poll).
	rotated := time.Now()
	for i := 0; ; i++ {
		name := fmt.Sprintf("probe-%d", i)
		probe := newWritten()
		if err := createSecret(ctx, c.api.Client, probe, ns, name, "probe"); err != nil {
			t.Fatal(err)
		}
		stored, err := c.etcd.ReadStored(ctx, "/registry/secrets/"+ns+"/"+name)
		if err != nil {
			t.Fatal(err)
		}
		under := old
		if len(stored) == 1 && stored[0].KeyID() == v2 {
			under = current
		}
		under.add("secrets", ns, name, "probe")
		if under == current {
			break
		}
		if time.Since(rotated) > 2*time.Minute {
			t.Fatalf("the apiserver did not write under %s within 2 min of the rotation", v2)
		}
		time.Sleep(time.Second)
	}
	t.Logf("MEASURED %s: the apiserver wrote under the new key_id %.1f s after the rotation", vb.name, time.Since(rotated).Seconds())

	if err := revokeV1(ctx); err != nil {
		t.Fatal(err)
	}
	disabled := time.Now()
	wr := startWriter(ctx, t, c, ns, current)
	time.Sleep(apiserverWriteTTL + 30*time.Second)
	wr.close()
	okWrites, refused, firstErr := wr.outcomes(disabled, time.Now())
	t.Logf("MEASURED %s: %d writes acknowledged, %d refused over %.0f s (past the apiserver's %s write TTL)",
		vb.name, okWrites, refused, time.Since(disabled).Seconds(), apiserverWriteTTL)
	if refused != 0 || okWrites == 0 {
		t.Errorf("disabling only the old version stopped writes: %d refused (first: %v), %d acknowledged", refused, firstErr, okWrites)
	}
	if st, err := p.Status(ctx); err != nil || st.Healthz != "ok" || st.KeyId != v2 {
		t.Errorf("plugin Status with only an old version disabled: %+v %v, want ok under %s", st, err, v2)
	}
	// Objects under the disabled version stay in etcd: the restarted
	// apiserver's Secrets watch cache cannot list them, so its /readyz stays
	// failing on informer-sync (migrate before disabling an old version).
	restartOpts := c.opts
	restartOpts.WaitPath = "/livez"
	if _, err := c.api.Restart(ctx, restartOpts); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Second)
	code, body, _ := c.api.Get(ctx, "/readyz")
	t.Logf("MEASURED %s, after a restart with objects under the revoked old version in etcd: /readyz %d %s", vb.name, code, firstFailing(body))
	if okReads, _ := readBack(ctx, c.api.Client, old.snapshot()); okReads != 0 {
		t.Errorf("after a restart, %d of %d objects under the disabled old version still read", okReads, len(old.snapshot()))
	}
	requireReadBack(ctx, t, c.api.Client, current.snapshot(), "objects under the current version, after a restart")
}

// firstFailing returns the failing checks of a /readyz or /livez answer.
func firstFailing(body string) string {
	var bad []string
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "[-]") {
			bad = append(bad, l)
		}
	}
	return strings.Join(bad, "; ")
}

// outageBackend is a key service that can be made unavailable (not
// revoked) while kubekms runs on it.
type outageBackend struct {
	name string
	// setup configures p and returns how the key service goes away and
	// comes back.
	setup func(t *testing.T, p *cluster.Plugin) (down, up func(t testing.TB))
}

func outageBackends() []outageBackend {
	return append([]outageBackend{
		{name: "awskms hung (local-kms SIGSTOP)", setup: func(t *testing.T, p *cluster.Plugin) (func(testing.TB), func(testing.TB)) {
			const keyA = "7f3a9c42-5d6e-4f70-8192-a3b4c5d6e7f8"
			srv := localkms.Start(t, localkms.Seed{AESKeys: []string{keyA}})
			onLocalKMS(t, p, srv, keyA)
			return func(t testing.TB) {
				if _, err := srv.AdminClient().DescribeKey(t.Context(), &kms.DescribeKeyInput{KeyId: aws.String(keyA)}); err != nil {
					t.Fatal(err)
				}
				srv.Pause(t)
			}, srv.Resume
		}},
	}, vaultOutageBackends()...)
}

// testOutageInGrace: the key service stops answering (SIGSTOP, so every call
// hangs) or refuses service (a sealed Vault) for longer than the apiserver's
// 3-minute write TTL but inside the outage grace: no write, read or
// readiness check fails, and the plugin's Status answers within the
// apiserver's 3 s deadline throughout.
func testOutageInGrace(t *testing.T, b binaries, ob outageBackend) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	p, err := cluster.NewPlugin(t, b.kubekms)
	if err != nil {
		t.Fatal(err)
	}
	down, up := ob.setup(t, p)
	c := startCluster(ctx, t, b, p)
	const secretsNS = "outage"
	acked := newWritten()
	wr := startWriter(ctx, t, c, secretsNS, acked)

	// A reader of acknowledged objects, the apiserver's /readyz, and the
	// plugin's Status latency, sampled every second.
	var readOK, readFail, readyFail atomic.Int64
	var statusMax atomic.Int64
	var statusFail atomic.Int64
	var lastReadErr, lastReadyErr atomic.Value
	sctx, stopSampling := context.WithCancel(ctx)
	var sampling sync.WaitGroup
	sampling.Add(1)
	go func() {
		defer sampling.Done()
		for sctx.Err() == nil {
			if objs := acked.snapshot(); len(objs) > 0 {
				keys := make([]string, 0, len(objs))
				for k := range objs {
					keys = append(keys, k)
				}
				k := keys[rand.IntN(len(keys))]
				s, err := c.api.Client.CoreV1().Secrets(secretsNS).Get(sctx, strings.TrimPrefix(k, "secrets/"+secretsNS+"/"), metav1.GetOptions{})
				switch {
				case sctx.Err() != nil:
				case err != nil || string(s.Data["value"]) != objs[k]:
					readFail.Add(1)
					lastReadErr.Store(fmt.Sprint(err))
				default:
					readOK.Add(1)
				}
			}
			if code, body, err := c.api.Get(sctx, "/readyz"); sctx.Err() == nil && code != 200 {
				readyFail.Add(1)
				lastReadyErr.Store(fmt.Sprintf("%d %v %s", code, err, body))
			}
			start := time.Now()
			_, err := p.Status(sctx)
			if sctx.Err() == nil {
				if err != nil {
					statusFail.Add(1)
				}
				statusMax.Store(max(statusMax.Load(), int64(time.Since(start))))
			}
			select {
			case <-sctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	time.Sleep(5 * time.Second)
	paused := time.Now()
	down(t)
	resumed := false
	t.Cleanup(func() {
		if !resumed {
			up(t)
		}
	})
	time.Sleep(apiserverWriteTTL + 30*time.Second)
	okWrites, refused, firstErr := wr.outcomes(paused, time.Now())
	st, stErr := p.Status(ctx)
	up(t)
	resumed = true
	back := time.Now()
	time.Sleep(5 * time.Second)
	stopSampling()
	sampling.Wait()
	wr.close()
	t.Logf("MEASURED %s for %.0f s: writes %d acknowledged / %d refused; reads %d ok / %d failed; /readyz failures %d; plugin Status max %.2f s, failures %d; plugin said %+v %v",
		ob.name, back.Sub(paused).Seconds(), okWrites, refused, readOK.Load(), readFail.Load(), readyFail.Load(),
		time.Duration(statusMax.Load()).Seconds(), statusFail.Load(), st, stErr)
	if refused != 0 || okWrites == 0 {
		t.Errorf("an outage inside the grace stopped writes: %d refused (first: %v)", refused, firstErr)
	}
	if readFail.Load() != 0 || readOK.Load() == 0 {
		t.Errorf("an outage inside the grace failed %d reads (last: %v)", readFail.Load(), lastReadErr.Load())
	}
	if readyFail.Load() != 0 {
		t.Errorf("the apiserver's /readyz failed %d times during the outage (last: %v)", readyFail.Load(), lastReadyErr.Load())
	}
	if d := time.Duration(statusMax.Load()); d >= 3*time.Second || statusFail.Load() != 0 {
		t.Errorf("plugin Status took up to %s (%d failures) during the outage: the apiserver allows 3 s", d, statusFail.Load())
	}
	if stErr != nil || st.Healthz != "ok" || st.KeyId == hierarchy.StoppedKeyID {
		t.Errorf("plugin Status during the outage: %+v %v, want ok under the same key_id", st, stErr)
	}
	requireReadBack(ctx, t, c.api.Client, acked.snapshot(), "after the outage")
}
