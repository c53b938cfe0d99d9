//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/rotate"
)

// TestRotateSoftkeyOneNode: `kubekms rotate --key-uri softkey:///...` on a
// one-node control plane (real etcd, kube-apiserver, kubekms serve) rotates
// the keyring itself, waits for the plugin and the apiserver, migrates
// every stale object (Secrets and the cluster's ConfigMaps), verifies 0
// stale, and after --retire-old-after disables the old version, with which
// nothing in etcd is encrypted any more. Every Secret reads back after.
func TestRotateSoftkeyOneNode(t *testing.T) {
	t.Parallel()
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	c := startKMSCluster(ctx, t, b)
	const ns = "e2e-rotate-softkey"
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	w := newWritten()
	for i := range 30 {
		if err := createSecret(ctx, c.api.Client, w, ns, fmt.Sprintf("s-%02d", i), fmt.Sprintf("value-%d-%s", i, randomHex(t, 8))); err != nil {
			t.Fatal(err)
		}
	}
	ring, err := softkey.ParseURI(c.plugin.KeyURI)
	if err != nil {
		t.Fatal(err)
	}
	before, err := softkey.Load(ring)
	if err != nil {
		t.Fatal(err)
	}
	args := []string{"--kubeconfig", writeKubeconfig(t, c.api.Config), "--apiservers", c.api.Config.Host,
		"--etcd-endpoints", c.etcd.Endpoint, "--plugin", c.plugin.Endpoint(), "--key-uri", c.plugin.KeyURI,
		"--state-file", filepath.Join(t.TempDir(), "rotate-state.json"), "--retire-old-after", "3s", "--convergence-timeout", "3m"}
	events, st, errText, code := rotateRun(ctx, t, b.kubekms, args, nil)
	if code != 0 || st == nil || !st.Done() {
		t.Fatalf("kubekms rotate --key-uri: exit %d, state %+v\n%s", code, st, errText)
	}
	after, err := softkey.Load(ring)
	if err != nil {
		t.Fatal(err)
	}
	if st.FromVersion != before.Primary || st.ToVersion != after.Primary || after.Primary == before.Primary ||
		st.FromKeyID != before.KeyID(before.Primary) || st.ToKeyID != after.KeyID(after.Primary) {
		t.Errorf("state %+v; keyring primary v%d -> v%d", st, before.Primary, after.Primary)
	}
	if st.Retired.IsZero() || st.Retired.Sub(st.Verified) < 3*time.Second || st.Stale != 0 || st.Rewritten < 30 {
		t.Errorf("state %+v: want the 30 Secrets (and more) rewritten, 0 stale, the old version retired >= 3 s after the verification", st)
	}
	disabled := false
	for _, v := range after.Versions {
		if v.Version == before.Primary {
			disabled = v.Disabled
		}
	}
	if !disabled {
		t.Errorf("the old version v%d is not disabled: %+v", before.Primary, after.Versions)
	}
	var phases []string
	for _, e := range events {
		phases = append(phases, string(e.Phase))
	}
	if got := strings.Join(phases, ","); !strings.Contains(got, "preflight,rotated,plugins,converged,migrated,verified,old-retired") ||
		!strings.HasSuffix(got, string(rotate.PhaseDone)) {
		t.Errorf("phases %s", got)
	}
	for _, v := range storedEncrypted(ctx, t, c.etcd) {
		if v.KeyID() != st.ToKeyID {
			t.Errorf("%s is stored under %q, want %s", v.Key, v.KeyID(), st.ToKeyID)
		}
	}
	requireReadBack(ctx, t, c.api.Client, w.snapshot(), "after the rotation retired the old version")
}
