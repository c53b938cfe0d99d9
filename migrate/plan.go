package migrate

import (
	"context"
	"errors"
	"fmt"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/tools/pager"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/inventory"
	"github.com/kubekms/kubekms/snapshot"
)

// Target is one object to rewrite.
type Target struct {
	Resource  Resource
	Namespace string // empty for cluster-scoped objects
	Name      string
}

// Key names the object in the state file and in messages:
// "<resource>/<namespace>/<name>", the namespace empty for cluster-scoped
// objects. Names never contain "/", so keys are unambiguous.
func (t Target) Key() string { return t.Resource.Name() + "/" + t.Namespace + "/" + t.Name }

// Plan is the list of objects to rewrite and how it was made.
type Plan struct {
	Targets []Target
	// FromEtcd is true when Targets are exactly the stale objects found in
	// etcd; false when they are every object listed through the API.
	FromEtcd bool
	// Seen counts the objects of the selected resources that were looked at.
	Seen int
	// Current counts objects already under the current key_id (etcd plans only).
	Current int
	// Unreadable lists etcd keys of the selected resources whose envelope
	// header could not be parsed or whose key does not name an object; they
	// are not planned (the apiserver could not read them either).
	Unreadable []string
}

// PerResource counts the planned objects by resource name.
func (p *Plan) PerResource() map[string]int {
	m := map[string]int{}
	for _, t := range p.Targets {
		m[t.Resource.Name()]++
	}
	return m
}

// EtcdOptions say which etcd values are stale.
type EtcdOptions struct {
	// Prefix is kube-apiserver's etcd prefix (inventory.RegistryPrefix when empty).
	Prefix string
	// CurrentKeyID is the key_id the KMS plugin reports now. Required.
	CurrentKeyID string
	// IncludePlaintext also plans unencrypted (identity) values, e.g. after
	// encryption was first enabled for a resource.
	IncludePlaintext bool
}

// Stale reports whether a stored value needs a rewrite to be under
// currentKeyID: an encrypted value that is not current (envelope.IsCurrent,
// the rule inventory counts by), plus unencrypted values when
// includePlaintext is set.
func Stale(h envelope.Header, currentKeyID string, includePlaintext bool) bool {
	if !h.Kind.Encrypted() {
		return includePlaintext
	}
	return !envelope.IsCurrent(h.Kind, h.KeyID, h.DEKSourceType, currentKeyID)
}

// PlanFromEtcd reads the envelope headers of every object of resources from
// src (nothing is decrypted) and plans the stale ones, in etcd key order.
func PlanFromEtcd(ctx context.Context, src snapshot.Source, resources []Resource, opts EtcdOptions) (*Plan, error) {
	if opts.CurrentKeyID == "" {
		return nil, errors.New("plan from etcd: the current key_id is needed to tell stale objects")
	}
	prefix := opts.Prefix
	if prefix == "" {
		prefix = inventory.RegistryPrefix
	}
	byStorage := map[string]Resource{}
	for _, r := range resources {
		for _, n := range r.storageNames() {
			if _, ok := byStorage[n]; !ok { // the first resource given wins a shared name
				byStorage[n] = r
			}
		}
	}
	plan := &Plan{FromEtcd: true}
	err := src.Each(ctx, func(key, value []byte) error {
		obj, ok := inventory.ParseKey(string(key), prefix)
		if !ok {
			return nil
		}
		r, ok := byStorage[obj.Resource]
		if !ok {
			return nil
		}
		plan.Seen++
		if r.Namespaced != (obj.Namespace != "") || strings.Contains(obj.Name, "/") {
			plan.Unreadable = append(plan.Unreadable, string(key))
			return nil
		}
		h, err := envelope.ParseHeader(value)
		if err != nil {
			plan.Unreadable = append(plan.Unreadable, string(key))
			return nil
		}
		if !Stale(h, opts.CurrentKeyID, opts.IncludePlaintext) {
			plan.Current++
			return nil
		}
		plan.Targets = append(plan.Targets, Target{Resource: r, Namespace: obj.Namespace, Name: obj.Name})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("plan from etcd: %w", err)
	}
	return plan, nil
}

// PlanFromAPI lists every object of resources through the API (metadata
// only, in pages of pageSize) and plans them all: the API does not say under
// which key an object is stored. Rewriting a current object is cheap: the
// apiserver skips the write of a no-op update unless the stored value is stale.
func PlanFromAPI(ctx context.Context, md metadata.Interface, resources []Resource, pageSize int64) (*Plan, error) {
	if pageSize <= 0 {
		pageSize = 500
	}
	plan := &Plan{}
	for _, r := range resources {
		p := pager.New(func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return md.Resource(r.GVR).List(ctx, opts)
		})
		p.PageSize = pageSize
		err := p.EachListItem(ctx, metav1.ListOptions{}, func(obj runtime.Object) error {
			m, ok := obj.(*metav1.PartialObjectMetadata)
			if !ok {
				return fmt.Errorf("list item is %T, want PartialObjectMetadata", obj)
			}
			plan.Seen++
			plan.Targets = append(plan.Targets, Target{Resource: r, Namespace: m.Namespace, Name: m.Name})
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", r.Name(), err)
		}
	}
	return plan, nil
}

// Remaining counts, per resource name, the stale objects a fresh etcd scan
// finds: the check after a migration.
func Remaining(ctx context.Context, src snapshot.Source, resources []Resource, opts EtcdOptions) (map[string]int, []string, error) {
	p, err := PlanFromEtcd(ctx, src, resources, opts)
	if err != nil {
		return nil, nil, err
	}
	keys := make([]string, 0, len(p.Targets))
	for _, t := range p.Targets {
		keys = append(keys, t.Key())
	}
	per := p.PerResource()
	for _, r := range resources {
		if _, ok := per[r.Name()]; !ok {
			per[r.Name()] = 0
		}
	}
	return per, keys, nil
}
