// Package inventory counts, per resource, how kube-apiserver's objects in
// etcd are stored: by provider and KMS key_id, how many are stale (not
// under the current key_id) and how many are unencrypted in a resource
// whose other objects are encrypted. It reads only envelope headers.
package inventory

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/snapshot"
)

// Options tunes Scan.
type Options struct {
	// Prefix is the etcd prefix of kube-apiserver's objects (RegistryPrefix when empty).
	Prefix string
	// CurrentKeyID is the key_id the KMS plugin reports now; when empty,
	// staleness is not judged.
	CurrentKeyID string
	// Progress, when set, is called with the number of keys read so far
	// (every few thousand keys and at the end).
	Progress func(done int)
	// Read, when set, reads (decrypts) every object value as kube-apiserver
	// does, e.g. with encconfig.Reader: a value it cannot read counts as
	// unreadable, and the stale count is the apiserver's own stale flag
	// (CurrentKeyID is then ignored). ReadWith names it in the report.
	Read     func(ctx context.Context, key, value []byte) (stale bool, err error)
	ReadWith string
}

// Report is the result of a Scan.
type Report struct {
	CurrentKeyID string `json:"currentKeyID,omitempty"`
	// ReadWith names what read every value (Options.ReadWith); empty when
	// only envelope headers were parsed.
	ReadWith  string           `json:"readWith,omitempty"`
	Totals    Counts           `json:"totals"`
	Resources []*ResourceStats `json:"resources"`
	// KeyNames maps key_ids to readable names where they differ (opaque key
	// IDs resolved with the plugin's secret; see NameKeyIDs).
	KeyNames map[string]string `json:"keyNames,omitempty"`
}

// NameKeyIDs fills KeyNames with name(key_id) for every key_id in the report
// whose name differs from it.
func (r *Report) NameKeyIDs(name func(keyID string) string) {
	add := func(id string) {
		if n := name(id); id != "" && n != id {
			if r.KeyNames == nil {
				r.KeyNames = map[string]string{}
			}
			r.KeyNames[id] = n
		}
	}
	add(r.CurrentKeyID)
	for _, res := range r.Resources {
		for id := range res.KeyIDs {
			add(id)
		}
	}
}

// Counts are the per-resource (or total) numbers.
type Counts struct {
	Objects   int `json:"objects"`
	Encrypted int `json:"encrypted"`
	// Unencrypted counts identity values in a resource of which at least
	// one other object is encrypted.
	Unencrypted int `json:"unencrypted"`
	// Plaintext counts all identity values.
	Plaintext int `json:"plaintext"`
	// Stale counts encrypted objects not under CurrentKeyID in seed mode:
	// KMS v2 with another key_id or the legacy AES_GCM_KEY mode, and every
	// other encrypted provider; with Options.Read, the encrypted values the
	// apiserver reads as stale. Zero when no current key_id was given.
	Stale int `json:"stale"`
	// Unreadable counts values whose envelope header could not be parsed,
	// and with Options.Read the values it could not read.
	Unreadable int `json:"unreadable"`
}

// ResourceStats is one resource's line of the report.
type ResourceStats struct {
	Resource string `json:"resource"`
	Counts
	// Providers counts objects by "<kind>" or "<kind>:<provider or key name>".
	Providers map[string]int `json:"providers"`
	// KeyIDs counts KMS v2 objects by key_id.
	KeyIDs map[string]int `json:"keyIDs,omitempty"`
}

// counter counts by string without allocating for keys already seen.
type counter map[string]*int

func (c counter) add(k []byte) {
	if n := c[string(k)]; n != nil {
		*n++
		return
	}
	n := 1
	c[string(k)] = &n
}

type resourceAcc struct {
	ResourceStats
	providers [envelope.KindSecretbox + 1]counter // by kind, then provider name
	keyIDs    counter
}

// Scan reads every value from src and returns the report.
func Scan(ctx context.Context, src snapshot.Source, opts Options) (*Report, error) {
	prefix := []byte(opts.Prefix)
	if len(prefix) == 0 {
		prefix = []byte(RegistryPrefix)
	}
	acc := map[string]*resourceAcc{}
	var buf []byte
	done := 0
	err := src.Each(ctx, func(key, value []byte) error {
		done++
		if opts.Progress != nil && done%4096 == 0 {
			opts.Progress(done)
		}
		var ok bool
		buf, ok = resourceKey(buf[:0], key, prefix)
		if !ok {
			return nil // not an object key (e.g. outside the prefix)
		}
		r := acc[string(buf)]
		if r == nil {
			r = &resourceAcc{ResourceStats: ResourceStats{Resource: string(buf)}, keyIDs: counter{}}
			for i := range r.providers {
				r.providers[i] = counter{}
			}
			acc[r.Resource] = r
		}
		r.Objects++
		h, err := envelope.ParseRawHeader(value)
		if err != nil || int(h.Kind) >= len(r.providers) {
			r.Unreadable++
			return nil
		}
		stale := false
		if opts.Read != nil {
			if stale, err = opts.Read(ctx, key, value); err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r.Unreadable++
				return nil
			}
		}
		r.providers[h.Kind].add(h.Provider)
		if !h.Kind.Encrypted() {
			r.Plaintext++
			return nil
		}
		r.Encrypted++
		if h.Kind == envelope.KindKMSv2 {
			r.keyIDs.add(h.KeyID)
		}
		switch {
		case opts.Read != nil:
			if stale {
				r.Stale++
			}
		case opts.CurrentKeyID != "" && !envelope.IsCurrent(h.Kind, h.KeyID, h.DEKSourceType, opts.CurrentKeyID):
			r.Stale++
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("scan: %w", err)
	}
	if opts.Progress != nil {
		opts.Progress(done)
	}
	rep := &Report{CurrentKeyID: opts.CurrentKeyID, ReadWith: opts.ReadWith, Resources: make([]*ResourceStats, 0, len(acc))}
	for _, name := range slices.Sorted(maps.Keys(acc)) {
		r := acc[name]
		if r.Encrypted > 0 {
			r.Unencrypted = r.Plaintext
		}
		r.Providers = map[string]int{}
		for kind, names := range r.providers {
			for name, n := range names {
				label := envelope.Kind(kind).String()
				if name != "" {
					label += ":" + name
				}
				r.Providers[label] += *n
			}
		}
		if len(r.keyIDs) > 0 {
			r.KeyIDs = make(map[string]int, len(r.keyIDs))
			for k, n := range r.keyIDs {
				r.KeyIDs[k] = *n
			}
		}
		rep.Resources = append(rep.Resources, &r.ResourceStats)
		t := &rep.Totals
		t.Objects += r.Objects
		t.Encrypted += r.Encrypted
		t.Unencrypted += r.Unencrypted
		t.Plaintext += r.Plaintext
		t.Stale += r.Stale
		t.Unreadable += r.Unreadable
	}
	return rep, nil
}

// Resource returns the stats of one resource, or nil.
func (r *Report) Resource(name string) *ResourceStats {
	for _, s := range r.Resources {
		if s.Resource == name {
			return s
		}
	}
	return nil
}

// formatCounts renders a count map as "a=1 b=2", sorted by key, each key
// cut to width runes so long key_ids keep the table readable.
func formatCounts(m map[string]int, width int) string {
	if len(m) == 0 {
		return "-"
	}
	parts := make([]string, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		label := k
		if r := []rune(label); width > 0 && len(r) > width {
			label = string(r[:width-1]) + "…"
		}
		parts = append(parts, fmt.Sprintf("%s=%d", label, m[k]))
	}
	return strings.Join(parts, " ")
}
