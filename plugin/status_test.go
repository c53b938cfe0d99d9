package plugin_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/metrics"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
)

// TestStatusWhileKeyServiceHangs: with a key service that stopped answering
// (SIGSTOP), Status answers from the last known state within the budget, and
// a Status that still outlived the caller's deadline is counted as
// DeadlineExceeded, not OK.
func TestStatusWhileKeyServiceHangs(t *testing.T) {
	dir, err := os.MkdirTemp("", "kk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	raw, err := softkey.Open(context.Background(), "softkey://"+filepath.Join(dir, "keyring.json"), keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	svc := keyservicetest.NewHangingProbe(raw)
	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	h, err := hierarchy.New(context.Background(), svc, hierarchy.Config{
		ProbeInterval: time.Millisecond, // every Status finds the last probe stale
		RemoteTimeout: time.Minute, StatusBudget: 200 * time.Millisecond, Metrics: m,
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := plugin.Listen("unix://"+filepath.Join(dir, "kms.sock"), plugin.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := plugin.NewGRPCServer(h, plugin.Options{Metrics: m})
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = plugin.Serve(sctx, srv, l, time.Second) }()
	released := false
	t.Cleanup(func() {
		if !released {
			close(svc.Release)
		}
		cancel()
		<-done
		h.Close()
	})
	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "kms.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	client := kmsapi.NewKeyManagementServiceClient(conn)

	first, err := client.Status(ctx(t), &kmsapi.StatusRequest{})
	if err != nil || first.Healthz != "ok" {
		t.Fatalf("before the hang: %v %+v", err, first)
	}
	svc.Hang.Store(true)
	time.Sleep(10 * time.Millisecond) // the background loop is now stuck in a probe, and the last answer stale

	// The apiserver's default: 3 s per call. The answer comes from the last
	// known state (an outage within the grace is still ok, same key_id).
	c3, cancel3 := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel3()
	st, err := client.Status(c3, &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatalf("Status while the key service hangs: %v (the apiserver would log DeadlineExceeded)", err)
	}
	if st.Healthz != "ok" || st.KeyId != first.KeyId {
		t.Fatalf("Status while the key service hangs: %+v, want ok under %q", st, first.KeyId)
	}

	// A caller with less time than the budget: its Status overruns and must
	// be counted as what it was.
	okBefore := statusCount(t, reg, "OK")
	overran := func() float64 { return statusCount(t, reg, "DeadlineExceeded") + statusCount(t, reg, "Canceled") }
	before := overran()
	c1, cancel1 := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel1()
	if _, err := client.Status(c1, &kmsapi.StatusRequest{}); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("Status past the caller's deadline: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for overran() == before {
		if time.Now().After(deadline) {
			t.Fatal("a Status that outlived its deadline was not counted as DeadlineExceeded")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if ok := statusCount(t, reg, "OK"); ok != okBefore {
		t.Fatalf("a Status that outlived its deadline was counted as OK (%v -> %v)", okBefore, ok)
	}
	close(svc.Release)
	released = true
}

// statusCount returns kubekms_grpc_requests_total for v2 Status with code.
func statusCount(t *testing.T, reg *prometheus.Registry, code string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "kubekms_grpc_requests_total" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			labels := map[string]string{}
			for _, lp := range mt.GetLabel() {
				labels[lp.GetName()] = lp.GetValue()
			}
			if labels["method"] == "Status" && labels["code"] == code {
				return mt.GetCounter().GetValue()
			}
		}
	}
	return 0
}
