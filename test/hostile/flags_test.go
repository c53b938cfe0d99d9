package hostile

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Bad flags and arguments: every command refuses them before it does
// anything (no keyring is made, no socket bound), with exit 1 and a message
// naming the flag; none panics.
func TestBadFlags(t *testing.T) {
	dir := shortDir(t)
	serve := func(extra ...string) []string {
		return append(append(serveArgs(dir, softkeyURI(dir)), "--no-state"), extra...)
	}
	sk := "--key-uri=" + softkeyURI(dir)
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{serve("--probe-interval=-1s"), `invalid argument "-1s" for "--probe-interval" flag: want a duration > 0`},
		{serve("--probe-interval=0"), `"--probe-interval" flag: want a duration > 0`},
		{serve("--revocation-bound=-5m"), `"--revocation-bound" flag: want a duration > 0`},
		{serve("--outage-grace=-1h"), `"--outage-grace" flag: want a duration > 0`},
		{serve("--max-age=0s"), `"--max-age" flag: want a duration > 0`},
		{serve("--shutdown-grace=-1s"), `"--shutdown-grace" flag: want a duration > 0`},
		{serve("--probe-interval=soon"), `"--probe-interval" flag: want a duration like 30s`},
		{serve("--max-concurrent-remote=-1"), `"--max-concurrent-remote" flag: want a whole number from 1 to 4096`},
		{serve("--max-concurrent-remote=0"), `want a whole number from 1 to 4096`},
		{serve("--seal-format=1"), `"--seal-format" flag: want a whole number from 2 to 3`},
		{serve("--cache-size=-1"), `"--cache-size" flag: want a whole number from 1`},
		{serve("--max-uses=0"), `"--max-uses" flag: want a whole number from 1 to 1073741824`},
		{serve("--max-uses=-1"), `"--max-uses" flag`},
		{serve("--max-uses=99999999999"), `want a whole number from 1 to 1073741824`},
		{serve("--socket-mode=999"), `--socket-mode "999": want an octal mode`},
		{serve("--log-format=xml"), `--log-format "xml": want json or text`},
		{serve("--log-level=loud"), `--log-level "loud"`},
		{serve("--metrics-addr=9595"), `--metrics-addr: "9595": want host:port`},
		{serve("--metrics-addr=127.0.0.1:http"), `port "http" is not a number`},
		{serve("--otlp-endpoint=collector"), `--otlp-endpoint "collector": want host:port`},
		{serve("--listen=tcp://127.0.0.1:1"), `--listen: endpoint "tcp://127.0.0.1:1"`},
		{serve("--key-uri=softkey:relative.json"), `softkey URI must be softkey:///absolute/path`},
		{serve("--key-uri=nope:///x"), `key URI scheme "nope" is not supported`},
		{serve("extra-arg"), `unknown command "extra-arg"`},
		{[]string{"softkey", "disable", sk, "--version=-1"}, `"--version" flag: want a whole number from 1`},
		{[]string{"softkey", "disable", sk}, "give exactly one of --version N or --all"},
		{[]string{"softkey", "disable", sk, "--version=1", "--all"}, "give exactly one of --version N or --all"},
		{[]string{"softkey", "rotate", sk, "now"}, `unknown command "now"`},
		{[]string{"softkey", "frobnicate", sk}, `unknown command "frobnicate"`},
		{[]string{"softkey", sk}, "give a subcommand"},
		{[]string{"status", "--timeout=-1s"}, `"--timeout" flag: want a duration > 0`},
		{[]string{"status", "-o", "yaml"}, `-o "yaml": want text or json`},
		{[]string{"inventory", "--snapshot=x", "--page-size=0"}, `"--page-size" flag: want a whole number from 1`},
		{[]string{"inventory", "--snapshot=x", "-o", "yaml"}, `-o "yaml": want table or json`},
		{[]string{"inventory", "--snapshot=x", "--prefix=/registry"}, `--prefix "/registry" must end with /`},
		{[]string{"inventory", "--snapshot=x", "--etcd-endpoints=http://127.0.0.1:1"}, "give exactly one of --snapshot and --etcd-endpoints"},
		{[]string{"inventory", "--snapshot=x", "--fail-on-stale"}, "--fail-on-stale needs --plugin, --current-key-id or --encryption-config"},
		{[]string{"decrypt", "--snapshot=x", "--plugin=unix:///x", "--output-dir=/tmp/x", "--timeout=0"}, `"--timeout" flag: want a duration > 0`},
		{[]string{"decrypt", "--plugin=unix:///x", "--output-dir=/tmp/x"}, "--snapshot is required"},
		{[]string{"migrate", "--all", "--timeout=-3s"}, `"--timeout" flag: want a duration > 0`},
		{[]string{"migrate", "--all", "--page-size=-1"}, `"--page-size" flag`},
		{[]string{"migrate", "--all", "--concurrency=0"}, "--concurrency 0: want >= 1"},
		{[]string{"migrate", "--all", "--qps=-1"}, "--qps -1: want >= 0"},
		{[]string{"migrate", "--all", "--limit=-1"}, "--limit -1: want >= 0"},
		{[]string{"rotate", "--etcd-endpoints=http://127.0.0.1:1", "--timeout=0"}, `"--timeout" flag: want a duration > 0`},
		{[]string{"rotate", "--etcd-endpoints=http://127.0.0.1:1", "--retire-old-after=-1h"}, `"--retire-old-after" flag: want a duration >= 0`},
		{[]string{"rotate", "--etcd-endpoints=http://127.0.0.1:1", "--concurrency=0"}, `"--concurrency" flag: want a whole number from 1 to 1024`},
		{[]string{"rotate", "--etcd-endpoints=http://127.0.0.1:1", "--qps=-1"}, "--qps -1: want >= 0"},
		{[]string{"softkey", "promote", sk, "--version=-2"}, `"--version" flag: want a whole number from 1`},
		{[]string{"no-such-command"}, `unknown command "no-such-command"`},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			kubekms(t, 20*time.Second, tc.args...).check(t, want{1, tc.msg})
		})
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		names := []string{}
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Fatalf("refused commands left files behind: %v", names)
	}
}

// `softkey disable` of a version that does not exist, or of the primary
// alone, is refused and changes nothing.
func TestSoftkeyDisableChecks(t *testing.T) {
	dir := shortDir(t)
	newKeyring(t, dir)
	uri := "--key-uri=" + softkeyURI(dir)
	before := readRegular(filepath.Join(dir, "keyring.json"))
	kubekms(t, 20*time.Second, "softkey", "disable", uri, "--version", "99").check(t, want{1, "version 99 does not exist (the keyring has versions 1)"})
	kubekms(t, 20*time.Second, "softkey", "rotate", uri).check(t, want{0, "primary is now"})
	after := readRegular(filepath.Join(dir, "keyring.json"))
	kubekms(t, 20*time.Second, "softkey", "disable", uri, "--version", "2").check(t,
		want{1, "version 2 is the primary: disabling it alone would make every Encrypt fail; rotate first"})
	kubekms(t, 20*time.Second, "softkey", "enable", uri, "--version", "7").check(t, want{1, "version 7 does not exist"})
	if readRegular(filepath.Join(dir, "keyring.json")) != after || before == after {
		t.Fatal("a refused command changed the keyring")
	}
	kubekms(t, 20*time.Second, "softkey", "disable", uri, "--version", "1").check(t, want{0, "disabled"})
	kubekms(t, 20*time.Second, "softkey", "disable", uri, "--all").check(t, want{0, "disabled,primary"})
	kubekms(t, 20*time.Second, "softkey", "enable", uri, "--all").check(t, want{0, "enabled,primary"})
}

// A metrics address other hosts can reach is said loudly at start. The
// plugin runs in a private network namespace (loopback only), so binding
// every interface reaches nothing outside the test.
func TestMetricsOnEveryInterfaceWarns(t *testing.T) {
	requireRoot(t)
	for _, tool := range []string{"unshare", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s: %v (util-linux, iproute2)", tool, err)
		}
	}
	dir := shortDir(t)
	for _, tc := range []struct {
		addr string
		warn bool
	}{
		{"0.0.0.0:%d", true},
		{"[::]:%d", true},
		{"127.0.0.1:%d", false},
		{":%d", false},
		{"localhost:%d", false},
	} {
		addr := fmt.Sprintf(tc.addr, 9595)
		cmd := exec.Command("unshare", "--net", "sh", "-c", `ip link set lo up && exec "$@"`, "sh", bin, "serve",
			"--listen", "unix://"+filepath.Join(dir, "kms.sock"), "--key-uri", softkeyURI(dir), "--no-state",
			"--log-format", "text", "--metrics-addr", addr)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		run := startCmd(t, cmd)
		for deadline := time.Now().Add(10 * time.Second); !strings.Contains(run.stderr.String(), "msg=serving") && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		r := run.wait(t, 20*time.Second)
		warned := strings.Contains(r.stderr, "level=WARN") && strings.Contains(r.stderr, "--metrics-addr binds a non-loopback address")
		if warned != tc.warn || !strings.Contains(r.stderr, `msg=serving`) {
			t.Errorf("--metrics-addr %s: warned=%v, want %v: %s", addr, warned, tc.warn, r)
		}
	}
}
