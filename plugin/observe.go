package plugin

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"golang.org/x/time/rate"
	"google.golang.org/grpc/status"

	"github.com/kubekms/kubekms/internal/metrics"
)

// Defaults of the call log (docs/operations.md, "Logs").
const (
	// DefaultSlowCall is the latency from which a call is always logged.
	DefaultSlowCall = 100 * time.Millisecond
	// DefaultLoggedCallsPerSecond is how many successful, fast calls per
	// method and second are logged at info after a burst of callLogBurst.
	DefaultLoggedCallsPerSecond = 10
	callLogBurst                = 100
)

// observer traces, counts and logs the calls of one gRPC method.
//
// Every call gets a span with the apiserver's uid and is counted. The log
// (and so the latency exemplar, which always names a logged uid) gets every
// failed call and every slow one, and the successful, fast calls while they
// come at fewer than LoggedCallsPerSecond per second (after a burst of 100):
// a cluster's normal KMS traffic is a few calls a minute, all logged, while a
// burst of thousands a second costs no more than a few lines. At debug level
// every call is logged.
type observer struct {
	log             *slog.Logger
	tracer          trace.Tracer // nil when tracing is off: no span at all
	startOpts       []trace.SpanStartOption
	calls           *metrics.Calls
	service, method string
	spanName        string
	slow            time.Duration
	sample          *rate.Limiter // nil: no sampled lines at info
	notLogged       atomic.Uint64 // calls not logged since the last line
}

func newObserver(opts Options, service, method string) *observer {
	o := &observer{
		log: opts.Logger, calls: opts.Metrics.Calls(service, method),
		startOpts: []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindServer)},
		service:   service, method: method, spanName: "kms." + service + "/" + method,
		slow: opts.SlowCall,
	}
	if _, off := opts.Tracer.(noop.Tracer); !off {
		o.tracer = opts.Tracer
	}
	if opts.LoggedCallsPerSecond > 0 {
		o.sample = rate.NewLimiter(rate.Limit(opts.LoggedCallsPerSecond), callLogBurst)
	}
	return o
}

// call is one observed request.
type call struct {
	o     *observer
	uid   string
	keyID string
	start time.Time
	span  trace.Span // nil when tracing is off
}

func (o *observer) begin(ctx context.Context, uid string) (context.Context, call) {
	c := call{o: o, uid: uid, start: time.Now()}
	if o.tracer != nil {
		ctx, c.span = o.tracer.Start(ctx, o.spanName, o.startOpts...)
		if c.span.IsRecording() {
			c.span.SetAttributes(attribute.String("kms.uid", uid))
		}
	}
	return ctx, c
}

// end records the outcome and returns err as a gRPC status.
func (c *call) end(err error) error {
	err = toStatus(err)
	code := status.Code(err)
	d := time.Since(c.start)
	o := c.o
	level, msg := slog.LevelDebug, "kms call"
	switch {
	case err != nil:
		level, msg = slog.LevelWarn, "kms call failed"
	case d >= o.slow:
		level, msg = slog.LevelWarn, "kms call slow"
	case o.sample != nil && o.sample.Allow():
		level = slog.LevelInfo
	}
	logged := o.log.Enabled(context.Background(), level)
	exemplar := ""
	if logged {
		exemplar = c.uid
	}
	o.calls.Record(code.String(), exemplar, d)
	if c.span != nil {
		if c.span.IsRecording() {
			if c.keyID != "" {
				c.span.SetAttributes(attribute.String("kms.key_id", c.keyID))
			}
			if err != nil {
				c.span.SetStatus(codes.Error, code.String())
				c.span.RecordError(err)
			}
		}
		c.span.End()
	}
	if !logged {
		o.notLogged.Add(1)
		return err
	}
	attrs := make([]slog.Attr, 0, 8)
	attrs = append(attrs, slog.String("service", o.service), slog.String("method", o.method), slog.String("uid", c.uid),
		slog.String("key_id", c.keyID), slog.String("outcome", code.String()), slog.Duration("duration", d))
	if err != nil {
		attrs = append(attrs, slog.String("error", status.Convert(err).Message()))
	}
	if n := o.notLogged.Swap(0); n > 0 {
		attrs = append(attrs, slog.Uint64("calls_not_logged", n))
	}
	o.log.LogAttrs(context.Background(), level, msg, attrs...)
	return err
}
