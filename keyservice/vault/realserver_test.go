package vault_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
)

// realServer returns the address and a root (or sufficiently privileged)
// token of a real Vault or OpenBao server: the one VAULT_BIN starts in dev
// mode on loopback, or the one VAULT_ADDR and VAULT_TOKEN name. Neither can
// be installed on the project's machines, so without them the test skips;
// CI covers the same contract with the transittest stand-in.
func realServer(t *testing.T) (addr, token string) {
	t.Helper()
	if bin := os.Getenv("VAULT_BIN"); bin != "" {
		return startDevServer(t, bin)
	}
	addr, token = os.Getenv("VAULT_ADDR"), os.Getenv("VAULT_TOKEN")
	if addr == "" || token == "" {
		t.Skip("no real Vault/OpenBao server: set VAULT_BIN, or VAULT_ADDR and VAULT_TOKEN (the stand-in contract runs regardless)")
	}
	return addr, token
}

// startDevServer runs `vault server -dev` (or `bao server -dev`) on a free
// loopback port with a random root token, and stops it when t ends.
func startDevServer(t *testing.T, bin string) (string, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := ln.Addr().String()
	_ = ln.Close()
	root := randomName("root-")
	cmd := exec.Command(bin, "server", "-dev", "-dev-listen-address="+listen, "-dev-root-token-id="+root)
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir()) // the dev server writes ~/.vault-token
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	logFile, err := os.Create(filepath.Join(t.TempDir(), "server.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	})
	addr := "http://" + listen
	c := adminClient(t, addr, root, "")
	deadline := time.Now().Add(30 * time.Second)
	for {
		hctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		h, err := c.Sys().HealthWithContext(hctx)
		cancel()
		if err == nil && h.Initialized && !h.Sealed {
			return addr, root
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logFile.Name())
			t.Fatalf("%s dev server did not become ready: %v\n%s", bin, err, log)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func randomName(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// realKey sets up a transit mount, a key, and a token whose policy grants
// exactly what the backend needs; disable/enable rewrite that policy.
type realKey struct {
	uri                     string
	rotate, disable, enable func(t *testing.T)
}

func newRealKey(t *testing.T) *realKey {
	addr, root := realServer(t)
	admin := adminClient(t, addr, root, os.Getenv("VAULT_NAMESPACE"))
	mount := randomName("kubekms-test-")
	if err := admin.Sys().Mount(mount, &api.MountInput{Type: "transit"}); err != nil {
		t.Fatalf("enable transit at %s: %v", mount, err)
	}
	t.Cleanup(func() { _ = admin.Sys().Unmount(mount) })
	if _, err := admin.Logical().Write(mount+"/keys/kek", nil); err != nil {
		t.Fatal(err)
	}
	grant := fmt.Sprintf(`
path "%[1]s/encrypt/kek" { capabilities = ["update"] }
path "%[1]s/decrypt/kek" { capabilities = ["update"] }
path "%[1]s/keys/kek" { capabilities = ["read"] }
`, mount)
	deny := fmt.Sprintf(`path "%s/keys/none" { capabilities = ["deny"] }`, mount)
	put := func(t *testing.T, rules string) {
		if err := admin.Sys().PutPolicy(mount, rules); err != nil {
			t.Fatalf("write policy: %v", err)
		}
	}
	put(t, grant)
	t.Cleanup(func() { _ = admin.Sys().DeletePolicy(mount) })
	renewable := true
	sec, err := admin.Auth().Token().Create(&api.TokenCreateRequest{Policies: []string{mount}, TTL: "1h", Renewable: &renewable})
	if err != nil {
		t.Fatalf("create token: %v", err)
	}
	tokenFile := writeFile(t, filepath.Join(t.TempDir(), "token"), sec.Auth.ClientToken)
	scheme := "hcvault"
	u, err := url.Parse(addr)
	if err != nil {
		t.Fatalf("VAULT_ADDR %q: %v", addr, err)
	}
	if u.Scheme == "https" {
		scheme = "vault+https"
	}
	uri := fmt.Sprintf("%s://%s/%s/keys/kek?token-file=%s", scheme, u.Host, mount, tokenFile)
	if ns := os.Getenv("VAULT_NAMESPACE"); ns != "" {
		uri += "&namespace=" + ns
	}
	if ca := os.Getenv("VAULT_CACERT"); ca != "" && scheme != "hcvault" {
		uri += "&ca-file=" + ca
	}
	return &realKey{
		uri:     uri,
		disable: func(t *testing.T) { put(t, deny) },
		enable:  func(t *testing.T) { put(t, grant) },
		rotate: func(t *testing.T) {
			if _, err := admin.Logical().Write(mount+"/keys/kek/rotate", nil); err != nil {
				t.Fatal(err)
			}
		},
	}
}

func (k *realKey) harness() keyservicetest.Harness {
	return keyservicetest.Harness{
		Open:    func(t *testing.T) keyservice.Service { return open(t, k.uri, nil) },
		Rotate:  k.rotate,
		Disable: k.disable,
		Enable:  k.enable,
		// No Stop/Start: a dev server keeps its keys in memory only.
	}
}

func TestContractRealServer(t *testing.T) {
	keyservicetest.Run(t, newRealKey(t).harness())
}

func TestHierarchyRealServer(t *testing.T) {
	hierarchytest.RunBackend(t, newRealKey(t).harness())
}
