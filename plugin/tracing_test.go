package plugin_test

import (
	"context"
	"path/filepath"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
)

// TestTracingFollowsUID: one span per gRPC call carrying the apiserver's uid,
// with the remote key-service call as its child, so one envelope operation
// can be followed from the apiserver's log line to the key service.
func TestTracingFollowsUID(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tracer := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec)).Tracer("test")
	dir := t.TempDir()
	svc, err := softkey.Open(context.Background(), "softkey://"+filepath.Join(dir, "keyring.json"), keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() }) // stops its keyring watch
	enc := func(h *hierarchy.Hierarchy) hierarchy.Sealed {
		s, err := h.Encrypt(context.Background(), seed)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	h1, err := hierarchy.New(context.Background(), svc, hierarchy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	s := enc(h1)
	h1.Close()
	// A fresh hierarchy: the Decrypt below is a cache miss, so it unwraps remotely.
	h2, err := hierarchy.New(context.Background(), svc, hierarchy.Config{Tracer: tracer})
	if err != nil {
		t.Fatal(err)
	}
	defer h2.Close()
	v2 := plugin.NewV2(h2, plugin.Options{Tracer: tracer})
	const uid = "1f0c8a2e-7d1b-4c55-9a0e-3b6f2d9e8c41"
	if _, err := v2.Decrypt(context.Background(), &kmsapi.DecryptRequest{Ciphertext: s.Ciphertext, KeyId: s.KeyID, Annotations: s.Annotations, Uid: uid}); err != nil {
		t.Fatal(err)
	}
	var server, unwrap sdktrace.ReadOnlySpan
	for _, sp := range rec.Ended() {
		switch sp.Name() {
		case "kms.v2/Decrypt":
			server = sp
		case "keyservice.unwrap":
			unwrap = sp
		}
	}
	if server == nil || unwrap == nil {
		t.Fatalf("spans: want kms.v2/Decrypt and keyservice.unwrap, got %d spans", len(rec.Ended()))
	}
	found := false
	for _, a := range server.Attributes() {
		if a.Key == "kms.uid" && a.Value.AsString() == uid {
			found = true
		}
	}
	if !found {
		t.Fatalf("server span lacks kms.uid=%s: %v", uid, server.Attributes())
	}
	if unwrap.Parent().SpanID() != server.SpanContext().SpanID() || unwrap.SpanContext().TraceID() != server.SpanContext().TraceID() {
		t.Fatal("the remote unwrap span is not a child of the gRPC call's span")
	}
}
