package main

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/manifests"
)

func newManifestsCmd() *cobra.Command {
	def := manifests.Defaults(manifests.Kubeadm)
	var o manifests.Options
	var out, only string
	cmd := &cobra.Command{
		Use:   "manifests",
		Short: "Render a consistent deployment: static pod or systemd unit, EncryptionConfiguration, kube-apiserver settings",
		Long: `Renders every file a control-plane node needs from one set of flags, so that paths, uid, group
and names agree: the static pod with its host folders (tmpfiles) or the systemd unit, the
EncryptionConfiguration, and the kube-apiserver settings of the distribution (kubeadm: a patch to
merge, the kubeadm configuration and a kubeadm patch for the probes; k3s and RKE2: a config.yaml.d
drop-in). kube-apiserver's liveness and startup probes exclude the KMS check (` + manifests.LivenessPath + `).

Without --out the files are printed one after the other, each under a header line; --file prints
one file alone. deploy/ in the repository is this command's output with the defaults.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			d, err := manifests.Render(o)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if only != "" {
				f := d.File(only)
				if f == nil {
					names := make([]string, len(d.Files))
					for i, f := range d.Files {
						names[i] = f.Name
					}
					return fmt.Errorf("--file %q: not rendered for %s (files: %s)", only, d.Options.Distro, strings.Join(names, ", "))
				}
				_, err := w.Write(f.Content)
				return err
			}
			if out != "" {
				if err := d.Write(out); err != nil {
					return err
				}
				tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "FILE\tINSTALL AS\tMODE")
				for _, f := range d.Files {
					install := f.Install
					if install == "" {
						install = "(merge by hand)"
					}
					fmt.Fprintf(tw, "%s\t%s\t%04o\n", f.Name, install, f.Mode)
				}
				return tw.Flush()
			}
			for _, f := range d.Files {
				fmt.Fprintf(w, "# ==> %s (install as %s) <==\n", f.Name, f.Install)
				if _, err := w.Write(f.Content); err != nil {
					return err
				}
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&o.Distro, "distro", manifests.Kubeadm, "kubeadm, k3s or rke2")
	fl.StringVar(&o.Image, "image", def.Image, "the static pod's image")
	fl.Int64Var(&o.UID, "uid", def.UID, "the static pod's user")
	fl.Int64Var(&o.GID, "gid", def.GID, "the static pod's group, which owns the socket")
	fl.StringVar(&o.Socket, "socket", def.Socket, "the unix socket (kubekms serve --listen, the EncryptionConfiguration's endpoint)")
	fl.StringVar(&o.StateDir, "state-dir", def.StateDir, "folder of the keyring (softkey) and the local KEK state")
	fl.StringVar(&o.KeyURI, "key-uri", "", "key service (default: a softkey keyring in --state-dir)")
	fl.StringVar(&o.ClusterName, "cluster-name", def.ClusterName, "bound into wrapped keys by pkcs11 and awskms: set once, never change")
	fl.StringVar(&o.MetricsAddr, "metrics-addr", def.MetricsAddr, "loopback address of metrics and probes")
	fl.StringVar(&o.Provider, "provider-name", def.Provider, "the EncryptionConfiguration's provider name (part of every stored value: never rename)")
	fl.StringSliceVar(&o.Resources, "resources", def.Resources, "resources the apiserver encrypts")
	fl.DurationVar(&o.Timeout, "timeout", def.Timeout, "the apiserver's per-call timeout")
	fl.StringVar(&o.EncConfig, "encryption-config", "", "where the EncryptionConfiguration goes on the node (default: by --distro)")
	fl.StringVar(&o.PodManifests, "pod-manifests", "", "the kubelet's static pod folder (default: by --distro)")
	fl.StringVarP(&out, "out", "o", "", "write the files into this folder")
	fl.StringVar(&only, "file", "", "print only this file (e.g. encryption-config.yaml)")
	return cmd
}
