package main

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/decrypt"
	"github.com/kubekms/kubekms/encconfig"
	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/envelope/kmsclient"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/opaqueid"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/localplugin"
)

// readerFlags say how the tools decrypt stored values: with one plugin
// (--plugin), with the key service itself (--key-uri, no plugin running),
// or with the apiserver's own EncryptionConfiguration (--encryption-config),
// whose KMS providers can be pointed at another plugin (--plugin
// NAME=ENDPOINT) or at a key service (--key-uri NAME=URI).
type readerFlags struct {
	plugins, keyURIs         []string
	encryptionConfig         string
	clusterName, keyIDSuffix string
	opaqueSecret             string
	timeout                  time.Duration
}

func (f *readerFlags) add(cmd *cobra.Command, pluginUsage string) {
	fl := cmd.Flags()
	fl.StringSliceVar(&f.plugins, "plugin", nil, pluginUsage)
	fl.StringSliceVar(&f.keyURIs, "key-uri", nil, "open this key service in-process instead of asking a running plugin (softkey:///..., awskms:///..., ...); with --encryption-config: [PROVIDER=]URI for a KMS provider")
	fl.StringVar(&f.encryptionConfig, "encryption-config", "", "kube-apiserver's EncryptionConfiguration file: read every provider in it (aescbc, aesgcm, secretbox, identity, KMS v1/v2) with the apiserver's own transformers")
	fl.StringVar(&f.clusterName, "cluster-name", "", "with --key-uri: the plugin's --cluster-name (bound into wrapped keys by pkcs11 and awskms)")
	fl.StringVar(&f.keyIDSuffix, "key-id-suffix", "", "with --key-uri: the plugin's --key-id-suffix")
	fl.StringVar(&f.opaqueSecret, "opaque-key-ids", "", "the plugin's --opaque-key-ids secret file: with --key-uri, read values stored under opaque key IDs; show the readable key ID of each opaque one")
	durationVar(fl, &f.timeout, "timeout", kmsclient.DefaultTimeout, "per-call timeout for the plugin")
}

// providerName is a KMS provider name before "=" in NAME=VALUE; a key URI
// such as "pkcs11:token=kms" has a ':' before its first '='.
var providerName = regexp.MustCompile(`^[A-Za-z0-9][-A-Za-z0-9_.]*$`)

// splitNamed splits "NAME=VALUE" into its parts, or returns "" and s.
func splitNamed(s string) (string, string) {
	if name, v, ok := strings.Cut(s, "="); ok && providerName.MatchString(name) {
		return name, v
	}
	return "", s
}

// readerCloser is an Opener and what to release after it.
type readerCloser struct {
	decrypt.Opener
	close func()
	// what says what reads, for the output.
	what string
}

// openFor is open with warnings logged to cmd's stderr.
func (f *readerFlags) openFor(cmd *cobra.Command) (*readerCloser, error) {
	log, err := newLogger(cmd.ErrOrStderr(), "text", "warn")
	if err != nil {
		return nil, err
	}
	return f.open(cmd.Context(), keyservice.Options{Logger: log})
}

// open returns the Opener the flags describe. Without --encryption-config
// it needs exactly one --plugin or --key-uri.
func (f *readerFlags) open(ctx context.Context, log keyservice.Options) (*readerCloser, error) {
	if f.encryptionConfig == "" {
		for _, v := range append(f.plugins, f.keyURIs...) {
			if name, _ := splitNamed(v); name != "" {
				return nil, fmt.Errorf("%q names a provider: that needs --encryption-config", v)
			}
		}
		switch {
		case len(f.plugins)+len(f.keyURIs) != 1:
			return nil, errors.New("give one --plugin (the KMS v2 plugin with the cluster's keys), one --key-uri (its key service), or --encryption-config")
		case len(f.plugins) == 1:
			c, err := kmsclient.Dial(f.plugins[0], f.timeout)
			if err != nil {
				return nil, err
			}
			return &readerCloser{Opener: envelope.NewOpener(c), close: func() { c.Close() }, what: "plugin " + f.plugins[0]}, nil
		}
		p, err := f.localPlugin(ctx, f.keyURIs[0], log)
		if err != nil {
			return nil, err
		}
		return &readerCloser{Opener: envelope.NewOpener(p), close: func() { p.Close() }, what: "key service " + redactURI(f.keyURIs[0]) + " (in-process)"}, nil
	}

	var closers []func()
	closeAll := func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	endpoints := map[string]string{}
	var plain []string // values without a provider name
	for _, v := range f.plugins {
		if name, ep := splitNamed(v); name != "" {
			endpoints[name] = ep
		} else {
			plain = append(plain, "plugin:"+ep)
		}
	}
	for _, v := range f.keyURIs {
		name, uri := splitNamed(v)
		if name == "" {
			plain = append(plain, "key-uri:"+uri)
			continue
		}
		p, err := f.localPlugin(ctx, uri, log)
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("--key-uri %s: %w", name, err)
		}
		closers = append(closers, func() { p.Close() })
		ep, err := p.Serve()
		if err != nil {
			closeAll()
			return nil, err
		}
		endpoints[name] = ep
	}
	if len(plain) > 0 {
		// A value without a name is for the config's only KMS provider.
		names, err := encconfig.KMSProviderNames(f.encryptionConfig)
		if err != nil {
			closeAll()
			return nil, err
		}
		if len(plain) > 1 || len(names) != 1 {
			closeAll()
			return nil, fmt.Errorf("the encryption config has %d KMS provider(s) (%s): name the one each --plugin/--key-uri is for, as PROVIDER=VALUE",
				len(names), strings.Join(names, ", "))
		}
		kind, v, _ := strings.Cut(plain[0], ":")
		if kind == "plugin" {
			endpoints[names[0]] = v
		} else {
			p, err := f.localPlugin(ctx, v, log)
			if err != nil {
				closeAll()
				return nil, err
			}
			closers = append(closers, func() { p.Close() })
			if endpoints[names[0]], err = p.Serve(); err != nil {
				closeAll()
				return nil, err
			}
		}
	}
	r, err := encconfig.Load(ctx, f.encryptionConfig, encconfig.Options{Endpoints: endpoints})
	if err != nil {
		closeAll()
		return nil, err
	}
	closers = append(closers, r.Close)
	return &readerCloser{Opener: r, close: closeAll, what: "the apiserver's transformers from " + f.encryptionConfig}, nil
}

func (f *readerFlags) localPlugin(ctx context.Context, uri string, opts keyservice.Options) (*localplugin.Plugin, error) {
	// softkey creates a missing keyring: recovery must read an existing one.
	if path, err := softkey.ParseURI(uri); err == nil && !fileExists(path) {
		return nil, fmt.Errorf("--key-uri %s: no keyring at %s", uri, path)
	}
	opts.ClusterName, opts.KeyIDSuffix = f.clusterName, f.keyIDSuffix
	reg := newRegistry()
	codec, err := f.opaqueCodec()
	if err != nil {
		return nil, err
	}
	if codec != nil {
		reg = opaqueRegistry(reg, codec)
	}
	return localplugin.Open(ctx, reg, uri, opts)
}

// opaqueCodec reads --opaque-key-ids; nil without it.
func (f *readerFlags) opaqueCodec() (*opaqueid.Codec, error) {
	if f.opaqueSecret == "" {
		return nil, nil
	}
	return opaqueid.ReadSecretFile(f.opaqueSecret)
}

// opaqueRegistry opens every scheme of reg with opaque key IDs, as
// `serve --opaque-key-ids` does.
func opaqueRegistry(reg *keyservice.Registry, codec *opaqueid.Codec) *keyservice.Registry {
	out := keyservice.NewRegistry()
	for _, scheme := range reg.Schemes() {
		out.Register(scheme, func(ctx context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
			svc, err := reg.Open(ctx, uri, opts)
			if err != nil {
				return nil, err
			}
			return opaqueid.Wrap(svc, codec), nil
		})
	}
	return out
}
