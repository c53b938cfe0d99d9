package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"

	"github.com/kubekms/kubekms/convergence"
	"github.com/kubekms/kubekms/envelope/kmsclient"
	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/migrate"
	"github.com/kubekms/kubekms/snapshot"
)

type migrateFlags struct {
	cluster               clusterFlags
	convergenceTimeout    time.Duration
	skipConvergence       bool
	resources             []string
	etcd                  etcdFlags
	plugins               []string
	keyID, rotatedFrom    string
	timeout               time.Duration
	all, includePlaintext bool
	qps                   float64
	concurrency, limit    int
	stateFile             string
	dryRun                bool
}

func newMigrateCmd() *cobra.Command {
	var f migrateFlags
	cmd := &cobra.Command{
		Use:   "migrate",
		Short: "Rewrite the objects stored under an old key through the API, so they are stored under the current key_id",
		Long: `After a key rotation, objects in etcd stay under the old key_id until they are written again.
migrate finds them and rewrites each through the Kubernetes API with a no-op update (GET, then
UPDATE with the same resourceVersion; conflicts are retried), which kube-apiserver stores again
under its current key. Then it reads etcd again and reports what is still stale.

Finding the objects:
  --etcd-endpoints  read the envelope headers in etcd (nothing is decrypted) and rewrite exactly
                    the stale objects; needs the current key_id (--plugin or --current-key-id).
  --all             list every object of the resources through the API and rewrite them all
                    (when etcd is not reachable; the apiserver skips the write of objects that
                    are already current). With --etcd-endpoints as well, etcd is checked after.

Before rewriting anything, migrate waits (up to --convergence-timeout) until every kube-apiserver
writes under the current key_id, the plugin's (asked again at every round, so a plugin that lags
behind a rotation can catch up), --current-key-id, or with neither any key_id they agree on. An
apiserver still on the old key would read the old objects as current and skip their rewrite.
Which key_id each apiserver writes under comes from its /metrics and /readyz, the apiservers'
number from their identity Leases (see kubekms status --cluster; --apiservers, --provider). When
they do not converge in time, migrate refuses and names the laggards. --skip-convergence-check
migrates without looking (for clusters whose apiserver metrics cannot be read: then wait for the
rotation to reach every apiserver yourself).

Right after a remote key's rotation the plugins may not have seen it yet (each sees it at its
next probe of the key service): then every plugin and apiserver still agrees on the old key_id,
nothing is stale yet, and migrate would end at once. Give --rotated-from OLD_KEY_ID (what kubekms
status printed before) to wait until the plugins report another key_id, or use kubekms rotate,
which waits for the rotation itself.

--state-file makes a run resumable: every rewritten object is recorded, and a rerun with the
same file skips them. --limit migrates in batches. --qps and --concurrency bound the load.

Exit code 0 when nothing stale remains, 2 when stale objects remain (e.g. after --limit) or the
apiservers did not converge, 1 on errors or objects that failed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runMigrate(cmd, &f) },
	}
	fl := cmd.Flags()
	f.cluster.add(cmd, true)
	durationVar(fl, &f.convergenceTimeout, "convergence-timeout", 5*time.Minute, "how long to wait for every apiserver to write under the key_id before refusing")
	fl.BoolVar(&f.skipConvergence, "skip-convergence-check", false, "do not check that every apiserver writes under the key_id (when their metrics cannot be read)")
	fl.StringSliceVar(&f.resources, "resources", []string{"secrets"}, "resources to migrate, as resource[.group] (secrets,configmaps,widgets.example.com)")
	fl.StringSliceVar(&f.etcd.endpoints, "etcd-endpoints", nil, "live etcd endpoints (https://host:2379,...) to find stale objects and check the result")
	fl.StringVar(&f.etcd.cacert, "cacert", "", "CA bundle to verify etcd's certificate")
	fl.StringVar(&f.etcd.cert, "cert", "", "client certificate for etcd")
	fl.StringVar(&f.etcd.key, "key", "", "client key for etcd")
	fl.StringVar(&f.etcd.prefix, "prefix", inventory.RegistryPrefix, "kube-apiserver's etcd prefix (--etcd-prefix, with a trailing /)")
	intVar(fl, &f.etcd.pageSize, "page-size", snapshot.DefaultPageSize, 1, 1<<20, "keys per range read on etcd")
	addPluginFlag(cmd, &f.plugins, nil, "KMS v2 plugin endpoint(s) (unix:///path.sock) whose Status gives the current key_id; several must agree")
	fl.StringVar(&f.keyID, "current-key-id", "", "the current key_id, instead of asking --plugin")
	fl.StringVar(&f.rotatedFrom, "rotated-from", "", "the key_id just rotated away from: wait until the --plugin endpoints report another one (right after a rotation they may not have seen it yet)")
	durationVar(fl, &f.timeout, "timeout", kmsclient.DefaultTimeout, "per-call timeout for the plugin")
	fl.BoolVar(&f.all, "all", false, "list and rewrite every object through the API instead of finding stale ones in etcd")
	fl.BoolVar(&f.includePlaintext, "include-plaintext", false, "also rewrite unencrypted objects (after encryption was enabled for a resource)")
	fl.Float64Var(&f.qps, "qps", 50, "API requests per second, GETs and UPDATEs together (0: no limit)")
	fl.IntVar(&f.concurrency, "concurrency", 4, "objects rewritten at once")
	fl.IntVar(&f.limit, "limit", 0, "rewrite at most this many objects in this run (0: all)")
	fl.StringVar(&f.stateFile, "state-file", "", "record rewritten objects here; a rerun with the same file skips them")
	fl.BoolVar(&f.dryRun, "dry-run", false, "list the objects that would be rewritten, change nothing")
	return cmd
}

func runMigrate(cmd *cobra.Command, f *migrateFlags) error {
	ctx := cmd.Context()
	out := cmd.OutOrStdout()
	useEtcd := len(f.etcd.endpoints) > 0
	switch {
	case !useEtcd && !f.all:
		return errors.New("give --etcd-endpoints (to find the stale objects in etcd) or --all (to rewrite every object through the API)")
	case len(f.plugins) > 0 && f.keyID != "":
		return errors.New("give at most one of --plugin and --current-key-id")
	case f.rotatedFrom != "" && len(f.plugins) == 0:
		return errors.New("--rotated-from needs --plugin (the plugins tell when they see the new key)")
	case f.qps < 0:
		return fmt.Errorf("--qps %v: want >= 0", f.qps)
	case f.concurrency < 1:
		return fmt.Errorf("--concurrency %d: want >= 1", f.concurrency)
	case f.limit < 0:
		return fmt.Errorf("--limit %d: want >= 0", f.limit)
	case f.includePlaintext && !useEtcd:
		return errors.New("--include-plaintext needs --etcd-endpoints (with --all every object is rewritten anyway)")
	case f.convergenceTimeout <= 0:
		return fmt.Errorf("--convergence-timeout %v: want > 0", f.convergenceTimeout)
	}
	grs, err := migrate.ParseResources(f.resources)
	if err != nil {
		return fmt.Errorf("--resources: %w", err)
	}
	if useEtcd && len(f.plugins) == 0 && f.keyID == "" {
		return errors.New("--etcd-endpoints needs the current key_id: give --plugin or --current-key-id")
	}
	keyID := f.keyID
	if len(f.plugins) > 0 {
		// Plugins that disagree (a rotation reaching them one after another)
		// are waited for below, with the apiservers.
		keyID, err = pluginsKeyID(ctx, f.plugins, f.timeout, f.rotatedFrom)
		if err != nil && (f.skipConvergence || !errors.Is(err, convergence.ErrUnsettled)) {
			return fmt.Errorf("current key_id: %w", err)
		}
	}

	cfg, err := f.cluster.kube.load("migrate")
	if err != nil {
		return err
	}
	if f.skipConvergence {
		fmt.Fprintln(out, "Convergence not checked (--skip-convergence-check): the apiservers may still write under an older key_id.")
	} else {
		if keyID, err = waitConvergence(cmd, &f.cluster, cfg, f.plugins, f.rotatedFrom, keyID, f.timeout, f.convergenceTimeout); err != nil {
			return err
		}
	}
	cfg.QPS = -1 // migrate.Run limits the rate itself (--qps)
	clients, err := migrate.NewClients(cfg)
	if err != nil {
		return err
	}
	resources, err := migrate.Resolve(clients.Mapper, grs)
	if err != nil {
		return err
	}
	etcdOpts := migrate.EtcdOptions{Prefix: f.etcd.prefix, CurrentKeyID: keyID, IncludePlaintext: f.includePlaintext}

	var plan *migrate.Plan
	if f.all {
		plan, err = migrate.PlanFromAPI(ctx, clients.Metadata, resources, 500)
	} else {
		plan, err = planFromEtcd(ctx, &f.etcd, resources, etcdOpts)
	}
	if err != nil {
		return err
	}
	printPlan(out, plan, keyID)
	if plan.FromEtcd && len(plan.Targets) == 0 && f.rotatedFrom == "" && !f.includePlaintext {
		fmt.Fprintf(out, "Note: nothing is stale under %s. If you have just rotated the key, the plugins may not report the new one yet: "+
			"rerun with --rotated-from %s (or use kubekms rotate).\n", keyID, keyID)
	}
	if f.dryRun {
		for _, t := range plan.Targets {
			fmt.Fprintln(out, "would rewrite", t.Key())
		}
		return nil
	}

	var state *migrate.State
	if f.stateFile != "" {
		if state, err = migrate.OpenState(f.stateFile, keyID); err != nil {
			return err
		}
		defer state.Close()
	}
	log, err := newLogger(cmd.ErrOrStderr(), "text", "info")
	if err != nil {
		return err
	}
	progress, finish := newProgress(cmd, "migrate")
	start := time.Now()
	res, runErr := migrate.Run(ctx, clients.Dynamic, plan, migrate.Options{
		QPS: f.qps, Concurrency: f.concurrency, Limit: f.limit, State: state, Progress: progress, Log: log,
	})
	finish()
	elapsed := time.Since(start)
	fmt.Fprintf(out, "Rewritten %d, unchanged %d, resumed from state file %d, deleted meanwhile %d, conflicts retried %d, failed %d, not attempted %d (%s)\n",
		res.Rewritten, res.Unchanged, res.Resumed, res.Deleted, res.ConflictsRetried, res.Failed, res.NotAttempted, elapsed.Round(time.Millisecond))
	if plan.FromEtcd && res.Unchanged > 0 {
		fmt.Fprintf(out, "Warning: kube-apiserver left %d stale object(s) unchanged: it did not use key_id %q "+
			"(the key_id changed during the migration, or the convergence check was skipped); run again later.\n", res.Unchanged, keyID)
	}
	if runErr != nil {
		return fmt.Errorf("migration stopped: %w", runErr)
	}

	var problems []string
	if res.Failed > 0 {
		problems = append(problems, fmt.Sprintf("%d object(s) failed, first: %v", res.Failed, res.Errors[0]))
	}
	if !useEtcd || keyID == "" {
		fmt.Fprintln(out, "Not checked: give --etcd-endpoints and --plugin (or --current-key-id) to check etcd afterwards.")
	} else {
		remaining, err := checkEtcd(ctx, out, &f.etcd, resources, etcdOpts)
		if err != nil {
			return err
		}
		if remaining > 0 && res.Failed == 0 {
			return &exitError{code: 2, err: fmt.Errorf("%d stale object(s) remain", remaining)}
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// waitConvergence waits until every apiserver writes under the key_id the
// plugins report (asked every round; not rotatedFrom), or keyID, or any
// agreed key_id; it returns the key_id converged on.
func waitConvergence(cmd *cobra.Command, cf *clusterFlags, cfg *rest.Config, plugins []string, rotatedFrom, keyID string, callTimeout, bound time.Duration) (string, error) {
	ctx, out := cmd.Context(), cmd.OutOrStdout()
	o, err := cf.observer(cfg)
	if err != nil {
		return "", err
	}
	target := convergence.Fixed(keyID)
	if len(plugins) > 0 {
		target = func(ctx context.Context) (string, error) { return pluginsKeyID(ctx, plugins, callTimeout, rotatedFrom) }
	}
	progress, finish := waitProgress(cmd, "apiservers writing under the key_id")
	conv, err := o.Wait(ctx, target, convergence.WaitOptions{Timeout: bound, Progress: progress})
	finish()
	if err != nil {
		return "", notConverged(fmt.Errorf("refusing to migrate: %w", err),
			"Run again once they converge (kubekms status --cluster shows them), or give --skip-convergence-check if their metrics cannot be read.")
	}
	fmt.Fprintf(out, "Convergence: all %d apiserver(s) write under %s (checked in %s)\n",
		len(conv.Report.Apiservers), keyName(conv.KeyIDHash, conv.KeyID), conv.Waited.Round(100*time.Millisecond))
	if conv.KeyID != "" {
		return conv.KeyID, nil
	}
	return keyID, nil
}

// pluginsKeyID is the key_id the plugins agree on; when they disagree (a
// rotation reaches them one after another), agree on rotatedFrom (the
// rotation has not reached them yet) or one stopped writing, the error
// wraps convergence.ErrUnsettled.
func pluginsKeyID(ctx context.Context, plugins []string, timeout time.Duration, rotatedFrom string) (string, error) {
	var first string
	for i, ep := range plugins {
		id, err := currentKeyID(ctx, ep, timeout)
		if errors.Is(err, convergence.ErrWritesStopped) {
			// It may recover (an outage): wait for it, and say why.
			return "", fmt.Errorf("%w: %w", convergence.ErrUnsettled, err)
		}
		if err != nil {
			return "", fmt.Errorf("plugin %s: %w", ep, err)
		}
		if i == 0 {
			first = id
		} else if id != first {
			return "", fmt.Errorf("%w: plugin %s reports %s, plugin %s reports %s", convergence.ErrUnsettled, plugins[0], first, ep, id)
		}
	}
	if rotatedFrom != "" && first == rotatedFrom {
		return "", fmt.Errorf("%w: the plugins still report %s, the key_id rotated from (--rotated-from): each sees the new key at its next probe of the key service",
			convergence.ErrUnsettled, first)
	}
	return first, nil
}

func planFromEtcd(ctx context.Context, src *etcdFlags, resources []migrate.Resource, opts migrate.EtcdOptions) (*migrate.Plan, error) {
	source, err := src.open(ctx)
	if err != nil {
		return nil, err
	}
	defer source.Close()
	return migrate.PlanFromEtcd(ctx, source, resources, opts)
}

func printPlan(w io.Writer, plan *migrate.Plan, keyID string) {
	per := plan.PerResource()
	var parts []string
	for _, n := range slices.Sorted(maps.Keys(per)) {
		parts = append(parts, fmt.Sprintf("%s=%d", n, per[n]))
	}
	if len(parts) == 0 {
		parts = []string{"none"}
	}
	if plan.FromEtcd {
		fmt.Fprintf(w, "Planned %d stale object(s) from etcd (current key_id %q): %s; %d already current\n",
			len(plan.Targets), keyID, strings.Join(parts, " "), plan.Current)
	} else {
		fmt.Fprintf(w, "Planned all %d object(s) listed through the API: %s\n", len(plan.Targets), strings.Join(parts, " "))
	}
	if n := len(plan.Unreadable); n > 0 {
		fmt.Fprintf(w, "Warning: %d value(s) in etcd could not be read and are not planned, first: %s\n", n, plan.Unreadable[0])
	}
}

// checkEtcd reads etcd again (at its newest revision) and prints what is
// still stale; it returns the count.
func checkEtcd(ctx context.Context, w io.Writer, src *etcdFlags, resources []migrate.Resource, opts migrate.EtcdOptions) (int, error) {
	source, err := src.open(ctx)
	if err != nil {
		return 0, fmt.Errorf("check etcd: %w", err)
	}
	defer source.Close()
	per, keys, err := migrate.Remaining(ctx, source, resources, opts)
	if err != nil {
		return 0, fmt.Errorf("check etcd: %w", err)
	}
	var parts []string
	for _, n := range slices.Sorted(maps.Keys(per)) {
		parts = append(parts, fmt.Sprintf("%s=%d", n, per[n]))
	}
	fmt.Fprintf(w, "Check of etcd: %d stale object(s) remain: %s\n", len(keys), strings.Join(parts, " "))
	for i, k := range keys {
		if i == 10 {
			fmt.Fprintf(w, "  ... and %d more\n", len(keys)-10)
			break
		}
		fmt.Fprintln(w, "  "+k)
	}
	return len(keys), nil
}
