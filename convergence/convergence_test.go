//lint:file-ignore SA1019 TestEndpointURLs covers the fallback to the deprecated core/v1 Endpoints

package convergence

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apiserver/pkg/server/healthz"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	encconfigmetrics "k8s.io/apiserver/pkg/server/options/encryptionconfig/metrics"
	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"
	"k8s.io/component-base/metrics/legacyregistry"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope/envelopetest"
)

// splitPlugin is the test plugin whose Encrypt can be made to answer with
// another key_id than Status: what a plugin does when it cannot wrap under
// the key it reports (the apiserver then keeps its old seed and fails its
// KMS check).
type splitPlugin struct {
	*envelopetest.Plugin
	encryptKeyID atomic.Pointer[string]
	// stopped makes it answer as kubekms does while its key is revoked:
	// Status unhealthy with StoppedKeyID, Encrypt refused.
	stopped atomic.Bool
}

func (p *splitPlugin) Status(ctx context.Context) (*kmsservice.StatusResponse, error) {
	if p.stopped.Load() {
		return &kmsservice.StatusResponse{Version: "v2", Healthz: "key revoked", KeyID: StoppedKeyID}, nil
	}
	return p.Plugin.Status(ctx)
}

func (p *splitPlugin) Encrypt(ctx context.Context, uid string, pt []byte) (*kmsservice.EncryptResponse, error) {
	if p.stopped.Load() {
		return nil, errors.New("key revoked")
	}
	resp, err := p.Plugin.Encrypt(ctx, uid, pt)
	if id := p.encryptKeyID.Load(); err == nil && id != nil {
		resp.KeyID = *id
	}
	return resp, err
}

// apiserver is the real k8s.io/apiserver encryption code (transformers,
// KMS v2 Status poller, envelope metrics, healthz checks) behind an HTTPS
// server on loopback that serves /metrics and /readyz like kube-apiserver.
type apiserver struct {
	id          string
	url         string
	transformer value.Transformer
}

func startApiserver(t *testing.T, endpoint, id string) *apiserver {
	t.Helper()
	cfg := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms: {apiVersion: v2, name: kubekms, endpoint: %q, timeout: 3s}
      - identity: {}
`, endpoint)
	path := filepath.Join(t.TempDir(), "enc.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ec, err := encryptionconfig.LoadEncryptionConfig(ctx, path, false, id)
	if err != nil {
		t.Fatal(err)
	}
	encconfigmetrics.RecordEncryptionConfigLastConfigInfo(id, ec.EncryptionFileContentHash) // as kube-apiserver does at start
	mux := http.NewServeMux()
	mux.Handle("/metrics", legacyregistry.Handler())
	healthz.InstallReadyzHandler(mux, ec.HealthChecks...)
	srv := httptest.NewTLSServer(mux)
	t.Cleanup(srv.Close)
	tr := encryptionconfig.StaticTransformers(ec.Transformers).TransformerForResource(envelopetest.Secrets)
	return &apiserver{id: id, url: srv.URL, transformer: tr}
}

func (a *apiserver) write(t *testing.T, name string) []byte {
	t.Helper()
	key := "/registry/secrets/default/" + name
	v, err := a.transformer.TransformToStorage(context.Background(), []byte("k8s\x00"+name), value.DefaultContext(key))
	if err != nil {
		t.Fatalf("TransformToStorage: %v", err)
	}
	return v
}

func identityLease(name, host string, renewed time.Time) *coordinationv1.Lease {
	dur := int32(3600)
	rt := metav1.NewMicroTime(renewed)
	holder := name + "_holder"
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "kube-system",
			Labels: map[string]string{IdentityLabel: "kube-apiserver", corev1.LabelHostname: host}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &dur, RenewTime: &rt},
	}
}

// One apiserver (the real upstream code) through a rotation: before any
// write its seed is known from the Status poll and its passing KMS check;
// after a write from the write; after the plugin rotates it lags until
// /readyz runs its Status poll again (at most every 20 s), then writes
// under the new key_id; a plugin whose Encrypt disagrees with its Status
// leaves it with no known key_id, and no agreement.
func TestObserveRealApiserverCode(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for the apiserver's 20 s KMS check interval")
	}
	t.Parallel()
	ctx := context.Background()
	plugin := &splitPlugin{Plugin: envelopetest.NewPlugin()}
	endpoint := envelopetest.Serve(t, plugin)
	const id = "apiserver-convergencetest1"
	api := startApiserver(t, endpoint, id)
	// The lease objects come from client-go's fake clientset: the e2e suite
	// reads real ones.
	kube := fake.NewClientset(identityLease(id, "node-1", time.Now()),
		identityLease("apiserver-gone", "node-9", time.Now().Add(-2*time.Hour)))
	key1, key2 := HashKeyID("key-1"), HashKeyID("key-2")
	o := &Observer{Kube: kube, Config: &rest.Config{Host: api.url, TLSClientConfig: rest.TLSClientConfig{Insecure: true}},
		KeyIDs: map[string]string{key1: "key-1"}}

	rep, err := o.Observe(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a := rep.Apiservers[0]
	if !rep.Agreed || rep.KeyIDHash != key1 || a.Basis != "status" || a.KeyID != "key-1" || !a.KMSHealthy {
		t.Fatalf("before any write: %+v, apiserver %+v", rep, a)
	}
	if a.Identity != id || a.Hostname != "node-1" || a.IDHash != HashKeyID(id) || a.Provider != "kubekms" {
		t.Errorf("identity: %+v", a)
	}
	if len(rep.Leases) != 2 || len(rep.Problems) != 0 {
		t.Errorf("an expired lease must not count: leases %d, problems %v", len(rep.Leases), rep.Problems)
	}

	api.write(t, "a")
	if rep, err = o.Observe(ctx); err != nil {
		t.Fatal(err)
	}
	if a = rep.Apiservers[0]; a.Basis != "write" || a.KeyIDHash != key1 || a.LastWrite == nil {
		t.Fatalf("after a write: %+v", a)
	}

	rotated := time.Now()
	plugin.Rotate()
	if rep, err = o.Observe(ctx); err != nil {
		t.Fatal(err)
	}
	if rep.Converged(key2) {
		t.Fatal("converged on key-2 before the apiserver polled Status again")
	}
	if lag := rep.Laggards(key2); len(lag) != 1 || !strings.Contains(lag[0], id) || !strings.Contains(lag[0], "key-1") {
		t.Errorf("laggards = %q", lag)
	}
	conv, err := o.Wait(ctx, Fixed("key-2"), WaitOptions{Timeout: 40 * time.Second, Interval: 500 * time.Millisecond})
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	took := time.Since(rotated)
	a = conv.Report.Apiservers[0]
	if a.KeyIDHash != key2 || a.KeyID != "key-2" || conv.KeyIDHash != key2 || a.Since.Before(rotated.Add(-time.Second)) || len(conv.Times) != 1 {
		t.Errorf("after the wait: %+v, times %v", a, conv.Times)
	}
	t.Logf("the apiserver's write seed followed the rotation after %s", took.Round(100*time.Millisecond))
	v := api.write(t, "b")
	if !strings.HasPrefix(string(v), "k8s:enc:kms:v2:kubekms:") {
		t.Fatalf("not written by kms v2: %q", v[:20])
	}

	// Status says key-3, Encrypt answers key-2: the apiserver keeps its
	// key-2 seed and fails its KMS check.
	stay := "key-2"
	plugin.encryptKeyID.Store(&stay)
	plugin.Rotate()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if rep, err = o.Observe(ctx); err != nil {
			t.Fatal(err)
		}
		if a = rep.Apiservers[0]; !a.KMSHealthy || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	lag := rep.Laggards(HashKeyID("key-3"))
	if rep.Agreed || a.KeyIDHash != "" || len(lag) != 1 || !strings.Contains(lag[0], "key_id unknown") || !strings.Contains(lag[0], "KMS provider check fails") {
		t.Errorf("a plugin whose Encrypt disagrees with its Status: agreed %v, %+v, laggards %q", rep.Agreed, a, lag)
	}

	// The plugin stops writing (kubekms with a revoked key): the apiserver's
	// metrics now hold the hash of StoppedKeyID from its Status poll (its
	// failing check reruns it every 3 s). That is "writes stopped", never a
	// key the apiserver agrees on, and no key_id to wait for.
	plugin.stopped.Store(true)
	for deadline = time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		if rep, err = o.Observe(ctx); err != nil {
			t.Fatal(err)
		}
		if a = rep.Apiservers[0]; a.WritesStopped || time.Now().After(deadline) {
			break
		}
	}
	lag = rep.Laggards(StoppedKeyIDHash)
	if !a.WritesStopped || a.KeyID != StoppedKeyID || a.KeyIDHash != StoppedKeyIDHash || rep.Agreed || rep.Converged(StoppedKeyIDHash) ||
		len(lag) != 1 || !strings.Contains(lag[0], "writes stopped") || !strings.Contains(lag[0], short(key2)) {
		t.Errorf("a plugin reporting %s: agreed %v, %+v, laggards %q", StoppedKeyID, rep.Agreed, a, lag)
	}
	_, err = o.Wait(ctx, Fixed(StoppedKeyID), WaitOptions{Timeout: time.Second, Interval: 200 * time.Millisecond})
	var nc *NotConvergedError
	if !errors.As(err, &nc) || !strings.Contains(nc.Error(), "names no key") || len(nc.Laggards) != 2 || !strings.Contains(nc.Laggards[1], id+" (node-1") {
		t.Errorf("Wait for %s: %v", StoppedKeyID, err)
	}
	conv, err = o.Wait(ctx, Fixed(""), WaitOptions{Timeout: time.Second, Interval: 200 * time.Millisecond})
	if !errors.As(err, &nc) || len(conv.Times) != 0 {
		t.Errorf("Wait for any agreement while writes are stopped: %v, times %v", err, conv.Times)
	}
}

func TestJudgeAgreement(t *testing.T) {
	t.Parallel()
	now := time.Now()
	leases := []Lease{
		{Identity: "apiserver-a", Hostname: "a", Renewed: now, Duration: time.Hour},
		{Identity: "apiserver-b", Hostname: "b", Renewed: now, Duration: time.Hour},
		{Identity: "apiserver-c", Hostname: "c", Renewed: now.Add(-2 * time.Hour), Duration: time.Hour}, // expired
	}
	api := func(id, key string) Apiserver {
		return Apiserver{URL: "https://" + id, IDHash: HashKeyID(id), Provider: "kubekms", KeyIDHash: key}
	}
	k1, k2 := HashKeyID("k1"), HashKeyID("k2")
	for _, tc := range []struct {
		name       string
		apiservers []Apiserver
		leasesOK   bool
		agreed     bool
		problem    string
	}{
		{"all agree", []Apiserver{api("apiserver-a", k1), api("apiserver-b", k1)}, true, true, ""},
		{"one on another key", []Apiserver{api("apiserver-a", k1), api("apiserver-b", k2)}, true, false, ""},
		{"one unknown", []Apiserver{api("apiserver-a", k1), api("apiserver-b", "")}, true, false, ""},
		{"a lease not read", []Apiserver{api("apiserver-a", k1)}, true, false, "apiserver-b (b) holds a live identity lease but was not read"},
		{"read without a lease", []Apiserver{api("apiserver-a", k1), api("apiserver-b", k1), api("apiserver-x", k1)}, true, false, "holds no live identity lease"},
		{"read twice", []Apiserver{api("apiserver-a", k1), api("apiserver-b", k1), api("apiserver-b", k1)}, true, false, "read twice"},
		{"leases unknown", []Apiserver{api("apiserver-a", k1)}, false, false, "cannot tell"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep := &Report{At: now, Leases: leases, Apiservers: tc.apiservers}
			if !tc.leasesOK {
				rep.Leases = nil
				rep.Problems = []string{"list leases: forbidden: cannot tell how many apiservers there are"}
			}
			(&Observer{}).judge(rep, tc.leasesOK)
			if rep.Agreed != tc.agreed {
				t.Errorf("agreed = %v, want %v (problems %v)", rep.Agreed, tc.agreed, rep.Problems)
			}
			if tc.problem != "" && !strings.Contains(strings.Join(rep.Problems, "|"), tc.problem) {
				t.Errorf("problems %q, want one containing %q", rep.Problems, tc.problem)
			}
			if !tc.agreed && len(rep.Laggards(k1)) == 0 {
				t.Error("no agreement but no laggard named")
			}
		})
	}
}

func TestEndpointURLs(t *testing.T) {
	t.Parallel()
	https, other := "https", "metrics"
	p1, p2, p9 := int32(6443), int32(7443), int32(9)
	notReady := false
	// client-go's fake clientset stands in for the API here; the e2e suite
	// reads a real kubernetes Service's EndpointSlices.
	kube := fake.NewClientset(
		&discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &other, Port: &p9}, {Name: &https, Port: &p1}},
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.0.0.2", "10.0.0.1"}},
				{Addresses: []string{"10.0.0.3"}, Conditions: discoveryv1.EndpointConditions{Ready: &notReady}}},
		},
		&discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "kubernetes-2", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: "kubernetes"}},
			AddressType: discoveryv1.AddressTypeIPv6,
			Ports:       []discoveryv1.EndpointPort{{Name: &https, Port: &p2}},
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"fd00::1"}}},
		},
	)
	got, err := EndpointURLs(context.Background(), kube)
	if err != nil {
		t.Fatal(err)
	}
	want := "https://10.0.0.1:6443 https://10.0.0.2:6443 https://[fd00::1]:7443"
	if strings.Join(got, " ") != want {
		t.Errorf("EndpointURLs = %v, want %s", got, want)
	}
	kube = fake.NewClientset([]runtime.Object{&corev1.Endpoints{
		ObjectMeta: metav1.ObjectMeta{Name: "kubernetes", Namespace: "default"},
		Subsets:    []corev1.EndpointSubset{{Addresses: []corev1.EndpointAddress{{IP: "10.1.0.1"}}, Ports: []corev1.EndpointPort{{Name: "https", Port: 443}}}},
	}}...)
	if got, err = EndpointURLs(context.Background(), kube); err != nil || strings.Join(got, " ") != "https://10.1.0.1:443" {
		t.Errorf("Endpoints fallback = %v, %v", got, err)
	}
	// No endpoint reconciler: neither object exists. None listed, no error,
	// so the observer reads the kubeconfig's server (and says so).
	kube = fake.NewClientset()
	if got, err = EndpointURLs(context.Background(), kube); err != nil || len(got) != 0 {
		t.Errorf("no EndpointSlices and no Endpoints = %v, %v; want none and no error", got, err)
	}
	o := &Observer{Kube: kube, Config: &rest.Config{Host: "https://127.0.0.1:6443/"}, FromEndpoints: true}
	urls, warning, err := o.urls(context.Background())
	if err != nil || strings.Join(urls, " ") != "https://127.0.0.1:6443" || !strings.Contains(warning, "lists no apiserver endpoints") {
		t.Errorf("urls without endpoints = %v, %q, %v; want the kubeconfig's server and a warning", urls, warning, err)
	}
}

func TestParseReadyz(t *testing.T) {
	h := ParseReadyz("[+]ping ok\n[+]etcd ok\n[-]kms-providers failed: reason withheld\n[+]kms-provider-0 ok\nreadyz check failed\n")
	if h.OK() || len(h.Checks) != 2 || h.Checks["kms-providers"] || !h.Checks["kms-provider-0"] {
		t.Errorf("ParseReadyz = %+v", h)
	}
	if ParseReadyz("[+]ping ok\n").OK() {
		t.Error("no kms check counts as healthy")
	}
}
