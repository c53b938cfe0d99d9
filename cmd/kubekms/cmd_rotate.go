package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/migrate"
	"github.com/kubekms/kubekms/rotate"
	"github.com/kubekms/kubekms/snapshot"
)

func newRotateCmd() *cobra.Command {
	var (
		cf                 clusterFlags
		etcd               etcdFlags
		plugins            []string
		keyURI, stateFile  string
		output             string
		resources          []string
		shared, force      bool
		callTimeout        time.Duration
		rotationTimeout    time.Duration
		convergenceTimeout time.Duration
		retireAfter        time.Duration
		qps                float64
		concurrency        int
	)
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Guided key rotation for the whole control plane: rotate, wait for every apiserver, migrate, verify",
		Long: `Rotates the key kubekms wraps its local KEKs with and carries the cluster through it:

  preflight   every --plugin healthy (Status, Encrypt/Decrypt) and able to decrypt what every
              other encrypts; every kube-apiserver writes under the plugins' key_id (as in
              kubekms status --cluster); no object is still stale from an earlier rotation
              (refused unless --force)
  rotate      --key-uri softkey:///...: kubekms rotates that keyring (a new primary version);
              without --key-uri the key lives in a remote key service: rotate it there (e.g.
              re-point the AWS KMS alias) while this waits (--rotation-timeout)
  plugins     wait until every --plugin reports the new key_id (--convergence-timeout)
  converge    wait until every apiserver writes under it (each is nudged through /readyz)
  migrate     rewrite exactly the stale objects through the API (as kubekms migrate)
  verify      an inventory of etcd must find 0 stale objects in the migrated resources
  retire      with --retire-old-after D (softkey only): after D, disable the old version if
              no object in etcd is under it

Each step is recorded in --state-file: a rerun after an interruption (Ctrl-C, a crash, a
timeout) resumes where it stopped; a state file of a finished rotation starts a new one.
Measured times (seconds from the rotation until each plugin and apiserver used the new key_id)
are printed and kept in the state file. Progress bars on a terminal; -o json prints one JSON
object per step and a final one with the whole state.

A softkey keyring held by several nodes cannot be rotated from one: with more than one apiserver
--key-uri is refused unless --shared-keyring (every plugin reads that very file). Rotate it in
steps: kubekms softkey stage, export/import to every node, then run kubekms rotate without
--key-uri and, while it waits for the rotation, kubekms softkey promote on every node.

Exit code 0 when done, 2 when refused or not converged in time (rerun later), 1 on errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if output != "text" && output != "json" {
				return fmt.Errorf("-o %q: want text or json", output)
			}
			if qps < 0 {
				return fmt.Errorf("--qps %v: want >= 0", qps)
			}
			if len(etcd.endpoints) == 0 {
				return errors.New("--etcd-endpoints is required: the rotation finds and checks stale objects in etcd")
			}
			var keyring string
			if keyURI != "" {
				p, err := softkey.ParseURI(keyURI)
				if err != nil {
					return fmt.Errorf("--key-uri: kubekms rotates only a softkey keyring it owns; rotate a remote key in its key service and omit --key-uri: %w", err)
				}
				keyring = p
			}
			cfg, err := cf.kube.load("rotate")
			if err != nil {
				return err
			}
			obs, err := cf.observer(cfg)
			if err != nil {
				return err
			}
			mcfg := *cfg
			mcfg.QPS = -1 // migrate.Run limits the rate itself (--qps)
			clients, err := migrate.NewClients(&mcfg)
			if err != nil {
				return err
			}
			log, err := newLogger(cmd.ErrOrStderr(), "text", "warn")
			if err != nil {
				return err
			}
			ui := newRotateUI(cmd, output)
			defer ui.finish()
			rc := rotate.Config{
				StatePath: stateFile, Plugins: plugins, CallTimeout: callTimeout, Cluster: obs,
				OpenEtcd: func(ctx context.Context) (snapshot.Source, error) { return etcd.open(ctx) },
				Prefix:   etcd.prefix, Clients: clients, Resources: resources, Keyring: keyring,
				SharedKeyring: shared, Force: force, RotationTimeout: rotationTimeout,
				ConvergenceTimeout: convergenceTimeout, RetireAfter: retireAfter,
				Migrate: migrate.Options{QPS: qps, Concurrency: concurrency, Log: log, Progress: ui.migrateProgress()},
				Events:  ui.event, WaitProgress: ui.wait, Log: log,
			}
			st, err := rotate.Run(ctx, rc)
			ui.finish()
			ui.result(st, err)
			if errors.Is(err, rotate.ErrRefused) {
				return &exitError{code: 2, err: err}
			}
			return err
		},
	}
	fl := cmd.Flags()
	cf.add(cmd, true)
	addPluginFlag(cmd, &plugins, []string{defaultListen()}, "KMS v2 plugin endpoint(s) this machine reaches (repeat for each node's plugin you can reach)")
	fl.StringVar(&keyURI, "key-uri", "", "the softkey keyring kubekms rotates (softkey:///path); omit when the key lives in a remote key service")
	fl.BoolVar(&shared, "shared-keyring", false, "every plugin reads this very keyring file (allows --key-uri with several apiservers)")
	fl.StringVar(&stateFile, "state-file", filepath.Join(defaultStateDir(), "rotate-state.json"), "progress of the rotation, for resuming")
	fl.StringSliceVar(&etcd.endpoints, "etcd-endpoints", nil, "live etcd endpoints (https://host:2379,...)")
	fl.StringVar(&etcd.cacert, "cacert", "", "CA bundle to verify etcd's certificate")
	fl.StringVar(&etcd.cert, "cert", "", "client certificate for etcd")
	fl.StringVar(&etcd.key, "key", "", "client key for etcd")
	fl.StringVar(&etcd.prefix, "prefix", inventory.RegistryPrefix, "kube-apiserver's etcd prefix (--etcd-prefix, with a trailing /)")
	intVar(fl, &etcd.pageSize, "page-size", snapshot.DefaultPageSize, 1, 1<<20, "keys per range read on etcd")
	fl.StringSliceVar(&resources, "resources", nil, "resources to migrate and verify (default: every resource with encrypted objects in etcd)")
	fl.BoolVar(&force, "force", false, "rotate although objects are still stale from an earlier rotation")
	durationVar(fl, &callTimeout, "timeout", 3*time.Second, "per-call timeout for the plugins")
	durationVar(fl, &rotationTimeout, "rotation-timeout", time.Hour, "how long to wait for the operator's rotation of a remote key")
	durationVar(fl, &convergenceTimeout, "convergence-timeout", 5*time.Minute, "how long to wait for the plugins, then for the apiservers, to use the new key_id")
	optionalDurationVar(fl, &retireAfter, "retire-old-after", 0, "softkey: disable the old version this long after the verification (0: keep it)")
	fl.Float64Var(&qps, "qps", 50, "API requests per second while migrating (0: no limit)")
	intVar(fl, &concurrency, "concurrency", 4, 1, 1024, "objects rewritten at once")
	fl.StringVarP(&output, "output", "o", "text", "output: text or json")
	return cmd
}

// rotateUI prints the steps (text or JSON lines) and draws progress bars
// on a terminal.
type rotateUI struct {
	cmd     *cobra.Command
	json    bool
	term    bool
	bar     *progressbar.ProgressBar
	barWhat string
}

func newRotateUI(cmd *cobra.Command, output string) *rotateUI {
	return &rotateUI{cmd: cmd, json: output == "json", term: isTerminal(cmd.ErrOrStderr())}
}

func (u *rotateUI) event(e rotate.Event) {
	u.finish()
	if u.json {
		_ = json.NewEncoder(u.cmd.OutOrStdout()).Encode(e)
		return
	}
	fmt.Fprintf(u.cmd.OutOrStdout(), "%s  %-11s %s\n", e.At.Local().Format("15:04:05"), e.Phase, e.Message)
}

func (u *rotateUI) wait(what string, done, total int) {
	if !u.term {
		return
	}
	if u.bar == nil || u.barWhat != what {
		u.finish()
		u.bar = progressbar.NewOptions(max(total, 1), progressbar.OptionSetWriter(u.cmd.ErrOrStderr()),
			progressbar.OptionSetDescription(what), progressbar.OptionShowCount(), progressbar.OptionSetElapsedTime(true),
			progressbar.OptionClearOnFinish(), progressbar.OptionSpinnerType(14))
		u.barWhat = what
	}
	u.bar.ChangeMax(max(total, 1))
	_ = u.bar.Set(done)
}

func (u *rotateUI) migrateProgress() func(done, total int) {
	if !u.term {
		return nil
	}
	return func(done, total int) { u.wait("migrate", done, total) }
}

func (u *rotateUI) finish() {
	if u.bar != nil {
		_ = u.bar.Finish()
		u.bar, u.barWhat = nil, ""
	}
}

func (u *rotateUI) result(st *rotate.State, err error) {
	if !u.json {
		if err != nil && st != nil && st.Phase != rotate.PhaseDone {
			fmt.Fprintf(u.cmd.OutOrStdout(), "stopped after phase %q; rerun the same command to resume\n", dash(string(st.Phase)))
		}
		return
	}
	out := struct {
		Phase string        `json:"phase"`
		Error string        `json:"error,omitempty"`
		State *rotate.State `json:"state,omitempty"`
	}{Phase: "result", State: st}
	if err != nil {
		out.Error = strings.TrimPrefix(err.Error(), "refused: ")
	}
	_ = json.NewEncoder(u.cmd.OutOrStdout()).Encode(out)
}
