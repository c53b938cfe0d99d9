package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/kubekms/kubekms/keyservice/softkey"
)

func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := newRootCmd()
	var out strings.Builder
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

// The procedure for a keyring on two nodes, through the commands: export,
// import (checked by fingerprint), stage, import, promote on both.
func TestSoftkeyShareCommands(t *testing.T) {
	dir := t.TempDir()
	a, b := "softkey://"+filepath.Join(dir, "a.json"), "softkey://"+filepath.Join(dir, "b.json")
	if _, err := runCLI(t, "softkey", "list", "--key-uri", a); err == nil {
		t.Fatal("list of a missing keyring succeeded")
	}
	mustRun := func(args ...string) string {
		t.Helper()
		out, err := runCLI(t, args...)
		if err != nil {
			t.Fatalf("kubekms %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	if _, err := runCLI(t, "softkey", "stage", "--key-uri", a); err == nil {
		t.Fatal("stage on a missing keyring succeeded")
	}
	if _, err := softkey.Create(filepath.Join(dir, "a.json")); err != nil {
		t.Fatal(err)
	}
	fp := func(uri string) string { return strings.Fields(mustRun("softkey", "fingerprint", "--key-uri", uri))[0] }
	export := filepath.Join(dir, "a.export")
	out := mustRun("softkey", "export", "--key-uri", a, "--to", export)
	if !strings.Contains(out, fp(a)) {
		t.Errorf("export does not print the fingerprint: %s", out)
	}
	if _, err := runCLI(t, "softkey", "export", "--key-uri", a, "--to", export); err == nil {
		t.Error("export over an existing file succeeded")
	}
	if _, err := runCLI(t, "softkey", "import", "--key-uri", b, "--from", export, "--expect-fingerprint", strings.Repeat("0", 32)); err == nil ||
		!strings.Contains(err.Error(), "not the keyring you exported") {
		t.Errorf("import with a wrong expected fingerprint: %v", err)
	}
	out = mustRun("softkey", "import", "--key-uri", b, "--from", export, "--expect-fingerprint", fp(a))
	if !strings.Contains(out, "created keyring") || fp(a) != fp(b) {
		t.Errorf("first import: %s", out)
	}
	mustRun("softkey", "stage", "--key-uri", a)
	export2 := filepath.Join(dir, "a2.export")
	mustRun("softkey", "export", "--key-uri", a, "--to", export2)
	if out = mustRun("softkey", "import", "--key-uri", b, "--from", export2); !strings.Contains(out, "added version(s) [2]") {
		t.Errorf("second import: %s", out)
	}
	mustRun("softkey", "promote", "--key-uri", a, "--version", "2")
	mustRun("softkey", "promote", "--key-uri", b, "--version", "2")
	if fp(a) != fp(b) {
		t.Error("fingerprints differ after promoting on both")
	}
	if out = mustRun("softkey", "list", "--key-uri", b); !strings.Contains(out, "enabled,primary") || !strings.Contains(out, "fingerprint "+fp(b)) {
		t.Errorf("list: %s", out)
	}
}
