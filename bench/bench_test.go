// Package bench measures kubekms through the real gRPC stack over a unix
// socket, side by side in the same run with a no-op KMS v2 server on the
// same kind of socket (the floor any plugin pays for gRPC and the socket).
//
//	go test -run '^$' -bench . -benchtime 3s ./bench/
//
// Each benchmark runs 16 concurrent callers and reports p50 and p99 latency
// besides ns/op (the inverse of throughput).
package bench

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/bench/noopkms"
	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
)

const callers = 16

func socketDir(b *testing.B) string {
	dir, err := os.MkdirTemp("", "kkb")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func serve(b *testing.B, srv *grpc.Server, dir string) kmsapi.KeyManagementServiceClient {
	sock := filepath.Join(dir, "kms.sock")
	l, err := plugin.Listen("unix://"+sock, plugin.SocketOptions{})
	if err != nil {
		b.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	b.Cleanup(srv.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return kmsapi.NewKeyManagementServiceClient(conn)
}

func noopClient(b *testing.B) kmsapi.KeyManagementServiceClient {
	s := grpc.NewServer()
	kmsapi.RegisterKeyManagementServiceServer(s, noopkms.Server{Echo: true})
	return serve(b, s, socketDir(b))
}

func kubekmsClient(b *testing.B, cfg hierarchy.Config) (kmsapi.KeyManagementServiceClient, *keyservicetest.Counting) {
	dir := socketDir(b)
	raw, err := softkey.Open(context.Background(), "softkey://"+filepath.Join(dir, "keyring.json"), keyservice.Options{})
	if err != nil {
		b.Fatal(err)
	}
	svc := keyservicetest.NewCounting(raw)
	h, err := hierarchy.New(context.Background(), svc, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(h.Close)
	return serve(b, plugin.NewGRPCServer(h, plugin.Options{}), dir), svc
}

// parallel runs op from 16 goroutines and reports latency percentiles.
func parallel(b *testing.B, op func(i int) error) {
	var mu sync.Mutex
	var lat []time.Duration
	b.SetParallelism((callers + 1) / max(1, testingProcs()))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		local := make([]time.Duration, 0, 1024)
		i := 0
		for pb.Next() {
			start := time.Now()
			if err := op(i); err != nil {
				b.Error(err)
				return
			}
			local = append(local, time.Since(start))
			i++
		}
		mu.Lock()
		lat = append(lat, local...)
		mu.Unlock()
	})
	b.StopTimer()
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
}

var seed = bytes.Repeat([]byte{9}, 32)

func BenchmarkDecryptNoop(b *testing.B) {
	c := noopClient(b)
	// kubekms's request size on softkey: a 132-byte format-3 ciphertext.
	req := &kmsapi.DecryptRequest{Ciphertext: bytes.Repeat([]byte{1}, 132), KeyId: "noop", Uid: "u"}
	parallel(b, func(int) error { _, err := c.Decrypt(context.Background(), req); return err })
}

func BenchmarkDecryptKubekms(b *testing.B) {
	c, svc := kubekmsClient(b, hierarchy.Config{})
	enc, err := c.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: seed, Uid: "u"})
	if err != nil {
		b.Fatal(err)
	}
	req := &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "u"}
	parallel(b, func(int) error { _, err := c.Decrypt(context.Background(), req); return err })
	b.ReportMetric(float64(svc.Crypto()), "remote-calls")
}

func BenchmarkEncryptNoop(b *testing.B) {
	c := noopClient(b)
	parallel(b, func(int) error {
		_, err := c.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: seed, Uid: "u"})
		return err
	})
}

func BenchmarkEncryptKubekms(b *testing.B) {
	c, svc := kubekmsClient(b, hierarchy.Config{})
	parallel(b, func(int) error {
		_, err := c.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: seed, Uid: "u"})
		return err
	})
	b.ReportMetric(float64(svc.Crypto()), "remote-calls")
}

// BenchmarkDecryptColdSoftkey makes every Decrypt a cache miss (one remote
// unwrap through the softkey service): 64 local KEKs, a cache of 1.
func BenchmarkDecryptColdSoftkey(b *testing.B) {
	c, svc := kubekmsClient(b, hierarchy.Config{MaxUses: 1, CacheSize: 1})
	var reqs []*kmsapi.DecryptRequest
	for range 64 {
		enc, err := c.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: seed, Uid: "u"})
		if err != nil {
			b.Fatal(err)
		}
		reqs = append(reqs, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "u"})
	}
	before := svc.Calls("unwrap")
	b.ResetTimer()
	for i := range b.N {
		if _, err := c.Decrypt(context.Background(), reqs[i%len(reqs)]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(svc.Calls("unwrap")-before)/float64(b.N), "unwraps/op")
}
