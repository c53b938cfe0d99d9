// Command noop is the no-op KMS v2 plugin the out-of-process benchmark
// (bench/floor) compares kubekms with: its own process, a unix socket,
// grpc-go's default server options, nothing else. With -tuned it also gets
// the server tuning kubekms serve has (reused stream workers, GOGC 400), to
// show what kubekms costs over a plugin tuned alike. With -echo Decrypt
// answers the ciphertext (Encrypt's answer is the plaintext), so a real
// kube-apiserver can store and read through it: the cold-start baseline of
// the e2e suite.
//
//	noop -listen unix:///tmp/noop.sock [-tuned] [-echo]
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"google.golang.org/grpc"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/bench/noopkms"
)

func main() {
	listen := flag.String("listen", "", "unix socket to serve on: unix:///path.sock")
	tuned := flag.Bool("tuned", false, "kubekms serve's tuning: 32 reused stream workers, GOGC 400")
	echo := flag.Bool("echo", false, "Decrypt answers the ciphertext (a usable identity plugin), not 32 zero bytes")
	flag.Parse()
	if err := run(*listen, *tuned, *echo); err != nil {
		fmt.Fprintln(os.Stderr, "noop:", err)
		os.Exit(1)
	}
}

func run(listen string, tuned, echo bool) error {
	path, ok := strings.CutPrefix(listen, "unix://")
	if !ok || path == "" {
		return fmt.Errorf("-listen %q: want unix:///path.sock", listen)
	}
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	var opts []grpc.ServerOption
	if tuned {
		opts = append(opts, grpc.NumStreamWorkers(32))
		debug.SetGCPercent(400)
	}
	s := grpc.NewServer(opts...)
	kmsapi.RegisterKeyManagementServiceServer(s, noopkms.Server{Echo: echo})
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		s.Stop()
	}()
	return s.Serve(l)
}
