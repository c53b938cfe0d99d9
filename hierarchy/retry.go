package hierarchy

import (
	"context"
	"time"

	"github.com/cenkalti/backoff/v5"

	"github.com/kubekms/kubekms/keyservice"
)

// retry runs fn until it succeeds or fails with an error that is not
// transient, backing off exponentially with jitter, for at most 4 attempts
// and never past ctx's deadline. It returns fn's last error, not the
// context's, so the caller still sees why the key service failed.
func retry(ctx context.Context, fn func() error) error {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 50 * time.Millisecond
	b.MaxInterval = time.Second
	b.RandomizationFactor = 0.5
	opts := []backoff.RetryOption{backoff.WithBackOff(b), backoff.WithMaxTries(4)}
	if dl, ok := ctx.Deadline(); ok {
		opts = append(opts, backoff.WithMaxElapsedTime(time.Until(dl)))
	}
	var last error
	_, err := backoff.Retry(ctx, func() (struct{}, error) {
		last = fn()
		if last != nil && keyservice.Classify(last) != keyservice.ClassTransient {
			return struct{}{}, backoff.Permanent(last)
		}
		return struct{}{}, last
	}, opts...)
	if err != nil && last != nil {
		return last
	}
	return err
}
