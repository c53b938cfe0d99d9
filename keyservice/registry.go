package keyservice

import (
	"context"
	"fmt"
	"sort"
	"strings"
)

// Opener opens a backend from its full key URI.
type Opener func(ctx context.Context, uri string, opts Options) (Service, error)

// Registry maps key-URI schemes to backends. It is built by the binary, so
// there is no global state and tests can register their own backends.
type Registry struct {
	openers map[string]Opener
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{openers: map[string]Opener{}} }

// Register adds a backend for scheme (without the colon).
func (r *Registry) Register(scheme string, open Opener) {
	r.openers[strings.ToLower(scheme)] = open
}

// Schemes lists the registered schemes, sorted.
func (r *Registry) Schemes() []string {
	out := make([]string, 0, len(r.openers))
	for s := range r.openers {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}

// Open opens the backend that uri's scheme names.
func (r *Registry) Open(ctx context.Context, uri string, opts Options) (Service, error) {
	scheme, _, ok := strings.Cut(uri, ":")
	if !ok || scheme == "" {
		return nil, fmt.Errorf("key URI %q has no scheme (want one of %s)", uri, strings.Join(r.Schemes(), ", "))
	}
	open, ok := r.openers[strings.ToLower(scheme)]
	if !ok {
		return nil, fmt.Errorf("key URI scheme %q is not supported (want one of %s)", scheme, strings.Join(r.Schemes(), ", "))
	}
	svc, err := open(ctx, uri, opts)
	if err != nil {
		return nil, fmt.Errorf("open %s key service: %w", scheme, err)
	}
	return svc, nil
}
