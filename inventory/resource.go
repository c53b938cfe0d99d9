package inventory

import (
	"bytes"
	"strings"
)

// RegistryPrefix is where kube-apiserver keeps its objects in etcd (the
// default --etcd-prefix).
const RegistryPrefix = "/registry/"

// Object is what an etcd key says about the object stored under it.
type Object struct {
	// Resource is the plural resource name, with its group for keys stored
	// under a group ("widgets.example.com", "apiservices.apiregistration.k8s.io");
	// built-in resources of named groups that kube-apiserver stores without
	// their group ("deployments", "leases") keep the bare name.
	Resource  string
	Namespace string // empty for cluster-scoped objects
	Name      string
}

// keyAliases maps the etcd key prefixes kube-apiserver uses for historical
// reasons to the resource they hold.
var keyAliases = map[string]string{
	"services/specs":     "services",
	"services/endpoints": "endpoints",
	"minions":            "nodes",
	"controllers":        "replicationcontrollers",
	"ingress":            "ingresses",
}

// ParseKey splits "/registry/<resource>/[<namespace>/]<name>" (or
// "/registry/<group>/<resource>/...") into an Object. ok is false for keys
// outside prefix or without a name.
func ParseKey(key, prefix string) (Object, bool) {
	rest, ok := strings.CutPrefix(key, prefix)
	if !ok {
		return Object{}, false
	}
	res, rest, ok := splitResource(rest)
	if !ok {
		return Object{}, false
	}
	if ns, name, found := strings.Cut(rest, "/"); found {
		if strings.Contains(name, "/") || ns == "" || name == "" {
			return Object{Resource: res, Name: rest}, true // not a kube object key; keep it whole
		}
		return Object{Resource: res, Namespace: ns, Name: name}, true
	}
	return Object{Resource: res, Name: rest}, true
}

// splitResource returns the resource name and the rest of the key after it.
func splitResource(rest string) (string, string, bool) {
	first, after, ok := strings.Cut(rest, "/")
	if !ok || first == "" || after == "" {
		return "", "", false
	}
	if second, tail, ok := strings.Cut(after, "/"); ok {
		if alias, ok := keyAliases[first+"/"+second]; ok {
			return alias, tail, tail != ""
		}
		if strings.Contains(first, ".") { // "/registry/<group>/<resource>/..."
			if second == "" || tail == "" {
				return "", "", false
			}
			return second + "." + first, tail, true
		}
	}
	if alias, ok := keyAliases[first]; ok {
		return alias, after, true
	}
	return first, after, true
}

// resourceKey is the allocation-free form of splitResource used on the hot
// path: it appends the resource name to buf.
func resourceKey(buf, key, prefix []byte) ([]byte, bool) {
	if !bytes.HasPrefix(key, prefix) {
		return buf, false
	}
	rest := key[len(prefix):]
	i := bytes.IndexByte(rest, '/')
	if i <= 0 || i == len(rest)-1 {
		return buf, false
	}
	first, after := rest[:i], rest[i+1:]
	j := bytes.IndexByte(after, '/')
	if j >= 0 {
		second := after[:j]
		if string(first) == "services" && (string(second) == "specs" || string(second) == "endpoints") {
			return append(buf, keyAliases["services/"+string(second)]...), true
		}
		if bytes.IndexByte(first, '.') >= 0 {
			if j == 0 || j == len(after)-1 {
				return buf, false
			}
			buf = append(buf, second...)
			buf = append(buf, '.')
			return append(buf, first...), true
		}
	}
	switch string(first) {
	case "minions", "controllers", "ingress": // keyAliases' one-part keys; a switch costs less than a map lookup per key
		return append(buf, keyAliases[string(first)]...), true
	}
	return append(buf, first...), true
}
