package awskms

import (
	"bytes"
	"context"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/kubekms/kubekms/hierarchy/hierarchytest"
	"github.com/kubekms/kubekms/internal/testservers/localkms"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
)

// Seeded keys: the alias starts on keyA; "rotation" re-points it to keyB.
const (
	keyA      = "0a6e8f3c-5b1d-4c2e-9f7a-1b2c3d4e5f60"
	keyB      = "1b7f904d-6c2e-4d3f-8a6b-2c3d4e5f6071"
	keyHMAC   = "2c80a15e-7d3f-4e40-9b7c-3d4e5f607182"
	testAlias = "alias/kubekms-test"
	hmacAlias = "alias/kubekms-hmac"
)

func startServer(t testing.TB) *localkms.Server {
	t.Helper()
	return localkms.Start(t, localkms.Seed{
		AESKeys:     []string{keyA, keyB},
		BackingKeys: 2, // stands in for rotated versions of the key material
		HMACKeys:    []string{keyHMAC},
		Aliases:     map[string]string{testAlias: keyA, hmacAlias: keyHMAC},
	})
}

// sdkEnv points the SDK's default chain at the static test credentials and
// the test region in the environment, and at nothing else (no shared files,
// no instance metadata).
func sdkEnv(t testing.TB) {
	t.Helper()
	none := filepath.Join(t.TempDir(), "none")
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID":           localkms.AccessKeyID,
		"AWS_SECRET_ACCESS_KEY":       localkms.SecretAccessKey,
		"AWS_SESSION_TOKEN":           "",
		"AWS_REGION":                  localkms.Region,
		"AWS_DEFAULT_REGION":          "",
		"AWS_PROFILE":                 "",
		"AWS_CONFIG_FILE":             none,
		"AWS_SHARED_CREDENTIALS_FILE": none,
		"AWS_EC2_METADATA_DISABLED":   "true",
		"AWS_ENDPOINT_URL":            "",
		"AWS_ENDPOINT_URL_KMS":        "",
		"AWS_MAX_ATTEMPTS":            "",
		"AWS_CA_BUNDLE":               "",
	} {
		t.Setenv(k, v)
	}
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// openService opens a key URI (without endpoint=, which it adds) with the
// production code path; only the HTTP client is the test's, so that its
// connections reach local-kms in its network namespace.
func openService(t testing.TB, srv *localkms.Server, key string, opts keyservice.Options) *service {
	t.Helper()
	svc, err := openURI(t, srv, key, opts)
	if err != nil {
		t.Fatalf("open %s: %v", key, err)
	}
	t.Cleanup(func() { _ = svc.Close() })
	return svc
}

func openURI(t testing.TB, srv *localkms.Server, key string, opts keyservice.Options) (*service, error) {
	sep := "?"
	if strings.Contains(key, "?") {
		sep = "&"
	}
	uri := "awskms:///" + key + sep + "endpoint=" + srv.Endpoint()
	return open(testCtx(t), uri, opts, config.WithHTTPClient(srv.HTTPClient()))
}

// aliasTarget returns the key ID the alias points at.
func aliasTarget(t *testing.T, admin *kms.Client, alias string) string {
	t.Helper()
	out, err := admin.DescribeKey(testCtx(t), &kms.DescribeKeyInput{KeyId: aws.String(alias)})
	if err != nil {
		t.Fatalf("DescribeKey %s: %v", alias, err)
	}
	return aws.ToString(out.KeyMetadata.KeyId)
}

func harness(t *testing.T, srv *localkms.Server) keyservicetest.Harness {
	admin := srv.AdminClient()
	return keyservicetest.Harness{
		Open: func(t *testing.T) keyservice.Service {
			// Region from AWS_REGION (the SDK config), key by alias.
			return openService(t, srv, testAlias, keyservice.Options{ClusterName: "cluster-a"})
		},
		Rotate: func(t *testing.T) {
			next := keyB
			if aliasTarget(t, admin, testAlias) == keyB {
				next = keyA
			}
			if _, err := admin.UpdateAlias(testCtx(t), &kms.UpdateAliasInput{AliasName: aws.String(testAlias), TargetKeyId: aws.String(next)}); err != nil {
				t.Fatalf("UpdateAlias: %v", err)
			}
		},
		Disable: func(t *testing.T) {
			id := aliasTarget(t, admin, testAlias)
			if _, err := admin.DisableKey(testCtx(t), &kms.DisableKeyInput{KeyId: aws.String(id)}); err != nil {
				t.Fatalf("DisableKey: %v", err)
			}
		},
		Enable: func(t *testing.T) {
			id := aliasTarget(t, admin, testAlias)
			if _, err := admin.EnableKey(testCtx(t), &kms.EnableKeyInput{KeyId: aws.String(id)}); err != nil {
				t.Fatalf("EnableKey: %v", err)
			}
		},
		Stop:  func(t *testing.T) { srv.Stop(t) },
		Start: func(t *testing.T) { srv.Start(t) },
		// After "point the alias at a new key", the operator disables the old key.
		RevokeVersion: func(t *testing.T, keyID string) {
			arn, err := keyARN(keyID)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := admin.DisableKey(testCtx(t), &kms.DisableKeyInput{KeyId: aws.String(arn)}); err != nil {
				t.Fatalf("DisableKey: %v", err)
			}
			t.Cleanup(func() {
				_, _ = admin.EnableKey(context.Background(), &kms.EnableKeyInput{KeyId: aws.String(arn)})
			})
		},
	}
}

func TestContract(t *testing.T) {
	sdkEnv(t)
	srv := startServer(t)
	keyservicetest.Run(t, harness(t, srv))
}

func TestEncryptionContextBindsCluster(t *testing.T) {
	sdkEnv(t)
	srv := startServer(t)
	a := openService(t, srv, testAlias, keyservice.Options{ClusterName: "cluster-a"})
	b := openService(t, srv, testAlias, keyservice.Options{ClusterName: "cluster-b"})
	kek := keyservicetest.NewKEK(t)
	res, err := a.Wrap(testCtx(t), kek)
	if err != nil {
		t.Fatalf("Wrap: %v", err)
	}
	_, err = b.Unwrap(testCtx(t), res.KeyID, res.Wrapped)
	if c := keyservice.Classify(err); c != keyservice.ClassInvalid {
		t.Fatalf("cluster B unwrapping cluster A's KEK: %v (class %v), want invalid", err, c)
	}
	got, err := a.Unwrap(testCtx(t), res.KeyID, res.Wrapped)
	if err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("cluster A unwrapping its own KEK: %v", err)
	}
	// The context is on the wire, not only in our client: KMS itself refuses
	// a Decrypt without it.
	_, err = srv.AdminClient().Decrypt(testCtx(t), &kms.DecryptInput{CiphertextBlob: res.Wrapped, KeyId: aws.String(localkms.KeyARN(keyA))})
	if c := keyservice.Classify(classify("unwrap", err)); c != keyservice.ClassInvalid {
		t.Fatalf("Decrypt without the encryption context: %v, want InvalidCiphertextException", err)
	}
}

func TestWrapReportsTheKeyEncryptUsed(t *testing.T) {
	sdkEnv(t)
	srv := startServer(t)
	h := harness(t, srv)
	svc := openService(t, srv, testAlias, keyservice.Options{ClusterName: "c"})
	first, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	if want := localkms.KeyARN(keyA); first.KeyID != want {
		t.Fatalf("Wrap key ID %q, want %q", first.KeyID, want)
	}
	h.Rotate(t)
	// No Probe in between: the key ID must come from Encrypt's answer.
	second, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	if want := localkms.KeyARN(keyB); second.KeyID != want {
		t.Fatalf("Wrap after re-pointing the alias: key ID %q, want %q", second.KeyID, want)
	}
}

func TestKeyIDSuffix(t *testing.T) {
	sdkEnv(t)
	srv := startServer(t)
	arn := localkms.KeyARN(keyA)
	v1 := openService(t, srv, arn, keyservice.Options{ClusterName: "c", KeyIDSuffix: "v1"})
	id, err := v1.Probe(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if id != arn+"#v1" {
		t.Fatalf("Probe key ID %q, want %q", id, arn+"#v1")
	}
	kek := keyservicetest.NewKEK(t)
	res, err := v1.Wrap(testCtx(t), kek)
	if err != nil || res.KeyID != id {
		t.Fatalf("Wrap: %q, %v; want key ID %q", res.KeyID, err, id)
	}
	// The operator changes the suffix (in the URI this time): a new key ID,
	// and what the old one wrapped still unwraps.
	v2 := openService(t, srv, arn+"?key-id-suffix=v2", keyservice.Options{ClusterName: "c"})
	id2, err := v2.Probe(testCtx(t))
	if err != nil || id2 != arn+"#v2" {
		t.Fatalf("Probe with suffix v2: %q, %v", id2, err)
	}
	got, err := v2.Unwrap(testCtx(t), res.KeyID, res.Wrapped)
	if err != nil || !bytes.Equal(got, kek) {
		t.Fatalf("Unwrap of a v1 key ID after the suffix changed: %v", err)
	}
	if _, err := openURI(t, srv, arn+"?key-id-suffix=v2", keyservice.Options{ClusterName: "c", KeyIDSuffix: "v3"}); err == nil {
		t.Fatal("open accepted different suffixes in the URI and the options")
	}
	if _, err := openURI(t, srv, arn, keyservice.Options{ClusterName: "c", KeyIDSuffix: "a#b"}); err == nil {
		t.Fatal("open accepted a suffix with the separator in it")
	}
}

func TestProbeStates(t *testing.T) {
	sdkEnv(t)
	srv := startServer(t)
	admin := srv.AdminClient()
	opts := keyservice.Options{ClusterName: "c"}

	t.Run("PendingDeletion", func(t *testing.T) {
		svc := openService(t, srv, localkms.KeyARN(keyB), opts)
		if _, err := admin.ScheduleKeyDeletion(testCtx(t), &kms.ScheduleKeyDeletionInput{KeyId: aws.String(keyB), PendingWindowInDays: aws.Int32(7)}); err != nil {
			t.Fatalf("ScheduleKeyDeletion: %v", err)
		}
		_, err := svc.Probe(testCtx(t))
		if keyservice.Classify(err) != keyservice.ClassRevoked || !strings.Contains(err.Error(), "PendingDeletion") {
			t.Fatalf("Probe of a key pending deletion: %v, want revoked", err)
		}
		if _, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
			t.Fatalf("Wrap with a key pending deletion: %v, want revoked", err)
		}
		if _, err := admin.CancelKeyDeletion(testCtx(t), &kms.CancelKeyDeletionInput{KeyId: aws.String(keyB)}); err != nil {
			t.Fatalf("CancelKeyDeletion: %v", err)
		}
		// local-kms leaves a cancelled key disabled, as AWS does.
		if _, err := admin.EnableKey(testCtx(t), &kms.EnableKeyInput{KeyId: aws.String(keyB)}); err != nil {
			t.Fatalf("EnableKey: %v", err)
		}
		if _, err := svc.Probe(testCtx(t)); err != nil {
			t.Fatalf("Probe after the deletion was cancelled: %v", err)
		}
	})
	t.Run("PendingImport", func(t *testing.T) {
		out, err := admin.CreateKey(testCtx(t), &kms.CreateKeyInput{Origin: types.OriginTypeExternal})
		if err != nil {
			t.Fatalf("CreateKey: %v", err)
		}
		svc := openService(t, srv, aws.ToString(out.KeyMetadata.Arn), opts)
		if _, err := svc.Probe(testCtx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
			t.Fatalf("Probe of a key pending import: %v, want revoked", err)
		}
	})
	t.Run("NotFound", func(t *testing.T) {
		svc := openService(t, srv, "alias/no-such-key", opts)
		if _, err := svc.Probe(testCtx(t)); keyservice.Classify(err) != keyservice.ClassRevoked {
			t.Fatalf("Probe of a missing alias: %v, want revoked", err)
		}
	})
	t.Run("NotAnEncryptionKey", func(t *testing.T) {
		svc := openService(t, srv, hmacAlias, opts)
		_, err := svc.Probe(testCtx(t))
		if keyservice.Classify(err) != keyservice.ClassInvalid || !strings.Contains(err.Error(), "key usage") {
			t.Fatalf("Probe of an HMAC key: %v, want invalid", err)
		}
	})
}

func TestUnwrapBadInput(t *testing.T) {
	sdkEnv(t)
	srv := startServer(t)
	svc := openService(t, srv, testAlias, keyservice.Options{ClusterName: "c"})
	res, err := svc.Wrap(testCtx(t), keyservicetest.NewKEK(t))
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		keyID   string
		wrapped []byte
	}{
		"alias as key ID":   {testAlias, res.Wrapped},
		"garbage key ID":    {"not-an-arn", res.Wrapped},
		"forged key ID":     {res.KeyID + "x", res.Wrapped}, // refused before any KMS call
		"other key":         {localkms.KeyARN(keyB), res.Wrapped},
		"oversized wrapped": {res.KeyID, make([]byte, maxCiphertext+1)},
		"garbage wrapped":   {res.KeyID, []byte("garbage")},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := svc.Unwrap(testCtx(t), tc.keyID, tc.wrapped)
			if c := keyservice.Classify(err); c != keyservice.ClassInvalid {
				t.Fatalf("Unwrap: %v (class %v), want invalid", err, c)
			}
		})
	}
	for _, n := range []int{0, maxPlaintext + 1} {
		if _, err := svc.Wrap(testCtx(t), make([]byte, n)); keyservice.Classify(err) != keyservice.ClassInvalid {
			t.Fatalf("Wrap of %d bytes: %v, want invalid", n, err)
		}
	}
}

func TestOpenErrors(t *testing.T) {
	sdkEnv(t)
	ctx := testCtx(t)
	if _, err := Open(ctx, "awskms:///alias/k", keyservice.Options{}); err == nil || !strings.Contains(err.Error(), "cluster name") {
		t.Fatalf("Open without a cluster name: %v", err)
	}
	if _, err := Open(ctx, "awskms://alias/k", keyservice.Options{ClusterName: "c"}); err == nil {
		t.Fatal("Open accepted a malformed URI")
	}
	t.Setenv("AWS_REGION", "")
	if _, err := Open(ctx, "awskms:///alias/k", keyservice.Options{ClusterName: "c"}); err == nil || !strings.Contains(err.Error(), "no AWS region") {
		t.Fatalf("Open of an alias with no region anywhere: %v", err)
	}
	svc, err := Open(ctx, "awskms:///"+localkms.KeyARN(keyA), keyservice.Options{ClusterName: "c"})
	if err != nil {
		t.Fatalf("Open of a key ARN takes its region from the ARN: %v", err)
	}
	if got := svc.(*service).client.Options().Region; got != localkms.Region {
		t.Fatalf("region %q, want the ARN's %q", got, localkms.Region)
	}
	_ = svc.Close()
}

// Benchmarks against local-kms. Cold = a new client (new connection pool,
// credentials not yet resolved) per Unwrap, as after a plugin restart; the
// test dialer's namespace switch is part of every new connection.
func BenchmarkWrap(b *testing.B) {
	sdkEnv(b)
	srv := startServer(b)
	svc := openService(b, srv, testAlias, keyservice.Options{ClusterName: "bench"})
	kek := make([]byte, 32)
	ctx := testCtx(b)
	for b.Loop() {
		if _, err := svc.Wrap(ctx, kek); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkUnwrap(b *testing.B) {
	sdkEnv(b)
	srv := startServer(b)
	opts := keyservice.Options{ClusterName: "bench"}
	svc := openService(b, srv, testAlias, opts)
	ctx := testCtx(b)
	res, err := svc.Wrap(ctx, make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	b.Run("warm", func(b *testing.B) {
		for b.Loop() {
			if _, err := svc.Unwrap(ctx, res.KeyID, res.Wrapped); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("cold", func(b *testing.B) {
		for b.Loop() {
			s, err := openURI(b, srv, testAlias, opts)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := s.Unwrap(ctx, res.KeyID, res.Wrapped); err != nil {
				b.Fatal(err)
			}
			_ = s.Close()
		}
	})
}

// TestHierarchy runs the local key hierarchy over local-kms with the same
// harness as the contract.
func TestHierarchy(t *testing.T) {
	sdkEnv(t)
	srv := startServer(t)
	hierarchytest.RunBackend(t, harness(t, srv))
}

// countingTransport counts HTTP attempts.
type countingTransport struct {
	next http.RoundTripper
	n    atomic.Int32
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.next.RoundTrip(r)
}

// TestOneAttemptPerCall checks that the SDK does not retry: the hierarchy
// retries transient errors itself, and retrying in both would multiply the
// attempts and the wait.
func TestOneAttemptPerCall(t *testing.T) {
	sdkEnv(t)
	srv := startServer(t)
	ct := &countingTransport{next: srv.HTTPClient().Transport}
	uri := "awskms:///" + testAlias + "?endpoint=" + srv.Endpoint()
	svc, err := open(testCtx(t), uri, keyservice.Options{ClusterName: "c"}, config.WithHTTPClient(&http.Client{Transport: ct}))
	if err != nil {
		t.Fatal(err)
	}
	srv.Stop(t)
	defer srv.Start(t)
	_, err = svc.Probe(testCtx(t))
	if keyservice.Classify(err) != keyservice.ClassTransient {
		t.Fatalf("Probe while local-kms is down: %v, want transient", err)
	}
	if n := ct.n.Load(); n != 1 {
		t.Fatalf("Probe made %d HTTP attempts, want 1", n)
	}
}
