package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/envelope/kmsclient"
	"github.com/kubekms/kubekms/keyservice/opaqueid"
	"github.com/kubekms/kubekms/plugincheck"
)

func newStatusCmd() *cobra.Command {
	var plugins []string
	var output, opaqueSecret string
	var timeout time.Duration
	var noRoundTrip, cluster bool
	var cf clusterFlags
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Check any KMS v2 plugin (Status, one Encrypt/Decrypt round trip, the apiserver's limits), or with --cluster which key_id every apiserver writes under",
		Long: `Checks a KMS v2 plugin (kubekms or any other) the way kube-apiserver uses it: Status, then one
Encrypt and Decrypt of a random 32-byte seed with a fresh uid, timing each, and the limits the
apiserver enforces on the answers. Exit code 0 when all is well, 2 when the plugin answered but
is unhealthy or broke a rule, 1 when it could not be reached.

With --cluster it reports instead, for every kube-apiserver of the cluster, which KMS key_id it
writes new objects under: the apiserver identity Leases (kube-system) say how many there are;
each apiserver's /metrics (apiserver_envelope_encryption_key_id_hash_*: the sha256 of the key_id
its last Status poll returned and of the last one it wrote under) and its /readyz KMS check say
what it uses. --apiservers says how to reach them. The key_id is shown readable when one of the
--plugin endpoints reports it. Reading /readyz runs an apiserver's Status poll when its last one
is older than 20 s. Exit code 0 when every apiserver writes under the same key_id, 2 when not
(each reason printed), 1 on errors. Needs get on /metrics (e.g. the system:monitoring group).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return fmt.Errorf("-o %q: want text or json", output)
			}
			if cluster {
				return runClusterStatus(cmd, &cf, plugins, timeout, output)
			}
			if len(plugins) != 1 {
				return errors.New("give one --plugin (several only with --cluster)")
			}
			rep, err := plugincheck.Check(cmd.Context(), plugins[0], timeout, !noRoundTrip)
			if err != nil {
				return err
			}
			out := statusOutput{Report: rep}
			if opaqueSecret != "" {
				codec, err := opaqueid.ReadSecretFile(opaqueSecret)
				if err != nil {
					return err
				}
				if n := codec.Name(rep.KeyID); n != rep.KeyID {
					out.KeyName = n
				}
			}
			if output == "json" {
				if err := writeJSON(cmd.OutOrStdout(), out); err != nil {
					return err
				}
			} else {
				printStatus(cmd, out)
			}
			if len(rep.Problems) > 0 {
				return &exitError{code: 2, err: fmt.Errorf("%d problem(s) found", len(rep.Problems))}
			}
			return nil
		},
	}
	fl := cmd.Flags()
	addPluginFlag(cmd, &plugins, []string{defaultListen()}, "KMS v2 plugin endpoint(s): unix:///path.sock (with --cluster: those whose key_ids to show readable)")
	durationVar(fl, &timeout, "timeout", kmsclient.DefaultTimeout, "per-call timeout (the apiserver's default is 3s)")
	fl.BoolVar(&noRoundTrip, "status-only", false, "only call Status (no Encrypt/Decrypt)")
	fl.StringVarP(&output, "output", "o", "text", "output: text or json")
	fl.BoolVar(&cluster, "cluster", false, "report which key_id every kube-apiserver writes under, and whether they agree")
	fl.StringVar(&opaqueSecret, "opaque-key-ids", "", "the plugin's opaque key ID secret file: show the readable key ID behind an opaque one")
	cf.add(cmd, true)
	return cmd
}

// addPluginFlag adds --plugin (repeatable) and its deprecated alias --endpoint.
func addPluginFlag(cmd *cobra.Command, to *[]string, def []string, usage string) {
	cmd.Flags().StringSliceVar(to, "plugin", def, usage)
	cmd.Flags().StringSliceVar(to, "endpoint", def, "deprecated: use --plugin")
	_ = cmd.Flags().MarkDeprecated("endpoint", "use --plugin, the flag every kubekms tool uses for a plugin")
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func runClusterStatus(cmd *cobra.Command, cf *clusterFlags, plugins []string, timeout time.Duration, output string) error {
	ctx := cmd.Context()
	cfg, err := cf.kube.load("status")
	if err != nil {
		return err
	}
	o, err := cf.observer(cfg)
	if err != nil {
		return err
	}
	// Plugins are optional here, only for readable key_ids: the default
	// socket is asked only if it exists.
	o.KeyIDs = map[string]string{}
	given := cmd.Flags().Changed("plugin") || cmd.Flags().Changed("endpoint")
	for _, ep := range plugins {
		if path, ok := strings.CutPrefix(ep, "unix://"); !given && (!ok || !fileExists(path)) {
			continue
		}
		ids, err := pluginKeyIDs(ctx, []string{ep}, timeout)
		if err != nil {
			return err
		}
		maps.Copy(o.KeyIDs, ids)
	}
	rep, err := o.Observe(ctx)
	if err != nil {
		return err
	}
	if output == "json" {
		err = writeJSON(cmd.OutOrStdout(), rep)
	} else {
		printClusterReport(cmd.OutOrStdout(), rep)
	}
	if err != nil {
		return err
	}
	if !rep.Agreed {
		return &exitError{code: 2, err: errors.New("the apiservers do not all write under the same key_id")}
	}
	return nil
}

// statusOutput is one plugin's check, with the readable key ID behind an
// opaque one (--opaque-key-ids).
type statusOutput struct {
	*plugincheck.Report
	KeyName string `json:"key_name,omitempty"`
}

func printStatus(cmd *cobra.Command, r statusOutput) {
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "endpoint:  %s\nversion:   %s\nhealthz:   %s\nkey_id:    %s\n", r.Endpoint, r.Version, r.Healthz, r.KeyID)
	if r.KeyName != "" {
		fmt.Fprintf(w, "key name:  %s\n", r.KeyName)
	}
	fmt.Fprintf(w, "Status:    %.2f ms\n", r.StatusMillis)
	if r.UID != "" {
		fmt.Fprintf(w, "Encrypt:   %.2f ms\nDecrypt:   %.2f ms\nuid:       %s\n", r.EncryptMillis, r.DecryptMillis, r.UID)
	}
	if len(r.Problems) == 0 {
		fmt.Fprintln(w, "result:    ok")
		return
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "problem:   %s\n", p)
	}
}
