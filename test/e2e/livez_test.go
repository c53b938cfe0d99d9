//go:build e2e

package e2e

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kubekms/kubekms/manifests"
)

// TestLivenessExcludesKMS: with the liveness path of the kubeadm patch that
// `kubekms manifests` renders, kubelet would not restart kube-apiserver while
// the plugin is down: that path answers 200 throughout, while /readyz reports
// the outage (readiness stays honest). After the plugin is back, /readyz
// answers 200 again with no apiserver restart. Plain /livez is measured too:
// kube-apiserver v1.37 keeps the KMS checks out of /livez by itself
// (k8s.io/apiserver options/etcd.go, addHealthChecksWithoutLivez), older
// apiservers did not; the exclusion keeps the probe right on both.
func TestLivenessExcludesKMS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := startKMSCluster(ctx, t, needBinaries(t))

	dep, err := manifests.Render(manifests.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var patch corev1.Pod
	if err := yaml.UnmarshalStrict(dep.File(manifests.KubeadmPatchFile).Content, &patch); err != nil {
		t.Fatal(err)
	}
	live := patch.Spec.Containers[0].LivenessProbe.HTTPGet.Path
	if startup := patch.Spec.Containers[0].StartupProbe.HTTPGet.Path; startup != live {
		t.Errorf("startup probe path %q differs from liveness %q", startup, live)
	}
	t.Logf("liveness path from %s: %s", manifests.KubeadmPatchFile, live)

	get := func(path string) int {
		code, body, err := c.api.Get(ctx, path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		if code != http.StatusOK {
			t.Logf("GET %s: %d %s", path, code, firstFailing(body))
		}
		return code
	}
	for _, p := range []string{live, "/livez", "/readyz"} {
		if code := get(p); code != http.StatusOK {
			t.Fatalf("healthy cluster: GET %s = %d", p, code)
		}
	}

	if err := c.plugin.Stop(); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	// The apiserver caches a healthy KMS answer for 20 s and a failed one for 3 s.
	var livezDown, readyzDown time.Duration
	for readyzDown == 0 {
		if time.Since(stopped) > 90*time.Second {
			t.Fatal("/readyz still 200 90 s after the plugin stopped")
		}
		if code := get(live); code != http.StatusOK {
			t.Fatalf("%s answered %d with the plugin stopped: kubelet would restart the apiserver", live, code)
		}
		if livezDown == 0 && get("/livez") != http.StatusOK {
			livezDown = time.Since(stopped)
		}
		if readyzDown == 0 && get("/readyz") != http.StatusOK {
			readyzDown = time.Since(stopped)
		}
		time.Sleep(500 * time.Millisecond)
	}
	// The exclusion names the check that fails: /readyz with the same query
	// answers 200 and says it left kms-providers out (a misspelt name would
	// only earn a "cannot be excluded" warning).
	_, query, ok := strings.Cut(live, "?")
	if !ok {
		t.Fatalf("liveness path %q excludes nothing", live)
	}
	if code, body, err := c.api.Get(ctx, "/readyz?"+query+"&verbose"); err != nil || code != http.StatusOK ||
		!strings.Contains(body, "[+]kms-providers excluded: ok") {
		t.Fatalf("/readyz?%s with the plugin stopped: %d %v\n%s", query, code, err, body)
	}
	if _, body, err := c.api.Get(ctx, live+"&verbose"); err == nil {
		t.Logf("MEASURED %s&verbose with the plugin stopped: %s", live, firstWarning(body))
	}
	// And for a while after: the exclusion holds for the whole outage.
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(time.Second) {
		if code := get(live); code != http.StatusOK {
			t.Fatalf("%s answered %d during the outage", live, code)
		}
		if livezDown == 0 && get("/livez") != http.StatusOK {
			livezDown = time.Since(stopped)
		}
	}
	plain := "stayed 200 (this apiserver keeps KMS out of /livez)"
	if livezDown > 0 {
		plain = "failed after " + livezDown.Round(100*time.Millisecond).String()
	}
	t.Logf("MEASURED plugin stopped for %s: %s stayed 200; /readyz failed after %s; plain /livez %s",
		time.Since(stopped).Round(time.Second), live, readyzDown.Round(100*time.Millisecond), plain)

	if err := c.plugin.Start(ctx); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	for get("/readyz") != http.StatusOK {
		if time.Since(restarted) > 60*time.Second {
			t.Fatal("/readyz not 200 within 60 s of the plugin's restart")
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("MEASURED plugin restarted: /readyz 200 again after %s (no apiserver restart)", time.Since(restarted).Round(100*time.Millisecond))
}

// firstWarning returns the "warn:" line of a verbose health answer, or "no warning".
func firstWarning(body string) string {
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, "warn:") {
			return l
		}
	}
	return "no warning"
}
