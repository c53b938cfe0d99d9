package azurekv

// The tests run the official azkeys client against
// internal/testservers/azurekv: the SDK's own fake server (azkeys/fake) with
// real RSA-OAEP-256 and AES key wrap behind it, a STAND-IN for Key Vault and
// Managed HSM, which cannot run here.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
	"github.com/kubekms/kubekms/internal/testservers/azurekv"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
)

const keyName = "kek"

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openService parses the real URI and builds the real client; only the
// credential and the HTTP transport are the fake's.
func openService(t testing.TB, srv *azurekv.Server, cluster string) *service {
	t.Helper()
	u, err := ParseURI("azurekv://" + strings.TrimPrefix(srv.URL, "https://") + "/keys/" + keyName)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := open(u, keyservice.Options{ClusterName: cluster}, azurekv.Credential(), srv.Transport())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Close() })
	return svc
}

func setEnabled(t *testing.T, srv *azurekv.Server, kid string, enabled bool) {
	t.Helper()
	id := azkeys.ID(kid)
	if _, err := srv.AdminClient(t).UpdateKey(testCtx(t), id.Name(), id.Version(), azkeys.UpdateKeyParameters{
		KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(enabled)},
	}, nil); err != nil {
		t.Fatalf("UpdateKey: %v", err)
	}
}

func harness(srv *azurekv.Server) keyservicetest.Harness {
	return keyservicetest.Harness{
		Open: func(t *testing.T) keyservice.Service { return openService(t, srv, "cluster-a") },
		Rotate: func(t *testing.T) {
			if _, err := srv.AdminClient(t).RotateKey(testCtx(t), keyName, nil); err != nil {
				t.Fatalf("RotateKey: %v", err)
			}
		},
		Disable: func(t *testing.T) { setEnabled(t, srv, srv.Latest(keyName), false) },
		Enable:  func(t *testing.T) { setEnabled(t, srv, srv.Latest(keyName), true) },
		Stop:    func(t *testing.T) { srv.Stop(t) },
		Start:   func(t *testing.T) { srv.Start(t) },
		RevokeVersion: func(t *testing.T, keyID string) {
			setEnabled(t, srv, keyID, false)
			t.Cleanup(func() { setEnabled(t, srv, keyID, true) })
		},
	}
}

func TestContractKeyVaultStandIn(t *testing.T) {
	keyservicetest.Run(t, harness(azurekv.Start(t, false, keyName)))
}

func TestContractManagedHSMStandIn(t *testing.T) {
	keyservicetest.Run(t, harness(azurekv.Start(t, true, keyName)))
}

func TestHierarchyKeyVaultStandIn(t *testing.T) {
	hierarchytest.RunBackend(t, harness(azurekv.Start(t, false, keyName)))
}

func TestHierarchyManagedHSMStandIn(t *testing.T) {
	hierarchytest.RunBackend(t, harness(azurekv.Start(t, true, keyName)))
}

func TestAlgorithms(t *testing.T) {
	for hsm, want := range map[bool]byte{false: tagRSAOAEP256, true: tagA256KW} {
		srv := azurekv.Start(t, hsm, keyName)
		svc := openService(t, srv, "c")
		res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
		if err != nil {
			t.Fatal(err)
		}
		if res.Wrapped[0] != want {
			t.Errorf("hsm=%v: algorithm tag %d, want %d", hsm, res.Wrapped[0], want)
		}
		if hsm && len(res.Wrapped) != 1+32+bindingSize+8 {
			t.Errorf("A256KW of 48 bytes: %d bytes wrapped, want 57", len(res.Wrapped))
		}
		if !hsm && len(res.Wrapped) != 1+256 {
			t.Errorf("RSA-OAEP-256 (2048-bit): %d bytes wrapped, want 257", len(res.Wrapped))
		}
		if res.KeyID != srv.Latest(keyName) {
			t.Errorf("key ID %q, want the version's KID %q", res.KeyID, srv.Latest(keyName))
		}
	}
}

func TestClusterBinding(t *testing.T) {
	srv := azurekv.Start(t, false, keyName)
	a, b := openService(t, srv, "cluster-a"), openService(t, srv, "cluster-b")
	kek := keyservicetest.NewKEK(t)
	res, err := a.Wrap(testCtx(t), kek)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Unwrap(testCtx(t), res.KeyID, res.Wrapped); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Fatalf("cluster B unwrapping cluster A's KEK: %v, want invalid", err)
	}
	if got, err := a.Unwrap(testCtx(t), res.KeyID, res.Wrapped); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("cluster A: %v", err)
	}
	u, _ := ParseURI("azurekv://x-vault.vault.azure.net/keys/k")
	if _, err := open(u, keyservice.Options{}, azurekv.Credential(), srv.Transport()); err == nil {
		t.Fatal("open without a cluster name succeeded")
	}
}

func TestWrapReportsTheVersionUsed(t *testing.T) {
	srv := azurekv.Start(t, false, keyName)
	svc := openService(t, srv, "c")
	if _, err := svc.Probe(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	old := srv.Latest(keyName)
	if _, err := srv.AdminClient(t).RotateKey(testCtx(t), keyName, nil); err != nil {
		t.Fatal(err)
	}
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t)) // no Probe in between
	if err != nil {
		t.Fatal(err)
	}
	if res.KeyID == old || res.KeyID != srv.Latest(keyName) {
		t.Fatalf("Wrap after rotation: key ID %q, want the new version %q", res.KeyID, srv.Latest(keyName))
	}
}

func TestProbeIsAKeyRead(t *testing.T) {
	srv := azurekv.Start(t, true, keyName)
	svc := openService(t, srv, "c")
	for range 3 {
		id, err := svc.Probe(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := svc.CheckKeyID(testCtx(t), id); err != nil {
			t.Fatal(err)
		}
	}
	if n := srv.Calls("WrapKey") + srv.Calls("UnwrapKey"); n != 0 {
		t.Fatalf("probes made %d crypto calls", n)
	}
	if n := srv.Calls("GetKey"); n != 6 {
		t.Fatalf("3 probes and 3 checks made %d GetKey calls, want 6", n)
	}
}

func TestExpiry(t *testing.T) {
	srv := azurekv.Start(t, false, keyName)
	svc := openService(t, srv, "c")
	kek := keyservicetest.NewKEK(t)
	res, err := svc.Wrap(testCtx(t), kek)
	if err != nil {
		t.Fatal(err)
	}
	id := azkeys.ID(res.KeyID)
	past := time.Now().Add(-time.Minute)
	if _, err := srv.AdminClient(t).UpdateKey(testCtx(t), keyName, id.Version(), azkeys.UpdateKeyParameters{
		KeyAttributes: &azkeys.KeyAttributes{Expires: &past}}, nil); err != nil {
		t.Fatal(err)
	}
	// The current version expired: Probe fails, but not as revoked (nothing
	// is shredded), and data it wrapped still unwraps.
	_, err = svc.Probe(testCtx(t))
	if err == nil || keyservice.Classify(err) == keyservice.ClassRevoked || !strings.Contains(err.Error(), "expired") {
		t.Fatalf("Probe of an expired version: %v (class %v)", err, keyservice.Classify(err))
	}
	if err := svc.CheckKeyID(testCtx(t), res.KeyID); err != nil {
		t.Fatalf("CheckKeyID of an expired old version: %v, want usable", err)
	}
	if got, err := svc.Unwrap(testCtx(t), res.KeyID, res.Wrapped); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("Unwrap under an expired version: %v", err)
	}
}

func TestForeignKeyIDsAreNotSent(t *testing.T) {
	srv := azurekv.Start(t, false, keyName)
	svc := openService(t, srv, "c")
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, kid := range []string{
		strings.Replace(res.KeyID, "/keys/kek/", "/keys/other/", 1),
		strings.Replace(res.KeyID, "kubekms-test.vault", "evil.vault", 1),
		srv.URL + "/keys/kek/",
		"kek",
	} {
		if _, err := svc.Unwrap(testCtx(t), kid, res.Wrapped); keyservice.Classify(err) != keyservice.ClassInvalid {
			t.Errorf("Unwrap with key ID %q: %v, want invalid", kid, err)
		}
	}
	if _, err := svc.Unwrap(testCtx(t), res.KeyID, append([]byte{9}, res.Wrapped[1:]...)); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Errorf("unknown algorithm tag: %v", err)
	}
	if n := srv.Calls("UnwrapKey"); n != 0 {
		t.Fatalf("%d foreign key IDs were sent", n)
	}
	srv.Deny(true)
	if _, err := svc.Probe(testCtx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("403: %v, want revoked", err)
	}
}

func TestNoRetriesInTheClient(t *testing.T) {
	srv := azurekv.Start(t, false, keyName)
	svc := openService(t, srv, "c")
	srv.Stop(t)
	if _, err := svc.Probe(testCtx(t)); keyservice.Classify(err) != keyservice.ClassTransient {
		t.Fatalf("Probe while down: %v", err)
	}
	if n := srv.Calls("GetKey"); n != 1 {
		t.Fatalf("one Probe while down made %d attempts", n)
	}
}

func TestClassify(t *testing.T) {
	for st, want := range map[int]keyservice.Class{
		http.StatusForbidden: keyservice.ClassRevoked, http.StatusNotFound: keyservice.ClassRevoked,
		http.StatusBadRequest: keyservice.ClassInvalid, http.StatusTooManyRequests: keyservice.ClassTransient,
		http.StatusServiceUnavailable: keyservice.ClassTransient, http.StatusUnauthorized: keyservice.ClassUnknown,
	} {
		err := classify("unwrap", fmt.Errorf("x: %w", &azcore.ResponseError{StatusCode: st}))
		if got := keyservice.Classify(err); got != want {
			t.Errorf("HTTP %d: %v, want %v", st, got, want)
		}
	}
	if keyservice.Classify(classify("probe", fmt.Errorf("dial: %w", syscall.ECONNREFUSED))) != keyservice.ClassTransient {
		t.Error("connection refused: not transient")
	}
	if keyservice.Classify(classify("probe", errors.New("other"))) != keyservice.ClassUnknown {
		t.Error("an unknown error was classified")
	}
}

func TestParseURI(t *testing.T) {
	for uri, want := range map[string]KeyURI{
		"azurekv://myvault.vault.azure.net/keys/kek":                                                                      {VaultURL: "https://myvault.vault.azure.net", Name: "kek"},
		"azurekv://MyPool.managedhsm.azure.net/keys/kek-2":                                                                {VaultURL: "https://mypool.managedhsm.azure.net", HSM: true, Name: "kek-2"},
		"azurekv://v-1.vault.azure.cn/keys/k?credential=workload-identity&client-id=00000000-0000-0000-0000-000000000001": {VaultURL: "https://v-1.vault.azure.cn", Name: "k", Credential: CredentialWorkloadIdentity, ClientID: "00000000-0000-0000-0000-000000000001"},
	} {
		got, err := ParseURI(uri)
		if err != nil || got != want {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", uri, got, err, want)
		}
	}
	for uri, msg := range map[string]string{
		"azurekv://myvault.example.com/keys/kek":                  "not a Key Vault",
		"azurekv://myvault.vault.azure.net:443/keys/kek":          "port",
		"azurekv://myvault.vault.azure.net/keys/kek/abc":          "want /keys/NAME",
		"azurekv://myvault.vault.azure.net/secrets/kek":           "want /keys/NAME",
		"azurekv://a.vault.azure.net/keys/kek":                    "not a Key Vault",
		"azurekv://myvault.vault.azure.net/keys/kek?credential=x": "credential=",
		"azurekv://myvault.vault.azure.net/keys/kek?client-id=1":  "GUID",
		"azurekv://myvault.vault.azure.net/keys/kek?foo=1":        "unknown option",
		"azurekv://u@myvault.vault.azure.net/keys/kek":            "user info",
		"hcvault://myvault.vault.azure.net/keys/kek":              "scheme",
	} {
		if _, err := ParseURI(uri); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("ParseURI(%q) = %v, want an error containing %q", uri, err, msg)
		}
	}
}
