// Package decrypt recovers kube-apiserver objects from etcd contents
// offline: it decrypts each selected value with the KMS plugin (one plugin
// call per stored seed), decodes it and hands a YAML manifest to a Sink.
// Values that cannot be recovered are reported with a reason; they never
// stop the run.
package decrypt

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/snapshot"
)

// Options selects what to recover.
type Options struct {
	// Prefix is the etcd prefix of kube-apiserver's objects (inventory.RegistryPrefix when empty).
	Prefix string
	// Resource, Namespace and Name select objects; empty selects all.
	// Resource uses inventory's names ("secrets", "widgets.example.com").
	Resource, Namespace, Name string
	// Progress, when set, is called with (keys read, total keys).
	Progress func(done, total int)
}

// Reason classifies a value that could not be recovered.
type Reason string

// Reasons in a Summary.
const (
	ReasonKeyUnavailable  Reason = "key unavailable (missing key version, revoked key or plugin error)"
	ReasonTampered        Reason = "tampered value (authentication failed)"
	ReasonUnknownProvider Reason = "unsupported provider"
	ReasonMalformed       Reason = "malformed envelope"
	ReasonUndecodable     Reason = "undecodable object"
	ReasonUnsafeName      Reason = "unsafe object name"
)

// Failure is one value that was not recovered.
type Failure struct {
	Key    string `json:"key"`
	Reason Reason `json:"reason"`
	Error  string `json:"error"`
}

// Summary is the outcome of a Run.
type Summary struct {
	Selected int       `json:"selected"`
	Written  int       `json:"written"`
	Failures []Failure `json:"failures,omitempty"`
	// PluginCalls counts KMS Decrypt calls; -1 when the Opener does not tell.
	PluginCalls int64 `json:"pluginCalls"`
}

// ByReason counts failures per reason.
func (s *Summary) ByReason() map[Reason]int {
	m := map[Reason]int{}
	for _, f := range s.Failures {
		m[f.Reason]++
	}
	return m
}

// Reasons returns the failure reasons present, sorted.
func (s *Summary) Reasons() []Reason {
	return slices.Sorted(maps.Keys(s.ByReason()))
}

// Opener decrypts a stored value: envelope.Opener (kubekms's reader, with
// one KMS v2 plugin) or encconfig.Reader (kube-apiserver's transformers,
// with every provider of its EncryptionConfiguration). Errors wrap one of
// envelope's error classes.
type Opener interface {
	Open(ctx context.Context, value, etcdKey []byte) ([]byte, envelope.Header, error)
}

// pluginCounter is an Opener that counts its plugin calls.
type pluginCounter interface{ PluginCalls() int64 }

// Sink receives recovered manifests.
type Sink interface {
	Write(obj inventory.Object, manifest []byte) error
}

// Run recovers every selected value of src. It returns an error only for
// a failure of the run itself (reading src, writing to sink, a cancelled
// ctx); per-value failures are in the Summary.
func Run(ctx context.Context, src snapshot.Source, op Opener, sink Sink, opts Options) (*Summary, error) {
	prefix := opts.Prefix
	if prefix == "" {
		prefix = inventory.RegistryPrefix
	}
	conv := NewConverter()
	sum := &Summary{}
	total, done := src.Len(), 0
	counter, counts := op.(pluginCounter)
	var calls0 int64
	if counts {
		calls0 = counter.PluginCalls()
	}
	err := src.Each(ctx, func(key, value []byte) error {
		done++
		if opts.Progress != nil && (done%256 == 0 || done == total) {
			opts.Progress(done, total)
		}
		obj, ok := inventory.ParseKey(string(key), prefix)
		if !ok || !opts.selects(obj) {
			return nil
		}
		sum.Selected++
		fail := func(r Reason, err error) {
			sum.Failures = append(sum.Failures, Failure{Key: string(key), Reason: r, Error: err.Error()})
		}
		if err := checkSafe(obj); err != nil {
			fail(ReasonUnsafeName, err)
			return nil
		}
		plain, _, err := op.Open(ctx, value, key)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fail(classify(err), err)
			return nil
		}
		manifest, err := conv.ToYAML(plain)
		if err != nil {
			fail(ReasonUndecodable, err)
			return nil
		}
		if err := sink.Write(obj, manifest); err != nil {
			return fmt.Errorf("write %s: %w", key, err)
		}
		sum.Written++
		return nil
	})
	sum.PluginCalls = -1
	if counts {
		sum.PluginCalls = counter.PluginCalls() - calls0
	}
	if opts.Progress != nil {
		opts.Progress(done, total)
	}
	return sum, err
}

func (o Options) selects(obj inventory.Object) bool {
	return (o.Resource == "" || o.Resource == obj.Resource) &&
		(o.Namespace == "" || o.Namespace == obj.Namespace) &&
		(o.Name == "" || o.Name == obj.Name)
}

func classify(err error) Reason {
	switch {
	case errors.Is(err, envelope.ErrKeyUnavailable):
		return ReasonKeyUnavailable
	case errors.Is(err, envelope.ErrTampered):
		return ReasonTampered
	case errors.Is(err, envelope.ErrUnknownProvider):
		return ReasonUnknownProvider
	default:
		return ReasonMalformed
	}
}
