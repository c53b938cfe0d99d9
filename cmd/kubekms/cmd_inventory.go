package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"golang.org/x/term"

	"github.com/kubekms/kubekms/convergence"
	"github.com/kubekms/kubekms/encconfig"
	"github.com/kubekms/kubekms/envelope/kmsclient"
	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/snapshot"
)

// etcdFlags are the etcd source flags shared by the tools (named like etcdctl's).
type etcdFlags struct {
	snapshot  string
	endpoints []string
	cacert    string
	cert      string
	key       string
	prefix    string
	pageSize  int
}

func (f *etcdFlags) add(cmd *cobra.Command, live bool) {
	cmd.Flags().StringVar(&f.snapshot, "snapshot", "", "etcd snapshot file (etcdctl snapshot save, or a stopped member's member/snap/db)")
	if live {
		cmd.Flags().StringSliceVar(&f.endpoints, "etcd-endpoints", nil, "live etcd endpoints (https://host:2379,...)")
		cmd.Flags().StringVar(&f.cacert, "cacert", "", "CA bundle to verify etcd's certificate")
		cmd.Flags().StringVar(&f.cert, "cert", "", "client certificate for etcd")
		cmd.Flags().StringVar(&f.key, "key", "", "client key for etcd")
		intVar(cmd.Flags(), &f.pageSize, "page-size", snapshot.DefaultPageSize, 1, 1<<20, "keys per range read on a live etcd")
	}
	cmd.Flags().StringVar(&f.prefix, "prefix", inventory.RegistryPrefix, "kube-apiserver's etcd prefix (--etcd-prefix, with a trailing /)")
}

// open returns the source the flags name: exactly one of --snapshot and --etcd-endpoints.
func (f *etcdFlags) open(ctx context.Context) (snapshot.Source, error) {
	if (f.snapshot == "") == (len(f.endpoints) == 0) {
		return nil, errors.New("give exactly one of --snapshot and --etcd-endpoints")
	}
	if !strings.HasSuffix(f.prefix, "/") {
		return nil, fmt.Errorf("--prefix %q must end with /", f.prefix)
	}
	if f.snapshot != "" {
		return snapshot.OpenFile(ctx, f.snapshot, []byte(f.prefix))
	}
	tlsCfg, err := f.tlsConfig()
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   f.endpoints,
		DialTimeout: 10 * time.Second,
		TLS:         tlsCfg,
		Logger:      zap.NewNop(),
		Context:     ctx,
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	src, err := snapshot.OpenEtcd(ctx, cli, f.prefix, f.pageSize)
	if err != nil {
		cli.Close()
		return nil, err
	}
	return closingSource{Source: src, closer: cli}, nil
}

func (f *etcdFlags) tlsConfig() (*tls.Config, error) {
	if f.cacert == "" && f.cert == "" && f.key == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.cacert != "" {
		pem, err := os.ReadFile(f.cacert)
		if err != nil {
			return nil, fmt.Errorf("--cacert: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--cacert %s: no PEM certificate found", f.cacert)
		}
	}
	if (f.cert == "") != (f.key == "") {
		return nil, errors.New("--cert and --key go together")
	}
	if f.cert != "" {
		pair, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			return nil, fmt.Errorf("--cert/--key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

type closingSource struct {
	snapshot.Source
	closer io.Closer
}

func (s closingSource) Close() error { return errors.Join(s.Source.Close(), s.closer.Close()) }

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// newProgress returns a progress callback drawing a bar on stderr, or nil
// when stdout or stderr is not a terminal.
func newProgress(cmd *cobra.Command, what string) (func(done, total int), func()) {
	if !isTerminal(cmd.OutOrStdout()) || !isTerminal(cmd.ErrOrStderr()) {
		return nil, func() {}
	}
	var bar *progressbar.ProgressBar
	update := func(done, total int) {
		if bar == nil {
			bar = progressbar.NewOptions(total, progressbar.OptionSetWriter(cmd.ErrOrStderr()),
				progressbar.OptionSetDescription(what), progressbar.OptionShowCount(), progressbar.OptionShowIts(),
				progressbar.OptionSetItsString("keys"), progressbar.OptionThrottle(100*time.Millisecond),
				progressbar.OptionClearOnFinish())
		}
		_ = bar.Set(done)
	}
	return update, func() {
		if bar != nil {
			_ = bar.Finish()
		}
	}
}

// currentKeyID asks the plugin's Status for its key_id.
func currentKeyID(ctx context.Context, endpoint string, timeout time.Duration) (string, error) {
	c, err := kmsclient.Dial(endpoint, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	st, err := c.StatusAnswer(ctx)
	if err != nil {
		return "", err
	}
	// kubekms's key_id while it refuses to seal names no key (judging
	// staleness by it would call every object stale): named as such, apart
	// from other unhealthy answers.
	if _, err := convergence.CheckPluginKeyID(endpoint, st.KeyID); err != nil {
		return "", err
	}
	if err := kmsclient.CheckStatus(st); err != nil {
		return "", fmt.Errorf("KMS plugin %s: Status: %w", endpoint, err)
	}
	return st.KeyID, nil
}

func newInventoryCmd() *cobra.Command {
	var src etcdFlags
	var rf readerFlags
	var keyID, output string
	var failOnStale, failOnPlaintext bool
	cmd := &cobra.Command{
		Use:   "inventory",
		Short: "Count objects in etcd per resource, provider and key_id; find stale and unencrypted ones",
		Long: `Reads kube-apiserver's objects from an etcd snapshot (--snapshot, no etcd server needed) or a
live etcd (--etcd-endpoints) and reports per resource how many objects there are, under which
provider and KMS key_id, how many are stale (not under the current key_id, given by --plugin's
Status or --current-key-id) and how many are unencrypted although other objects of the same
resource are encrypted. Only envelope headers are read: nothing is decrypted.

With --encryption-config (kube-apiserver's EncryptionConfiguration file) every value is read
instead with the apiserver's own transformers, as the apiserver would read it: STALE is then the
apiserver's own stale judgement (another provider, key or key_id writes now), and UNREADABLE
counts what it could not read. Its KMS providers dial the endpoints in the file unless
--plugin NAME=ENDPOINT or --key-uri NAME=URI (served in this process) says otherwise.

Exit code 0, or 2 when --fail-on-stale / --fail-on-plaintext find something, 1 on errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if output != "table" && output != "json" {
				return fmt.Errorf("-o %q: want table or json", output)
			}
			opts := inventory.Options{Prefix: src.prefix}
			if rf.encryptionConfig != "" {
				if keyID != "" {
					return errors.New("--current-key-id and --encryption-config exclude each other: with the config, the apiserver's transformers judge staleness")
				}
				reader, err := rf.openFor(cmd)
				if err != nil {
					return err
				}
				defer reader.close()
				r := reader.Opener.(*encconfig.Reader)
				opts.ReadWith = reader.what
				opts.Read = func(ctx context.Context, key, value []byte) (bool, error) {
					_, stale, _, err := r.Read(ctx, value, key)
					return stale, err
				}
			} else {
				switch {
				case len(rf.keyURIs) > 0:
					return errors.New("--key-uri needs --encryption-config here (inventory reads headers only otherwise)")
				case len(rf.plugins) > 1:
					return errors.New("give one --plugin (several only with --encryption-config)")
				case len(rf.plugins) == 1 && keyID != "":
					return errors.New("give at most one of --plugin and --current-key-id")
				case len(rf.plugins) == 1:
					var err error
					if keyID, err = currentKeyID(ctx, rf.plugins[0], rf.timeout); err != nil {
						return fmt.Errorf("current key_id: %w", err)
					}
				}
				if failOnStale && keyID == "" {
					return errors.New("--fail-on-stale needs --plugin, --current-key-id or --encryption-config")
				}
				opts.CurrentKeyID = keyID
			}
			source, err := src.open(ctx)
			if err != nil {
				return err
			}
			defer source.Close()
			progress, finish := newProgress(cmd, "inventory")
			if progress != nil {
				total := source.Len()
				opts.Progress = func(done int) { progress(done, total) }
			}
			rep, err := inventory.Scan(ctx, source, opts)
			finish()
			if err != nil {
				return err
			}
			if codec, err := rf.opaqueCodec(); err != nil {
				return err
			} else if codec != nil {
				rep.NameKeyIDs(codec.Name)
			}
			if output == "json" {
				err = inventory.WriteJSON(cmd.OutOrStdout(), rep)
			} else {
				err = inventory.WriteTable(cmd.OutOrStdout(), rep)
			}
			if err != nil {
				return err
			}
			var problems []string
			if failOnStale && rep.Totals.Stale > 0 {
				problems = append(problems, fmt.Sprintf("%d stale object(s)", rep.Totals.Stale))
			}
			if failOnPlaintext && rep.Totals.Unencrypted > 0 {
				problems = append(problems, fmt.Sprintf("%d unencrypted object(s) in encrypted resources", rep.Totals.Unencrypted))
			}
			if len(problems) > 0 {
				return &exitError{code: 2, err: errors.New(strings.Join(problems, ", "))}
			}
			return nil
		},
	}
	src.add(cmd, true)
	rf.add(cmd, "KMS v2 plugin endpoint (unix:///path.sock) whose Status gives the current key_id; with --encryption-config: [PROVIDER=]ENDPOINT for a KMS provider")
	cmd.Flags().StringVar(&keyID, "current-key-id", "", "the current key_id, instead of asking --plugin")
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	cmd.Flags().BoolVar(&failOnStale, "fail-on-stale", false, "exit 2 if any object is not under the current key_id")
	cmd.Flags().BoolVar(&failOnPlaintext, "fail-on-plaintext", false, "exit 2 if any object is unencrypted in a resource that is otherwise encrypted")
	return cmd
}
