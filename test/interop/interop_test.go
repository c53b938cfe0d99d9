// Package interop runs `kubekms serve` behind the real k8s.io/apiserver
// envelope transformer (loaded from an EncryptionConfiguration exactly as
// kube-apiserver loads it): no kube-apiserver binary, but the apiserver's own
// KMS v2 client, seed handling, storage format and staleness logic.
package interop

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/testutil"
)

var kubekmsBin string

// TestMain runs every backend at once unless -test.parallel says otherwise:
// they spend their minute waiting, not computing.
func TestMain(m *testing.M) {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		_ = flag.Set("test.parallel", "16")
	}
	os.Exit(testutil.MainWithKubekms(m, &kubekmsBin))
}

// Backend is one key service the suite runs kubekms on.
type Backend struct {
	Name string
	// Setup starts the key service (stopped when t ends) and says how to
	// run kubekms on it. dir is the plugin's private folder.
	Setup func(t *testing.T, dir string) Deployment
}

// Deployment is how kubekms serve runs on one key service.
type Deployment struct {
	KeyURI string
	// Flags are extra serve flags (--cluster-name, ...).
	Flags []string
	// Env is added to the plugin's environment, which is the test's own
	// minus every AWS_ variable (the host's AWS settings never leak in).
	Env []string
	// Wrap, if set, wraps the plugin's command line (e.g. with nsenter, to
	// run it in the key service's network namespace).
	Wrap func(cmd []string) []string
	// Rotate rotates the remote key: the key ID must change.
	Rotate func(t *testing.T)
}

func softkeyBackend() Backend {
	return Backend{Name: "softkey", Setup: func(t *testing.T, dir string) Deployment {
		uri := "softkey://" + filepath.Join(dir, "keyring.json")
		return Deployment{KeyURI: uri, Rotate: func(t *testing.T) {
			out, err := exec.Command(kubekmsBin, "softkey", "rotate", "--key-uri", uri).CombinedOutput()
			if err != nil {
				t.Fatalf("softkey rotate: %v: %s", err, out)
			}
		}}
	}}
}

// TestApiserverTransformer runs the backends in parallel: each waits out the
// apiserver's 1-minute Status poll after its rotation.
func TestApiserverTransformer(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.Name, func(t *testing.T) { t.Parallel(); runInterop(t, b) })
	}
}

// plugin is a running `kubekms serve`.
type plugin struct {
	cmd    *exec.Cmd
	socket string
	logs   *bytes.Buffer
}

func startPlugin(t *testing.T, dir string, d Deployment) *plugin {
	t.Helper()
	socket := filepath.Join(dir, "kms.sock")
	argv := append([]string{kubekmsBin, "serve", "--listen", "unix://" + socket, "--key-uri", d.KeyURI,
		"--state-file", filepath.Join(dir, "state.json"), "--probe-interval", "1s"}, d.Flags...)
	if d.Wrap != nil {
		argv = d.Wrap(argv)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = pluginEnv(d.Env)
	logs := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL} // dies with the test binary, even on -timeout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &plugin{cmd: cmd, socket: socket, logs: logs}
	t.Cleanup(func() { p.kill(syscall.SIGKILL) })
	deadline := time.Now().Add(20 * time.Second)
	for {
		if st, err := os.Stat(socket); err == nil && st.Mode().Type() == os.ModeSocket {
			return p
		}
		if time.Now().After(deadline) {
			p.kill(syscall.SIGKILL)
			t.Fatalf("plugin did not create its socket: %s", logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func pluginEnv(extra []string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AWS_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

func (p *plugin) kill(sig syscall.Signal) {
	if p.cmd.ProcessState != nil {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
	_ = p.cmd.Wait()
}

const provider = "kubekms"

func writeConfig(t *testing.T, dir, socket string) string {
	t.Helper()
	cfg := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets]
  providers:
  - kms:
      apiVersion: v2
      name: %s
      endpoint: unix://%s
      timeout: 3s
  - identity: {}
`, provider, socket)
	path := filepath.Join(dir, "encryption-config.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// apiserver is the transformer of one simulated kube-apiserver run.
type apiserver struct {
	tr     value.Transformer
	cancel context.CancelFunc
}

func startApiserver(t *testing.T, cfgPath string) *apiserver {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cfg, err := encryptionconfig.LoadEncryptionConfig(ctx, cfgPath, false, "interop-test")
	if err != nil {
		cancel()
		t.Fatalf("LoadEncryptionConfig: %v", err)
	}
	tr := encryptionconfig.StaticTransformers(cfg.Transformers).TransformerForResource(schema.GroupResource{Resource: "secrets"})
	return &apiserver{tr: tr, cancel: cancel}
}

func etcdKey(i int) string { return fmt.Sprintf("/registry/secrets/default/secret-%d", i) }

func (a *apiserver) write(t *testing.T, key string, plain []byte) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := a.tr.TransformToStorage(ctx, plain, value.DefaultContext(key))
	if err != nil {
		t.Fatalf("TransformToStorage: %v", err)
	}
	return out
}

func (a *apiserver) read(t *testing.T, key string, stored, want []byte) (stale bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, stale, err := a.tr.TransformFromStorage(ctx, stored, value.DefaultContext(key))
	if err != nil {
		t.Fatalf("TransformFromStorage(%s): %v", key, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("TransformFromStorage(%s) returned other bytes", key)
	}
	return stale
}

// storedKeyID parses the kubekms key_id out of a stored value.
func storedKeyID(t *testing.T, stored []byte) string {
	t.Helper()
	prefix := "k8s:enc:kms:v2:" + provider + ":"
	if !bytes.HasPrefix(stored, []byte(prefix)) {
		t.Fatalf("stored value does not start with %q", prefix)
	}
	var obj kmstypes.EncryptedObject
	if err := proto.Unmarshal(stored[len(prefix):], &obj); err != nil {
		t.Fatalf("stored EncryptedObject: %v", err)
	}
	// Format 3 (the default): the wrapped local KEK inside the encrypted
	// seed, no annotation for the apiserver to check on every read.
	sealed := hierarchy.Sealed{Ciphertext: obj.EncryptedDEKSource, Annotations: obj.Annotations}
	if len(obj.Annotations) != 0 || obj.EncryptedDEKSource[0] != 3 || len(sealed.LocalKEK()) == 0 {
		t.Fatalf("stored value: format %d, %d annotations; want format 3 with the local KEK inside", obj.EncryptedDEKSource[0], len(obj.Annotations))
	}
	return obj.KeyID
}

func runInterop(t *testing.T, b Backend) {
	dir, err := os.MkdirTemp("", "kki") // short path: unix sockets allow 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := b.Setup(t, dir)
	p := startPlugin(t, dir, d)
	cfg := writeConfig(t, dir, p.socket)

	// 1. Writes go through kubekms and are stored as k8s:enc:kms:v2:kubekms:.
	a1 := startApiserver(t, cfg)
	const n = 20
	stored := map[string][]byte{}
	plain := map[string][]byte{}
	for i := range n {
		k := etcdKey(i)
		plain[k] = []byte(fmt.Sprintf("k8s\x00password-%d", i))
		stored[k] = a1.write(t, k, plain[k])
		if bytes.Contains(stored[k], plain[k]) {
			t.Fatal("plaintext visible in the stored value")
		}
	}
	keyID1 := storedKeyID(t, stored[etcdKey(0)])
	for k := range stored {
		if stale := a1.read(t, k, stored[k], plain[k]); stale {
			t.Fatalf("%s reported stale right after writing", k)
		}
	}

	// 2. An apiserver restart (a new transformer) reads the first one's data.
	a1.cancel()
	a2 := startApiserver(t, cfg)
	for k := range stored {
		a2.read(t, k, stored[k], plain[k])
	}

	// 3. A plugin restart (kill -9): a new apiserver run still reads everything.
	p.kill(syscall.SIGKILL)
	p = startPlugin(t, dir, d)
	a2.cancel()
	a3 := startApiserver(t, cfg)
	for k := range stored {
		a3.read(t, k, stored[k], plain[k])
	}

	// 4. Rotation without restart: new writes carry the new key_id within the
	// apiserver's Status poll (1 min), old data reads with stale=true.
	d.Rotate(t)
	deadline := time.Now().Add(3 * time.Minute)
	var keyID2 string
	for i := 0; ; i++ {
		k := fmt.Sprintf("/registry/secrets/default/after-rotation-%d", i)
		v := []byte("k8s\x00after")
		s := a3.write(t, k, v)
		if keyID2 = storedKeyID(t, s); keyID2 != keyID1 {
			if stale := a3.read(t, k, s, v); stale {
				t.Fatal("a value written under the new key_id reads as stale")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("new writes still use key_id %q 3 minutes after rotation", keyID1)
		}
		time.Sleep(2 * time.Second)
	}
	t.Logf("key_id %s -> %s", keyID1, keyID2)
	for k := range stored {
		if stale := a3.read(t, k, stored[k], plain[k]); !stale {
			t.Fatalf("%s under the old key_id did not read as stale", k)
		}
	}
	// 5. Storage migration: rewriting gives the new key_id and stale=false.
	for k := range stored {
		stored[k] = a3.write(t, k, plain[k])
		if id := storedKeyID(t, stored[k]); id != keyID2 {
			t.Fatalf("rewritten %s has key_id %q, want %q", k, id, keyID2)
		}
		if stale := a3.read(t, k, stored[k], plain[k]); stale {
			t.Fatalf("rewritten %s still stale", k)
		}
	}
	if !strings.Contains(p.logs.String(), `"method":"Decrypt"`) {
		t.Errorf("plugin logs show no Decrypt call: %s", p.logs)
	}
}
