package convergence

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// IdentityLabel marks kube-apiserver's identity Leases in kube-system
// (k8s.io/kubernetes pkg/controlplane/apiserver: IdentityLeaseComponentLabelKey).
const IdentityLabel = "apiserver.kubernetes.io/identity"

// Lease is one apiserver identity Lease.
type Lease struct {
	// Identity is the Lease's name: the apiserver's ID ("apiserver-<hash of
	// its hostname>"), whose sha256 labels its metrics.
	Identity string `json:"identity"`
	Hostname string `json:"hostname,omitempty"`
	Holder   string `json:"holder,omitempty"`
	// Renewed and Duration say whether the apiserver is alive: its Lease
	// expires Duration after the last renewal (1 h by default, renewed
	// every 10 s).
	Renewed  time.Time     `json:"renewed"`
	Duration time.Duration `json:"duration"`
}

// Expired reports whether the Lease was not renewed within its duration.
func (l Lease) Expired(now time.Time) bool {
	return l.Duration > 0 && now.After(l.Renewed.Add(l.Duration))
}

// IDHash is the hash the apiserver's metrics label it with.
func (l Lease) IDHash() string { return HashKeyID(l.Identity) }

// ListLeases returns kube-apiserver's identity Leases, sorted by identity.
func ListLeases(ctx context.Context, kube kubernetes.Interface) ([]Lease, error) {
	list, err := kube.CoordinationV1().Leases(metav1.NamespaceSystem).List(ctx,
		metav1.ListOptions{LabelSelector: IdentityLabel + "=kube-apiserver"})
	if err != nil {
		return nil, fmt.Errorf("list apiserver identity leases in kube-system: %w", err)
	}
	out := make([]Lease, 0, len(list.Items))
	for _, l := range list.Items {
		lease := Lease{Identity: l.Name, Hostname: l.Labels[corev1.LabelHostname]}
		if l.Spec.HolderIdentity != nil {
			lease.Holder = *l.Spec.HolderIdentity
		}
		if l.Spec.RenewTime != nil {
			lease.Renewed = l.Spec.RenewTime.UTC()
		}
		if l.Spec.LeaseDurationSeconds != nil {
			lease.Duration = time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second
		}
		out = append(out, lease)
	}
	slices.SortFunc(out, func(a, b Lease) int { return compareStrings(a.Identity, b.Identity) })
	return out, nil
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// EndpointURLs returns the https URLs of every apiserver the `kubernetes`
// Service in `default` points at: its EndpointSlices (every ready address
// with the slice's https port), or, when it has none, its Endpoints. The
// endpoint reconciler keeps them to the apiservers that are up (the lease
// reconciler, kube-apiserver's default); with --endpoint-reconciler-type=none
// they are whatever was written.
func EndpointURLs(ctx context.Context, kube kubernetes.Interface) ([]string, error) {
	list, err := kube.DiscoveryV1().EndpointSlices(metav1.NamespaceDefault).List(ctx,
		metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=kubernetes"})
	if err != nil {
		return nil, fmt.Errorf("list EndpointSlices of the kubernetes service: %w", err)
	}
	var urls []string
	add := func(ip string, port int32) {
		u := "https://" + net.JoinHostPort(ip, strconv.Itoa(int(port)))
		if !slices.Contains(urls, u) {
			urls = append(urls, u)
		}
	}
	for _, s := range list.Items {
		port := httpsPort(s.Ports)
		if port == 0 {
			continue
		}
		for _, ep := range s.Endpoints {
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			for _, a := range ep.Addresses {
				add(a, port)
			}
		}
	}
	if len(urls) > 0 {
		slices.Sort(urls)
		return urls, nil
	}
	// Endpoints is deprecated in favour of EndpointSlices; older clusters have only it.
	eps, err := kube.CoreV1().Endpoints(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		// No endpoint reconciler (--endpoint-reconciler-type=none, some
		// single-node distributions): none listed, so the caller reads the
		// kubeconfig's server instead of failing.
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("the kubernetes service has no EndpointSlices, and its Endpoints: %w", err)
	}
	for _, sub := range eps.Subsets {
		var port int32
		for _, p := range sub.Ports {
			if p.Name == "https" || port == 0 {
				port = p.Port
			}
		}
		for _, a := range sub.Addresses {
			add(a.IP, port)
		}
	}
	slices.Sort(urls)
	return urls, nil
}

func httpsPort(ports []discoveryv1.EndpointPort) int32 {
	var first int32
	for _, p := range ports {
		if p.Port == nil {
			continue
		}
		if p.Name != nil && *p.Name == "https" {
			return *p.Port
		}
		if first == 0 {
			first = *p.Port
		}
	}
	return first
}
