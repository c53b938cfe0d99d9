package keyservicetest

import (
	"context"
	"sync"

	"github.com/kubekms/kubekms/keyservice"
)

// Counting wraps a real Service, counts its calls and can inject failures.
// It is a test probe around the real backend, not a replacement for it.
type Counting struct {
	keyservice.Service

	mu    sync.Mutex
	calls map[string]int
	// fail, when set, is returned (instead of calling the backend) by the
	// next failN calls of any operation.
	fail  error
	failN int
}

// NewCounting wraps svc.
func NewCounting(svc keyservice.Service) *Counting {
	return &Counting{Service: svc, calls: map[string]int{}}
}

// Calls returns how many times op ("wrap", "unwrap", "probe") was called.
func (c *Counting) Calls(op string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls[op]
}

// Crypto returns the wrap plus unwrap calls: the paid remote operations.
func (c *Counting) Crypto() int { return c.Calls("wrap") + c.Calls("unwrap") }

// FailNext makes the next n calls fail with err.
func (c *Counting) FailNext(n int, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fail, c.failN = err, n
}

func (c *Counting) count(op string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls[op]++
	if c.failN > 0 {
		c.failN--
		return c.fail
	}
	return nil
}

// Wrap counts and delegates.
func (c *Counting) Wrap(ctx context.Context, p []byte) (keyservice.WrapResult, error) {
	if err := c.count("wrap"); err != nil {
		return keyservice.WrapResult{}, err
	}
	return c.Service.Wrap(ctx, p)
}

// Unwrap counts and delegates.
func (c *Counting) Unwrap(ctx context.Context, keyID string, w []byte) ([]byte, error) {
	if err := c.count("unwrap"); err != nil {
		return nil, err
	}
	return c.Service.Unwrap(ctx, keyID, w)
}

// Probe counts and delegates.
func (c *Counting) Probe(ctx context.Context) (string, error) {
	if err := c.count("probe"); err != nil {
		return "", err
	}
	return c.Service.Probe(ctx)
}
