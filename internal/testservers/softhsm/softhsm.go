// Package softhsm gives tests a private SoftHSM2 token (a real PKCS#11
// module): its own config file and token directory under t.TempDir, selected
// through SOFTHSM2_CONF (which the module reads in C_Initialize), keys made
// and deleted with OpenSC's pkcs11-tool.
//
// Environment variables it reads:
//
//	KUBEKMS_PKCS11_MODULE   the SoftHSM2 module (default /usr/lib/softhsm/libsofthsm2.so)
//	KUBEKMS_SOFTHSM2_UTIL   softhsm2-util (default: cache bin dir, then PATH)
//	KUBEKMS_PKCS11_TOOL     OpenSC's pkcs11-tool (default: cache bin dir, then PATH)
//	KUBEKMS_REQUIRE_REAL=1  fail instead of skip when any of them is missing
//
// hack/install-softhsm.sh installs all three.
package softhsm

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
)

// Test credentials and names of every token Start makes.
const (
	PIN        = "user-PIN-7319"
	SOPIN      = "so-PIN-2846"
	TokenLabel = "kms"
	// KeyLabel is the label tests give the key they wrap with.
	KeyLabel = "kek"
)

// Token is one private SoftHSM2 installation with one initialized token.
type Token struct {
	t testing.TB
	// Dir holds the config, the PIN file and the token directory.
	Dir string
	// Conf is the SoftHSM2 config file; SOFTHSM2_CONF must name it.
	Conf string
	// Module is the PKCS#11 module path.
	Module string
	// PINFile holds PIN and a newline.
	PINFile string

	tokens string
	util   string
	tool   string
	nextID int
	ids    []int // key objects created and not deleted
}

// Module returns the SoftHSM2 module path, reporting it Missing if absent.
func Module(t testing.TB) string {
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

// Start makes a private token labelled TokenLabel with PIN and SOPIN and sets
// SOFTHSM2_CONF for the rest of the test (so t must not be parallel). Child
// processes inherit it; Env returns it for an explicit environment.
func Start(t testing.TB) *Token {
	t.Helper()
	tk := StartForProcesses(t)
	t.Setenv("SOFTHSM2_CONF", tk.Conf)
	return tk
}

// StartForProcesses makes the same token without touching the test's
// environment, for tests (parallel ones too) that use it only from child
// processes started with Env.
func StartForProcesses(t testing.TB) *Token {
	t.Helper()
	tk := &Token{
		t:      t,
		util:   testutil.Binary(t, "KUBEKMS_SOFTHSM2_UTIL", "softhsm2-util"),
		tool:   testutil.Binary(t, "KUBEKMS_PKCS11_TOOL", "pkcs11-tool"),
		Module: Module(t),
		Dir:    t.TempDir(),
		nextID: 1,
	}
	tk.tokens = filepath.Join(tk.Dir, "tokens")
	tk.Conf = filepath.Join(tk.Dir, "softhsm2.conf")
	if err := os.Mkdir(tk.tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n", tk.tokens)
	if err := os.WriteFile(tk.Conf, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	tk.PINFile = filepath.Join(tk.Dir, "pin")
	if err := os.WriteFile(tk.PINFile, []byte(PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tk.run(tk.util, "--init-token", "--free", "--label", TokenLabel, "--pin", PIN, "--so-pin", SOPIN)
	return tk
}

// Env is the environment a separate process needs to see this token.
func (tk *Token) Env() []string { return []string{"SOFTHSM2_CONF=" + tk.Conf} }

func (tk *Token) run(bin string, args ...string) string {
	tk.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append(os.Environ(), tk.Env()...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		tk.t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), args[0], err, out)
	}
	return string(out)
}

func (tk *Token) tool11(args ...string) string {
	tk.t.Helper()
	base := []string{"--module", tk.Module, "--token-label", TokenLabel, "--login", "--pin", PIN}
	return tk.run(tk.tool, append(base, args...)...)
}

// Keygen creates an AES-256 key labelled label with the next CKA_ID, and
// returns that id. Without extra pkcs11-tool flags the key is sensitive and
// non-extractable; with them, the flags alone decide.
func (tk *Token) Keygen(label string, extra ...string) int {
	tk.t.Helper()
	id := tk.nextID
	tk.nextID++
	args := append([]string{"--keygen", "--key-type", "AES:32", "--label", label, "--id", fmt.Sprintf("%02x", id)}, extra...)
	if len(extra) == 0 {
		args = append(args, "--sensitive")
	}
	tk.tool11(args...)
	tk.ids = append(tk.ids, id)
	return id
}

// SetNextID sets the CKA_ID the next Keygen uses (to re-create a key).
func (tk *Token) SetNextID(id int) { tk.nextID = id }

// DeleteKey deletes the key object with CKA_ID id.
func (tk *Token) DeleteKey(id int) {
	tk.t.Helper()
	tk.tool11("--delete-object", "--type", "secrkey", "--id", fmt.Sprintf("%02x", id))
}

// DeleteAll deletes every key object created so far: what an operator does
// to revoke (crypto-shred) the key.
func (tk *Token) DeleteAll() {
	tk.t.Helper()
	for _, id := range tk.ids {
		tk.DeleteKey(id)
	}
	tk.ids = nil
}

// Remove makes the token unavailable by moving its directory out of the
// token directory (as pulling a token out of its reader would); Reinsert
// moves it back. SoftHSM2 then reports the token as broken (C_GetTokenInfo
// fails with CKR_GENERAL_ERROR, C_FindObjects finds nothing) until
// C_Initialize runs again, even after the directory is back.
func (tk *Token) Remove() {
	tk.t.Helper()
	ents, err := os.ReadDir(tk.tokens)
	if err != nil || len(ents) != 1 {
		tk.t.Fatalf("token directory %s: %v entries, %v", tk.tokens, len(ents), err)
	}
	if err := os.MkdirAll(filepath.Join(tk.Dir, "away"), 0o700); err != nil {
		tk.t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(tk.tokens, ents[0].Name()), filepath.Join(tk.Dir, "away", ents[0].Name())); err != nil {
		tk.t.Fatal(err)
	}
}

// Reinsert undoes Remove.
func (tk *Token) Reinsert() {
	tk.t.Helper()
	ents, err := os.ReadDir(filepath.Join(tk.Dir, "away"))
	if err != nil || len(ents) != 1 {
		tk.t.Fatalf("moved-away token: %v entries, %v", len(ents), err)
	}
	if err := os.Rename(filepath.Join(tk.Dir, "away", ents[0].Name()), filepath.Join(tk.tokens, ents[0].Name())); err != nil {
		tk.t.Fatal(err)
	}
}

// URI returns a pkcs11 key URI for this token with extra path attributes
// (";object=kek") and query attributes ("&max-sessions=2") appended. The PIN
// comes from PINFile.
func (tk *Token) URI(path, query string) string {
	return "pkcs11:token=" + TokenLabel + path + "?module-path=" + Escape(tk.Module) +
		"&pin-source=" + Escape("file:"+tk.PINFile) + query
}

// Escape percent-encodes a query attribute value as keyservice/pkcs11 does
// (RFC 7512: unreserved and the reserved characters a query value may hold
// stay as they are; '%', ';', '&', '?' and '=' are always encoded).
func Escape(s string) string {
	const digits = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if queryChar(c) && !strings.ContainsRune("%;&?=", rune(c)) {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(digits[c>>4])
		b.WriteByte(digits[c&15])
	}
	return b.String()
}

func queryChar(c byte) bool {
	alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
	return alnum || strings.IndexByte("-._~:[]@!$'()*+,/?|;", c) >= 0
}
