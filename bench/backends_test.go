package bench

// Remote key-service economics, per backend, through the hierarchy directly
// (no gRPC: the socket and gRPC floor is measured by the benchmarks in
// bench_test.go):
//
//	KUBEKMS_REQUIRE_REAL=1 go test -run '^$' -bench 'Backend' -benchtime 10000x ./bench/
//
// BenchmarkBackend/<backend>/mixed: 5,000 Encrypt + 5,000 Decrypt (with
// -benchtime 10000x) by one fresh hierarchy; reports the remote crypto calls
// (Wrap + Unwrap) per 10,000 operations. One is expected: the Wrap of the one
// local KEK, made at start-up.
//
// BenchmarkBackend/<backend>/decrypt-cold: every Decrypt is a cache miss,
// so one remote Unwrap (a cache of 1, cycling over 64 values sealed under 64
// local KEKs made with MaxUses 1); reports unwraps/op (expect 1.00) and the
// p50/p99 latency.
//
// Backends: softkey (embedded keyring file), pkcs11 (real SoftHSM2), awskms
// (real local-kms, reached through a loopback forwarder into its private
// network namespace: one extra loopback hop per request), vault (a real
// Vault v1.21.0 server with file storage on 127.0.0.1, plain http, token
// auth, audit log on: what a default production Vault does per request),
// gcpkms-standin (internal/testservers/gcpkms, a STAND-IN Cloud KMS gRPC
// server on 127.0.0.1 reached by the official client), azurekv-standin and
// azurehsm-standin (the Azure SDK's in-process fake transport with real
// RSA-OAEP-256 / AES key wrap: no network at all, so only the SDK's
// serialization is measured) and tpm (a real swtpm on a unix socket).

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kubekms/kubekms/hierarchy"
	azurekvserver "github.com/kubekms/kubekms/internal/testservers/azurekv"
	gcpkmsserver "github.com/kubekms/kubekms/internal/testservers/gcpkms"
	"github.com/kubekms/kubekms/internal/testservers/localkms"
	"github.com/kubekms/kubekms/internal/testservers/softhsm"
	"github.com/kubekms/kubekms/internal/testservers/swtpm"
	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/awskms"
	"github.com/kubekms/kubekms/keyservice/azurekv"
	"github.com/kubekms/kubekms/keyservice/gcpkms"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/pkcs11"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/keyservice/tpm"
	"github.com/kubekms/kubekms/keyservice/vault"
)

// backendSeed is what the apiserver sends: a 32-byte seed.
var backendSeed = []byte("0123456789abcdef0123456789abcdef")

// benchBackend opens one key service on its server; the server and the
// service live until b ends.
type benchBackend struct {
	name string
	open func(b *testing.B) keyservice.Service
}

func benchBackends() []benchBackend {
	return []benchBackend{
		{"softkey", openSoftkey},
		{"pkcs11", openPKCS11},
		{"awskms", openAWSKMS},
		{"vault", openVault},
		{"gcpkms-standin", openGCPKMSStandIn},
		{"azurekv-standin", func(b *testing.B) keyservice.Service { return openAzureStandIn(b, false) }},
		{"azurehsm-standin", func(b *testing.B) keyservice.Service { return openAzureStandIn(b, true) }},
		{"tpm", openTPM},
	}
}

func benchCtx(b *testing.B) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	b.Cleanup(cancel)
	return ctx
}

func mustOpen(b *testing.B, open keyservice.Opener, uri string, opts keyservice.Options) keyservice.Service {
	b.Helper()
	svc, err := open(benchCtx(b), uri, opts)
	if err != nil {
		b.Fatalf("open key service: %v", err)
	}
	b.Cleanup(func() { _ = svc.Close() })
	return svc
}

func openSoftkey(b *testing.B) keyservice.Service {
	return mustOpen(b, softkey.Open, "softkey://"+filepath.Join(b.TempDir(), "keyring.json"), keyservice.Options{})
}

func openPKCS11(b *testing.B) keyservice.Service {
	tk := softhsm.Start(b)
	tk.Keygen(softhsm.KeyLabel)
	return mustOpen(b, pkcs11.Open, tk.URI(";object="+softhsm.KeyLabel, ""), keyservice.Options{})
}

func openAWSKMS(b *testing.B) keyservice.Service {
	const key, alias = "7f309c42-5d6e-4f70-8182-93a4b5c6d7e8", "alias/kubekms-bench"
	srv := localkms.Start(b, localkms.Seed{AESKeys: []string{key}, Aliases: map[string]string{alias: key}})
	// The SDK reads its settings from the environment: the test credentials
	// and region, and none of the host's AWS settings (AWS_CA_BUNDLE, ...).
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "AWS_") {
			b.Setenv(name, "")
		}
	}
	for _, kv := range localkms.ClientEnv(filepath.Join(b.TempDir(), "none")) {
		name, value, _ := strings.Cut(kv, "=")
		b.Setenv(name, value)
	}
	uri := "awskms:///" + alias + "?endpoint=" + srv.Forward(b)
	return mustOpen(b, awskms.Open, uri, keyservice.Options{ClusterName: "bench"})
}

func openVault(b *testing.B) keyservice.Service {
	k := vaultserver.New(b, vaultserver.Options{}).NewTransitKey(b)
	return mustOpen(b, vault.Open, k.URI(), keyservice.Options{})
}

func openGCPKMSStandIn(b *testing.B) keyservice.Service {
	srv := gcpkmsserver.Start(b, "kek")
	return mustOpen(b, gcpkms.Open, "gcpkms:///"+gcpkmsserver.KeyName("kek")+"?endpoint="+srv.Endpoint(), keyservice.Options{ClusterName: "bench"})
}

func openAzureStandIn(b *testing.B, hsm bool) keyservice.Service {
	srv := azurekvserver.Start(b, hsm, "kek")
	svc, err := azurekv.OpenWith("azurekv://"+strings.TrimPrefix(srv.URL, "https://")+"/keys/kek",
		keyservice.Options{ClusterName: "bench"}, azurekvserver.Credential(), srv.Transport())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = svc.Close() })
	return svc
}

func openTPM(b *testing.B) keyservice.Service {
	tp := swtpm.Start(b)
	uri := "tpm://" + tp.Socket() + "?handle=0x81000100&pcrs=7"
	if _, err := tpm.Provision(benchCtx(b), uri, "bench"); err != nil {
		b.Fatal(err)
	}
	return mustOpen(b, tpm.Open, uri, keyservice.Options{ClusterName: "bench"})
}

func newHierarchy(b *testing.B, svc keyservice.Service, cfg hierarchy.Config) *hierarchy.Hierarchy {
	b.Helper()
	h, err := hierarchy.New(benchCtx(b), svc, cfg)
	if err != nil {
		b.Fatalf("hierarchy: %v", err)
	}
	b.Cleanup(h.Close)
	return h
}

func BenchmarkBackend(b *testing.B) {
	for _, be := range benchBackends() {
		b.Run(be.name, func(b *testing.B) {
			svc := be.open(b)
			b.Run("mixed", func(b *testing.B) { benchMixed(b, svc) })
			b.Run("decrypt-cold", func(b *testing.B) { benchDecryptCold(b, svc) })
		})
	}
}

// benchMixed alternates Encrypt and Decrypt (of the value just sealed) on a
// fresh hierarchy, counting every remote call from its start.
func benchMixed(b *testing.B, svc keyservice.Service) {
	ctx := benchCtx(b)
	c := keyservicetest.NewCounting(svc)
	h := newHierarchy(b, c, hierarchy.Config{})
	var last hierarchy.Sealed
	ops := 0
	for b.Loop() {
		var err error
		if ops%2 == 0 {
			last, err = h.Encrypt(ctx, backendSeed)
		} else {
			_, err = h.Decrypt(ctx, last.KeyID, last.Ciphertext, last.Annotations)
		}
		if err != nil {
			b.Fatalf("op %d: %v", ops, err)
		}
		ops++
	}
	per10k := func(n int) float64 { return float64(n) * 10000 / float64(ops) }
	b.ReportMetric(per10k(c.Crypto()), "remote/10k-ops")
	b.ReportMetric(float64(c.Calls("wrap")), "wraps")
	b.ReportMetric(float64(c.Calls("unwrap")), "unwraps")
	b.ReportMetric(float64(c.Calls("probe")), "probes")
}

// benchDecryptCold makes every Decrypt a cache miss: one remote Unwrap.
func benchDecryptCold(b *testing.B, svc keyservice.Service) {
	ctx := benchCtx(b)
	c := keyservicetest.NewCounting(svc)
	h := newHierarchy(b, c, hierarchy.Config{MaxUses: 1, CacheSize: 1})
	const kekCount = 64
	sealed := make([]hierarchy.Sealed, kekCount)
	annotations := map[string]bool{}
	for i := range sealed {
		s, err := h.Encrypt(ctx, backendSeed)
		if err != nil {
			b.Fatalf("seal %d: %v", i, err)
		}
		sealed[i] = s
		annotations[string(s.LocalKEK())] = true
	}
	if len(annotations) != kekCount {
		b.Fatalf("%d values were sealed under %d local KEKs, want %d", kekCount, len(annotations), kekCount)
	}
	before := c.Calls("unwrap")
	var lat []time.Duration
	ops := 0
	for b.Loop() {
		s := sealed[ops%kekCount]
		start := time.Now()
		if _, err := h.Decrypt(ctx, s.KeyID, s.Ciphertext, s.Annotations); err != nil {
			b.Fatalf("decrypt %d: %v", ops, err)
		}
		lat = append(lat, time.Since(start))
		ops++
	}
	b.ReportMetric(float64(c.Calls("unwrap")-before)/float64(ops), "unwraps/op")
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}
