//go:build image

// Package image runs the container image built by `make image` with podman:
// as the static pod's uid with --network none, and the rendered static pod
// with `podman kube play`, and runs the conformance checks
// (internal/conformance) against their sockets from the host. `make
// image-test` and `make static-pod-test` build the image (`make image`, a
// few seconds when nothing changed) and set KUBEKMS_IMAGE.
package image

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kubekms/kubekms/internal/conformance"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/manifests"
)

var kubekmsBin string // the host's kubekms, for `kubekms status`

func TestMain(m *testing.M) { os.Exit(testutil.MainWithKubekms(m, &kubekmsBin)) }

// image returns the image under test and podman.
func image(t *testing.T) (img, podman string) {
	t.Helper()
	img = os.Getenv("KUBEKMS_IMAGE")
	if img == "" {
		testutil.Missing(t, "KUBEKMS_IMAGE (the image to test; `make image-test` sets it)")
	}
	podman = testutil.Binary(t, "KUBEKMS_PODMAN", "podman")
	return img, podman
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// hostRoot makes a new temporary root for a test's host folders (removed
// after the test) and returns it.
func hostRoot(t *testing.T) string {
	t.Helper()
	root, err := os.MkdirTemp("", "kkimg") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

// tmpfiles makes the static pod's folders under root as the rendered
// tmpfiles entries say, with systemd-tmpfiles.
func tmpfiles(t *testing.T, d *manifests.Deployment, root string) {
	t.Helper()
	tf := testutil.Binary(t, "KUBEKMS_SYSTEMD_TMPFILES", "systemd-tmpfiles")
	conf := filepath.Join(root, manifests.TmpfilesFile)
	if err := os.WriteFile(conf, d.File(manifests.TmpfilesFile).Content, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, tf, "--create", conf)
}

func waitSocket(t *testing.T, sock string, alive func() error) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if st, err := os.Stat(sock); err == nil && st.Mode().Type() == os.ModeSocket {
			return
		}
		if err := alive(); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no socket %s after 60 s", sock)
		}
	}
}

// checkSocket: the static pod's owner, group and mode.
func checkSocket(t *testing.T, sock string, uid, gid int64) {
	t.Helper()
	st, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	if st.Mode().Perm() != 0o660 || int64(sys.Uid) != uid || int64(sys.Gid) != gid {
		t.Errorf("socket %s: %v %d:%d, want -rw-rw---- %d:%d", sock, st.Mode().Perm(), sys.Uid, sys.Gid, uid, gid)
	}
}

// shippedPod is the rendered static pod for opts.
func shippedPod(t *testing.T, opts manifests.Options) (*manifests.Deployment, *corev1.Pod) {
	t.Helper()
	d, err := manifests.Render(opts)
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(d.File(manifests.StaticPodFile).Content, &pod); err != nil {
		t.Fatal(err)
	}
	return d, &pod
}

// TestImageRun runs the image with the shipped static pod's arguments, as its
// uid and gid, with --network none, a read-only root and no capabilities, the
// two host folders mounted, and checks it from the host.
func TestImageRun(t *testing.T) {
	img, podman := image(t)
	d, pod := shippedPod(t, manifests.Options{})
	o := d.Options
	root := hostRoot(t)
	runDir, stateDir := filepath.Join(root, "run"), filepath.Join(root, "state")
	for dir, mode := range map[string]os.FileMode{runDir: 0o750, stateDir: 0o700} {
		if err := os.Mkdir(dir, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, int(o.UID), int(o.GID)); err != nil {
			t.Fatal(err)
		}
	}
	name := fmt.Sprintf("kubekms-image-test-%d", os.Getpid())
	args := []string{"run", "-d", "--name", name, "--network", "none",
		"--user", fmt.Sprintf("%d:%d", o.UID, o.GID), "--read-only", "--cap-drop", "all",
		"--security-opt", "no-new-privileges",
		"-v", runDir + ":" + filepath.Dir(o.Socket), "-v", stateDir + ":" + o.StateDir, img}
	args = append(args, pod.Spec.Containers[0].Args...)
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command(podman, "logs", name).CombinedOutput()
			t.Logf("container log:\n%s", out)
		}
		_ = exec.Command(podman, "rm", "-f", "-t", "0", name).Run()
	})
	run(t, podman, args...)
	sock := filepath.Join(runDir, filepath.Base(o.Socket))
	waitSocket(t, sock, func() error {
		if st := run(t, podman, "inspect", "-f", "{{.State.Status}}", name); st != "running" {
			return fmt.Errorf("container %s before it served", st)
		}
		return nil
	})
	checkSocket(t, sock, o.UID, o.GID)
	conformance.Run(t, "unix://"+sock, o.Provider, kubekmsBin)
	if _, err := os.Stat(filepath.Join(stateDir, "local-kek-state.json")); err != nil {
		t.Errorf("local KEK state not in the state folder: %v", err)
	}

	// kubelet's stop: SIGTERM, then a clean exit within the grace period.
	start := time.Now()
	run(t, podman, "stop", "-t", strconv.FormatInt(*pod.Spec.TerminationGracePeriodSeconds, 10), name)
	if code := run(t, podman, "inspect", "-f", "{{.State.ExitCode}}", name); code != "0" {
		t.Errorf("exit code %s after SIGTERM, want 0", code)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left after stop: %v", err)
	}
	t.Logf("stopped cleanly in %s", time.Since(start).Round(time.Millisecond))
}

// TestImageDefaults runs the image as a uid without a passwd entry (HOME=/)
// with only a keyring named: the local KEK state must go beside the keyring,
// nothing may be written elsewhere in the container, and without --key-uri it
// must refuse to start with a clear message rather than write to /.local.
func TestImageDefaults(t *testing.T) {
	img, podman := image(t)
	root := hostRoot(t)
	data := filepath.Join(root, "data")
	if err := os.Mkdir(data, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(data, 10001, 10001); err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("kubekms-defaults-test-%d", os.Getpid())
	t.Cleanup(func() { _ = exec.Command(podman, "rm", "-f", "-t", "0", name).Run() })
	// A writable root here, so that podman diff can show any stray write (and no
	// passwd entry added by podman: HOME=/ as under kubelet).
	run(t, podman, "run", "-d", "--name", name, "--network", "none", "--user", "10001:10001",
		"--passwd=false", "--env", "HOME=/", "-v", data+":/data", img, "serve", "--key-uri=softkey:///data/keyring.json")
	state := filepath.Join(data, "local-kek-state.json")
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := os.Stat(state); err == nil {
			break
		}
		if time.Now().After(deadline) {
			out, _ := exec.Command(podman, "logs", name).CombinedOutput()
			t.Fatalf("no local KEK state beside the keyring after 60 s:\n%s", out)
		}
	}
	var stray []string
	for _, l := range strings.Split(run(t, podman, "diff", name), "\n") {
		f := strings.Fields(l) // "A /path" or "C /path"
		if len(f) != 2 {
			continue
		}
		p := f[1]
		if p == "/data" || p == "/tmp" || strings.HasPrefix(p, "/tmp/kubekms-10001") || l == "C /etc" {
			// the mount point; the default socket's private folder in /tmp; the folder
			// where podman puts the mount points of hosts and resolv.conf (a file
			// written below it would still be listed)
			continue
		}
		stray = append(stray, l)
	}
	if len(stray) > 0 {
		t.Errorf("kubekms wrote outside its folders: %q", stray)
	}

	out, err := exec.Command(podman, "run", "--rm", "--network", "none", "--user", "10001:10001", "--passwd=false", "--env", "HOME=/",
		"--read-only", img, "serve").CombinedOutput()
	if err == nil || !bytes.Contains(out, []byte("--key-uri is required")) {
		t.Errorf("serve as a uid with HOME=/ and no --key-uri: %v\n%s\nwant a refusal naming --key-uri", err, out)
	}
}

// TestStaticPod plays the rendered static pod with `podman kube play` (its
// folders made by the rendered tmpfiles entries, under a temporary root, and
// its metrics on a free loopback port) and checks what the manifest promises.
func TestStaticPod(t *testing.T) {
	img, podman := image(t)
	root := hostRoot(t)
	port := testutil.FreePort(t)
	d, pod := shippedPod(t, manifests.Options{Image: img,
		Socket: filepath.Join(root, "run", "kms.sock"), StateDir: filepath.Join(root, "state"),
		MetricsAddr: fmt.Sprintf("127.0.0.1:%d", port)})
	o := d.Options
	tmpfiles(t, d, root)

	podName := fmt.Sprintf("kubekms-pod-test-%d", os.Getpid())
	manifest := strings.Replace(string(d.File(manifests.StaticPodFile).Content), "\n  name: kubekms\n", "\n  name: "+podName+"\n", 1)
	path := filepath.Join(root, "kubekms.yaml")
	if err := os.WriteFile(path, []byte(manifest), 0o600); err != nil {
		t.Fatal(err)
	}
	ctr := podName + "-" + pod.Spec.Containers[0].Name
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command(podman, "logs", ctr).CombinedOutput()
			t.Logf("container log:\n%s", out)
		}
		_ = exec.Command(podman, "pod", "rm", "-f", "-t", "0", podName).Run()
	})
	t.Logf("podman kube play: %s", run(t, podman, "kube", "play", path))

	sock := o.Socket
	waitSocket(t, sock, func() error {
		if st := run(t, podman, "inspect", "-f", "{{.State.Status}}", ctr); st != "running" {
			return fmt.Errorf("container %s before it served", st)
		}
		return nil
	})

	// What the manifest promises, read from the running process and podman.
	pid := run(t, podman, "inspect", "-f", "{{.State.Pid}}", ctr)
	st := procStatus(t, pid)
	want := map[string]string{
		"Uid":    fmt.Sprintf("%d\t%d\t%d\t%d", o.UID, o.UID, o.UID, o.UID),
		"Gid":    fmt.Sprintf("%d\t%d\t%d\t%d", o.GID, o.GID, o.GID, o.GID),
		"CapInh": "0000000000000000", "CapPrm": "0000000000000000", "CapEff": "0000000000000000",
		"CapBnd": "0000000000000000", "CapAmb": "0000000000000000",
		"NoNewPrivs": "1", "Seccomp": "2",
	}
	for k, v := range want {
		if st[k] != v {
			t.Errorf("container process %s: %q, want %q", k, st[k], v)
		}
	}
	if ro := run(t, podman, "inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", ctr); ro != "true" {
		t.Errorf("ReadonlyRootfs %s, want true", ro)
	}
	if !rootMountReadOnly(t, pid) {
		t.Error("the container's / is not mounted read-only")
	}
	if mem := run(t, podman, "inspect", "-f", "{{.HostConfig.Memory}}", ctr); mem != strconv.FormatInt(pod.Spec.Containers[0].Resources.Limits.Memory().Value(), 10) {
		t.Errorf("memory limit %s, want the manifest's %s", mem, pod.Spec.Containers[0].Resources.Limits.Memory())
	}
	checkSocket(t, sock, o.UID, o.GID)

	// The probes, from the host (hostNetwork: the metrics server is on the node's loopback).
	c := pod.Spec.Containers[0]
	for _, p := range []*corev1.Probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
		url := fmt.Sprintf("http://%s:%d%s", p.HTTPGet.Host, p.HTTPGet.Port.IntValue(), p.HTTPGet.Path)
		if code := httpGet(t, url); code != http.StatusOK {
			t.Errorf("probe GET %s: %d", url, code)
		}
	}
	conformance.Run(t, "unix://"+sock, o.Provider, kubekmsBin)

	run(t, podman, "pod", "stop", "-t", strconv.FormatInt(*pod.Spec.TerminationGracePeriodSeconds, 10), podName)
	if code := run(t, podman, "inspect", "-f", "{{.State.ExitCode}}", ctr); code != "0" {
		t.Errorf("exit code %s after SIGTERM, want 0", code)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left after stop: %v", err)
	}
}

func procStatus(t *testing.T, pid string) map[string]string {
	t.Helper()
	f, err := os.Open("/proc/" + pid + "/status")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

// rootMountReadOnly reads the process's mount table: is "/" mounted ro?
func rootMountReadOnly(t *testing.T, pid string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/" + pid + "/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	ro := false
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l) // id parent major:minor root mountpoint options ...
		if len(f) > 5 && f[4] == "/" {
			ro = strings.Contains(","+f[5]+",", ",ro,") // the last mount on / wins
		}
	}
	return ro
}

func httpGet(t *testing.T, url string) int {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			return resp.StatusCode
		}
		if time.Now().After(deadline) {
			t.Errorf("GET %s: %v", url, err)
			return 0
		}
	}
}
