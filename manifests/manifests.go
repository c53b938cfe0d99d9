// Package manifests renders one consistent kubekms deployment from one set of
// options: the static pod (and its host folders) or the systemd unit, the
// EncryptionConfiguration, and what the cluster's kube-apiserver needs (the
// flag, the mounts, liveness and startup probes that exclude KMS) for kubeadm,
// k3s or RKE2. Every path, uid and name is given once, so the files cannot
// disagree. deploy/ holds the rendering of the defaults (kubeadm), and the
// real-cluster suite starts kube-apiserver with the rendered
// EncryptionConfiguration and flags.
package manifests

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/template"
	"time"
)

// LivenessPath is what kube-apiserver's liveness and startup probes should
// ask: every check but the KMS plugins'. A plugin or key-service outage is
// not cured by restarting the apiserver, and a restart empties its cache of
// decrypted seeds. "kms-providers" is the check's name when only KMS v2
// providers are configured (k8s.io/apiserver, encryptionconfig).
const LivenessPath = "/livez?exclude=kms-providers"

// Distributions.
const (
	Kubeadm = "kubeadm"
	K3s     = "k3s"
	RKE2    = "rke2"
)

// Options are the one set of inputs. The zero value of a field means its
// default (Defaults shows them).
type Options struct {
	Distro       string        // kubeadm, k3s or rke2
	Image        string        // the static pod's image
	UID, GID     int64         // the static pod's user and group (the socket's group)
	Socket       string        // the unix socket, an absolute path
	StateDir     string        // the keyring (softkey) and local KEK state
	KeyURI       string        // default: the softkey keyring in StateDir
	ClusterName  string        // bound into wrapped keys (pkcs11, awskms)
	MetricsAddr  string        // loopback host:port of metrics and probes
	Provider     string        // the EncryptionConfiguration's provider name
	Resources    []string      // what the apiserver encrypts
	Timeout      time.Duration // the apiserver's per-call timeout
	EncConfig    string        // where the EncryptionConfiguration goes on the node
	PodManifests string        // the kubelet's static pod folder
}

// Defaults are the options deploy/ is rendered with, for a distribution.
func Defaults(distro string) Options {
	o := Options{
		Distro:      distro,
		Image:       "registry.example.com/kubekms/kubekms:v0.1.0",
		UID:         10001,
		GID:         10001,
		Socket:      "/var/run/kubekms/kms.sock",
		StateDir:    "/var/lib/kubekms",
		ClusterName: "kubernetes",
		MetricsAddr: "127.0.0.1:9595",
		Provider:    "kubekms",
		Resources:   []string{"secrets"},
		Timeout:     3 * time.Second,
	}
	switch distro {
	case K3s:
		o.EncConfig = "/etc/rancher/k3s/kubekms/encryption-config.yaml"
		o.PodManifests = "/var/lib/rancher/k3s/agent/pod-manifests"
	case RKE2:
		o.EncConfig = "/etc/rancher/rke2/kubekms/encryption-config.yaml"
		o.PodManifests = "/var/lib/rancher/rke2/agent/pod-manifests"
	default:
		o.EncConfig = "/etc/kubernetes/enc/encryption-config.yaml"
		o.PodManifests = "/etc/kubernetes/manifests"
	}
	return o
}

// File is one rendered file.
type File struct {
	Name    string      // path in the output folder, e.g. "static-pod.yaml"
	Install string      // where it goes on a control-plane node ("" = merge it by hand)
	Mode    os.FileMode // its mode there
	Content []byte
}

// Arg is one kube-apiserver flag, --Name=Value.
type Arg struct{ Name, Value string }

// Flag is the flag as a command-line argument.
func (a Arg) Flag() string { return "--" + a.Name + "=" + a.Value }

// Deployment is a rendering.
type Deployment struct {
	Options Options
	Files   []File
	// APIServerArgs are the flags kube-apiserver needs (the EncryptionConfiguration).
	APIServerArgs []Arg
}

// File returns the rendered file of that name, or nil.
func (d *Deployment) File(name string) *File {
	for i := range d.Files {
		if d.Files[i].Name == name {
			return &d.Files[i]
		}
	}
	return nil
}

// EncryptionConfig is the rendered EncryptionConfiguration.
func (d *Deployment) EncryptionConfig() []byte { return d.File(EncryptionConfigFile).Content }

// APIServerFlags are APIServerArgs as command-line arguments.
func (d *Deployment) APIServerFlags() []string {
	out := make([]string, len(d.APIServerArgs))
	for i, a := range d.APIServerArgs {
		out[i] = a.Flag()
	}
	return out
}

// File names.
const (
	StaticPodFile        = "static-pod.yaml"
	TmpfilesFile         = "kubekms.tmpfiles.conf"
	UnitFile             = "kubekms.service"
	EncryptionConfigFile = "encryption-config.yaml"
	APIServerPatchFile   = "kube-apiserver-patch.yaml"
	KubeadmConfigFile    = "kubeadm-config.yaml"
	KubeadmPatchFile     = "kubeadm-patches/kube-apiserver+strategic.yaml"
	K3sConfigFile        = "k3s-config.yaml"
	RKE2ConfigFile       = "rke2-config.yaml"
)

//go:embed templates
var templates embed.FS

// data is what the templates see.
type data struct {
	Options
	Listen, SocketDir, HostSocketDir, KeyURI, StateFile string
	MetricsHost, MetricsPort, EncConfigDir, Timeout     string
	RuntimeDirectory, StateDirectory, LivenessPath      string
	APIServerArgs                                       []Arg
	APIServerFlags                                      []string
	APIServerFiles                                      string
}

// Render renders the deployment for o (defaults filled in) and checks that
// it is consistent.
func Render(o Options) (*Deployment, error) {
	o, err := complete(o)
	if err != nil {
		return nil, err
	}
	d := data{
		Options:       o,
		Listen:        "unix://" + o.Socket,
		SocketDir:     path.Dir(o.Socket),
		HostSocketDir: hostDir(path.Dir(o.Socket)),
		KeyURI:        o.KeyURI,
		StateFile:     path.Join(o.StateDir, "local-kek-state.json"),
		EncConfigDir:  path.Dir(o.EncConfig),
		Timeout:       o.Timeout.String(),
		LivenessPath:  LivenessPath,
		APIServerArgs: []Arg{{"encryption-provider-config", o.EncConfig}},
	}
	d.MetricsHost, d.MetricsPort, _ = net.SplitHostPort(o.MetricsAddr)
	for _, a := range d.APIServerArgs {
		d.APIServerFlags = append(d.APIServerFlags, a.Flag())
	}
	// The systemd unit keeps its folders in /run and /var/lib (RuntimeDirectory,
	// StateDirectory); elsewhere only the static pod is rendered.
	d.RuntimeDirectory, _ = strings.CutPrefix(d.HostSocketDir, "/run/")
	d.StateDirectory, _ = strings.CutPrefix(o.StateDir, "/var/lib/")
	withUnit := strings.HasPrefix(d.HostSocketDir, "/run/") && strings.HasPrefix(o.StateDir, "/var/lib/")

	type out struct {
		name, tmpl, install string
		mode                os.FileMode
	}
	files := []out{
		{StaticPodFile, "static-pod.yaml", path.Join(o.PodManifests, "kubekms.yaml"), 0o600},
		{TmpfilesFile, "kubekms.tmpfiles.conf", "/etc/tmpfiles.d/kubekms.conf", 0o644},
	}
	if withUnit {
		files = append(files, out{UnitFile, "kubekms.service", "/etc/systemd/system/kubekms.service", 0o644})
	}
	files = append(files, out{EncryptionConfigFile, "encryption-config.yaml", o.EncConfig, 0o600})
	switch o.Distro {
	case Kubeadm:
		d.APIServerFiles = APIServerPatchFile + ", or " + KubeadmConfigFile + " with " + KubeadmPatchFile
		files = append(files,
			out{APIServerPatchFile, "kube-apiserver-patch.yaml", "", 0o644},
			out{KubeadmConfigFile, "kubeadm-config.yaml", "", 0o644},
			out{KubeadmPatchFile, "kubeadm-patches/kube-apiserver+strategic.yaml", "", 0o644})
	case K3s:
		d.APIServerFiles = K3sConfigFile
		files = append(files, out{K3sConfigFile, "k3s-config.yaml", "/etc/rancher/k3s/config.yaml.d/50-kubekms.yaml", 0o600})
	case RKE2:
		d.APIServerFiles = RKE2ConfigFile
		files = append(files, out{RKE2ConfigFile, "rke2-config.yaml", "/etc/rancher/rke2/config.yaml.d/50-kubekms.yaml", 0o600})
	}

	dep := &Deployment{Options: o, APIServerArgs: d.APIServerArgs}
	for _, f := range files {
		b, err := execute(f.tmpl, f.name, d)
		if err != nil {
			return nil, err
		}
		dep.Files = append(dep.Files, File{Name: f.name, Install: f.install, Mode: f.mode, Content: b})
	}
	return dep, nil
}

func execute(tmpl, name string, d data) ([]byte, error) {
	text, err := templates.ReadFile("templates/" + tmpl)
	if err != nil {
		return nil, err
	}
	t, err := template.New(tmpl).Option("missingkey=error").Funcs(template.FuncMap{
		"header": func() string {
			return "# Rendered by `kubekms manifests` (manifests/templates/" + tmpl + "): change the flags or the template, not this file.\n"
		},
		"join": strings.Join,
		"base": path.Base,
		"has":  func(list []string, s string) bool { return slices.Contains(list, s) },
	}).Parse(string(text))
	if err != nil {
		return nil, fmt.Errorf("template %s: %w", tmpl, err)
	}
	var b bytes.Buffer
	if err := t.Execute(&b, d); err != nil {
		return nil, fmt.Errorf("render %s: %w", name, err)
	}
	return b.Bytes(), nil
}

// complete fills in defaults and refuses options that would render an
// unsafe or inconsistent deployment.
func complete(o Options) (Options, error) {
	if o.Distro == "" {
		o.Distro = Kubeadm
	}
	def := Defaults(o.Distro)
	fill := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	fill(&o.Image, def.Image)
	fill(&o.Socket, def.Socket)
	fill(&o.StateDir, def.StateDir)
	fill(&o.ClusterName, def.ClusterName)
	fill(&o.MetricsAddr, def.MetricsAddr)
	fill(&o.Provider, def.Provider)
	fill(&o.EncConfig, def.EncConfig)
	fill(&o.PodManifests, def.PodManifests)
	if o.UID == 0 {
		o.UID = def.UID
	}
	if o.GID == 0 {
		o.GID = def.GID
	}
	if len(o.Resources) == 0 {
		o.Resources = def.Resources
	}
	if o.Timeout == 0 {
		o.Timeout = def.Timeout
	}
	fill(&o.KeyURI, "softkey://"+path.Join(o.StateDir, "keyring.json"))

	var errs []error
	if !slices.Contains([]string{Kubeadm, K3s, RKE2}, o.Distro) {
		errs = append(errs, fmt.Errorf("distribution %q: want kubeadm, k3s or rke2", o.Distro))
	}
	for name, p := range map[string]string{"socket": o.Socket, "state folder": o.StateDir, "encryption config": o.EncConfig, "pod manifests folder": o.PodManifests} {
		if !path.IsAbs(p) || path.Clean(p) != p {
			errs = append(errs, fmt.Errorf("%s %q: want a clean absolute path", name, p))
		}
	}
	// The socket path must fit sun_path (108 bytes with the NUL).
	if len(o.Socket) > 107 {
		errs = append(errs, fmt.Errorf("socket %q: longer than a unix socket path may be (107 bytes)", o.Socket))
	}
	if path.Dir(o.Socket) == o.StateDir {
		errs = append(errs, errors.New("the socket's folder must not be the state folder: the apiserver mounts the socket's folder"))
	}
	if o.UID < 0 || o.GID <= 0 {
		errs = append(errs, fmt.Errorf("uid %d, gid %d: want a non-root uid and gid", o.UID, o.GID))
	}
	host, port, err := net.SplitHostPort(o.MetricsAddr)
	if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
		errs = append(errs, fmt.Errorf("metrics address %q: want a loopback IP and a port (metrics and probes have no authentication)", o.MetricsAddr))
	} else if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		errs = append(errs, fmt.Errorf("metrics address %q: want a fixed port", o.MetricsAddr))
	}
	if o.Timeout < time.Second {
		errs = append(errs, fmt.Errorf("timeout %s: kube-apiserver needs at least 1s per call", o.Timeout))
	}
	for _, r := range o.Resources {
		if r == "" || strings.ContainsAny(r, " \t\n:#") {
			errs = append(errs, fmt.Errorf("resource %q: want a resource name like secrets or configmaps", r))
		}
	}
	if strings.ContainsAny(o.Image+o.KeyURI+o.ClusterName+o.Provider, " \t\n\"'#") {
		errs = append(errs, errors.New("image, key URI, cluster name and provider name may not contain blanks, quotes or #"))
	}
	return o, errors.Join(errs...)
}

// hostDir folds /var/run into /run, which it links to on every systemd host.
func hostDir(p string) string {
	if rest, ok := strings.CutPrefix(p, "/var/run/"); ok {
		return "/run/" + rest
	}
	return p
}

// Write writes the files under dir (0644: they hold no secret; Mode is the
// mode to install them with).
func (d *Deployment) Write(dir string) error {
	for _, f := range d.Files {
		p := filepath.Join(dir, filepath.FromSlash(f.Name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, f.Content, 0o644); err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
	}
	return nil
}
