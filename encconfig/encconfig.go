// Package encconfig reads kube-apiserver's stored values the way the
// apiserver itself does: with the transformers that
// k8s.io/apiserver/pkg/server/options/encryptionconfig builds from its
// EncryptionConfiguration file (aescbc, aesgcm, secretbox, identity, and
// KMS v1 and v2 with any number of plugins), so a recovery tool reads
// exactly what the cluster could, and judges staleness by the same rule.
package encconfig

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"google.golang.org/grpc/status"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime/schema"
	apiserverv1 "k8s.io/apiserver/pkg/apis/apiserver/v1"
	"k8s.io/apiserver/pkg/features"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	"github.com/kubekms/kubekms/envelope"
	"github.com/kubekms/kubekms/inventory"
)

// Options adjust how the configuration is loaded.
type Options struct {
	// Endpoints replaces the endpoint of KMS providers, by provider name:
	// a plugin that listens elsewhere on this machine than on the
	// apiserver's node, or one served by this process (localplugin).
	Endpoints map[string]string
	// Prefix is the apiserver's etcd prefix (inventory.RegistryPrefix when empty).
	Prefix string
}

// Provider is one provider of the configuration.
type Provider struct {
	Resources []string `json:"resources"`
	Kind      string   `json:"kind"` // aescbc, aesgcm, secretbox, identity, kms-v1, kms-v2
	Name      string   `json:"name,omitempty"`
	Endpoint  string   `json:"endpoint,omitempty"`
}

// Reader reads stored values with the apiserver's transformers.
type Reader struct {
	transformers encryptionconfig.StaticTransformers
	providers    []Provider
	prefix       string
	groups       map[string][]string // bare resource name -> API groups with it, core first
	cancel       context.CancelFunc
}

// Load reads the EncryptionConfiguration at path and builds its
// transformers. KMS v2 providers are primed as the apiserver primes them
// (Status, then Encrypt of a fresh seed): a plugin must answer both, even
// to read. KMS v1 providers need the KMSv1 feature gate in the apiserver;
// here it is turned on for this process when the file has one (reading
// old data is what recovery is for). Close stops the plugins' pollers.
func Load(ctx context.Context, path string, opts Options) (*Reader, error) {
	cfg, err := parse(path)
	if err != nil {
		return nil, err
	}
	r := &Reader{prefix: opts.Prefix, groups: builtinGroups()}
	if r.prefix == "" {
		r.prefix = inventory.RegistryPrefix
	}
	used := map[string]bool{}
	v1 := false
	for i := range cfg.Resources {
		rc := &cfg.Resources[i]
		for _, p := range rc.Providers {
			pr := Provider{Resources: rc.Resources}
			switch {
			case p.KMS != nil:
				pr.Kind, pr.Name = "kms-"+p.KMS.APIVersion, p.KMS.Name
				if pr.Kind == "kms-" {
					pr.Kind = "kms-v1" // the API's default
				}
				if ep, ok := opts.Endpoints[p.KMS.Name]; ok {
					p.KMS.Endpoint = ep
					used[p.KMS.Name] = true
				}
				pr.Endpoint = p.KMS.Endpoint
				v1 = v1 || pr.Kind == "kms-v1"
			case p.AESCBC != nil:
				pr.Kind, pr.Name = "aescbc", keyNames(p.AESCBC.Keys)
			case p.AESGCM != nil:
				pr.Kind, pr.Name = "aesgcm", keyNames(p.AESGCM.Keys)
			case p.Secretbox != nil:
				pr.Kind, pr.Name = "secretbox", keyNames(p.Secretbox.Keys)
			case p.Identity != nil:
				pr.Kind = "identity"
			}
			r.providers = append(r.providers, pr)
		}
	}
	for name := range opts.Endpoints {
		if !used[name] {
			return nil, fmt.Errorf("--kms-endpoint %s: the encryption config has no KMS provider named %q (it has: %s)", name, name, r.kmsNames())
		}
	}
	if v1 && !utilfeature.DefaultFeatureGate.Enabled(features.KMSv1) {
		if err := utilfeature.DefaultMutableFeatureGate.Set(string(features.KMSv1) + "=true"); err != nil {
			return nil, fmt.Errorf("enable reading KMS v1 providers: %w", err)
		}
	}
	loadPath := path
	if len(opts.Endpoints) > 0 {
		// The apiserver's loader takes a file: write the changed config to a
		// private one (it holds the config's keys) and remove it once loaded.
		dir, err := os.MkdirTemp("", "kubekms-encconfig-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(dir)
		out, err := yaml.Marshal(cfg)
		if err != nil {
			return nil, fmt.Errorf("encode encryption config: %w", err)
		}
		loadPath = filepath.Join(dir, "encryption-config.yaml")
		if err := os.WriteFile(loadPath, out, 0o600); err != nil {
			return nil, err
		}
	}
	tctx, cancel := context.WithCancel(ctx)
	ec, err := encryptionconfig.LoadEncryptionConfig(tctx, loadPath, false, "")
	if err != nil {
		cancel()
		return nil, fmt.Errorf("encryption config %s: %w", path, err)
	}
	r.transformers, r.cancel = encryptionconfig.StaticTransformers(ec.Transformers), cancel
	return r, nil
}

func keyNames(keys []apiserverv1.Key) string {
	names := make([]string, 0, len(keys))
	for _, k := range keys {
		names = append(names, k.Name)
	}
	return strings.Join(names, ",")
}

func (r *Reader) kmsNames() string {
	var names []string
	for _, p := range r.providers {
		if strings.HasPrefix(p.Kind, "kms-") {
			names = append(names, p.Name)
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// Providers lists the configuration's providers in order.
func (r *Reader) Providers() []Provider { return slices.Clone(r.providers) }

// Close stops the KMS plugins' pollers.
func (r *Reader) Close() {
	if r.cancel != nil {
		r.cancel()
	}
}

// Open returns the plaintext of the value stored under etcdKey, read by the
// transformer the apiserver uses for the key's resource. Errors wrap one of
// envelope's classes (ErrMalformed, ErrUnknownProvider, ErrKeyUnavailable,
// ErrTampered).
func (r *Reader) Open(ctx context.Context, val, etcdKey []byte) ([]byte, envelope.Header, error) {
	out, _, h, err := r.Read(ctx, val, etcdKey)
	return out, h, err
}

// Read is Open that also returns the apiserver's stale flag: true when the
// apiserver would store the value again on its next write (another provider
// or key writes now).
func (r *Reader) Read(ctx context.Context, val, etcdKey []byte) ([]byte, bool, envelope.Header, error) {
	h, herr := envelope.ParseHeader(val)
	obj, ok := inventory.ParseKey(string(etcdKey), r.prefix)
	if !ok {
		return nil, false, h, fmt.Errorf("%w: %q is not an object key under %s", envelope.ErrMalformed, etcdKey, r.prefix)
	}
	var errs []error
	for _, gr := range r.groupResources(obj.Resource) {
		t := r.transformers.TransformerForResource(gr)
		out, stale, err := t.TransformFromStorage(ctx, val, value.DefaultContext(etcdKey))
		if err == nil {
			return out, stale, h, nil
		}
		errs = append(errs, err)
	}
	err := errors.Join(errs...)
	if herr != nil {
		return nil, false, h, fmt.Errorf("%w (the apiserver's transformer: %v)", herr, err)
	}
	return nil, false, h, classify(err)
}

// classify maps a transformer's error to envelope's classes, by the
// messages of k8s.io/apiserver v0.37's transformers.
func classify(err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "no matching prefix found"), strings.Contains(msg, "no matching key was found"):
		return fmt.Errorf("%w: no provider or key of the encryption config reads it: %v", envelope.ErrUnknownProvider, err)
	case strings.Contains(msg, "failed to decrypt DEK"), strings.Contains(msg, "unexpected nil transformer"), isGRPC(err):
		// KMS v2 wraps the plugin's error; KMS v1 returns its gRPC status as
		// it is; a KMS v2 provider whose plugin never answered Status and
		// Encrypt has no transformer at all.
		return fmt.Errorf("%w: %v", envelope.ErrKeyUnavailable, err)
	case strings.Contains(msg, "message authentication failed"), strings.Contains(msg, "output array was not large enough"),
		strings.Contains(msg, "invalid PKCS7"), strings.Contains(msg, "invalid padding"):
		return fmt.Errorf("%w: %v", envelope.ErrTampered, err)
	}
	return fmt.Errorf("%w: %v", envelope.ErrMalformed, err)
}

func isGRPC(err error) bool {
	var s interface{ GRPCStatus() *status.Status }
	return errors.As(err, &s)
}

// groupResources is the API group/resource the apiserver's encryption
// config would name for an etcd key's resource: "widgets.example.com" as
// it is; a bare name is core if the core group has it, else the built-in
// groups that do (kube-apiserver stores e.g. deployments.apps under
// /registry/deployments/).
func (r *Reader) groupResources(name string) []schema.GroupResource {
	if strings.Contains(name, ".") {
		return []schema.GroupResource{schema.ParseGroupResource(name)}
	}
	groups := r.groups[name]
	if len(groups) == 0 {
		return []schema.GroupResource{{Resource: name}}
	}
	out := make([]schema.GroupResource, 0, len(groups))
	for _, g := range groups {
		out = append(out, schema.GroupResource{Group: g, Resource: name})
	}
	return out
}

// builtinGroups maps the plural resource names of client-go's built-in
// kinds to their groups, core ("") first.
func builtinGroups() map[string][]string {
	m := map[string][]string{}
	for gvk := range scheme.Scheme.AllKnownTypes() {
		if strings.HasSuffix(gvk.Kind, "List") || strings.HasSuffix(gvk.Kind, "Options") || gvk.Version == "__internal" {
			continue
		}
		plural, _ := meta.UnsafeGuessKindToResource(gvk)
		if !slices.Contains(m[plural.Resource], gvk.Group) {
			m[plural.Resource] = append(m[plural.Resource], gvk.Group)
		}
	}
	for _, g := range m {
		sort.Strings(g) // "" sorts first
	}
	return m
}

// KMSProviderNames lists the names of the KMS providers of the
// configuration at path, without loading it (no plugin is dialled).
func KMSProviderNames(path string) ([]string, error) {
	cfg, err := parse(path)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, rc := range cfg.Resources {
		for _, p := range rc.Providers {
			if p.KMS != nil && !slices.Contains(names, p.KMS.Name) {
				names = append(names, p.KMS.Name)
			}
		}
	}
	return names, nil
}

// parse reads the file strictly (a misspelt field is an error); the
// apiserver's loader validates it again.
func parse(path string) (*apiserverv1.EncryptionConfiguration, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("encryption config: %w", err)
	}
	var cfg apiserverv1.EncryptionConfiguration
	if err := yaml.UnmarshalStrict(data, &cfg); err != nil {
		return nil, fmt.Errorf("encryption config %s: %w", path, err)
	}
	return &cfg, nil
}
