package keyservice_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/kubekms/kubekms/keyservice"
)

func TestRegistry(t *testing.T) {
	r := keyservice.NewRegistry()
	var got string
	r.Register("Mem", func(_ context.Context, uri string, _ keyservice.Options) (keyservice.Service, error) {
		got = uri
		return nil, nil
	})
	r.Register("broken", func(context.Context, string, keyservice.Options) (keyservice.Service, error) {
		return nil, errors.New("no such key")
	})
	if _, err := r.Open(context.Background(), "mem:///x?y=1", keyservice.Options{}); err != nil || got != "mem:///x?y=1" {
		t.Fatalf("Open: %v, opener saw %q", err, got)
	}
	for uri, want := range map[string]string{
		"":                "has no scheme",
		"/path/only":      "has no scheme",
		"gcpkms://x":      `scheme "gcpkms" is not supported (want one of broken, mem)`,
		"broken:///thing": "open broken key service: no such key",
	} {
		_, err := r.Open(context.Background(), uri, keyservice.Options{})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Open(%q) = %v, want an error containing %q", uri, err, want)
		}
	}
}

func TestClassify(t *testing.T) {
	base := errors.New("boom")
	for _, tc := range []struct {
		err  error
		want keyservice.Class
	}{
		{nil, keyservice.ClassUnknown},
		{base, keyservice.ClassUnknown},
		{keyservice.Transient("wrap", base), keyservice.ClassTransient},
		{fmt.Errorf("unwrap local KEK: %w", keyservice.Revoked("unwrap", base)), keyservice.ClassRevoked},
		{keyservice.Invalid("unwrap", base), keyservice.ClassInvalid},
		{context.DeadlineExceeded, keyservice.ClassTransient},
		{fmt.Errorf("x: %w", context.Canceled), keyservice.ClassTransient},
	} {
		if got := keyservice.Classify(tc.err); got != tc.want {
			t.Errorf("Classify(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if e := keyservice.Revoked("probe", base); !errors.Is(e, base) || !strings.Contains(e.Error(), "probe (revoked): boom") {
		t.Errorf("Revoked error: %v", e)
	}
}
