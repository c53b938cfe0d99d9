package gcpkms

// The tests run the official Cloud KMS client against
// internal/testservers/gcpkms, a STAND-IN server implementing the official
// google.cloud.kms.v1.KeyManagementService on 127.0.0.1 (no Cloud KMS
// emulator exists and the real service cannot be reached from here).

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
	"github.com/kubekms/kubekms/internal/testservers/gcpkms"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
)

const keyShort = "kek"

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func keyURI(srv *gcpkms.Server) string {
	return "gcpkms:///" + gcpkms.KeyName(keyShort) + "?endpoint=" + srv.Endpoint()
}

// openService opens the key with the production code path (Open), through
// the plaintext loopback endpoint option.
func openService(t testing.TB, srv *gcpkms.Server, cluster string) *service {
	t.Helper()
	svc, err := Open(testCtx(t), keyURI(srv), keyservice.Options{ClusterName: cluster})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { _ = svc.Close() })
	return svc.(*service)
}

func setState(t *testing.T, srv *gcpkms.Server, version string, st kmspb.CryptoKeyVersion_CryptoKeyVersionState) {
	srv.SetState(t, version, st)
}

func primary(t *testing.T, srv *gcpkms.Server) string { return srv.Primary(t, keyShort) }

func rotate(t *testing.T, srv *gcpkms.Server) string { return srv.Rotate(t, keyShort) }

func harness(srv *gcpkms.Server) keyservicetest.Harness {
	return keyservicetest.Harness{
		Open:    func(t *testing.T) keyservice.Service { return openService(t, srv, "cluster-a") },
		Rotate:  func(t *testing.T) { rotate(t, srv) },
		Disable: func(t *testing.T) { setState(t, srv, primary(t, srv), kmspb.CryptoKeyVersion_DISABLED) },
		Enable:  func(t *testing.T) { setState(t, srv, primary(t, srv), kmspb.CryptoKeyVersion_ENABLED) },
		Stop:    func(t *testing.T) { srv.Stop(t) },
		Start:   func(t *testing.T) { srv.Start(t) },
		RevokeVersion: func(t *testing.T, keyID string) {
			setState(t, srv, keyID, kmspb.CryptoKeyVersion_DISABLED)
			t.Cleanup(func() { setState(t, srv, keyID, kmspb.CryptoKeyVersion_ENABLED) })
		},
	}
}

func TestContractStandIn(t *testing.T) {
	keyservicetest.Run(t, harness(gcpkms.Start(t, keyShort)))
}

func TestHierarchyStandIn(t *testing.T) {
	hierarchytest.RunBackend(t, harness(gcpkms.Start(t, keyShort)))
}

func TestKeyIDIsTheVersionEncryptUsed(t *testing.T) {
	srv := gcpkms.Start(t, keyShort)
	svc := openService(t, srv, "c")
	first, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	if want := gcpkms.KeyName(keyShort) + "/cryptoKeyVersions/1"; first.KeyID != want {
		t.Fatalf("key ID %q, want %q", first.KeyID, want)
	}
	v2 := rotate(t, srv)
	// No Probe in between: the key ID comes from Encrypt's answer.
	second, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil || second.KeyID != v2 {
		t.Fatalf("after rotation: key ID %q (%v), want %q", second.KeyID, err, v2)
	}
	if id, err := svc.Probe(testCtx(t)); err != nil || id != v2 {
		t.Fatalf("Probe after rotation: %q, %v", id, err)
	}
}

func TestAADBindsCluster(t *testing.T) {
	srv := gcpkms.Start(t, keyShort)
	a, b := openService(t, srv, "cluster-a"), openService(t, srv, "cluster-b")
	kek := keyservicetest.NewKEK(t)
	res, err := a.Wrap(testCtx(t), kek)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Unwrap(testCtx(t), res.KeyID, res.Wrapped); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Fatalf("cluster B unwrapping cluster A's KEK: %v, want invalid", err)
	}
	// The AAD is on the wire: Cloud KMS itself refuses a Decrypt without it.
	_, err = srv.AdminClient(t).Decrypt(testCtx(t), &kmspb.DecryptRequest{Name: gcpkms.KeyName(keyShort), Ciphertext: res.Wrapped})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Decrypt without AAD: %v, want InvalidArgument", err)
	}
	if got, err := a.Unwrap(testCtx(t), res.KeyID, res.Wrapped); err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("cluster A: %v", err)
	}
	if _, err := Open(testCtx(t), keyURI(srv), keyservice.Options{}); err == nil {
		t.Fatal("Open without a cluster name succeeded")
	}
}

// Probe and CheckKeyID are key reads: no Encrypt or Decrypt (paid calls).
func TestProbeIsAKeyRead(t *testing.T) {
	srv := gcpkms.Start(t, keyShort)
	svc := openService(t, srv, "c")
	for range 5 {
		id, err := svc.Probe(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := svc.CheckKeyID(testCtx(t), id); err != nil {
			t.Fatal(err)
		}
	}
	if n := srv.Calls("Encrypt") + srv.Calls("Decrypt"); n != 0 {
		t.Fatalf("5 probes and checks made %d paid crypto calls", n)
	}
	if srv.Calls("GetCryptoKey") != 5 || srv.Calls("GetCryptoKeyVersion") != 5 {
		t.Fatalf("calls: GetCryptoKey %d, GetCryptoKeyVersion %d, want 5 each", srv.Calls("GetCryptoKey"), srv.Calls("GetCryptoKeyVersion"))
	}
}

func TestVersionStates(t *testing.T) {
	srv := gcpkms.Start(t, keyShort)
	svc := openService(t, srv, "c")
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	v2 := rotate(t, srv)
	// DESTROY_SCHEDULED on the old version: CheckKeyID and Unwrap say revoked,
	// the current version is untouched.
	if _, err := srv.AdminClient(t).DestroyCryptoKeyVersion(testCtx(t), &kmspb.DestroyCryptoKeyVersionRequest{Name: res.KeyID}); err != nil {
		t.Fatal(err)
	}
	if err := svc.CheckKeyID(testCtx(t), res.KeyID); keyservice.Classify(err) != keyservice.ClassRevoked || !strings.Contains(err.Error(), "DESTROY_SCHEDULED") {
		t.Fatalf("CheckKeyID of a version scheduled for destruction: %v", err)
	}
	if _, err := svc.Unwrap(testCtx(t), res.KeyID, res.Wrapped); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Unwrap under a version scheduled for destruction: %v", err)
	}
	if err := svc.CheckKeyID(testCtx(t), v2); err != nil {
		t.Fatalf("CheckKeyID of the primary: %v", err)
	}
	// IAM: access denied is revoked.
	srv.Deny(true)
	if _, err := svc.Probe(testCtx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
		t.Fatalf("Probe with access denied: %v", err)
	}
	srv.Deny(false)
	// A key ID of another key is bad input, not sent.
	other := strings.Replace(res.KeyID, "/cryptoKeys/kek/", "/cryptoKeys/other/", 1)
	before := srv.Calls("Decrypt")
	if _, err := svc.Unwrap(testCtx(t), other, res.Wrapped); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Fatalf("Unwrap with another key's ID: %v", err)
	}
	if err := svc.CheckKeyID(testCtx(t), "projects/x"); keyservice.Classify(err) != keyservice.ClassInvalid {
		t.Fatalf("CheckKeyID of a malformed key ID: %v", err)
	}
	if srv.Calls("Decrypt") != before {
		t.Fatal("a foreign key ID was sent to Cloud KMS")
	}
}

func TestNoRetriesInTheClient(t *testing.T) {
	srv := gcpkms.Start(t, keyShort)
	svc := openService(t, srv, "c")
	if _, err := svc.Probe(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	srv.Deny(true) // a failing call: the client must not retry it
	before := srv.Calls("GetCryptoKey")
	_, _ = svc.Probe(testCtx(t))
	if n := srv.Calls("GetCryptoKey") - before; n != 1 {
		t.Fatalf("one failing Probe reached the server %d times", n)
	}
}

func TestClassify(t *testing.T) {
	for code, want := range map[codes.Code]keyservice.Class{
		codes.Unavailable:        keyservice.ClassTransient,
		codes.DeadlineExceeded:   keyservice.ClassTransient,
		codes.ResourceExhausted:  keyservice.ClassTransient,
		codes.Internal:           keyservice.ClassTransient,
		codes.PermissionDenied:   keyservice.ClassRevoked,
		codes.NotFound:           keyservice.ClassRevoked,
		codes.FailedPrecondition: keyservice.ClassRevoked,
		codes.InvalidArgument:    keyservice.ClassInvalid,
		codes.Unauthenticated:    keyservice.ClassUnknown,
	} {
		err := classify("unwrap", fmt.Errorf("ctx: %w", status.Error(code, "x")))
		if got := keyservice.Classify(err); got != want {
			t.Errorf("%v: class %v, want %v", code, got, want)
		}
	}
	if keyservice.Classify(classify("probe", context.DeadlineExceeded)) != keyservice.ClassTransient {
		t.Error("deadline: not transient")
	}
	if !errors.Is(classify("probe", context.Canceled), context.Canceled) {
		t.Error("classify lost the cause")
	}
}

func TestParseURI(t *testing.T) {
	key := "projects/my-project/locations/europe-west2/keyRings/ring_1/cryptoKeys/kek-1"
	for uri, want := range map[string]KeyURI{
		"gcpkms:///" + key: {Key: key},
		"gcpkms:///" + key + "?endpoint=private.cloudkms.example:443":                {Key: key, Endpoint: "private.cloudkms.example:443"},
		"gcpkms:///" + key + "?endpoint=http://127.0.0.1:9000":                       {Key: key, Endpoint: "http://127.0.0.1:9000"},
		"GCPKMS:///projects/123456/locations/global/keyRings/r/cryptoKeys/k":         {Key: "projects/123456/locations/global/keyRings/r/cryptoKeys/k"},
		"gcpkms:///projects/example.com:proj-1/locations/us/keyRings/r/cryptoKeys/k": {Key: "projects/example.com:proj-1/locations/us/keyRings/r/cryptoKeys/k"},
	} {
		got, err := ParseURI(uri)
		if err != nil || got != want {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", uri, got, err, want)
		}
	}
	for uri, msg := range map[string]string{
		"gcpkms://" + key:                                                      "three slashes",
		"awskms:///" + key:                                                     "scheme",
		"gcpkms:///" + key + "/cryptoKeyVersions/1":                            "not a CryptoKey resource name",
		"gcpkms:///projects/P/locations/l/keyRings/r/cryptoKeys/k":             "project",
		"gcpkms:///projects/my-project/locations/l/keyRings/r%2F/cryptoKeys/k": "key ring",
		"gcpkms:///" + key + "?endpoint=http://10.0.0.1:80":                    "loopback",
		"gcpkms:///" + key + "?endpoint=https://x:443":                         "want host:port",
		"gcpkms:///" + key + "?endpoint=x":                                     "want host:port",
		"gcpkms:///" + key + "?foo=1":                                          "unknown option",
		"gcpkms:///" + key + "?endpoint=a:1&endpoint=b:2":                      "once",
		"gcpkms:///" + key + "#x":                                              "fragment",
	} {
		if _, err := ParseURI(uri); err == nil || !strings.Contains(err.Error(), msg) {
			t.Errorf("ParseURI(%q) = %v, want an error containing %q", uri, err, msg)
		}
	}
}
