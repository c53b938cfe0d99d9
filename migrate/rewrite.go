package migrate

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/util/retry"
)

// Options tune Run.
type Options struct {
	// QPS limits the API requests (GETs and UPDATEs) per second over all
	// workers; 0 means no limit.
	QPS float64
	// Concurrency is the number of objects rewritten at once (1 when < 1).
	Concurrency int
	// Limit stops the run after this many objects were attempted (0: all),
	// for migrating in batches; objects skipped from State do not count.
	Limit int
	// State, when set, is consulted to skip objects rewritten by an earlier
	// run and gets every rewrite recorded.
	State *State
	// Progress, when set, is called after each object with the number
	// finished and the number this run will attempt; calls never overlap.
	Progress func(done, total int)
	// Log gets one line per failed object (nil: slog.Default()).
	Log *slog.Logger
}

// Result counts what a run did.
type Result struct {
	Planned int
	// Rewritten objects got a new resourceVersion: the apiserver stored them
	// again, under its current write key.
	Rewritten int
	// Unchanged objects kept their resourceVersion: the apiserver found the
	// stored value current and skipped the write. An etcd plan expects none;
	// some mean the apiserver does not yet use the key_id the plan assumed
	// (it polls the plugin's Status about once a minute).
	Unchanged int
	// Resumed objects were skipped: State records them as rewritten.
	Resumed int
	// Deleted objects were gone (NotFound) when their turn came.
	Deleted int
	// ConflictsRetried counts updates refused with Conflict (the object
	// changed between GET and UPDATE) and retried after a new GET.
	ConflictsRetried int
	// Failed objects could not be rewritten; Errors holds the first few.
	Failed int
	Errors []error
	// NotAttempted objects were left for another run (Limit or cancellation).
	NotAttempted int
}

const maxErrors = 10

// conflictBackoff spaces the retries after a Conflict: up to 8 tries over
// about 2.5s (client-go's DefaultRetry gives up after 5 tries in 50ms).
var conflictBackoff = wait.Backoff{Steps: 8, Duration: 10 * time.Millisecond, Factor: 2, Jitter: 0.1}

// Run rewrites the plan's targets through client with no-op updates. It
// returns when every target was handled, the Limit was reached, or ctx was
// cancelled (then with ctx's error). Per-object failures are counted in the
// Result, not returned.
func Run(ctx context.Context, client dynamic.Interface, plan *Plan, opts Options) (Result, error) {
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	workers := max(opts.Concurrency, 1)
	limiter := rate.NewLimiter(rate.Inf, 1)
	if opts.QPS > 0 {
		limiter = rate.NewLimiter(rate.Limit(opts.QPS), max(1, int(opts.QPS/10)))
	}
	res := Result{Planned: len(plan.Targets)}
	todo := make([]Target, 0, len(plan.Targets))
	for _, t := range plan.Targets {
		if opts.State != nil && opts.State.Done(t.Key()) {
			res.Resumed++
			continue
		}
		todo = append(todo, t)
	}
	if opts.Limit > 0 && len(todo) > opts.Limit {
		res.NotAttempted = len(todo) - opts.Limit
		todo = todo[:opts.Limit]
	}

	var (
		mu       sync.Mutex // guards res and finished
		finished int
		next     atomic.Int64 // index of the next target to take
		wg       sync.WaitGroup
	)
	for range min(workers, len(todo)) {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= len(todo) {
					return
				}
				t := todo[i]
				out := rewrite(ctx, client, limiter, t)
				if ctx.Err() != nil && out.err != nil {
					mu.Lock()
					res.NotAttempted++ // cut short by the cancellation, not failed
					mu.Unlock()
					return
				}
				var recordErr error
				if out.err == nil && out.rewritten && opts.State != nil {
					recordErr = opts.State.Record(t.Key(), out.resourceVersion)
				}
				mu.Lock()
				res.ConflictsRetried += out.conflicts
				switch {
				case out.err != nil && apierrors.IsNotFound(out.err):
					res.Deleted++
				case out.err != nil:
					res.Failed++
					if len(res.Errors) < maxErrors {
						res.Errors = append(res.Errors, out.err)
					}
					log.Warn("rewrite failed", "object", t.Key(), "err", out.err)
				case out.rewritten:
					res.Rewritten++
				default:
					res.Unchanged++
				}
				if recordErr != nil {
					res.Failed++
					if len(res.Errors) < maxErrors {
						res.Errors = append(res.Errors, recordErr)
					}
				}
				finished++
				if opts.Progress != nil {
					opts.Progress(finished, len(todo)) // under mu: calls never overlap
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	// Targets no worker reached because ctx ended.
	res.NotAttempted += max(0, len(todo)-int(next.Load()))
	return res, ctx.Err()
}

type outcome struct {
	rewritten       bool
	resourceVersion string
	conflicts       int
	err             error
}

// rewrite GETs the object and UPDATEs it unchanged; the resourceVersion it
// carries makes the update fail with Conflict if the object changed in
// between, and then both are retried.
func rewrite(ctx context.Context, client dynamic.Interface, limiter *rate.Limiter, t Target) outcome {
	ri := client.Resource(t.Resource.GVR).Namespace(t.Namespace)
	var out outcome
	attempts := 0
	err := retry.RetryOnConflict(conflictBackoff, func() error {
		if attempts++; attempts > 1 {
			out.conflicts++
		}
		if err := limiter.Wait(ctx); err != nil {
			return err
		}
		obj, err := ri.Get(ctx, t.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		before := obj.GetResourceVersion()
		if err := limiter.Wait(ctx); err != nil {
			return err
		}
		updated, err := ri.Update(ctx, obj, metav1.UpdateOptions{FieldManager: "kubekms-migrate"})
		if err != nil {
			return err
		}
		out.resourceVersion = updated.GetResourceVersion()
		out.rewritten = out.resourceVersion != before
		return nil
	})
	if err != nil {
		out.err = fmt.Errorf("rewrite %s: %w", t.Key(), err) // IsNotFound still sees through
	}
	return out
}
