// Package localplugin runs the kubekms plugin inside a tool's own process,
// for recovery without a running plugin: it opens the key service of a key
// URI, builds the local key hierarchy over it (no state file: nothing on
// the node is touched) and offers it as a KMS v2 Decrypt for the tools'
// own reader, or serves it on a private unix socket for code that dials a
// plugin (the apiserver's transformers in package encconfig).
package localplugin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/plugin"
)

// Plugin is a key service and its hierarchy, in this process.
type Plugin struct {
	svc  keyservice.Service
	h    *hierarchy.Hierarchy
	log  *slog.Logger
	dir  string
	srvs []*grpc.Server
}

// Open opens the key service that uri names through reg and builds a
// hierarchy over it. It makes no remote call it does not need: a key
// service that cannot wrap (a revoked current version) still unwraps the
// local KEKs of the versions it can.
func Open(ctx context.Context, reg *keyservice.Registry, uri string, opts keyservice.Options) (*Plugin, error) {
	svc, err := reg.Open(ctx, uri, opts)
	if err != nil {
		return nil, err
	}
	log := opts.LoggerOrDiscard()
	h, err := hierarchy.New(ctx, svc, hierarchy.Config{Logger: log})
	if err != nil {
		svc.Close()
		return nil, fmt.Errorf("local key hierarchy: %w", err)
	}
	return &Plugin{svc: svc, h: h, log: log}, nil
}

// Decrypt opens a seed the apiserver stored (envelope.SeedDecrypter).
func (p *Plugin) Decrypt(ctx context.Context, _ string, req *kmsservice.DecryptRequest) ([]byte, error) {
	return p.h.Decrypt(ctx, req.KeyID, req.Ciphertext, req.Annotations)
}

// Serve serves the plugin (KMS v2 and v1beta1) on a new unix socket in a
// private folder (0700) until Close, and returns its endpoint.
func (p *Plugin) Serve() (string, error) {
	if p.dir == "" {
		dir, err := os.MkdirTemp("", "kubekms-local-")
		if err != nil {
			return "", fmt.Errorf("socket folder: %w", err)
		}
		p.dir = dir
	}
	endpoint := "unix://" + filepath.Join(p.dir, fmt.Sprintf("kms-%d.sock", len(p.srvs)))
	l, err := plugin.Listen(endpoint, plugin.SocketOptions{Mode: 0o600})
	if err != nil {
		return "", err
	}
	srv := plugin.NewGRPCServer(p.h, plugin.Options{Logger: p.log})
	p.srvs = append(p.srvs, srv)
	go func() { _ = srv.Serve(l) }()
	return endpoint, nil
}

// Close stops the servers, the hierarchy and the key service.
func (p *Plugin) Close() error {
	for _, s := range p.srvs {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		plugin.Shutdown(ctx, s)
		cancel()
	}
	p.h.Close()
	err := p.svc.Close()
	if p.dir != "" {
		err = errors.Join(err, os.RemoveAll(p.dir))
	}
	return err
}
