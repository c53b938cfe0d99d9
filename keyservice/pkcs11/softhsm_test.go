package pkcs11

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice"
)

// Environment variables the tests read:
//
//	KUBEKMS_PKCS11_MODULE   the SoftHSM2 module (default /usr/lib/softhsm/libsofthsm2.so)
//	KUBEKMS_SOFTHSM2_UTIL   softhsm2-util (default: cache bin dir, then PATH)
//	KUBEKMS_PKCS11_TOOL     OpenSC's pkcs11-tool (default: cache bin dir, then PATH)
//	KUBEKMS_REQUIRE_REAL=1  fail instead of skip when any of them is missing
//
// hack/install-softhsm.sh installs all three.

const (
	testPIN   = "user-PIN-7319"
	testSOPIN = "so-PIN-2846"
	testToken = "kms"
	testLabel = "kek"
)

// softHSM is one private SoftHSM2 installation: its own config file and
// token directory under t.TempDir, selected through SOFTHSM2_CONF (which the
// module reads in C_Initialize).
type softHSM struct {
	t       testing.TB
	dir     string
	tokens  string
	module  string
	util    string
	tool    string
	pinFile string
	nextID  int
	ids     []int // key objects created and not deleted
}

func moduleOrMissing(t testing.TB) string {
	t.Helper()
	module := os.Getenv("KUBEKMS_PKCS11_MODULE")
	if module == "" {
		module = "/usr/lib/softhsm/libsofthsm2.so"
	}
	if _, err := os.Stat(module); err != nil {
		testutil.Missing(t, "SoftHSM2 module %s: %v (run hack/install-softhsm.sh)", module, err)
	}
	return module
}

func newSoftHSM(t testing.TB) *softHSM {
	t.Helper()
	h := &softHSM{
		t:      t,
		util:   testutil.Binary(t, "KUBEKMS_SOFTHSM2_UTIL", "softhsm2-util"),
		tool:   testutil.Binary(t, "KUBEKMS_PKCS11_TOOL", "pkcs11-tool"),
		module: moduleOrMissing(t),
		dir:    t.TempDir(),
		nextID: 1,
	}
	h.tokens = filepath.Join(h.dir, "tokens")
	conf := filepath.Join(h.dir, "softhsm2.conf")
	if err := os.Mkdir(h.tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n", h.tokens)
	if err := os.WriteFile(conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	h.pinFile = filepath.Join(h.dir, "pin")
	if err := os.WriteFile(h.pinFile, []byte(testPIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h.run(h.util, "--init-token", "--free", "--label", testToken, "--pin", testPIN, "--so-pin", testSOPIN)
	return h
}

func (h *softHSM) run(bin string, args ...string) string {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		h.t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), args[0], err, out)
	}
	return string(out)
}

func (h *softHSM) tool11(args ...string) string {
	h.t.Helper()
	base := []string{"--module", h.module, "--token-label", testToken, "--login", "--pin", testPIN}
	return h.run(h.tool, append(base, args...)...)
}

// keygen creates a sensitive, non-extractable AES-256 key labelled label with
// the next CKA_ID, and returns that id.
func (h *softHSM) keygen(label string, extra ...string) int {
	h.t.Helper()
	id := h.nextID
	h.nextID++
	args := append([]string{"--keygen", "--key-type", "AES:32", "--label", label, "--id", fmt.Sprintf("%02x", id)}, extra...)
	if len(extra) == 0 {
		args = append(args, "--sensitive")
	}
	h.tool11(args...)
	h.ids = append(h.ids, id)
	return id
}

func (h *softHSM) deleteKey(id int) {
	h.t.Helper()
	h.tool11("--delete-object", "--type", "secrkey", "--id", fmt.Sprintf("%02x", id))
}

// deleteAll deletes every key object created so far: what an operator does
// to revoke (crypto-shred) the key.
func (h *softHSM) deleteAll() {
	h.t.Helper()
	for _, id := range h.ids {
		h.deleteKey(id)
	}
	h.ids = nil
}

// stop makes the token unavailable by moving its directory out of the token
// directory (as pulling a token out of its reader would); start moves it back.
// SoftHSM2 then reports the token as broken (C_GetTokenInfo fails with
// CKR_GENERAL_ERROR, C_FindObjects finds nothing) until C_Initialize runs
// again, even after the directory is back.
func (h *softHSM) stop() {
	h.t.Helper()
	ents, err := os.ReadDir(h.tokens)
	if err != nil || len(ents) != 1 {
		h.t.Fatalf("token directory %s: %v entries, %v", h.tokens, len(ents), err)
	}
	if err := os.MkdirAll(filepath.Join(h.dir, "away"), 0o700); err != nil {
		h.t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(h.tokens, ents[0].Name()), filepath.Join(h.dir, "away", ents[0].Name())); err != nil {
		h.t.Fatal(err)
	}
}

func (h *softHSM) start() {
	h.t.Helper()
	ents, err := os.ReadDir(filepath.Join(h.dir, "away"))
	if err != nil || len(ents) != 1 {
		h.t.Fatalf("moved-away token: %v entries, %v", len(ents), err)
	}
	if err := os.Rename(filepath.Join(h.dir, "away", ents[0].Name()), filepath.Join(h.tokens, ents[0].Name())); err != nil {
		h.t.Fatal(err)
	}
}

// uri returns a key URI for this HSM with extra path attributes and query
// attributes appended.
func (h *softHSM) uri(path, query string) string {
	u := "pkcs11:token=" + testToken + path + "?module-path=" + escape(h.module, queryChar) +
		"&pin-source=" + escape("file:"+h.pinFile, queryChar)
	return u + query
}

func (h *softHSM) open(t testing.TB, uri string, opts keyservice.Options) *Service {
	t.Helper()
	svc, err := Open(context.Background(), uri, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = svc.Close() })
	return svc.(*Service)
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitProbe polls Probe until it succeeds (the module re-initializes at most
// once per reinitInterval).
func waitProbe(t testing.TB, svc keyservice.Service) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		id, err := svc.Probe(testCtx(t))
		if err == nil {
			return id
		}
		if time.Now().After(deadline) {
			t.Fatalf("Probe did not recover: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func mustClass(t testing.TB, what string, err error, want keyservice.Class) {
	t.Helper()
	if got := keyservice.Classify(err); got != want {
		t.Fatalf("%s: class %v, want %v (err: %v)", what, got, want, err)
	}
}

func hasSecret(err error, secrets ...string) bool {
	if err == nil {
		return false
	}
	for _, s := range secrets {
		if strings.Contains(err.Error(), s) {
			return true
		}
	}
	return false
}
