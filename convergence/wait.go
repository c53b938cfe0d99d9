package convergence

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// NotConvergedError is returned by Wait when the bound passed first.
type NotConvergedError struct {
	Target   string // the key_id (or its hash) waited for; "" for any agreement
	Waited   time.Duration
	Laggards []string
}

func (e *NotConvergedError) Error() string {
	want := "the same key_id"
	if e.Target != "" {
		want = "key_id " + e.Target
	}
	return fmt.Sprintf("after %s not every apiserver writes under %s:\n  %s",
		e.Waited.Round(time.Second), want, strings.Join(e.Laggards, "\n  "))
}

// Target names the key_id to wait for. It is asked again at every round, so
// a plugin that itself lags behind a rotation can catch up. An empty key_id
// means any key_id the apiservers agree on.
type Target func(ctx context.Context) (keyID string, err error)

// ErrUnsettled is returned (wrapped) by a Target that cannot name a
// key_id yet, e.g. because the plugins it asks disagree: Wait keeps waiting
// and names the reason among the laggards.
var ErrUnsettled = errors.New("the key_id to wait for is not settled")

// Fixed is a Target that never changes.
func Fixed(keyID string) Target {
	return func(context.Context) (string, error) { return keyID, nil }
}

// WaitOptions bound and pace Wait.
type WaitOptions struct {
	// Timeout bounds the wait (default 5 min: an apiserver polls Status once
	// a minute, and is reread here at most every 20 s).
	Timeout time.Duration
	// Interval between observations (default 2 s).
	Interval time.Duration
	// Progress, when set, gets every observation and the key_id hash waited
	// for ("" for any agreement).
	Progress func(rep *Report, target string)
}

// Convergence is the outcome of Wait.
type Convergence struct {
	Report *Report
	// KeyID is the target's key_id when Wait returned ("" when waiting for
	// any agreement); KeyIDHash what the apiservers agreed on.
	KeyID     string
	KeyIDHash string
	// Times holds, per apiserver (by Name), how long after Wait began it
	// was first seen writing under the target.
	Times map[string]time.Duration
	// Waited is the time from the start to the end of the wait.
	Waited time.Duration
}

// Wait observes the cluster until every apiserver writes under the target,
// or the timeout passes (a *NotConvergedError naming the laggards), or ctx
// ends. Every observation reads each apiserver's /readyz, which runs its
// KMS Status poll when the last one is older than 20 s: waiting here makes
// the apiservers converge sooner than their one-minute poll.
func (o *Observer) Wait(ctx context.Context, target Target, opts WaitOptions) (*Convergence, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = 5 * time.Minute
	}
	if opts.Interval <= 0 {
		opts.Interval = 2 * time.Second
	}
	start := o.now()
	res := &Convergence{Times: map[string]time.Duration{}}
	for {
		keyID, err := target(ctx)
		unsettled := ""
		switch {
		case errors.Is(err, ErrUnsettled):
			unsettled, keyID = err.Error(), res.KeyID
		case err != nil:
			return res, fmt.Errorf("the key_id to wait for: %w", err)
		case keyID == StoppedKeyID: // a plugin that stopped writing names no key to wait for
			unsettled, keyID = fmt.Sprintf("%s: the key_id to wait for is %s, which names no key", ErrUnsettled, StoppedKeyID), res.KeyID
		}
		want := ""
		if keyID != "" {
			want = HashKeyID(keyID)
			o.learn(want, keyID)
		}
		if keyID != res.KeyID { // the target moved: times count for the new one
			clear(res.Times)
		}
		res.KeyID = keyID
		rep, err := o.Observe(ctx)
		if err != nil {
			return res, err
		}
		res.Report, res.Waited = rep, o.now().Sub(start)
		for _, a := range rep.Apiservers {
			if _, seen := res.Times[a.Name()]; !seen && a.KeyIDHash != "" && !a.WritesStopped && (a.KeyIDHash == want || want == "") {
				res.Times[a.Name()] = res.Waited
			}
		}
		if opts.Progress != nil {
			opts.Progress(rep, want)
		}
		if unsettled == "" && rep.Agreed && (want == "" || rep.KeyIDHash == want) {
			res.KeyIDHash = rep.KeyIDHash
			return res, nil
		}
		if denied(rep) {
			return res, fmt.Errorf("cannot read the apiservers: %s", rep.Apiservers[0].Reason)
		}
		if res.Waited >= opts.Timeout {
			e := &NotConvergedError{Waited: res.Waited}
			if want != "" {
				e.Target = describeKey(want, keyID)
				e.Laggards = rep.Laggards(want)
			} else {
				e.Laggards = rep.Laggards("")
			}
			if unsettled != "" {
				// The laggards are (also) plugins: name what each apiserver
				// writes under as well.
				e.Laggards = append([]string{unsettled}, rep.States()...)
			}
			return res, e
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(min(opts.Interval, opts.Timeout-res.Waited)):
		}
	}
}

func (o *Observer) learn(hash, keyID string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.KeyIDs == nil {
		o.KeyIDs = map[string]string{}
	}
	o.KeyIDs[hash] = keyID
}

// denied reports whether every apiserver refused the credentials.
func denied(rep *Report) bool {
	for _, a := range rep.Apiservers {
		if !a.Denied {
			return false
		}
	}
	return len(rep.Apiservers) > 0
}
