package plugin

import (
	"context"
	"net"
	"time"

	"google.golang.org/grpc"
	kmsv1 "k8s.io/kms/apis/v1beta1"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/hierarchy"
)

// MaxRequestBytes bounds a request: the largest valid Decrypt is a 1 KiB
// ciphertext, a 1 KiB key_id and 32 KiB of annotations.
const MaxRequestBytes = 64 * 1024

// DefaultCallTimeout bounds a call whose client set no deadline (the
// apiserver sets its own, 3 s by default).
const DefaultCallTimeout = 30 * time.Second

// streamWorkers is how many calls run at once on reused goroutines: more than
// the apiserver's concurrent callers (its watch-cache decoders and writers).
const streamWorkers = 32

// NewGRPCServer returns a gRPC server with the v2 and v1beta1 services on h.
// A request that is not a valid protobuf message is InvalidArgument, logged
// and counted (see requestCodec).
func NewGRPCServer(h *hierarchy.Hierarchy, opts Options) *grpc.Server {
	opts.defaults()
	codec := newRequestCodec()
	s := grpc.NewServer(
		grpc.MaxRecvMsgSize(MaxRequestBytes),
		grpc.MaxConcurrentStreams(1024),
		grpc.ForceServerCodecV2(codec),
		grpc.ChainUnaryInterceptor(codec.decodeInterceptor(opts), deadlineInterceptor),
		// Calls run on long-lived workers whose stacks have grown already,
		// instead of a new goroutine per call that grows its stack (copies
		// it) on every call: that was 12% of the server's CPU
		// (docs/performance.md). Calls beyond the workers get a goroutine.
		grpc.NumStreamWorkers(streamWorkers),
	)
	kmsapi.RegisterKeyManagementServiceServer(s, NewV2(h, opts))
	kmsv1.RegisterKeyManagementServiceServer(s, NewV1(h, opts))
	return s
}

func deadlineInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultCallTimeout)
		defer cancel()
	}
	return handler(ctx, req)
}

// Shutdown stops s gracefully (in-flight calls finish) within ctx, then hard.
func Shutdown(ctx context.Context, s *grpc.Server) {
	done := make(chan struct{})
	go func() {
		s.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.Stop()
		<-done
	}
}

// Serve serves s on l until ctx ends, then shuts down gracefully (bounded by
// grace). It returns Serve's error, if any.
func Serve(ctx context.Context, s *grpc.Server, l net.Listener, grace time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(l) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	Shutdown(sctx, s)
	return <-errc
}
