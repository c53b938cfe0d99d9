package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kubekms/kubekms/convergence"
)

// kubeFlags name the cluster's API (client-go's rules).
type kubeFlags struct {
	kubeconfig, context string
}

func (f *kubeFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
	cmd.Flags().StringVar(&f.context, "context", "", "kubeconfig context (default: the current one)")
}

// load follows client-go's rules: --kubeconfig, else $KUBECONFIG, else
// ~/.kube/config, else the in-cluster service account.
func (f *kubeFlags) load(agent string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = f.kubeconfig
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules,
		&clientcmd.ConfigOverrides{CurrentContext: f.context}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	cfg.Timeout = 60 * time.Second
	cfg.UserAgent = "kubekms-" + agent + "/" + version
	return cfg, nil
}

// clusterFlags select how the apiservers are found and read.
type clusterFlags struct {
	kube       kubeFlags
	apiservers []string
	provider   string
}

func (f *clusterFlags) add(cmd *cobra.Command, withKube bool) {
	if withKube {
		f.kube.add(cmd)
	}
	cmd.Flags().StringSliceVar(&f.apiservers, "apiservers", []string{"endpoints"},
		`how to reach every kube-apiserver: "endpoints" (the kubernetes Service's EndpointSlices), "kubeconfig" (only the kubeconfig's server), or their URLs (https://10.0.0.1:6443,...)`)
	cmd.Flags().StringVar(&f.provider, "provider", "", "the KMS v2 provider name to check (default: the one the apiservers write with)")
}

// observer builds the convergence observer; cfg is the kubeconfig's.
func (f *clusterFlags) observer(cfg *rest.Config) (*convergence.Observer, error) {
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	o := &convergence.Observer{Kube: kube, Config: cfg, Provider: f.provider}
	switch {
	case len(f.apiservers) == 1 && f.apiservers[0] == "endpoints":
		o.FromEndpoints = true
	case len(f.apiservers) == 1 && f.apiservers[0] == "kubeconfig":
	default:
		for _, u := range f.apiservers {
			u = strings.TrimSuffix(strings.TrimSpace(u), "/")
			if !strings.HasPrefix(u, "https://") && !strings.HasPrefix(u, "http://") {
				return nil, fmt.Errorf("--apiservers %q: want endpoints, kubeconfig, or https:// URLs", u)
			}
			o.URLs = append(o.URLs, u)
		}
	}
	return o, nil
}

// pluginKeyIDs asks each plugin's Status for its key_id, by hash.
func pluginKeyIDs(ctx context.Context, endpoints []string, timeout time.Duration) (map[string]string, error) {
	out := map[string]string{}
	for _, ep := range endpoints {
		id, err := currentKeyID(ctx, ep, timeout)
		if errors.Is(err, convergence.ErrWritesStopped) {
			continue // the report names an apiserver whose plugin stopped writing
		}
		if err != nil {
			return nil, fmt.Errorf("plugin %s: %w", ep, err)
		}
		out[convergence.HashKeyID(id)] = id
	}
	return out, nil
}

func printClusterReport(w io.Writer, rep *convergence.Report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "APISERVER\tHOSTNAME\tURL\tPROVIDER\tKEY_ID_HASH\tKEY_ID\tSINCE\tKMS CHECK")
	for _, a := range rep.Apiservers {
		kms := "ok"
		switch {
		case a.WritesStopped:
			kms = "failing (writes stopped)"
		case !a.KMSHealthy:
			kms = "failing"
		}
		since := "-"
		if !a.Since.IsZero() {
			since = fmt.Sprintf("%s (%s ago)", a.Since.Local().Format(time.RFC3339), rep.At.Sub(a.Since).Round(time.Second))
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", dash(a.Identity), dash(a.Hostname), a.URL, dash(a.Provider),
			dash(shortHash(a.KeyIDHash)), dash(a.KeyID), since, kms)
	}
	tw.Flush()
	for _, a := range rep.Apiservers {
		if a.Reason != "" {
			fmt.Fprintf(w, "%s: %s\n", a.Name(), a.Reason)
		}
	}
	live := 0
	for _, l := range rep.Leases {
		if !l.Expired(rep.At) {
			live++
		}
	}
	if rep.Agreed {
		fmt.Fprintf(w, "agreement: yes: all %d apiserver(s) (%d live identity lease(s)) write under %s\n",
			len(rep.Apiservers), live, keyName(rep.KeyIDHash, rep.KeyID))
	} else {
		fmt.Fprintf(w, "agreement: no (%d apiserver(s) read, %d live identity lease(s))\n", len(rep.Apiservers), live)
	}
	for _, p := range rep.Problems {
		fmt.Fprintln(w, "problem:", p)
	}
	for _, p := range rep.Warnings {
		fmt.Fprintln(w, "warning:", p)
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func shortHash(h string) string {
	if len(h) > 7+16 {
		return h[:7+16]
	}
	return h
}

func keyName(hash, keyID string) string {
	if keyID != "" {
		return fmt.Sprintf("%s (%s)", keyID, shortHash(hash))
	}
	return hash
}

// waitProgress draws one line per observation on a terminal: how many
// apiservers write under the target.
func waitProgress(cmd *cobra.Command, what string) (func(*convergence.Report, string), func()) {
	if !isTerminal(cmd.ErrOrStderr()) {
		return nil, func() {}
	}
	var bar *progressbar.ProgressBar
	update := func(rep *convergence.Report, target string) {
		n, live, done := len(rep.Apiservers), 0, 0
		for _, l := range rep.Leases {
			if !l.Expired(rep.At) {
				live++
			}
		}
		n = max(n, live)
		for _, a := range rep.Apiservers {
			if a.KeyIDHash != "" && (a.KeyIDHash == target || (target == "" && rep.Agreed)) {
				done++
			}
		}
		if bar == nil {
			bar = progressbar.NewOptions(max(n, 1), progressbar.OptionSetWriter(cmd.ErrOrStderr()),
				progressbar.OptionShowCount(), progressbar.OptionSetItsString("apiservers"),
				progressbar.OptionClearOnFinish(), progressbar.OptionSetElapsedTime(true))
		}
		bar.ChangeMax(max(n, 1))
		bar.Describe(what)
		_ = bar.Set(done)
	}
	return update, func() {
		if bar != nil {
			_ = bar.Finish()
		}
	}
}

// notConverged turns a convergence wait failure into the tools' exit code 2
// with the laggards named.
func notConverged(err error, hint string) error {
	var nc *convergence.NotConvergedError
	if errors.As(err, &nc) {
		return &exitError{code: 2, err: fmt.Errorf("%w\n%s", err, hint)}
	}
	return err
}
