package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope/kmsclient"
	"github.com/kubekms/kubekms/plugin"
)

// statusReport is what `kubekms status` measures.
type statusReport struct {
	Endpoint      string   `json:"endpoint"`
	Version       string   `json:"version"`
	Healthz       string   `json:"healthz"`
	KeyID         string   `json:"key_id"`
	StatusMillis  float64  `json:"status_ms"`
	EncryptMillis float64  `json:"encrypt_ms,omitempty"`
	DecryptMillis float64  `json:"decrypt_ms,omitempty"`
	UID           string   `json:"uid,omitempty"`
	Problems      []string `json:"problems"`
}

func newStatusCmd() *cobra.Command {
	var plugins []string
	var output string
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
			rep, err := checkPlugin(cmd.Context(), plugins[0], timeout, !noRoundTrip)
			if err != nil {
				return err
			}
			if output == "json" {
				if err := writeJSON(cmd.OutOrStdout(), rep); err != nil {
					return err
				}
			} else {
				printStatus(cmd, rep)
			}
			if len(rep.Problems) > 0 {
				return &exitError{code: 2, err: fmt.Errorf("%d problem(s) found", len(rep.Problems))}
			}
			return nil
		},
	}
	fl := cmd.Flags()
	addPluginFlag(cmd, &plugins, []string{defaultListen()}, "KMS v2 plugin endpoint(s): unix:///path.sock (with --cluster: those whose key_ids to show readable)")
	fl.DurationVar(&timeout, "timeout", kmsclient.DefaultTimeout, "per-call timeout (the apiserver's default is 3s)")
	fl.BoolVar(&noRoundTrip, "status-only", false, "only call Status (no Encrypt/Decrypt)")
	fl.StringVarP(&output, "output", "o", "text", "output: text or json")
	fl.BoolVar(&cluster, "cluster", false, "report which key_id every kube-apiserver writes under, and whether they agree")
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

func checkPlugin(ctx context.Context, endpoint string, timeout time.Duration, roundTrip bool) (*statusReport, error) {
	c, err := kmsclient.Dial(endpoint, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	rep := &statusReport{Endpoint: endpoint, Problems: []string{}}
	problem := func(format string, args ...any) { rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...)) }

	start := time.Now()
	st, err := c.Status(ctx)
	rep.StatusMillis = millis(time.Since(start))
	if err != nil {
		return nil, fmt.Errorf("status call: %w", err)
	}
	rep.Version, rep.Healthz, rep.KeyID = st.Version, st.Healthz, st.KeyID
	if st.Version != "v2" && st.Version != "v2beta1" {
		problem("version is %q; the apiserver wants v2 (or v2beta1)", st.Version)
	}
	if st.Healthz != "ok" {
		problem("healthz is %q, not \"ok\"", st.Healthz)
	}
	if st.KeyID == "" || len(st.KeyID) > 1024 {
		problem("key_id is %d bytes; the apiserver wants 1..1024", len(st.KeyID))
	}
	if !roundTrip || st.Healthz != "ok" {
		return rep, nil
	}
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		return nil, err
	}
	rep.UID = uuid.NewString()
	start = time.Now()
	enc, err := c.Encrypt(ctx, rep.UID, seed)
	rep.EncryptMillis = millis(time.Since(start))
	if err != nil {
		problem("Encrypt: %v", err)
		return rep, nil
	}
	if err := plugin.CheckEncryptAnswer(enc.Ciphertext, enc.KeyID, enc.Annotations); err != nil {
		problem("Encrypt answer: %v", err)
	}
	if enc.KeyID != st.KeyID {
		problem("Encrypt's key_id %q differs from Status's %q: the apiserver would refuse the new seed", enc.KeyID, st.KeyID)
	}
	start = time.Now()
	plain, err := c.Decrypt(ctx, rep.UID, &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID, Annotations: enc.Annotations})
	rep.DecryptMillis = millis(time.Since(start))
	switch {
	case err != nil:
		problem("Decrypt: %v", err)
	case !bytes.Equal(plain, seed):
		problem("Decrypt returned different bytes than were encrypted")
	}
	return rep, nil
}

func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func printStatus(cmd *cobra.Command, r *statusReport) {
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "endpoint:  %s\nversion:   %s\nhealthz:   %s\nkey_id:    %s\n", r.Endpoint, r.Version, r.Healthz, r.KeyID)
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
