package manifests

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apiserver/pkg/apis/apiserver"
	"k8s.io/apiserver/pkg/apis/apiserver/install"
	"k8s.io/apiserver/pkg/apis/apiserver/validation"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite ../deploy from the templates (same as `make manifests`)")

// TestDeployIsRendered: deploy/ is exactly the rendering of the defaults, so a
// change to a template that is not rendered (or a hand edit of deploy/) fails.
func TestDeployIsRendered(t *testing.T) {
	d, err := Render(Options{})
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := d.Write("../deploy"); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range d.Files {
		got, err := os.ReadFile(filepath.Join("..", "deploy", f.Name))
		if err != nil {
			t.Errorf("deploy/%s: %v (run `make manifests`)", f.Name, err)
			continue
		}
		if !bytes.Equal(got, f.Content) {
			t.Errorf("deploy/%s differs from `kubekms manifests` with the defaults: run `make manifests` (and edit manifests/templates, not deploy/)", f.Name)
		}
	}
}

// TestConsistent renders every distribution with non-default values and
// checks that the files agree with each other and with the options.
func TestConsistent(t *testing.T) {
	for _, distro := range []string{Kubeadm, K3s, RKE2} {
		t.Run(distro, func(t *testing.T) {
			o := Options{Distro: distro, Image: "localhost/kubekms:test", UID: 4242, GID: 4343,
				Socket: "/run/kk/plugin.sock", StateDir: "/srv/kk", MetricsAddr: "127.0.0.1:19595",
				Provider: "kk", Resources: []string{"secrets", "configmaps"}, Timeout: 5 * time.Second}
			d, err := Render(o)
			if err != nil {
				t.Fatal(err)
			}
			var pod corev1.Pod
			if err := yaml.UnmarshalStrict(d.File(StaticPodFile).Content, &pod); err != nil {
				t.Fatalf("static pod: %v", err)
			}
			c := pod.Spec.Containers[0]
			for _, want := range []string{"--listen=unix:///run/kk/plugin.sock", "--socket-group=4343",
				"--key-uri=softkey:///srv/kk/keyring.json", "--state-file=/srv/kk/local-kek-state.json", "--metrics-addr=127.0.0.1:19595"} {
				if !slices.Contains(c.Args, want) {
					t.Errorf("static pod args %q lack %s", c.Args, want)
				}
			}
			if c.Image != o.Image || *pod.Spec.SecurityContext.RunAsUser != 4242 || *pod.Spec.SecurityContext.RunAsGroup != 4343 {
				t.Errorf("static pod image %s uid %d gid %d", c.Image, *pod.Spec.SecurityContext.RunAsUser, *pod.Spec.SecurityContext.RunAsGroup)
			}
			if c.LivenessProbe.HTTPGet.Port.IntValue() != 19595 || c.LivenessProbe.HTTPGet.Host != "127.0.0.1" {
				t.Errorf("liveness probe %+v, want 127.0.0.1:19595", c.LivenessProbe.HTTPGet)
			}
			var entries []string
			for _, l := range strings.Split(string(d.File(TmpfilesFile).Content), "\n") {
				if strings.HasPrefix(l, "d ") {
					entries = append(entries, strings.Join(strings.Fields(l), " "))
				}
			}
			if want := []string{"d /run/kk 0750 4242 4343 -", "d /srv/kk 0700 4242 4343 -"}; !slices.Equal(entries, want) {
				t.Errorf("tmpfiles entries %q, want %q", entries, want)
			}
			if d.File(UnitFile) != nil {
				t.Errorf("a systemd unit was rendered although the state folder is not under /var/lib")
			}
			cfg := validEncryptionConfig(t, d.EncryptionConfig())
			kms := cfg.Resources[0].Providers[0].KMS
			if kms.Endpoint != "unix:///run/kk/plugin.sock" || kms.Name != "kk" || kms.Timeout.Duration != 5*time.Second ||
				!slices.Equal(cfg.Resources[0].Resources, o.Resources) {
				t.Errorf("encryption config %+v %v", kms, cfg.Resources[0].Resources)
			}
			if got := d.APIServerFlags(); !slices.Equal(got, []string{"--encryption-provider-config=" + Defaults(distro).EncConfig}) {
				t.Errorf("apiserver flags %q", got)
			}
			switch distro {
			case K3s, RKE2:
				name := K3sConfigFile
				if distro == RKE2 {
					name = RKE2ConfigFile
				}
				var conf map[string][]string
				if err := yaml.UnmarshalStrict(d.File(name).Content, &conf); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				if !slices.Equal(conf["kube-apiserver-arg+"], []string{"encryption-provider-config=" + Defaults(distro).EncConfig}) {
					t.Errorf("%s: kube-apiserver-arg+ %q", name, conf["kube-apiserver-arg+"])
				}
				if distro == RKE2 && !slices.Contains(conf["kube-apiserver-extra-mount+"], "/run/kk:/run/kk:ro") {
					t.Errorf("%s: the socket folder is not mounted into the apiserver: %q", name, conf["kube-apiserver-extra-mount+"])
				}
				if !strings.HasPrefix(d.File(StaticPodFile).Install, "/var/lib/rancher/"+distro+"/agent/pod-manifests/") {
					t.Errorf("static pod installed as %s", d.File(StaticPodFile).Install)
				}
			case Kubeadm:
				var patch corev1.Pod
				if err := yaml.UnmarshalStrict(d.File(APIServerPatchFile).Content, &patch); err != nil {
					t.Fatal(err)
				}
				ac := patch.Spec.Containers[0]
				if ac.LivenessProbe.HTTPGet.Path != LivenessPath || !slices.Contains(patch.Spec.SecurityContext.SupplementalGroups, 4343) ||
					patch.Spec.Volumes[0].HostPath.Path != "/run/kk" || ac.VolumeMounts[0].MountPath != "/run/kk" {
					t.Errorf("apiserver patch: %+v", patch.Spec)
				}
			}
		})
	}
}

func TestRefusesInconsistentOptions(t *testing.T) {
	for name, o := range map[string]Options{
		"relative socket":      {Socket: "run/kms.sock"},
		"socket in state":      {Socket: "/var/lib/kubekms/kms.sock"},
		"long socket":          {Socket: "/" + strings.Repeat("s", 110)},
		"public metrics":       {MetricsAddr: "0.0.0.0:9595"},
		"no metrics port":      {MetricsAddr: "127.0.0.1"},
		"root group":           {GID: -1},
		"short timeout":        {Timeout: time.Millisecond},
		"unknown distro":       {Distro: "minikube"},
		"resource with colon":  {Resources: []string{"secrets:x"}},
		"image with a newline": {Image: "a\nb"},
	} {
		if _, err := Render(o); err == nil {
			t.Errorf("%s: rendered %+v", name, o)
		}
	}
}

// validEncryptionConfig decodes and validates the file as kube-apiserver does.
func validEncryptionConfig(t *testing.T, b []byte) *apiserver.EncryptionConfiguration {
	t.Helper()
	scheme := runtime.NewScheme()
	install.Install(scheme)
	obj, _, err := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDecoder().Decode(b, nil, nil)
	if err != nil {
		t.Fatalf("apiserver decode: %v\n%s", err, b)
	}
	cfg := obj.(*apiserver.EncryptionConfiguration)
	if errs := validation.ValidateEncryptionConfiguration(cfg, false); len(errs) > 0 {
		t.Fatalf("kube-apiserver would refuse the EncryptionConfiguration: %v", errs.ToAggregate())
	}
	return cfg
}
