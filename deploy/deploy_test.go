// Package deploy holds no code: its test keeps the deployment artifacts in
// this folder true as kubekms changes. It decodes every manifest with the
// real Kubernetes types, checks that every flag they pass exists in
// `kubekms serve --help`, that the probes name the paths serve.go serves, and
// then runs kubekms with the static pod's and the systemd unit's own
// arguments (as the pod's uid, in folders made by systemd-tmpfiles) behind the
// real kube-apiserver transformer. The alert rules go through promtool, the
// systemd unit through systemd-analyze.
package deploy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	"k8s.io/apiserver/pkg/apis/apiserver"
	"k8s.io/apiserver/pkg/apis/apiserver/install"
	apiserverv1 "k8s.io/apiserver/pkg/apis/apiserver/v1"
	"k8s.io/apiserver/pkg/apis/apiserver/validation"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	kmsutil "k8s.io/kms/pkg/util"
	"sigs.k8s.io/yaml"

	"github.com/kubekms/kubekms/internal/metrics"
	"github.com/kubekms/kubekms/internal/testutil"
)

const (
	staticPodFile     = "static-pod.yaml"
	apiserverFile     = "kube-apiserver-patch.yaml"
	encryptionFile    = "encryption-config.yaml"
	unitFile          = "kubekms.service"
	tmpfilesFile      = "kubekms.tmpfiles.conf"
	alertsFile        = "alerts.yaml"
	alertsTestFile    = "alerts-test.yaml"
	operationsDoc     = "../docs/operations.md"
	kubeadmPatchFile  = "kubeadm-patches/kube-apiserver+strategic.yaml"
	kubeadmConfigFile = "kubeadm-config.yaml"
	livenessPath      = "/livez?exclude=kms-providers" // kube-apiserver's probes: all but the KMS check
	providerName      = "kubekms"
	kubekmsBinPath    = "/usr/local/bin/kubekms"
	rootlessUID       = 20000 // a kube-apiserver run as non-root, given the socket's group
	outsiderUID       = 20001 // any other local user
	startupDeadline   = 60 * time.Second
)

// --- the kubekms binary and its flags -----------------------------------------------

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// kubekms builds ./cmd/kubekms once, into a folder every user may enter
// (the tests run it as the static pod's uid).
func kubekms(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "kubekms-deploy-bin-")
		if buildErr == nil {
			buildErr = os.Chmod(buildDir, 0o755)
		}
		if buildErr == nil {
			_, buildErr = testutil.BuildKubekms(buildDir)
		}
	})
	if buildErr != nil {
		t.Fatalf("build kubekms: %v", buildErr)
	}
	return filepath.Join(buildDir, "kubekms")
}

var flagRE = regexp.MustCompile(`(?m)^\s+(?:-\w, )?--([a-z0-9][a-z0-9-]*)`)

// helpFlags returns the long flags that `kubekms <sub> --help` lists.
func helpFlags(t *testing.T, sub ...string) map[string]bool {
	t.Helper()
	out, err := exec.Command(kubekms(t), append(sub, "--help")...).CombinedOutput()
	if err != nil {
		t.Fatalf("kubekms %s --help: %v\n%s", strings.Join(sub, " "), err, out)
	}
	flags := map[string]bool{}
	for _, m := range flagRE.FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = true
	}
	if !flags["listen"] || !flags["key-uri"] {
		t.Fatalf("could not read the flags of `kubekms %s --help`:\n%s", strings.Join(sub, " "), out)
	}
	return flags
}

// serveDefault returns the default of a serve flag, as --help shows it.
func serveDefault(t *testing.T, flag string) string {
	t.Helper()
	out, err := exec.Command(kubekms(t), "serve", "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("kubekms serve --help: %v", err)
	}
	m := regexp.MustCompile(`--` + regexp.QuoteMeta(flag) + `\s.*\(default "?([^")]+)"?\)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("kubekms serve --help shows no default for --%s", flag)
	}
	return string(m[1])
}

// serveArgs splits a `serve --flag=value ...` argument list. Every flag must
// be written --name=value (or --name for a boolean), so that a value can never
// be mistaken for a flag, and every flag must exist in `kubekms serve --help`.
func serveArgs(t *testing.T, where string, args []string) map[string]string {
	t.Helper()
	if len(args) == 0 || args[0] != "serve" {
		t.Fatalf("%s: arguments must start with the serve command, got %q", where, args)
	}
	known := helpFlags(t, "serve")
	flags := map[string]string{}
	for _, a := range args[1:] {
		name, val, hasVal := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.HasPrefix(a, "--") || name == "" {
			t.Errorf("%s: argument %q is not a --flag (serve takes no positional arguments)", where, a)
			continue
		}
		if !known[name] {
			t.Errorf("%s: --%s is not a flag of `kubekms serve` (see kubekms serve --help)", where, name)
		}
		if _, dup := flags[name]; dup {
			t.Errorf("%s: --%s given twice", where, name)
		}
		if !hasVal {
			val = "true"
		}
		flags[name] = val
	}
	return flags
}

func readFile(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// decodePod decodes a manifest strictly: an unknown or misspelt field fails.
func decodePod(t *testing.T, name string) *corev1.Pod {
	t.Helper()
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(readFile(t, name), &pod); err != nil {
		t.Fatalf("%s does not decode as a v1 Pod: %v", name, err)
	}
	if pod.APIVersion != "v1" || pod.Kind != "Pod" {
		t.Fatalf("%s: apiVersion/kind = %s/%s, want v1/Pod", name, pod.APIVersion, pod.Kind)
	}
	return &pod
}

func container(t *testing.T, pod *corev1.Pod, name string) *corev1.Container {
	t.Helper()
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	t.Fatalf("pod %s has no container %q", pod.Name, name)
	return nil
}

// hostPathAt returns the hostPath volume mounted at mountPath in c.
func hostPathAt(pod *corev1.Pod, c *corev1.Container, mountPath string) (*corev1.HostPathVolumeSource, *corev1.VolumeMount) {
	for i, m := range c.VolumeMounts {
		if m.MountPath != mountPath {
			continue
		}
		for _, v := range pod.Spec.Volumes {
			if v.Name == m.Name && v.HostPath != nil {
				return v.HostPath, &c.VolumeMounts[i]
			}
		}
	}
	return nil, nil
}

// socketPath is the file an endpoint (unix:///path) names.
func socketPath(t *testing.T, where, endpoint string) string {
	t.Helper()
	p, err := kmsutil.ParseEndpoint(endpoint)
	if err != nil || strings.HasPrefix(p, "@") || !filepath.IsAbs(p) {
		t.Fatalf("%s: endpoint %q must be unix:///absolute/path (abstract sockets have no permissions): %v", where, endpoint, err)
	}
	return p
}

// softkeyPath is the keyring file of a softkey:/// key URI.
func softkeyPath(t *testing.T, where, uri string) string {
	t.Helper()
	p, ok := strings.CutPrefix(uri, "softkey://")
	if !ok || !filepath.IsAbs(p) {
		t.Fatalf("%s: --key-uri %q: the shipped artifacts use the embedded keyring, softkey:///abs/path", where, uri)
	}
	return p
}

// hostDir folds /var/run into /run, which it links to on every systemd host.
func hostDir(p string) string {
	if rest, ok := strings.CutPrefix(p, "/var/run/"); ok {
		return "/run/" + rest
	}
	return p
}

func loopbackAddr(t *testing.T, where, addr string) int {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s: --metrics-addr %q: %v", where, addr, err)
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		t.Errorf("%s: --metrics-addr %q must be a loopback address: metrics and /readyz have no authentication", where, addr)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n <= 0 {
		t.Fatalf("%s: --metrics-addr %q needs a fixed port", where, addr)
	}
	return n
}

func socketMode(t *testing.T, where, mode string) os.FileMode {
	t.Helper()
	m, err := strconv.ParseUint(mode, 8, 32)
	if err != nil {
		t.Fatalf("%s: --socket-mode %q: %v", where, mode, err)
	}
	if m&0o007 != 0 || m&0o600 != 0o600 {
		t.Errorf("%s: --socket-mode %s must give the owner rw and other users nothing", where, mode)
	}
	return os.FileMode(m)
}

// --- static pod ------------------------------------------------------------------------

type staticPod struct {
	pod   *corev1.Pod
	c     *corev1.Container
	flags map[string]string
	sock  string // socket path, the same on the host and in both containers
	uid   int64
	gid   int64
}

func loadStaticPod(t *testing.T) staticPod {
	t.Helper()
	pod := decodePod(t, staticPodFile)
	c := container(t, pod, "kubekms")
	if len(c.Command) != 0 {
		t.Errorf("%s: set args, not command: the image's ENTRYPOINT is /kubekms", staticPodFile)
	}
	sp := staticPod{pod: pod, c: c, flags: serveArgs(t, staticPodFile, c.Args)}
	sp.sock = socketPath(t, staticPodFile, sp.flags["listen"])
	sc := pod.Spec.SecurityContext
	if sc == nil || sc.RunAsUser == nil || sc.RunAsGroup == nil {
		t.Fatalf("%s: the pod's securityContext must set runAsUser and runAsGroup (the socket's owner)", staticPodFile)
	}
	sp.uid, sp.gid = *sc.RunAsUser, *sc.RunAsGroup
	return sp
}

func TestStaticPod(t *testing.T) {
	sp := loadStaticPod(t)
	pod, c, f := sp.pod, sp.c, sp.flags
	spec := pod.Spec

	if pod.Namespace != "kube-system" || !spec.HostNetwork || spec.PriorityClassName != "system-node-critical" {
		t.Errorf("namespace %q, hostNetwork %v, priorityClassName %q: want kube-system, true, system-node-critical",
			pod.Namespace, spec.HostNetwork, spec.PriorityClassName)
	}
	if spec.HostNetwork && len(c.Ports) > 0 {
		// Meaningless with the node's network, and refused by runtimes that map ports
		// (podman kube play: "PortMappings can only be used with Bridge or slirp4netns networking").
		t.Errorf("hostNetwork pod declares ports %+v: drop the ports block", c.Ports)
	}
	if spec.DNSPolicy != corev1.DNSDefault {
		t.Errorf("dnsPolicy %q: want Default (cluster DNS needs the apiserver, which needs kubekms)", spec.DNSPolicy)
	}
	if c.Image == "" {
		t.Error("no image")
	}

	// Not root, no privileges, the runtime's seccomp profile.
	psc := spec.SecurityContext
	if psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || sp.uid == 0 || sp.gid == 0 {
		t.Errorf("pod securityContext: runAsNonRoot %v, runAsUser %d, runAsGroup %d: want a non-root uid and gid", psc.RunAsNonRoot, sp.uid, sp.gid)
	}
	if psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Error("pod securityContext: seccompProfile must be RuntimeDefault")
	}
	csc := c.SecurityContext
	switch {
	case csc == nil:
		t.Fatal("container has no securityContext")
	case csc.ReadOnlyRootFilesystem == nil || !*csc.ReadOnlyRootFilesystem:
		t.Error("container: readOnlyRootFilesystem must be true")
	case csc.AllowPrivilegeEscalation == nil || *csc.AllowPrivilegeEscalation:
		t.Error("container: allowPrivilegeEscalation must be false")
	case csc.Privileged != nil && *csc.Privileged:
		t.Error("container: privileged")
	case csc.Capabilities == nil || !slices.Equal(csc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(csc.Capabilities.Add) != 0:
		t.Errorf("container: capabilities must drop ALL and add none, got %+v", csc.Capabilities)
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Errorf("resources: want cpu and memory requests and a memory limit, got %+v", c.Resources)
	}
	grace := f["shutdown-grace"]
	if grace == "" {
		grace = serveDefault(t, "shutdown-grace")
	}
	if g := pod.Spec.TerminationGracePeriodSeconds; g == nil {
		t.Error("set terminationGracePeriodSeconds (above --shutdown-grace)")
	} else if d, err := time.ParseDuration(grace); err != nil || time.Duration(*g)*time.Second <= d {
		t.Errorf("terminationGracePeriodSeconds %d must exceed --shutdown-grace %s", *g, grace)
	}

	// The socket: in a hostPath folder mounted at the same path, owner-and-group only,
	// the group being the pod's gid.
	dir := filepath.Dir(sp.sock)
	hp, m := hostPathAt(pod, c, dir)
	if hp == nil || hp.Path != dir || hp.Type == nil || *hp.Type != corev1.HostPathDirectoryOrCreate || m.ReadOnly {
		t.Errorf("the socket folder %s must be a writable hostPath (DirectoryOrCreate) of the same path, got %+v", dir, hp)
	}
	if mode := socketMode(t, staticPodFile, f["socket-mode"]); mode&0o060 != 0 && f["socket-group"] != strconv.FormatInt(sp.gid, 10) {
		t.Errorf("--socket-group %q: want the pod's gid %d (numeric: the image has no group entry for it)", f["socket-group"], sp.gid)
	}

	// Keyring and state: in a writable hostPath.
	for _, p := range []string{softkeyPath(t, staticPodFile, f["key-uri"]), f["state-file"]} {
		if hp, m := hostPathAt(pod, c, filepath.Dir(p)); hp == nil || m.ReadOnly {
			t.Errorf("%s: its folder must be a writable hostPath volume (it must outlive the pod)", p)
		}
	}

	// Probes: on the metrics address (loopback, so host must be set: hostNetwork would
	// send them to the node's IP), at the paths serve.go serves (TestServeStaticPod
	// requests them).
	port := loopbackAddr(t, staticPodFile, f["metrics-addr"])
	host, _, _ := net.SplitHostPort(f["metrics-addr"])
	for _, p := range []struct {
		name  string
		probe *corev1.Probe
		path  string
	}{
		{"startupProbe", c.StartupProbe, "/livez"},
		{"livenessProbe", c.LivenessProbe, "/livez"}, // never /healthz: a restart cures no outage
		{"readinessProbe", c.ReadinessProbe, "/readyz"},
	} {
		if p.probe == nil || p.probe.HTTPGet == nil {
			t.Errorf("%s: want an httpGet probe", p.name)
			continue
		}
		g := p.probe.HTTPGet
		if g.Host != host || probePort(c, g) != port || g.Path != p.path {
			t.Errorf("%s: GET %s:%s%s, want %s:%d%s", p.name, g.Host, g.Port.String(), g.Path, host, port, p.path)
		}
	}
	if c.StartupProbe != nil {
		if budget := time.Duration(c.StartupProbe.PeriodSeconds*c.StartupProbe.FailureThreshold) * time.Second; budget < 35*time.Second {
			t.Errorf("startupProbe allows %s: kubekms may try the key service for 30 s before it serves", budget)
		}
	}
}

func probePort(c *corev1.Container, g *corev1.HTTPGetAction) int {
	if g.Port.StrVal == "" {
		return g.Port.IntValue()
	}
	for _, p := range c.Ports {
		if p.Name == g.Port.StrVal {
			return int(p.ContainerPort)
		}
	}
	return -1
}

func TestAPIServerPatch(t *testing.T) {
	sp := loadStaticPod(t)
	pod := decodePod(t, apiserverFile)
	c := container(t, pod, "kube-apiserver")

	// The apiserver sees the socket folder at the same path as kubekms.
	dir := filepath.Dir(sp.sock)
	if hp, _ := hostPathAt(pod, c, dir); hp == nil || hp.Path != dir {
		t.Errorf("kube-apiserver must mount the hostPath %s at %s, got %+v", dir, dir, hp)
	}
	// A non-root apiserver needs the socket's group.
	if sc := pod.Spec.SecurityContext; sc == nil || !slices.Contains(sc.SupplementalGroups, sp.gid) {
		t.Errorf("kube-apiserver: supplementalGroups must contain kubekms's gid %d", sp.gid)
	}
	// --encryption-provider-config names a file in a mounted folder, which holds
	// encryption-config.yaml, whose endpoint is kubekms's socket.
	var cfg string
	for _, a := range c.Command {
		if v, ok := strings.CutPrefix(a, "--encryption-provider-config="); ok {
			cfg = v
		}
	}
	if cfg == "" {
		t.Fatal("kube-apiserver: no --encryption-provider-config=")
	}
	if filepath.Base(cfg) != encryptionFile {
		t.Errorf("--encryption-provider-config=%s: the file shipped is %s", cfg, encryptionFile)
	}
	if hp, m := hostPathAt(pod, c, filepath.Dir(cfg)); hp == nil || !m.ReadOnly {
		t.Errorf("the folder of %s must be a read-only hostPath mount", cfg)
	}
	ec := decodeEncryptionConfig(t)
	if got := socketPath(t, encryptionFile, ec.Resources[0].Providers[0].KMS.Endpoint); got != sp.sock {
		t.Errorf("%s endpoint %s, but the static pod listens on %s", encryptionFile, got, sp.sock)
	}
	// kubelet must not restart the apiserver for a KMS outage: liveness and startup
	// exclude the KMS check; readiness (if the patch touches it) keeps it.
	for name, p := range map[string]*corev1.Probe{"livenessProbe": c.LivenessProbe, "startupProbe": c.StartupProbe} {
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != livenessPath {
			t.Errorf("kube-apiserver %s: want httpGet path %s, got %+v", name, livenessPath, p)
		}
	}
	if p := c.ReadinessProbe; p != nil && (p.HTTPGet == nil || p.HTTPGet.Path != "/readyz") {
		t.Errorf("kube-apiserver readinessProbe %+v: keep /readyz, which includes the KMS check", p)
	}
}

// TestKubeadmPatch applies kubeadm-patches/kube-apiserver+strategic.yaml the way
// kubeadm does (a strategic merge patch) to the probes kubeadm writes, and reads
// kubeadm-config.yaml: the flag and mounts must be those of the hand-merge patch.
func TestKubeadmPatch(t *testing.T) {
	kubeadmPod := []byte(`{"apiVersion":"v1","kind":"Pod","metadata":{"name":"kube-apiserver","namespace":"kube-system"},
"spec":{"containers":[{"name":"kube-apiserver","command":["kube-apiserver","--secure-port=6443"],
"livenessProbe":{"httpGet":{"host":"10.0.0.1","path":"/livez","port":6443,"scheme":"HTTPS"},"failureThreshold":8},
"readinessProbe":{"httpGet":{"host":"10.0.0.1","path":"/readyz","port":6443,"scheme":"HTTPS"}},
"startupProbe":{"httpGet":{"host":"10.0.0.1","path":"/livez","port":6443,"scheme":"HTTPS"},"failureThreshold":24}}]}}`)
	patch, err := yaml.YAMLToJSON(readFile(t, kubeadmPatchFile))
	if err != nil {
		t.Fatalf("%s: %v", kubeadmPatchFile, err)
	}
	merged, err := strategicpatch.StrategicMergePatch(kubeadmPod, patch, corev1.Pod{})
	if err != nil {
		t.Fatalf("strategic merge of %s: %v", kubeadmPatchFile, err)
	}
	var pod corev1.Pod
	if err := json.Unmarshal(merged, &pod); err != nil {
		t.Fatal(err)
	}
	c := container(t, &pod, "kube-apiserver")
	for name, p := range map[string]*corev1.Probe{"livenessProbe": c.LivenessProbe, "startupProbe": c.StartupProbe} {
		g := p.HTTPGet
		if g.Path != livenessPath || g.Host != "10.0.0.1" || g.Port.IntValue() != 6443 || g.Scheme != corev1.URISchemeHTTPS {
			t.Errorf("%s after the patch: %+v, want kubeadm's host, port and scheme with path %s", name, g, livenessPath)
		}
	}
	if c.ReadinessProbe.HTTPGet.Path != "/readyz" || !slices.Equal(c.Command, []string{"kube-apiserver", "--secure-port=6443"}) {
		t.Errorf("the patch must leave readiness and the command alone: %+v %q", c.ReadinessProbe.HTTPGet, c.Command)
	}

	var cfg struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		APIServer  struct {
			ExtraArgs    []struct{ Name, Value string } `json:"extraArgs"`
			ExtraVolumes []struct {
				Name, HostPath, MountPath, PathType string
				ReadOnly                            bool
			} `json:"extraVolumes"`
		} `json:"apiServer"`
	}
	if err := yaml.UnmarshalStrict(readFile(t, kubeadmConfigFile), &cfg); err != nil {
		t.Fatalf("%s: %v", kubeadmConfigFile, err)
	}
	if cfg.APIVersion != "kubeadm.k8s.io/v1beta4" || cfg.Kind != "ClusterConfiguration" {
		t.Errorf("%s: %s/%s, want kubeadm.k8s.io/v1beta4 ClusterConfiguration", kubeadmConfigFile, cfg.APIVersion, cfg.Kind)
	}
	hand := container(t, decodePod(t, apiserverFile), "kube-apiserver")
	for _, a := range cfg.APIServer.ExtraArgs {
		if !slices.Contains(hand.Command, "--"+a.Name+"="+a.Value) {
			t.Errorf("%s: extraArg %s=%s is not in %s", kubeadmConfigFile, a.Name, a.Value, apiserverFile)
		}
	}
	if len(cfg.APIServer.ExtraArgs) == 0 {
		t.Errorf("%s: no extraArgs", kubeadmConfigFile)
	}
	for _, v := range cfg.APIServer.ExtraVolumes {
		hp, m := hostPathAt(decodePod(t, apiserverFile), hand, v.MountPath)
		if hp == nil || hp.Path != v.HostPath || !v.ReadOnly || !m.ReadOnly {
			t.Errorf("%s: extraVolume %+v differs from %s's mount", kubeadmConfigFile, v, apiserverFile)
		}
	}
	if len(cfg.APIServer.ExtraVolumes) != len(hand.VolumeMounts) {
		t.Errorf("%s has %d extraVolumes, %s %d mounts", kubeadmConfigFile, len(cfg.APIServer.ExtraVolumes), apiserverFile, len(hand.VolumeMounts))
	}
}

// --- encryption configuration ----------------------------------------------------------

func decodeEncryptionConfig(t *testing.T) *apiserverv1.EncryptionConfiguration {
	t.Helper()
	var ec apiserverv1.EncryptionConfiguration
	if err := yaml.UnmarshalStrict(readFile(t, encryptionFile), &ec); err != nil {
		t.Fatalf("%s: %v", encryptionFile, err)
	}
	if len(ec.Resources) == 0 || len(ec.Resources[0].Providers) == 0 || ec.Resources[0].Providers[0].KMS == nil {
		t.Fatalf("%s: the first provider of the first resource must be kms", encryptionFile)
	}
	return &ec
}

func TestEncryptionConfig(t *testing.T) {
	ec := decodeEncryptionConfig(t)
	if ec.APIVersion != "apiserver.config.k8s.io/v1" || ec.Kind != "EncryptionConfiguration" {
		t.Errorf("apiVersion/kind %s/%s", ec.APIVersion, ec.Kind)
	}
	r := ec.Resources[0]
	if !slices.Contains(r.Resources, "secrets") {
		t.Errorf("resources %v: want secrets", r.Resources)
	}
	kms := r.Providers[0].KMS
	if kms.APIVersion != "v2" || kms.Name != providerName || kms.Timeout == nil || kms.Timeout.Duration != 3*time.Second {
		t.Errorf("kms provider %+v: want apiVersion v2, name %s, timeout 3s", kms, providerName)
	}
	socketPath(t, encryptionFile, kms.Endpoint)
	if len(r.Providers) != 2 || r.Providers[1].Identity == nil {
		t.Errorf("the second (and last) provider must be identity, so data written before encryption stays readable")
	}

	// What kube-apiserver itself does with the file (encryptionconfig.loadConfig):
	// a strict decode into the internal type, then its validation.
	scheme := runtime.NewScheme()
	install.Install(scheme)
	obj, _, err := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDecoder().Decode(readFile(t, encryptionFile), nil, nil)
	if err != nil {
		t.Fatalf("apiserver decode: %v", err)
	}
	cfg, ok := obj.(*apiserver.EncryptionConfiguration)
	if !ok {
		t.Fatalf("decoded a %T", obj)
	}
	if errs := validation.ValidateEncryptionConfiguration(cfg, false); len(errs) > 0 {
		t.Errorf("kube-apiserver would refuse %s: %v", encryptionFile, errs.ToAggregate())
	}
}

// --- systemd unit and tmpfiles ---------------------------------------------------------

// unit is a parsed systemd unit: section -> key -> values (in order).
type unit map[string]map[string][]string

func (u unit) get(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

func parseUnit(t *testing.T, data []byte) unit {
	t.Helper()
	u := unit{}
	section := ""
	text := strings.ReplaceAll(string(data), "\\\n", " ")
	for i, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[' && line[len(line)-1] == ']':
			section = line[1 : len(line)-1]
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: line %d: %q is not key=value in a section", unitFile, i+1, line)
			}
			u[section][k] = append(u[section][k], strings.Join(strings.Fields(v), " "))
		}
	}
	return u
}

type systemdUnit struct {
	u     unit
	exec  []string
	flags map[string]string
}

func loadUnit(t *testing.T) systemdUnit {
	t.Helper()
	u := parseUnit(t, readFile(t, unitFile))
	exec := strings.Fields(u.get("Service", "ExecStart"))
	if len(exec) < 2 || exec[0] != kubekmsBinPath {
		t.Fatalf("ExecStart %q: want %s serve ...", exec, kubekmsBinPath)
	}
	for _, a := range exec {
		if strings.ContainsAny(a, `"'$%`) {
			t.Fatalf("ExecStart argument %q: no quoting or substitutions, so the test reads it as systemd does", a)
		}
	}
	return systemdUnit{u: u, exec: exec, flags: serveArgs(t, unitFile, exec[1:])}
}

func TestSystemdUnit(t *testing.T) {
	su := loadUnit(t)
	u, f := su.u, su.flags
	want := map[string]string{
		"Type": "simple", "Restart": "on-failure", "KillSignal": "SIGTERM",
		"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
		"CapabilityBoundingSet": "", "AmbientCapabilities": "", "SystemCallFilter": "@system-service",
		"RuntimeDirectory": "kubekms", "RuntimeDirectoryPreserve": "yes", "StateDirectory": "kubekms",
		"StateDirectoryMode": "0700", "UMask": "0077",
	}
	for k, v := range want {
		if vals, ok := u["Service"][k]; !ok || vals[len(vals)-1] != v {
			t.Errorf("[Service] %s=%q, want %q", k, vals, v)
		}
	}
	if user := u.get("Service", "User"); user == "" || user == "root" || u.get("Service", "Group") == "" {
		t.Errorf("User=%q Group=%q: want a dedicated non-root user and group", user, u.get("Service", "Group"))
	}

	// The socket lives in RuntimeDirectory, mode 0750 or 0700, group = the service's group.
	sock := socketPath(t, unitFile, f["listen"])
	if got, want := hostDir(filepath.Dir(sock)), "/run/"+u.get("Service", "RuntimeDirectory"); got != want {
		t.Errorf("--listen folder %s is not RuntimeDirectory (%s)", got, want)
	}
	if m := u.get("Service", "RuntimeDirectoryMode"); m != "0750" && m != "0700" {
		t.Errorf("RuntimeDirectoryMode=%s: want 0750 (with the socket group) or 0700", m)
	}
	if mode := socketMode(t, unitFile, f["socket-mode"]); mode&0o060 != 0 && f["socket-group"] != u.get("Service", "Group") {
		t.Errorf("--socket-group=%s: want the service's group %s", f["socket-group"], u.get("Service", "Group"))
	}
	if ec := decodeEncryptionConfig(t); socketPath(t, encryptionFile, ec.Resources[0].Providers[0].KMS.Endpoint) != sock {
		t.Errorf("%s and %s name different sockets", unitFile, encryptionFile)
	}
	// Keyring and state in StateDirectory, which is writable.
	state := "/var/lib/" + u.get("Service", "StateDirectory")
	for _, p := range []string{softkeyPath(t, unitFile, f["key-uri"]), f["state-file"]} {
		if filepath.Dir(p) != state {
			t.Errorf("%s is outside StateDirectory %s (read-only under ProtectSystem=strict)", p, state)
		}
	}
	if !slices.Contains(u["Service"]["ReadWritePaths"], state) {
		t.Errorf("ReadWritePaths must list %s", state)
	}
	loopbackAddr(t, unitFile, f["metrics-addr"])

	stop, err := time.ParseDuration(strings.ReplaceAll(u.get("Service", "TimeoutStopSec"), " ", ""))
	grace, err2 := time.ParseDuration(f["shutdown-grace"])
	if err != nil || err2 != nil || stop <= grace {
		t.Errorf("TimeoutStopSec=%s must be a duration over --shutdown-grace=%s", u.get("Service", "TimeoutStopSec"), f["shutdown-grace"])
	}
}

// TestSystemdAnalyze lets systemd itself read the unit: no unknown or invalid
// directive (systemd only warns about those), and an exposure score of at most
// 2.0 of 10 ("OK"), so that hardening cannot silently go.
func TestSystemdAnalyze(t *testing.T) {
	analyze := testutil.Binary(t, "KUBEKMS_SYSTEMD_ANALYZE", "systemd-analyze")
	// verify wants ExecStart's binary to exist: point it at the one just built.
	text := strings.Replace(string(readFile(t, unitFile)), "ExecStart="+kubekmsBinPath, "ExecStart="+kubekms(t), 1)
	path := filepath.Join(t.TempDir(), unitFile)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	out, err = exec.Command(analyze, "security", "--offline=true", "--threshold=20", path).CombinedOutput()
	if err != nil {
		t.Errorf("systemd-analyze security: exposure over 2.0 (%v)\n%s", err, out)
	}
	if m := regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+)`).FindSubmatch(out); m != nil {
		t.Logf("systemd-analyze security: exposure %s of 10", m[1])
	}
}

type tmpfilesEntry struct {
	mode     os.FileMode
	uid, gid int64
}

func parseTmpfiles(t *testing.T) map[string]tmpfilesEntry {
	t.Helper()
	out := map[string]tmpfilesEntry{}
	for i, line := range strings.Split(string(readFile(t, tmpfilesFile)), "\n") {
		fs := strings.Fields(line)
		if len(fs) == 0 || strings.HasPrefix(fs[0], "#") {
			continue
		}
		if len(fs) != 6 || fs[0] != "d" {
			t.Fatalf("%s:%d: want `d path mode uid gid -`, got %q", tmpfilesFile, i+1, line)
		}
		mode, err1 := strconv.ParseUint(fs[2], 8, 32)
		uid, err2 := strconv.ParseInt(fs[3], 10, 64)
		gid, err3 := strconv.ParseInt(fs[4], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("%s:%d: mode, uid and gid must be numeric (the pod's uid has no name on the host): %q", tmpfilesFile, i+1, line)
		}
		out[fs[1]] = tmpfilesEntry{os.FileMode(mode), uid, gid}
	}
	return out
}

// TestTmpfiles: the folders the static pod needs are created for its uid, the
// socket folder open to its group only, the state folder to nobody else.
func TestTmpfiles(t *testing.T) {
	sp := loadStaticPod(t)
	entries := parseTmpfiles(t)
	for dir, mode := range map[string]os.FileMode{
		hostDir(filepath.Dir(sp.sock)):                                   0o750,
		filepath.Dir(softkeyPath(t, staticPodFile, sp.flags["key-uri"])): 0o700,
		filepath.Dir(sp.flags["state-file"]):                             0o700,
	} {
		e, ok := entries[dir]
		if !ok {
			t.Errorf("%s: no entry for %s", tmpfilesFile, dir)
			continue
		}
		if e.mode != mode || e.uid != sp.uid || e.gid != sp.gid {
			t.Errorf("%s: %s %v %d:%d, want %v %d:%d (the static pod's runAsUser:runAsGroup)", tmpfilesFile, dir, e.mode, e.uid, e.gid, mode, sp.uid, sp.gid)
		}
	}
}

// --- running kubekms as deployed -------------------------------------------------------

// server is a kubekms serve process started with an artifact's arguments.
type server struct {
	cmd     *exec.Cmd
	sock    string
	metrics string // http://127.0.0.1:port
	log     *testutil.SyncBuffer
	done    chan struct{} // closed when the process has exited
	waitErr error         // its exit status, once done is closed
}

// rebase moves the artifact's host paths under root (/var/run folded into
// /run, as on the host), points metrics at a free loopback port and replaces
// the socket group.
func rebase(t *testing.T, root string, flags map[string]string, group string) (args []string, sock, metricsURL string) {
	t.Helper()
	under := func(p string) string { return filepath.Join(root, hostDir(p)) }
	out := map[string]string{}
	for k, v := range flags {
		out[k] = v
	}
	sock = under(socketPath(t, "args", flags["listen"]))
	out["listen"] = "unix://" + sock
	out["key-uri"] = "softkey://" + under(softkeyPath(t, "args", flags["key-uri"]))
	out["state-file"] = under(flags["state-file"])
	port := testutil.FreePort(t)
	out["metrics-addr"] = fmt.Sprintf("127.0.0.1:%d", port)
	out["socket-group"] = group
	args = []string{"serve"}
	for k, v := range out {
		args = append(args, "--"+k+"="+v)
	}
	return args, sock, fmt.Sprintf("http://127.0.0.1:%d", port)
}

func startServer(t *testing.T, args []string, sock, metricsURL string, cred *syscall.Credential, env []string) *server {
	t.Helper()
	s := &server{sock: sock, metrics: metricsURL, log: &testutil.SyncBuffer{}, done: make(chan struct{})}
	s.cmd = exec.Command(kubekms(t), args...)
	s.cmd.Env = env
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred}
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start kubekms: %v", err)
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() {
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
		}
		if t.Failed() {
			t.Logf("kubekms log:\n%s", s.log.String())
		}
	})
	return s
}

// get returns the status code and body of GET metricsURL+path.
func (s *server) get(path string) (int, string, error) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(s.metrics + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// waitProbe polls path until it answers 200, as kubelet's startup probe would.
func (s *server) waitProbe(t *testing.T, path string, within time.Duration) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(within)
	for {
		code, body, err := s.get(path)
		if err == nil && code == http.StatusOK {
			t.Logf("GET %s: 200 after %s", path, time.Since(start).Round(time.Millisecond))
			return
		}
		select {
		case <-s.done:
			t.Fatalf("kubekms exited before %s answered: %v\n%s", path, s.waitErr, s.log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: %d %q %v after %s", path, code, body, err, within)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop sends SIGTERM (what kubelet and systemd send) and waits for a clean exit.
func (s *server) stop(t *testing.T, within time.Duration) {
	t.Helper()
	start := time.Now()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.done:
		if s.waitErr != nil {
			t.Errorf("kubekms did not exit cleanly on SIGTERM: %v", s.waitErr)
		}
		t.Logf("exited %s after SIGTERM", time.Since(start).Round(time.Millisecond))
	case <-time.After(within):
		t.Fatalf("kubekms still running %s after SIGTERM (the kill deadline)", within)
	}
	if _, err := os.Lstat(s.sock); !os.IsNotExist(err) {
		t.Errorf("socket %s left behind after SIGTERM (%v)", s.sock, err)
	}
}

// status runs `kubekms status` against the socket as cred (nil: this process's user).
func status(t *testing.T, sock string, cred *syscall.Credential, timeout time.Duration) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, kubekms(t), "status", "--plugin", "unix://"+sock, "--timeout", timeout.String())
	cmd.Env = []string{}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	start := time.Now()
	out, err := cmd.CombinedOutput()
	t.Logf("kubekms status as %v: %s", cred, time.Since(start).Round(time.Millisecond))
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatalf("kubekms status: %v", err)
	}
	return 0, string(out)
}

// newRoot makes a folder that every user may traverse (the static pod's uid
// runs below it), removed at the end of the test.
func newRoot(t *testing.T) string {
	t.Helper()
	root, err := os.MkdirTemp("", "kubekms-deploy-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

// TestServeStaticPod runs kubekms the way the static pod does: its exact
// arguments (paths moved under a temporary root), its uid and gid, its memory
// limit, in folders made by systemd-tmpfiles from kubekms.tmpfiles.conf. Then
// it checks the probes' paths, the socket's owner and mode, who can connect,
// that the real kube-apiserver transformer, loaded from encryption-config.yaml,
// writes and reads a Secret through it, and a clean stop on SIGTERM.
func TestServeStaticPod(t *testing.T) {
	if os.Geteuid() != 0 {
		testutil.Missing(t, "root, to run kubekms as the static pod's uid")
	}
	tmpfiles := testutil.Binary(t, "KUBEKMS_SYSTEMD_TMPFILES", "systemd-tmpfiles")
	sp := loadStaticPod(t)
	root := newRoot(t)
	if out, err := exec.Command(tmpfiles, "--create", "--root="+root, absPath(t, tmpfilesFile)).CombinedOutput(); err != nil {
		t.Fatalf("systemd-tmpfiles: %v\n%s", err, out)
	}

	args, sock, metricsURL := rebase(t, root, sp.flags, sp.flags["socket-group"])
	env := []string{}
	for _, e := range sp.c.Env {
		if e.ValueFrom != nil && e.ValueFrom.ResourceFieldRef != nil && e.ValueFrom.ResourceFieldRef.Resource == "limits.memory" {
			env = append(env, fmt.Sprintf("%s=%d", e.Name, sp.c.Resources.Limits.Memory().Value()))
		}
	}
	cred := &syscall.Credential{Uid: uint32(sp.uid), Gid: uint32(sp.gid), Groups: []uint32{}}
	s := startServer(t, args, sock, metricsURL, cred, env)

	// kubelet's probes, at the manifest's paths.
	s.waitProbe(t, sp.c.StartupProbe.HTTPGet.Path, startupDeadline)
	for _, path := range []string{sp.c.LivenessProbe.HTTPGet.Path, sp.c.ReadinessProbe.HTTPGet.Path, "/healthz"} {
		if code, body, err := s.get(path); err != nil || code != http.StatusOK {
			t.Errorf("GET %s: %d %q %v", path, code, body, err)
		}
	}

	// The socket: the pod's uid and gid, the manifest's mode.
	st, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	if want := socketMode(t, staticPodFile, sp.flags["socket-mode"]); st.Mode().Perm() != want || int64(sys.Uid) != sp.uid || int64(sys.Gid) != sp.gid {
		t.Errorf("socket %v %d:%d, want %v %d:%d", st.Mode().Perm(), sys.Uid, sys.Gid, want, sp.uid, sp.gid)
	}

	// Who can connect: root (kubeadm's apiserver), a non-root apiserver given the group
	// (kube-apiserver-patch.yaml's supplementalGroups), and nobody else.
	if code, out := status(t, sock, nil, 5*time.Second); code != 0 {
		t.Errorf("kubekms status as root: exit %d\n%s", code, out)
	}
	apiserverPod := decodePod(t, apiserverFile)
	groups := []uint32{}
	for _, g := range apiserverPod.Spec.SecurityContext.SupplementalGroups {
		groups = append(groups, uint32(g))
	}
	if code, out := status(t, sock, &syscall.Credential{Uid: rootlessUID, Gid: rootlessUID, Groups: groups}, 5*time.Second); code != 0 {
		t.Errorf("kubekms status as a non-root apiserver with supplementalGroups %v: exit %d\n%s", groups, code, out)
	}
	if code, out := status(t, sock, &syscall.Credential{Uid: outsiderUID, Gid: outsiderUID, Groups: []uint32{}}, time.Second); code != 1 || !strings.Contains(out, "permission denied") {
		t.Errorf("kubekms status as another user: exit %d, want 1 (permission denied)\n%s", code, out)
	}

	apiserverRoundTrip(t, root, sock)

	// kubelet sends SIGTERM and kills after terminationGracePeriodSeconds.
	s.stop(t, time.Duration(*sp.pod.Spec.TerminationGracePeriodSeconds)*time.Second)
}

// apiserverRoundTrip loads encryption-config.yaml into the real kube-apiserver
// code, its endpoint moved to sock, and writes and reads a Secret through it.
func apiserverRoundTrip(t *testing.T, root, sock string) {
	t.Helper()
	ec := decodeEncryptionConfig(t)
	text := strings.Replace(string(readFile(t, encryptionFile)), ec.Resources[0].Providers[0].KMS.Endpoint, "unix://"+sock, 1)
	path := filepath.Join(root, encryptionFile)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg, err := encryptionconfig.LoadEncryptionConfig(ctx, path, false, "kubekms-deploy-test")
	if err != nil {
		t.Fatalf("kube-apiserver would not load %s: %v", encryptionFile, err)
	}
	tr := encryptionconfig.StaticTransformers(cfg.Transformers).TransformerForResource(schema.GroupResource{Resource: "secrets"})
	key := value.DefaultContext("/registry/secrets/default/deploy-test")
	plain := []byte("k8s\x00a secret written through the deployed configuration")
	var stored []byte
	for {
		if stored, err = tr.TransformToStorage(ctx, plain, key); err == nil || ctx.Err() != nil {
			break
		}
		time.Sleep(200 * time.Millisecond) // the apiserver's first Status may still be on its way
	}
	if err != nil {
		t.Fatalf("apiserver write: %v", err)
	}
	if prefix := "k8s:enc:kms:v2:" + providerName + ":"; !bytes.HasPrefix(stored, []byte(prefix)) {
		t.Errorf("stored value starts %q, want %q", stored[:min(len(stored), 32)], prefix)
	} else {
		t.Logf("kube-apiserver transformer stored %d bytes under %q", len(stored), prefix)
	}
	got, _, err := tr.TransformFromStorage(ctx, stored, key)
	if err != nil || !bytes.Equal(got, plain) {
		t.Errorf("apiserver read: %q, %v", got, err)
	}
	// identity second: data written before encryption was turned on still reads.
	if got, _, err := tr.TransformFromStorage(ctx, plain, key); err != nil || !bytes.Equal(got, plain) {
		t.Errorf("apiserver read of unencrypted data: %q, %v", got, err)
	}
}

// TestServeSystemdUnit runs ExecStart's arguments (paths under a temporary
// root, in folders of the unit's RuntimeDirectoryMode and StateDirectoryMode)
// and stops it as systemd would, within TimeoutStopSec.
func TestServeSystemdUnit(t *testing.T) {
	su := loadUnit(t)
	root := newRoot(t)
	sockDir := filepath.Join(root, "run", su.u.get("Service", "RuntimeDirectory"))
	stateDir := filepath.Join(root, "var", "lib", su.u.get("Service", "StateDirectory"))
	for dir, key := range map[string]string{sockDir: "RuntimeDirectoryMode", stateDir: "StateDirectoryMode"} {
		mode, err := strconv.ParseUint(su.u.get("Service", key), 8, 32)
		if err != nil {
			t.Fatalf("%s: %v", key, err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, os.FileMode(mode)); err != nil {
			t.Fatal(err)
		}
	}
	// The unit's group does not exist here: this process's own group stands in.
	args, sock, metricsURL := rebase(t, root, su.flags, strconv.Itoa(os.Getgid()))
	s := startServer(t, args, sock, metricsURL, nil, []string{})
	s.waitProbe(t, "/readyz", startupDeadline)
	if code, out := status(t, sock, nil, 5*time.Second); code != 0 {
		t.Errorf("kubekms status: exit %d\n%s", code, out)
	}
	stop, err := time.ParseDuration(su.u.get("Service", "TimeoutStopSec"))
	if err != nil {
		t.Fatal(err)
	}
	s.stop(t, stop)
}

// --- alerts and documented metrics -----------------------------------------------------

func TestAlertRules(t *testing.T) {
	promtool := testutil.Binary(t, "KUBEKMS_PROMTOOL", "promtool")
	for _, args := range [][]string{{"check", "rules", alertsFile}, {"test", "rules", alertsTestFile}} {
		if out, err := exec.Command(promtool, args...).CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// recorder is a prometheus.Registerer that keeps what it is given.
type recorder struct{ cs []prometheus.Collector }

func (r *recorder) Register(c prometheus.Collector) error   { r.cs = append(r.cs, c); return nil }
func (r *recorder) MustRegister(cs ...prometheus.Collector) { r.cs = append(r.cs, cs...) }
func (r *recorder) Unregister(prometheus.Collector) bool    { return false }

// kubekmsMetrics returns the names of the metrics kubekms exports.
func kubekmsMetrics() map[string]bool {
	r := &recorder{}
	metrics.New(r)
	names := map[string]bool{
		// Registered by serve.go for key services with an auth token (Vault).
		"kubekms_keyservice_token_ttl_seconds": true,
	}
	fq := regexp.MustCompile(`fqName: "([^"]+)"`)
	for _, c := range r.cs {
		ch := make(chan *prometheus.Desc, 16)
		go func() { c.Describe(ch); close(ch) }()
		for d := range ch {
			if m := fq.FindStringSubmatch(d.String()); m != nil {
				names[m[1]] = true
			}
		}
	}
	return names
}

var metricRE = regexp.MustCompile(`\bkubekms_[a-z0-9_]+`)

// TestMetricNames: every kubekms_* name in the alert rules and in
// docs/operations.md is a metric kubekms exports, and every exported metric is
// documented.
func TestMetricNames(t *testing.T) {
	known := kubekmsMetrics()
	if len(known) < 10 {
		t.Fatalf("read only %d metric names from internal/metrics", len(known))
	}
	doc := readFile(t, operationsDoc)
	for _, file := range []string{alertsFile, operationsDoc} {
		for _, name := range metricRE.FindAllString(string(readFile(t, file)), -1) {
			base := name
			for _, suf := range []string{"_bucket", "_sum", "_count"} {
				if b, ok := strings.CutSuffix(name, suf); ok && known[b] {
					base = b
				}
			}
			if !known[base] {
				t.Errorf("%s names %s, which kubekms does not export", file, name)
			}
		}
	}
	for name := range known {
		if !bytes.Contains(doc, []byte(name)) {
			t.Errorf("%s does not document %s", operationsDoc, name)
		}
	}
}

func absPath(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(name)
	if err != nil {
		t.Fatal(err)
	}
	return p
}
