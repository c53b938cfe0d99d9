// Package rotate is a guided rotation of the key kubekms wraps its local
// KEKs with, for a whole control plane: preflight (every plugin healthy and
// able to read every other's data, every apiserver writing under the same
// key_id, nothing stale from an earlier rotation), the rotation itself
// (of a softkey keyring kubekms owns, or waiting for the operator to rotate
// a remote key), waiting until every plugin and then every apiserver uses
// the new key_id, the storage migration of exactly the stale objects, an
// inventory of etcd that must find none left, and optionally disabling the
// old softkey version after a grace. Every step is recorded in a state
// file, so an interrupted run resumes where it stopped.
package rotate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/kubekms/kubekms/convergence"
	"github.com/kubekms/kubekms/envelope/kmsclient"
	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/migrate"
	"github.com/kubekms/kubekms/plugincheck"
	"github.com/kubekms/kubekms/snapshot"
)

// Config is what a rotation works with.
type Config struct {
	// StatePath is the state file (required); the migration's own state
	// file is StatePath + ".migrate".
	StatePath string
	// Plugins are the KMS plugin endpoints this machine reaches (at least
	// one): they must be healthy, agree, and read each other's data.
	Plugins     []string
	CallTimeout time.Duration
	// Cluster reads every apiserver (required).
	Cluster *convergence.Observer
	// OpenEtcd opens etcd for the inventories and the migration plan.
	OpenEtcd func(ctx context.Context) (snapshot.Source, error)
	Prefix   string
	// Clients rewrite objects through the API.
	Clients *migrate.Clients
	// Resources to migrate and verify ("secrets", "widgets.example.com");
	// empty: every resource of which the preflight inventory finds an
	// encrypted object.
	Resources []string
	// Keyring is the softkey keyring file kubekms rotates; empty when the
	// key lives in a remote key service: then the operator rotates it and
	// Run waits until the plugins see it (RotationTimeout).
	Keyring string
	// SharedKeyring says every plugin reads Keyring itself (one file on
	// shared storage, or all plugins on this machine). Without it a softkey
	// rotation is refused when the cluster has more than one apiserver.
	SharedKeyring bool
	// Force starts a rotation although objects are still stale from an
	// earlier one.
	Force bool
	// RotationTimeout bounds the wait for the operator's rotation (default
	// 1 h); ConvergenceTimeout each wait for plugins and apiservers (5 min).
	RotationTimeout    time.Duration
	ConvergenceTimeout time.Duration
	// RetireAfter > 0 disables the old softkey version this long after the
	// verification, once no object in etcd is under it.
	RetireAfter time.Duration
	// Migrate tunes the rewrite (QPS, Concurrency, Progress, Log); its
	// State and Limit are set by Run.
	Migrate migrate.Options
	// Events gets a line of progress per step (may be nil).
	Events func(Event)
	// WaitProgress, when set, is called during waits with a description
	// and how many of how many are done.
	WaitProgress func(what string, done, total int)
	Log          *slog.Logger
	Now          func() time.Time
}

// Event reports one step.
type Event struct {
	Phase   Phase     `json:"phase"`
	At      time.Time `json:"at"`
	Message string    `json:"message"`
}

// ErrRefused marks the errors of a rotation that did not start or go on
// because the cluster is not in a state to: a preflight check failed, or
// the plugins or apiservers did not converge in time. Rerunning later
// (with the same state file) goes on.
var ErrRefused = errors.New("refused")

func refuse(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrRefused, fmt.Sprintf(format, args...))
}

type run struct {
	cfg Config
	st  *State
	log *slog.Logger
}

// Run rotates, or resumes the rotation recorded in cfg.StatePath. A state
// file of a finished rotation starts a new one.
func Run(ctx context.Context, cfg Config) (*State, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	st, err := LoadState(cfg.StatePath)
	if err != nil {
		return nil, err
	}
	if st.Done() {
		st = &State{Version: stateVersion}
	}
	r := &run{cfg: cfg, st: st, log: cfg.Log}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if st.Phase != PhaseStart {
		r.event(st.Phase, "resuming the rotation from %s (started %s) after phase %q", st.FromKeyID, st.Started.Format(time.RFC3339), st.Phase)
	}
	steps := []struct {
		done Phase
		fn   func(context.Context) error
	}{
		{PhasePreflight, r.preflight},
		{PhaseRotated, r.rotate},
		{PhasePlugins, r.waitPlugins},
		{PhaseConverged, r.waitApiservers},
		{PhaseMigrated, r.migrate},
		{PhaseVerified, r.verify},
		{PhaseOldRetired, r.retire},
	}
	for _, s := range steps {
		if st.reached(s.done) {
			continue
		}
		if err := s.fn(ctx); err != nil {
			return st, err
		}
		if err := r.advance(s.done); err != nil {
			return st, err
		}
	}
	st.Finished = r.now()
	if err := r.advance(PhaseDone); err != nil {
		return st, err
	}
	r.event(PhaseDone, "rotation from %s to %s done in %s", st.FromKeyID, st.ToKeyID, st.Finished.Sub(st.Started).Round(time.Second))
	return st, nil
}

func (c *Config) check() error {
	switch {
	case c.StatePath == "":
		return errors.New("rotate: a state file is required")
	case len(c.Plugins) == 0:
		return errors.New("rotate: give at least one plugin endpoint (the plugin on this node)")
	case c.Cluster == nil || c.OpenEtcd == nil || c.Clients == nil:
		return errors.New("rotate: the cluster, etcd and API clients are required")
	case c.RetireAfter > 0 && c.Keyring == "":
		return errors.New("rotate: disabling the old version needs a softkey keyring kubekms owns; disable a remote key's old version in its key service")
	}
	if c.RotationTimeout <= 0 {
		c.RotationTimeout = time.Hour
	}
	if c.ConvergenceTimeout <= 0 {
		c.ConvergenceTimeout = 5 * time.Minute
	}
	if c.CallTimeout <= 0 {
		c.CallTimeout = kmsclient.DefaultTimeout
	}
	return nil
}

func (r *run) now() time.Time {
	if r.cfg.Now != nil {
		return r.cfg.Now().UTC()
	}
	return time.Now().UTC()
}

func (r *run) event(p Phase, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.log.Info(msg, "phase", p)
	if r.cfg.Events != nil {
		r.cfg.Events(Event{Phase: p, At: r.now(), Message: msg})
	}
}

func (r *run) advance(p Phase) error {
	r.st.Phase = p
	return r.st.save(r.cfg.StatePath)
}

func (r *run) progress(what string, done, total int) {
	if r.cfg.WaitProgress != nil {
		r.cfg.WaitProgress(what, done, total)
	}
}

// pluginKeyIDs asks every plugin's Status for its key_id.
func (r *run) pluginKeyIDs(ctx context.Context) (map[string]string, error) {
	out := map[string]string{}
	for _, ep := range r.cfg.Plugins {
		c, err := kmsclient.Dial(ep, r.cfg.CallTimeout)
		if err != nil {
			return nil, err
		}
		st, err := c.StatusAnswer(ctx) // an unhealthy answer's key_id counts, as for the apiserver
		c.Close()
		if err != nil {
			return nil, fmt.Errorf("plugin %s: Status: %w", ep, err)
		}
		out[ep] = st.KeyID
	}
	return out, nil
}

func (r *run) preflight(ctx context.Context) error {
	st := r.st
	var keyID string
	for _, ep := range r.cfg.Plugins {
		rep, err := plugincheck.Check(ctx, ep, r.cfg.CallTimeout, true)
		if err != nil {
			return fmt.Errorf("preflight: plugin %s: %w", ep, err)
		}
		if len(rep.Problems) > 0 {
			return refuse("preflight: plugin %s is not healthy: %s", ep, strings.Join(rep.Problems, "; "))
		}
		if keyID != "" && rep.KeyID != keyID {
			return refuse("preflight: the plugins disagree (%s reports %s, %s reports %s): a rotation is under way; wait for it (kubekms status --cluster)",
				r.cfg.Plugins[0], keyID, ep, rep.KeyID)
		}
		keyID = rep.KeyID
	}
	if len(r.cfg.Plugins) > 1 {
		problems, err := plugincheck.Cross(ctx, r.cfg.Plugins, r.cfg.CallTimeout)
		if err != nil {
			return fmt.Errorf("preflight: %w", err)
		}
		if len(problems) > 0 {
			return refuse("preflight: the plugins cannot read each other's data:\n  %s", strings.Join(problems, "\n  "))
		}
	}
	r.cfg.Cluster.KeyIDs = map[string]string{convergence.HashKeyID(keyID): keyID}
	rep, err := r.cfg.Cluster.Observe(ctx)
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	if !rep.Converged(convergence.HashKeyID(keyID)) {
		return refuse("preflight: not every apiserver writes under %s, the plugins' key_id:\n  %s",
			keyID, strings.Join(rep.Laggards(convergence.HashKeyID(keyID)), "\n  "))
	}
	if r.cfg.Keyring != "" {
		live := 0
		for _, l := range rep.Leases {
			if !l.Expired(rep.At) {
				live++
			}
		}
		if live > 1 && !r.cfg.SharedKeyring {
			return refuse("preflight: the cluster has %d apiservers, and a softkey keyring rotated on this node alone "+
				"leaves the others unable to read what this node's plugin writes. Rotate a keyring held on several nodes in steps: "+
				"kubekms softkey stage, export/import to every node (compare the fingerprints), then start kubekms rotate without "+
				"--key-uri and, while it waits for the rotation, kubekms softkey promote on every node; it then converges, migrates "+
				"and verifies. Give --shared-keyring only if every plugin reads this very file", live)
		}
		ring, err := softkey.Load(r.cfg.Keyring)
		if err != nil {
			return fmt.Errorf("preflight: %w", err)
		}
		if ring.KeyID(ring.Primary) != keyID {
			return refuse("preflight: the plugins report %s but the keyring %s's primary is %s: they do not use this keyring",
				keyID, r.cfg.Keyring, ring.KeyID(ring.Primary))
		}
		st.Keyring, st.FromVersion = r.cfg.Keyring, ring.Primary
	}
	inv, err := r.inventory(ctx, keyID)
	if err != nil {
		return fmt.Errorf("preflight: %w", err)
	}
	resources := r.cfg.Resources
	if len(resources) == 0 {
		for _, s := range inv.Resources {
			if s.Encrypted > 0 {
				resources = append(resources, s.Resource)
			}
		}
	}
	if len(resources) == 0 {
		return errors.New("preflight: etcd holds no encrypted object: nothing to rotate for")
	}
	stale := staleIn(inv, resources)
	if stale > 0 && !r.cfg.Force {
		return refuse("preflight: %d object(s) are still stale (not under the current key_id %s): an earlier rotation was not migrated. "+
			"Migrate first (kubekms migrate), or give --force to rotate anyway", stale, keyID)
	}
	st.Started, st.FromKeyID, st.Resources, st.Stale = r.now(), keyID, resources, stale
	r.event(PhasePreflight, "preflight ok: %d plugin(s) healthy%s, all %d apiserver(s) write under %s, %d stale object(s) in %s",
		len(r.cfg.Plugins), crossNote(len(r.cfg.Plugins)), len(rep.Apiservers), keyID, stale, strings.Join(resources, ","))
	return nil
}

func crossNote(n int) string {
	if n > 1 {
		return " and reading each other's data"
	}
	return ""
}

// staleIn sums the stale counts of the named resources.
func staleIn(rep *inventory.Report, resources []string) int {
	n := 0
	for _, s := range rep.Resources {
		if slices.Contains(resources, s.Resource) {
			n += s.Stale
		}
	}
	return n
}

func (r *run) inventory(ctx context.Context, keyID string) (*inventory.Report, error) {
	src, err := r.cfg.OpenEtcd(ctx)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	return inventory.Scan(ctx, src, inventory.Options{Prefix: r.cfg.Prefix, CurrentKeyID: keyID})
}

func (r *run) rotate(ctx context.Context) error {
	st := r.st
	if st.Keyring != "" {
		ring, err := softkey.Load(st.Keyring)
		if err != nil {
			return err
		}
		if ring.Primary == st.FromVersion { // not rotated yet (a resumed run may find it done)
			if ring, err = softkey.Rotate(st.Keyring); err != nil {
				return err
			}
		}
		st.ToVersion, st.ToKeyID, st.Rotated = ring.Primary, ring.KeyID(ring.Primary), r.now()
		r.event(PhaseRotated, "rotated keyring %s: primary v%d -> v%d (%s)", st.Keyring, st.FromVersion, st.ToVersion, st.ToKeyID)
		return nil
	}
	r.event(PhaseRotated, "waiting up to %s for the key service's rotation: rotate the remote key now (e.g. re-point the alias); the plugins report %s until they see it",
		r.cfg.RotationTimeout, st.FromKeyID)
	deadline := r.now().Add(r.cfg.RotationTimeout)
	stopped := map[string]bool{} // plugins seen reporting writes stopped, said once each
	for {
		ids, err := r.pluginKeyIDs(ctx)
		if err != nil {
			r.log.Warn("waiting for the rotation", "error", err)
		}
		for _, ep := range slices.Sorted(maps.Keys(ids)) {
			switch id := ids[ep]; {
			case id == convergence.StoppedKeyID: // names no key: not the rotation
				if !stopped[ep] {
					stopped[ep] = true
					r.event(PhaseRotated, "plugin %s reports %s (writes stopped: its key is revoked or its key service unreachable "+
						"past the outage grace); that is no new key: still waiting", ep, convergence.StoppedKeyID)
				}
			case id != st.FromKeyID:
				st.ToKeyID, st.Rotated = id, r.now()
				r.event(PhaseRotated, "plugin %s sees the new key_id %s", ep, id)
				return nil
			}
		}
		r.progress("waiting for the key service's rotation", 0, 1)
		if r.now().After(deadline) {
			return refuse("no plugin saw a new key_id within %s: the key was not rotated (rerun to keep waiting)", r.cfg.RotationTimeout)
		}
		if err := sleep(ctx, time.Second); err != nil {
			return err
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func (r *run) waitPlugins(ctx context.Context) error {
	st := r.st
	if st.PluginSeconds == nil {
		st.PluginSeconds = map[string]float64{}
	}
	deadline := r.now().Add(r.cfg.ConvergenceTimeout)
	for {
		ids, err := r.pluginKeyIDs(ctx)
		if err != nil {
			r.log.Warn("waiting for the plugins", "error", err)
		}
		var lag []string
		for _, ep := range r.cfg.Plugins {
			id, ok := ids[ep]
			switch {
			case ok && id == st.ToKeyID:
				if _, seen := st.PluginSeconds[ep]; !seen {
					st.PluginSeconds[ep] = r.now().Sub(st.Rotated).Seconds()
				}
			case ok && id == convergence.StoppedKeyID:
				lag = append(lag, ep+" (writes stopped: "+convergence.StoppedKeyID+")")
			case ok && id != st.FromKeyID:
				return fmt.Errorf("plugin %s reports %s, neither the old %s nor the new %s: another rotation happened meanwhile", ep, id, st.FromKeyID, st.ToKeyID)
			default:
				lag = append(lag, ep)
			}
		}
		r.progress("plugins on the new key_id", len(r.cfg.Plugins)-len(lag), len(r.cfg.Plugins))
		if len(lag) == 0 {
			r.event(PhasePlugins, "every plugin reports %s; seconds after the rotation: %s", st.ToKeyID, formatTimes(st.PluginSeconds))
			return nil
		}
		if r.now().After(deadline) {
			return refuse("after %s these plugins still do not report %s: %s (rerun to keep waiting)", r.cfg.ConvergenceTimeout, st.ToKeyID, strings.Join(lag, ", "))
		}
		if err := sleep(ctx, 500*time.Millisecond); err != nil {
			return err
		}
	}
}

func formatTimes(m map[string]float64) string {
	parts := make([]string, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %.1f", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

func (r *run) waitApiservers(ctx context.Context) error {
	st := r.st
	r.cfg.Cluster.KeyIDs = map[string]string{convergence.HashKeyID(st.FromKeyID): st.FromKeyID, convergence.HashKeyID(st.ToKeyID): st.ToKeyID}
	start := r.now()
	conv, err := r.cfg.Cluster.Wait(ctx, convergence.Fixed(st.ToKeyID), convergence.WaitOptions{
		Timeout: r.cfg.ConvergenceTimeout,
		Progress: func(rep *convergence.Report, target string) {
			n := 0
			for _, a := range rep.Apiservers {
				if a.KeyIDHash == target {
					n++
				}
			}
			r.progress("apiservers writing under the new key_id", n, len(rep.Apiservers))
		},
	})
	if err != nil {
		return refuse("the apiservers did not converge (rerun to keep waiting): %v", err)
	}
	st.ApiserverSeconds = map[string]float64{}
	offset := start.Sub(st.Rotated)
	for name, d := range conv.Times {
		st.ApiserverSeconds[name] = (offset + d).Seconds()
	}
	r.event(PhaseConverged, "all %d apiserver(s) write under %s; seconds after the rotation: %s",
		len(conv.Report.Apiservers), st.ToKeyID, formatTimes(st.ApiserverSeconds))
	return nil
}

func (r *run) migrate(ctx context.Context) error {
	st := r.st
	grs, err := migrate.ParseResources(st.Resources)
	if err != nil {
		return err
	}
	resources, err := migrate.Resolve(r.cfg.Clients.Mapper, grs)
	if err != nil {
		return err
	}
	src, err := r.cfg.OpenEtcd(ctx)
	if err != nil {
		return err
	}
	plan, err := migrate.PlanFromEtcd(ctx, src, resources, migrate.EtcdOptions{Prefix: r.cfg.Prefix, CurrentKeyID: st.ToKeyID})
	src.Close()
	if err != nil {
		return err
	}
	ms, err := migrate.OpenState(r.cfg.StatePath+".migrate", st.ToKeyID)
	if err != nil {
		return err
	}
	defer ms.Close()
	opts := r.cfg.Migrate
	opts.State, opts.Limit = ms, 0
	start := r.now()
	res, err := migrate.Run(ctx, r.cfg.Clients.Dynamic, plan, opts)
	st.Planned, st.Rewritten, st.Unchanged, st.Resumed = len(plan.Targets), res.Rewritten, res.Unchanged, res.Resumed
	if err != nil {
		return fmt.Errorf("migration stopped (rerun to resume): %w", err)
	}
	if res.Failed > 0 {
		return fmt.Errorf("%d object(s) could not be rewritten (rerun to retry them), first: %v", res.Failed, res.Errors[0])
	}
	r.event(PhaseMigrated, "rewrote %d stale object(s) (%d resumed from an earlier run, %d deleted meanwhile, %d left unchanged) in %s",
		res.Rewritten, res.Resumed, res.Deleted, res.Unchanged, r.now().Sub(start).Round(time.Millisecond))
	return nil
}

func (r *run) verify(ctx context.Context) error {
	st := r.st
	inv, err := r.inventory(ctx, st.ToKeyID)
	if err != nil {
		return err
	}
	st.Stale = staleIn(inv, st.Resources)
	if st.Stale > 0 {
		// Back to before the migration: a rerun migrates what is left.
		r.st.Phase = PhaseConverged
		if err := r.st.save(r.cfg.StatePath); err != nil {
			return err
		}
		return refuse("verification: %d object(s) are still stale under %s (an apiserver moved off the key_id, or objects were restored meanwhile): rerun to migrate them",
			st.Stale, st.ToKeyID)
	}
	st.Verified = r.now()
	if r.cfg.RetireAfter > 0 {
		st.RetireAt = st.Verified.Add(r.cfg.RetireAfter)
	}
	others := inv.Totals.Stale
	note := ""
	if others > 0 {
		note = fmt.Sprintf("; %d stale object(s) in other resources", others)
	}
	r.event(PhaseVerified, "inventory of etcd: 0 stale object(s) in %s under %s%s", strings.Join(st.Resources, ","), st.ToKeyID, note)
	return nil
}

func (r *run) retire(ctx context.Context) error {
	st := r.st
	if st.Keyring == "" || st.RetireAt.IsZero() {
		r.event(PhaseOldRetired, "the old key (%s) is kept: disable it in the key service once no backup you may restore needs it", st.FromKeyID)
		return nil
	}
	if wait := st.RetireAt.Sub(r.now()); wait > 0 {
		r.event(PhaseOldRetired, "waiting %s (until %s) before disabling %s", wait.Round(time.Second), st.RetireAt.Format(time.RFC3339), st.FromKeyID)
		for r.now().Before(st.RetireAt) {
			r.progress("grace before disabling the old version", 0, 1)
			if err := sleep(ctx, min(time.Second, st.RetireAt.Sub(r.now()))); err != nil {
				return err
			}
		}
	}
	inv, err := r.inventory(ctx, st.ToKeyID)
	if err != nil {
		return err
	}
	under := 0
	for _, s := range inv.Resources {
		under += s.KeyIDs[st.FromKeyID]
	}
	if under > 0 {
		return refuse("not disabling %s: %d object(s) in etcd are still under it (migrate them, then rerun)", st.FromKeyID, under)
	}
	if _, err := softkey.SetDisabled(st.Keyring, st.FromVersion, true); err != nil {
		return err
	}
	st.Retired = r.now()
	r.event(PhaseOldRetired, "disabled %s (keyring version %d): no object in etcd was under it", st.FromKeyID, st.FromVersion)
	return nil
}
