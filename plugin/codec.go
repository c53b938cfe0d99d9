package plugin

import (
	"context"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
)

// requestCodec is the server's protobuf codec. grpc-go answers a request it
// cannot decode (not protobuf, a string field that is not UTF-8) with
// Internal, before any interceptor runs, so nobody logs or counts it. This
// codec instead notes the decode error against the (left empty) message and
// lets the call go on; decodeInterceptor, the first interceptor, finds the
// note and answers InvalidArgument, logged and counted like every call.
type requestCodec struct {
	encoding.CodecV2
	failed sync.Map // request message -> decode error
}

func newRequestCodec() *requestCodec {
	return &requestCodec{CodecV2: encoding.GetCodecV2(protocodec.Name)}
}

func (c *requestCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if err := c.CodecV2.Unmarshal(data, v); err != nil {
		c.failed.Store(v, err)
	}
	return nil
}

// decodeInterceptor answers requests the codec could not decode.
func (c *requestCodec) decodeInterceptor(opts Options) grpc.UnaryServerInterceptor {
	var observers sync.Map // full method -> *observer, made at its first undecodable request
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		v, failed := c.failed.LoadAndDelete(req)
		if !failed {
			return handler(ctx, req)
		}
		service, method := splitMethod(info.FullMethod)
		o, ok := observers.Load(info.FullMethod)
		if !ok {
			o, _ = observers.LoadOrStore(info.FullMethod, newObserver(opts, service, method))
		}
		_, call := o.(*observer).begin(ctx, "")
		return nil, call.end(invalid("request is not a valid %s message: %v", method+"Request", v.(error)))
	}
}

// splitMethod turns "/v2.KeyManagementService/Decrypt" into ("v2", "Decrypt").
func splitMethod(full string) (service, method string) {
	svc, method, _ := strings.Cut(strings.TrimPrefix(full, "/"), "/")
	service, _, _ = strings.Cut(svc, ".")
	return service, method
}
