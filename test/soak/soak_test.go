// Package soak drives `kubekms serve` with concurrent Encrypt and Decrypt
// calls while the key service goes away and comes back, the plugin is killed
// with SIGKILL and restarted, the remote key is rotated 5 times, and the key
// is disabled and re-enabled. It reports operations attempted, failed and
// lost; lost must be 0: every ciphertext the plugin ever returned still
// decrypts (through a freshly started plugin) once its key is enabled again.
//
// It runs on softkey (the keyring file goes away) and on a real Vault server
// (stopped and restarted on its file storage, sealed and unsealed, hung with
// SIGSTOP; a removed policy is the revocation). Every outage must be served
// from the outage grace with zero failed calls: a sealed Vault is an outage,
// never a revocation. backends_test.go adds the Cloud KMS stand-in and a real
// software TPM (swtpm).
//
//	go test -count=1 -v ./test/soak/ -soak.phase=3s
package soak

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/internal/testutil"
)

var (
	phase   = flag.Duration("soak.phase", 2*time.Second, "length of each fault phase")
	workers = flag.Int("soak.workers", 8, "concurrent callers")
	bin     string
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(testutil.MainWithKubekms(m, &bin))
}

type plugin struct {
	cmd  *exec.Cmd
	logs *bytes.Buffer
}

// keyService is the key service under soak: its key URI and what the soak
// does to it.
type keyService struct {
	uri   string
	flags []string // extra serve flags
	env   []string // added to the plugin's environment
	// outages are the phases in which the key service is unreachable or
	// refuses service; each must cost zero failed calls.
	outages         []fault
	rotate          func(t *testing.T)
	disable, enable func(t *testing.T)
}

type fault struct {
	name   string
	during func(t *testing.T, sleep func())
}

type env struct {
	dir, socket string
	ks          keyService
	p           *plugin
	logs        bytes.Buffer // of every plugin process
}

func (e *env) start(t *testing.T) {
	t.Helper()
	p := &plugin{logs: &e.logs}
	p.cmd = exec.Command(bin, append([]string{"serve", "--listen", "unix://" + e.socket, "--key-uri", e.ks.uri,
		"--state-file", filepath.Join(e.dir, "state.json"), "--probe-interval", "200ms",
		"--revocation-bound", "500ms", "--outage-grace", "1h", "--log-level", "warn"}, e.ks.flags...)...)
	p.cmd.Env = append(os.Environ(), e.ks.env...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL} // dies with the test binary, even on -timeout
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	e.p = p
	t.Cleanup(func() { p.kill() })
	deadline := time.Now().Add(20 * time.Second)
	for {
		if st, err := os.Stat(e.socket); err == nil && st.Mode().Type() == os.ModeSocket {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin did not start: %s", p.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *plugin) kill() {
	if p.cmd.ProcessState == nil {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		_ = p.cmd.Wait()
	}
}

func softkeyService(t *testing.T, dir string) keyService {
	keyring := filepath.Join(dir, "keyring.json")
	uri := "softkey://" + keyring
	kubekms := func(t *testing.T, args ...string) {
		t.Helper()
		out, err := exec.Command(bin, append(args, "--key-uri", uri)...).CombinedOutput()
		if err != nil {
			t.Fatalf("kubekms %v: %v: %s", args, err, out)
		}
	}
	return keyService{
		uri: uri,
		outages: []fault{{"key service unreachable", func(t *testing.T, sleep func()) {
			mustRename(t, keyring, keyring+".away")
			sleep()
			mustRename(t, keyring+".away", keyring)
		}}},
		rotate:  func(t *testing.T) { kubekms(t, "softkey", "rotate") },
		disable: func(t *testing.T) { kubekms(t, "softkey", "disable", "--all") },
		enable:  func(t *testing.T) { kubekms(t, "softkey", "enable", "--all") },
	}
}

func vaultService(t *testing.T, _ string) keyService {
	k := vaultserver.New(t, vaultserver.Options{}).NewTransitKey(t)
	srv := k.Server
	return keyService{
		uri: k.URI(),
		outages: []fault{
			{"Vault stopped, restarted on its storage, unsealed", func(t *testing.T, sleep func()) {
				srv.Stop(t)
				sleep()
				srv.Start(t)
			}},
			{"Vault sealed", func(t *testing.T, sleep func()) {
				srv.Seal(t)
				sleep()
				srv.Unseal(t)
			}},
			{"Vault hung (SIGSTOP)", func(t *testing.T, sleep func()) {
				srv.Pause(t)
				sleep()
				srv.Resume(t)
			}},
		},
		rotate:  func(t *testing.T) { k.Rotate(t) },
		disable: func(t *testing.T) { k.RemovePolicy(t) },
		enable:  func(t *testing.T) { k.RestorePolicy(t) },
	}
}

// record is one Encrypt answer with the plaintext it must decrypt to.
type record struct {
	plain []byte
	resp  *kmsapi.EncryptResponse
}

// counts are per phase.
type counts struct {
	first             atomic.Value // first error message
	attempted, failed atomic.Int64
	codes             sync.Map // codes.Code -> *atomic.Int64
}

func (c *counts) fail(err error) {
	c.first.CompareAndSwap(nil, err.Error())
	c.failed.Add(1)
	v, _ := c.codes.LoadOrStore(status.Code(err), new(atomic.Int64))
	v.(*atomic.Int64).Add(1)
}

func (c *counts) code(code codes.Code) int64 {
	if v, ok := c.codes.Load(code); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

func TestSoak(t *testing.T) {
	t.Run("softkey", func(t *testing.T) { soak(t, softkeyService) })
	t.Run("vault", func(t *testing.T) { soak(t, vaultService) })
}

func soak(t *testing.T, newService func(t *testing.T, dir string) keyService) {
	dir, err := os.MkdirTemp("", "kks")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &env{dir: dir, socket: filepath.Join(dir, "kms.sock"), ks: newService(t, dir)}
	e.start(t)
	// Like the apiserver's KMS client: one connection, WaitForReady, a
	// deadline per call.
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := kmsapi.NewKeyManagementServiceClient(conn)

	var mu sync.Mutex
	var records []record
	var cur atomic.Pointer[counts]
	cur.Store(&counts{})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range *workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c := cur.Load()
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				plain := make([]byte, 32)
				_, _ = rand.Read(plain)
				c.attempted.Add(1)
				resp, err := client.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: plain, Uid: "soak"})
				if err != nil {
					c.fail(err)
				} else {
					mu.Lock()
					records = append(records, record{plain, resp})
					mu.Unlock()
				}
				mu.Lock()
				var r record
				if n := len(records); n > 0 {
					i, _ := rand.Int(rand.Reader, big.NewInt(int64(n)))
					r = records[i.Int64()]
				}
				mu.Unlock()
				if r.resp != nil {
					c.attempted.Add(1)
					got, err := client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: r.resp.Ciphertext, KeyId: r.resp.KeyId, Annotations: r.resp.Annotations, Uid: "soak"})
					switch {
					case err != nil:
						c.fail(err)
					case !bytes.Equal(got.Plaintext, r.plain):
						t.Error("Decrypt returned wrong plaintext")
					}
				}
				cancel()
				time.Sleep(time.Millisecond)
			}
		}()
	}

	type result struct {
		name string
		c    *counts
	}
	var results []result
	run := func(name string, during func()) *counts {
		c := &counts{}
		cur.Store(c)
		// Let calls that started in the previous phase finish before this
		// phase's fault, so their outcome is not charged to the wrong phase.
		time.Sleep(200 * time.Millisecond)
		during()
		results = append(results, result{name, c})
		return c
	}
	sleep := func() { time.Sleep(*phase) }

	run("baseline", sleep)
	var outages []result
	for _, f := range e.ks.outages {
		c := run(f.name, func() { f.during(t, sleep) })
		outages = append(outages, result{f.name, c})
		run("after: "+f.name, sleep)
	}
	run("plugin SIGKILL + restart", func() {
		e.p.kill()
		time.Sleep(*phase / 4)
		e.start(t)
		sleep()
	})
	rotations := run("remote key rotated 5 times", func() {
		for range 5 {
			e.ks.rotate(t)
			time.Sleep(*phase / 2)
		}
	})
	revoked := run("key disabled", func() {
		e.ks.disable(t)
		sleep()
	})
	run("key re-enabled", func() {
		e.ks.enable(t)
		sleep()
	})
	close(stop)
	wg.Wait()
	if os.Getenv("SOAK_DEBUG") != "" {
		t.Logf("plugin logs: %s", e.logs.String())
	}

	// Every ciphertext ever returned must still decrypt, through a fresh
	// plugin with no cache and no state.
	e.p.kill()
	if err := os.Remove(filepath.Join(dir, "state.json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	e.start(t)
	lost := 0
	var firstErr error
	for _, r := range records {
		var got *kmsapi.DecryptResponse
		var err error
		// Like the apiserver, retry what the transport reports as
		// Unavailable (the connection to the killed plugin can still carry
		// the first call): lost means it never decrypts.
		for try := 0; try < 3; try++ {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			got, err = client.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: r.resp.Ciphertext, KeyId: r.resp.KeyId, Annotations: r.resp.Annotations, Uid: "verify"})
			cancel()
			if status.Code(err) != codes.Unavailable {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil || !bytes.Equal(got.Plaintext, r.plain) {
			if firstErr == nil {
				firstErr = fmt.Errorf("key_id %s: %v", r.resp.KeyId, err)
			}
			lost++
		}
	}

	t.Logf("| phase (%v each, %d callers) | attempted | failed | failures by code |", *phase, *workers)
	t.Logf("|---|---|---|---|")
	for _, r := range results {
		byCode := ""
		r.c.codes.Range(func(k, v any) bool {
			byCode += fmt.Sprintf("%v=%d ", k, v.(*atomic.Int64).Load())
			return true
		})
		t.Logf("| %s | %d | %d | %s |", r.name, r.c.attempted.Load(), r.c.failed.Load(), byCode)
		if first := r.c.first.Load(); first != nil {
			t.Logf("  first failure in %q: %s", r.name, first)
		}
	}
	t.Logf("ciphertexts returned: %d, lost: %d (first error: %v)", len(records), lost, firstErr)

	if lost != 0 {
		t.Fatalf("%d of %d ciphertexts no longer decrypt", lost, len(records))
	}
	for _, o := range outages {
		if n := o.c.failed.Load(); n != 0 {
			t.Errorf("%d calls failed in %q; the outage grace should serve them", n, o.name)
		}
	}
	if n := rotations.failed.Load(); n != 0 {
		t.Errorf("%d calls failed during rotations", n)
	}
	if revoked.code(codes.FailedPrecondition) == 0 {
		t.Error("no call was refused while the key was disabled: crypto-shredding did not happen")
	}
	if results[0].c.attempted.Load() == 0 {
		t.Error("the soak made no calls")
	}
}

func mustRename(t *testing.T, from, to string) {
	t.Helper()
	if err := os.Rename(from, to); err != nil {
		t.Fatal(err)
	}
}
