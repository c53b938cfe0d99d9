// Package plugin is the gRPC KMS plugin: the v2 KeyManagementService (and the
// legacy v1beta1 one on the same socket) over the local key hierarchy. It
// validates requests against the apiserver's limits, maps errors to gRPC
// codes, and traces, counts and logs calls with the apiserver's uid. It
// knows nothing about any key-service vendor.
package plugin

import (
	"context"
	"log/slog"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/metrics"
)

// Options configure the service.
type Options struct {
	Logger  *slog.Logger
	Metrics *metrics.Metrics
	Tracer  trace.Tracer
	// Version is reported by the v1beta1 Version call.
	Version string
	// SlowCall is the latency from which every call is logged (default
	// DefaultSlowCall).
	SlowCall time.Duration
	// LoggedCallsPerSecond is how many successful, fast calls per method
	// and second are logged at info, after a burst of 100 (default
	// DefaultLoggedCallsPerSecond; negative: none). See observer.
	LoggedCallsPerSecond float64
}

func (o *Options) defaults() {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Tracer == nil {
		o.Tracer = noop.NewTracerProvider().Tracer("")
	}
	if o.Version == "" {
		o.Version = "dev"
	}
	if o.SlowCall == 0 {
		o.SlowCall = DefaultSlowCall
	}
	if o.LoggedCallsPerSecond == 0 {
		o.LoggedCallsPerSecond = DefaultLoggedCallsPerSecond
	}
}

// V2 implements v2.KeyManagementService.
type V2 struct {
	kmsapi.UnimplementedKeyManagementServiceServer
	h        *hierarchy.Hierarchy
	opts     Options
	enc, dec *observer
}

// NewV2 returns the v2 service over h.
func NewV2(h *hierarchy.Hierarchy, opts Options) *V2 {
	opts.defaults()
	return &V2{h: h, opts: opts, enc: newObserver(opts, "v2", "Encrypt"), dec: newObserver(opts, "v2", "Decrypt")}
}

// Status reports health from the hierarchy's last probe (waiting at most the
// hierarchy's StatusBudget for a fresh one). While kubekms refuses to seal,
// key_id is hierarchy.StoppedKeyID, which makes kube-apiserver let its write
// seed expire. A call that outlived its deadline is counted as
// DeadlineExceeded: that is what the apiserver saw.
func (s *V2) Status(ctx context.Context, _ *kmsapi.StatusRequest) (*kmsapi.StatusResponse, error) {
	start := time.Now()
	st := s.h.Status(ctx)
	healthz := "ok"
	if !st.OK {
		healthz = st.Reason
		s.opts.Logger.Warn("unhealthy", "reason", st.Reason, "mode", st.Mode.String(), "key_id", st.KeyID, "remote_key_id", st.RemoteKeyID)
	}
	if err := ctx.Err(); err != nil {
		// A client that gave up at its deadline may cancel before the
		// server's own deadline fires: it still ran out of time.
		if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
			err = context.DeadlineExceeded
		}
		err = status.FromContextError(err).Err()
		s.opts.Metrics.GRPC("v2", "Status", status.Code(err).String(), "", time.Since(start))
		return nil, err
	}
	s.opts.Metrics.GRPC("v2", "Status", "OK", "", time.Since(start))
	return &kmsapi.StatusResponse{Version: "v2", Healthz: healthz, KeyId: st.KeyID}, nil
}

// Encrypt seals the apiserver's seed.
func (s *V2) Encrypt(ctx context.Context, req *kmsapi.EncryptRequest) (*kmsapi.EncryptResponse, error) {
	ctx, c := s.enc.begin(ctx, req.GetUid())
	sealed, err := s.h.Encrypt(ctx, req.GetPlaintext())
	if err != nil {
		return nil, c.end(err)
	}
	c.keyID = sealed.KeyID
	if err := CheckEncryptAnswer(sealed.Ciphertext, sealed.KeyID, sealed.Annotations); err != nil {
		return nil, c.end(internalErr("encrypt answer breaks the apiserver's limits: %v", err))
	}
	return &kmsapi.EncryptResponse{Ciphertext: sealed.Ciphertext, KeyId: sealed.KeyID, Annotations: sealed.Annotations}, c.end(nil)
}

// Decrypt opens a seed the apiserver stored.
func (s *V2) Decrypt(ctx context.Context, req *kmsapi.DecryptRequest) (*kmsapi.DecryptResponse, error) {
	ctx, c := s.dec.begin(ctx, req.GetUid())
	c.keyID = req.GetKeyId()
	if err := checkKeyID(req.GetKeyId()); err != nil {
		return nil, c.end(invalid("%v", err))
	}
	if err := checkAnnotations(req.GetAnnotations()); err != nil {
		return nil, c.end(invalid("%v", err))
	}
	plain, err := s.h.Decrypt(ctx, req.GetKeyId(), req.GetCiphertext(), req.GetAnnotations())
	if err != nil {
		return nil, c.end(err)
	}
	return &kmsapi.DecryptResponse{Plaintext: plain}, c.end(nil)
}
