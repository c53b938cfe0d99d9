// Package migrate rewrites the objects of encrypted resources through the
// Kubernetes API so kube-apiserver stores them again under the current
// encryption key: the storage migration after a KMS key rotation. Stale
// objects are found exactly from the envelope headers in etcd, or, when etcd
// is not reachable, every object is listed through the API; each is then
// rewritten with a no-op update (GET, then UPDATE with the same
// resourceVersion), which kube-apiserver turns into a real write only for
// values its encryption config reads as stale.
package migrate

import (
	"errors"
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// Resource is one API resource to migrate, resolved against the apiserver.
type Resource struct {
	GVR        schema.GroupVersionResource
	Namespaced bool
}

// Name is the resource as the user and the state file name it: "secrets",
// "deployments.apps", "widgets.example.com".
func (r Resource) Name() string { return r.GVR.GroupResource().String() }

// storageNames are the names inventory.ParseKey gives this resource's etcd
// keys: "<resource>.<group>" for keys stored under their group (custom and
// aggregated resources), the bare resource for the core group and for the
// built-in resources of named groups that kube-apiserver stores without
// their group (/registry/deployments/...).
func (r Resource) storageNames() []string {
	if r.GVR.Group == "" {
		return []string{r.GVR.Resource}
	}
	return []string{r.GVR.Resource + "." + r.GVR.Group, r.GVR.Resource}
}

// ParseResources parses a list like "secrets,configmaps,deployments.apps"
// (group-qualified plural resource names, as kubectl takes them) and drops
// duplicates.
func ParseResources(names []string) ([]schema.GroupResource, error) {
	var out []schema.GroupResource
	seen := map[schema.GroupResource]bool{}
	for _, n := range names {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		gr := schema.ParseGroupResource(n)
		if errs := validation.IsDNS1123Label(gr.Resource); len(errs) > 0 {
			return nil, fmt.Errorf("resource %q: %s", n, strings.Join(errs, "; "))
		}
		if gr.Group != "" {
			if errs := validation.IsDNS1123Subdomain(gr.Group); len(errs) > 0 {
				return nil, fmt.Errorf("resource %q: group: %s", n, strings.Join(errs, "; "))
			}
		}
		if !seen[gr] {
			seen[gr] = true
			out = append(out, gr)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no resources given")
	}
	return out, nil
}

// Clients are the API clients a migration uses.
type Clients struct {
	Dynamic  dynamic.Interface  // GET and UPDATE of any resource
	Metadata metadata.Interface // listing (object metadata only)
	Mapper   meta.RESTMapper    // resource names to versions and scope
}

// NewClients builds the clients from a rest.Config. The discovery answers
// are cached in memory for the life of the Clients.
func NewClients(cfg *rest.Config) (*Clients, error) {
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	md, err := metadata.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("metadata client: %w", err)
	}
	disc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("discovery client: %w", err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(disc))
	return &Clients{Dynamic: dyn, Metadata: md, Mapper: mapper}, nil
}

// Resolve maps each group/resource to the version the apiserver prefers and
// finds whether it is namespaced. A resource of a named group may be given
// without its group when the name is unambiguous ("deployments").
func Resolve(mapper meta.RESTMapper, grs []schema.GroupResource) ([]Resource, error) {
	out := make([]Resource, 0, len(grs))
	for _, gr := range grs {
		gvr, err := mapper.ResourceFor(gr.WithVersion(""))
		if err != nil {
			return nil, fmt.Errorf("resource %q is not served by the apiserver: %w", gr.String(), err)
		}
		gvk, err := mapper.KindFor(gvr)
		if err != nil {
			return nil, fmt.Errorf("resource %q: kind: %w", gr.String(), err)
		}
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return nil, fmt.Errorf("resource %q: mapping: %w", gr.String(), err)
		}
		out = append(out, Resource{GVR: gvr, Namespaced: m.Scope.Name() == meta.RESTScopeNameNamespace})
	}
	return out, nil
}
