package tpm

// Every test here runs against a real software TPM 2.0 (swtpm) on a unix
// socket, provisioned by this package and driven with tpm2-tools where an
// operator would use them (PCR extend and reset, evicting a key).

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
	"github.com/kubekms/kubekms/internal/testservers/swtpm"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
)

const (
	handles = "0x81000100-0x8100010f"
	// PCR 16 is the debug PCR: resettable from locality 0, so a test can
	// break the policy (extend) and restore it (reset).
	debugPCR = "16"
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func uriFor(tp *swtpm.TPM, extra string) string {
	return "tpm://" + tp.Socket() + "?handle=" + handles + extra
}

func provision(t testing.TB, uri string) string {
	t.Helper()
	line, err := Provision(testCtx(t), uri, "node-a")
	if err != nil {
		t.Fatalf("Provision: %v", err)
	}
	return line
}

func openURI(t testing.TB, uri, cluster string) *service {
	t.Helper()
	svc, err := Open(testCtx(t), uri, keyservice.Options{ClusterName: cluster})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Close() })
	return svc.(*service)
}

// handleOf finds the persistent handle of the single-node key ID keyID.
func handleOf(t *testing.T, tp *swtpm.TPM, keyID string) tpm2.TPMHandle {
	t.Helper()
	d, err := openDevice(tp.Socket())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	hs, err := persistentHandles(d, 0x81000100, 0x8100010f)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		_, name, err := readKey(d, h)
		if err == nil && keyIDOf([][]byte{name}) == keyID {
			return h
		}
	}
	t.Fatalf("no key has key ID %s", keyID)
	return 0
}

func harness(tp *swtpm.TPM, uri string) keyservicetest.Harness {
	return keyservicetest.Harness{
		Open:    func(t *testing.T) keyservice.Service { return openURI(t, uri, "cluster-a") },
		Rotate:  func(t *testing.T) { provision(t, uri) },
		Disable: func(t *testing.T) { tp.Tool(t, "tpm2_pcrextend", debugPCR+":sha256="+strings.Repeat("ab", 32)) },
		Enable:  func(t *testing.T) { tp.Tool(t, "tpm2_pcrreset", debugPCR) },
		Stop:    func(t *testing.T) { tp.Stop(t) },
		Start:   func(t *testing.T) { tp.Start(t) },
		// After a rotation, the operator evicts the old key.
		RevokeVersion: func(t *testing.T, keyID string) {
			tp.Tool(t, "tpm2_evictcontrol", "-C", "o", "-c", fmt.Sprintf("0x%x", uint32(handleOf(t, tp, keyID))))
		},
	}
}

func pcrHarness(t *testing.T) keyservicetest.Harness {
	tp := swtpm.Start(t)
	uri := uriFor(tp, "&pcrs=7,"+debugPCR)
	provision(t, uri)
	return harness(tp, uri)
}

func TestContractSwtpm(t *testing.T) { keyservicetest.Run(t, pcrHarness(t)) }

func TestHierarchySwtpm(t *testing.T) { hierarchytest.RunBackend(t, pcrHarness(t)) }

// Without PCRs the key has no policy: only eviction revokes it.
func TestNoPCRs(t *testing.T) {
	tp := swtpm.Start(t)
	uri := uriFor(tp, "")
	provision(t, uri)
	svc := openURI(t, uri, "c")
	kek := keyservicetest.NewKEK(t)
	res, err := svc.Wrap(testCtx(t), kek)
	if err != nil {
		t.Fatal(err)
	}
	tp.Tool(t, "tpm2_pcrextend", debugPCR+":sha256="+strings.Repeat("ab", 32))
	if got, err := svc.Unwrap(testCtx(t), res.KeyID, res.Wrapped); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("a key with no PCR policy stopped working after a PCR change: %v", err)
	}
	tp.Tool(t, "tpm2_evictcontrol", "-C", "o", "-c", "0x81000100")
	if _, err := svc.Probe(testCtx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Probe after eviction: %v, want revoked", err)
	}
	if _, err := svc.Unwrap(testCtx(t), res.KeyID, res.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Unwrap after eviction: %v, want revoked", err)
	}
}

// The TPM itself enforces the PCR policy: with the software check skipped,
// TPM2_ECDH_ZGen fails with TPM_RC_POLICY_FAIL, classified revoked.
func TestTPMEnforcesThePCRPolicy(t *testing.T) {
	tp := swtpm.Start(t)
	uri := uriFor(tp, "&pcrs="+debugPCR)
	provision(t, uri)
	svc := openURI(t, uri, "c")
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	entries, err := parseBlob(res.Wrapped)
	if err != nil {
		t.Fatal(err)
	}
	e := entries[0]
	zgenWith := func() error {
		return svc.withTPM("unwrap", func(d transport.TPM) error {
			_, err := zgen(d, e.handle, e.name, maskPCRs(e.pcrMask), e.ephemeral)
			return err
		})
	}
	if err := zgenWith(); err != nil {
		t.Fatalf("ECDH_ZGen with the PCRs unchanged: %v", err)
	}
	tp.Tool(t, "tpm2_pcrextend", debugPCR+":sha256="+strings.Repeat("cd", 32))
	err = zgenWith()
	if keyservice.Classify(err) != keyservice.ClassRevoked || !strings.Contains(err.Error(), "TPM_RC_POLICY_FAIL") {
		t.Fatalf("ECDH_ZGen after a PCR change: %v, want TPM_RC_POLICY_FAIL (revoked)", err)
	}
}

func TestRotationKeepsOldKeys(t *testing.T) {
	tp := swtpm.Start(t)
	uri := uriFor(tp, "")
	provision(t, uri)
	svc := openURI(t, uri, "c")
	kek := keyservicetest.NewKEK(t)
	old, err := svc.Wrap(testCtx(t), kek)
	if err != nil {
		t.Fatal(err)
	}
	line := provision(t, uri)
	if !strings.Contains(line, " 0x81000101 ") {
		t.Fatalf("second key not at the next handle: %s", line)
	}
	id, err := svc.Probe(testCtx(t))
	if err != nil || id == old.KeyID {
		t.Fatalf("Probe after rotation: %q, %v (old %q)", id, err, old.KeyID)
	}
	// A restarted plugin on the same TPM still unwraps the old value.
	if got, err := openURI(t, uri, "c").Unwrap(testCtx(t), old.KeyID, old.Wrapped); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("old value after rotation: %v", err)
	}
	// Survives a TPM restart (persistent handles are in NV).
	tp.Stop(t)
	tp.Start(t)
	if got, err := svc.Unwrap(testCtx(t), old.KeyID, old.Wrapped); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("old value after a TPM restart: %v", err)
	}
}

func TestClusterBinding(t *testing.T) {
	tp := swtpm.Start(t)
	uri := uriFor(tp, "")
	provision(t, uri)
	res, err := openURI(t, uri, "a").Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := openURI(t, uri, "b").Unwrap(testCtx(t), res.KeyID, res.Wrapped); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Fatalf("cluster b unwrapping cluster a's value: %v, want invalid", err)
	}
}

// Two nodes, two TPMs, one peers file: each node wraps for both, each
// unwraps the other's values with its own TPM, both report one key ID, and a
// third node not in the set cannot unwrap.
func TestHAPeers(t *testing.T) {
	tpA, tpB, tpC := swtpm.Start(t), swtpm.Start(t), swtpm.Start(t)
	peers := filepath.Join(t.TempDir(), "peers")
	lineA, err := Provision(testCtx(t), uriFor(tpA, "&pcrs="+debugPCR), "node-a")
	if err != nil {
		t.Fatal(err)
	}
	lineB, err := Provision(testCtx(t), uriFor(tpB, ""), "node-b")
	if err != nil {
		t.Fatal(err)
	}
	provision(t, uriFor(tpC, ""))
	if err := os.WriteFile(peers, []byte("# kubekms TPM peers\n"+lineA+"\n\n"+lineB+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	a := openURI(t, uriFor(tpA, "&pcrs="+debugPCR+"&peers="+peers), "c")
	b := openURI(t, uriFor(tpB, "&peers="+peers), "c")
	idA, errA := a.Probe(testCtx(t))
	idB, errB := b.Probe(testCtx(t))
	if errA != nil || errB != nil || idA != idB {
		t.Fatalf("key IDs: a %q (%v), b %q (%v): want one for the node set", idA, errA, idB, errB)
	}
	kek := keyservicetest.NewKEK(t)
	res, err := a.Wrap(testCtx(t), kek)
	if err != nil {
		t.Fatal(err)
	}
	for name, svc := range map[string]*service{"a": a, "b": b} {
		if got, err := svc.Unwrap(testCtx(t), res.KeyID, res.Wrapped); err != nil || !bytes.Equal(got, kek) {
			t.Fatalf("node %s unwrapping node a's value: %v", name, err)
		}
	}
	// Node C's TPM holds a key at the same handle, but not one of the set's.
	c := openURI(t, uriFor(tpC, ""), "c")
	if _, err := c.Unwrap(testCtx(t), res.KeyID, res.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("node c (not in the set): %v, want revoked", err)
	}
	// Node A's PCR change revokes A's entry only; B still unwraps.
	tpA.Tool(t, "tpm2_pcrextend", debugPCR+":sha256="+strings.Repeat("ab", 32))
	if _, err := a.Unwrap(testCtx(t), res.KeyID, res.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("node a after its PCR changed: %v, want revoked", err)
	}
	if got, err := b.Unwrap(testCtx(t), res.KeyID, res.Wrapped); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("node b after node a's PCR changed: %v", err)
	}
	// A peers file without this node's key is an error, not a silent
	// single-node set.
	if err := os.WriteFile(peers, []byte(lineB+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tpA.Tool(t, "tpm2_pcrreset", debugPCR)
	if _, err := a.Probe(testCtx(t)); err == nil || !strings.Contains(err.Error(), "does not list this node") {
		t.Fatalf("Probe with a peers file lacking this node: %v", err)
	}
}

// The largest node set fits the apiserver's annotation limit with room.
func TestWrappedSizeFor64Nodes(t *testing.T) {
	set := make([]member, maxNodes)
	var ns [][]byte
	for i := range set {
		k, err := ecdh.P256().GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		name := make([]byte, 34)
		_, _ = rand.Read(name)
		set[i] = member{node: fmt.Sprint(i), name: name, handle: 0x81000100, pcrs: []uint{7}, pub: k.PublicKey()}
		ns = append(ns, name)
	}
	blob, err := seal(set, keyIDOf(ns), "cluster", make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	// The annotation adds its key and 9 bytes of header to the wrapped key.
	if n := len(blob) + len(hierarchy.AnnotationKey) + 9; n > hierarchy.MaxAnnotations/2 {
		t.Fatalf("64 nodes: annotation of %d bytes, want under half of %d", n, hierarchy.MaxAnnotations)
	}
	t.Logf("64-node wrapped local KEK: %d bytes (%d per node)", len(blob), (len(blob)-2)/maxNodes)
	if entries, err := parseBlob(blob); err != nil || len(entries) != maxNodes {
		t.Fatalf("parse: %d entries, %v", len(entries), err)
	}
	set = append(set, set[0])
	if _, err := seal(set, "x", "c", make([]byte, 32)); err == nil {
		t.Fatal("65 nodes accepted")
	}
}

func TestMalformedAndForeign(t *testing.T) {
	tp := swtpm.Start(t)
	uri := uriFor(tp, "")
	provision(t, uri)
	svc := openURI(t, uri, "c")
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		id   string
		blob []byte
	}{
		"empty":         {res.KeyID, nil},
		"truncated":     {res.KeyID, res.Wrapped[:len(res.Wrapped)-1]},
		"trailing":      {res.KeyID, append(bytes.Clone(res.Wrapped), 0)},
		"other key ID":  {"tpm:00000000000000000000000000000000", res.Wrapped},
		"bad version":   {res.KeyID, append([]byte{2}, res.Wrapped[1:]...)},
		"zero entries":  {res.KeyID, []byte{1, 0}},
		"point flipped": {res.KeyID, flip(res.Wrapped, 2+2+34+8+10)},
	} {
		if _, err := svc.Unwrap(testCtx(t), tc.id, tc.blob); keyservice.Classify(err) != keyservice.ClassInvalid {
			t.Errorf("%s: %v (class %v), want invalid", name, err, keyservice.Classify(err))
		}
	}
}

func flip(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0x40
	return c
}

func TestParseURI(t *testing.T) {
	for uri, want := range map[string]KeyURI{
		"tpm:///dev/tpmrm0?handle=0x81000100":                              {Device: "/dev/tpmrm0", First: 0x81000100, Last: 0x81000100},
		"tpm:///dev/tpmrm0?handle=0x81000100-0x8100010f&pcrs=16,7,7":       {Device: "/dev/tpmrm0", First: 0x81000100, Last: 0x8100010f, PCRs: []uint{7, 16}},
		"TPM:///run/swtpm/sock?handle=0x81000000&peers=/etc/kubekms/peers": {Device: "/run/swtpm/sock", First: 0x81000000, Last: 0x81000000, Peers: "/etc/kubekms/peers"},
	} {
		got, err := ParseURI(uri)
		if err != nil || fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", uri, got, err, want)
		}
	}
	for uri, msg := range map[string]string{
		"tpm:///dev/tpmrm0":                                 "handle= is required",
		"tpm://host/dev/tpmrm0?handle=0x81000100":           "empty host",
		"tpm:///dev/../dev/tpm0?handle=0x81000100":          "clean absolute path",
		"tpm:///dev/tpmrm0?handle=0x80000000":               "persistent owner handle",
		"tpm:///dev/tpmrm0?handle=0x81000100-0x81000000":    "range",
		"tpm:///dev/tpmrm0?handle=0x81000000-0x81000fff":    "at most 256",
		"tpm:///dev/tpmrm0?handle=0x81000100&pcrs=24":       "0 to 23",
		"tpm:///dev/tpmrm0?handle=0x81000100&peers=rel":     "absolute",
		"tpm:///dev/tpmrm0?handle=0x81000100&x=1":           "unknown option",
		"tpm:///dev/tpmrm0?handle=0x81000100&handle=0x8100": "once",
	} {
		if _, err := ParseURI(uri); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("ParseURI(%q) = %v, want an error containing %q", uri, err, msg)
		}
	}
}
