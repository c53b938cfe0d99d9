package main

import (
	"errors"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/decrypt"
)

func newDecryptCmd() *cobra.Command {
	var src etcdFlags
	var rf readerFlags
	var outputDir string
	var resource, namespace, name string
	var allowTerminal bool
	cmd := &cobra.Command{
		Use:   "decrypt",
		Short: "Recover objects from an etcd snapshot as YAML manifests (offline disaster recovery)",
		Long: `Decrypts kube-apiserver's objects from an etcd snapshot and writes them as Kubernetes YAML
manifests into --output-dir. What decrypts:
  --plugin ENDPOINT       a KMS v2 plugin with the cluster's keys (kubekms or any other);
  --key-uri URI           the key service itself, opened in this process: no plugin needs to
                          run (kubekms's own data; --cluster-name as the plugin had it);
  --encryption-config F   the apiserver's EncryptionConfiguration: every provider in it
                          (aescbc, aesgcm, secretbox, identity, KMS v1 and v2) read by the
                          apiserver's own transformers, as the apiserver would; its KMS
                          providers dial the endpoints in the file unless --plugin NAME=ENDPOINT
                          or --key-uri NAME=URI (served in-process) says otherwise.
Layout: 
<dir>/<resource>/<namespace or _cluster>/<name>.yaml, folders 0700, files 0600. With
--output-dir - all manifests go to stdout as one multi-document YAML, which is refused when
stdout is a terminal unless --allow-terminal.

Built-in kinds are decoded from the protobuf storage encoding with client-go's scheme; custom
resources (JSON) pass through. Objects that cannot be recovered (a missing key version, a
tampered value, an unsupported provider) are listed at the end and skipped. Exit code 0 when
everything selected was written, 2 when some objects failed, 1 on errors.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if src.snapshot == "" {
				return errors.New("--snapshot is required")
			}
			if outputDir == "" {
				return errors.New("--output-dir is required (a new directory, or - for stdout)")
			}
			var sink decrypt.Sink
			if outputDir == "-" {
				if isTerminal(cmd.OutOrStdout()) && !allowTerminal {
					return errors.New("refusing to print decrypted objects to a terminal: use --output-dir DIR, redirect stdout, or pass --allow-terminal")
				}
				sink = decrypt.StreamSink{W: cmd.OutOrStdout()}
			} else {
				d, err := decrypt.NewDirSink(outputDir)
				if err != nil {
					return err
				}
				sink = d
			}
			reader, err := rf.openFor(cmd)
			if err != nil {
				return err
			}
			defer reader.close()
			source, err := src.open(ctx)
			if err != nil {
				return err
			}
			defer source.Close()

			progress, finish := newProgress(cmd, "decrypt")
			if outputDir == "-" {
				progress = nil // the bar would interleave with the manifests
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "reading with %s\n", reader.what)
			sum, err := decrypt.Run(ctx, source, reader.Opener, sink, decrypt.Options{
				Prefix: src.prefix, Resource: resource, Namespace: namespace, Name: name, Progress: progress,
			})
			finish()
			if err != nil {
				return err
			}
			printSummary(cmd.ErrOrStderr(), sum)
			if len(sum.Failures) > 0 {
				return &exitError{code: 2, err: fmt.Errorf("%d of %d selected object(s) could not be recovered", len(sum.Failures), sum.Selected)}
			}
			if sum.Selected == 0 {
				return &exitError{code: 2, err: errors.New("no object matched the selection")}
			}
			return nil
		},
	}
	src.add(cmd, false)
	rf.add(cmd, "KMS v2 plugin endpoint (unix:///path.sock) with the cluster's keys; with --encryption-config: [PROVIDER=]ENDPOINT for a KMS provider")
	cmd.Flags().StringVar(&outputDir, "output-dir", "", "directory for the manifests (created 0700), or - for stdout")
	cmd.Flags().StringVar(&resource, "resource", "", "only this resource (e.g. secrets, widgets.example.com)")
	cmd.Flags().StringVarP(&namespace, "namespace", "n", "", "only this namespace")
	cmd.Flags().StringVar(&name, "name", "", "only objects with this name")
	cmd.Flags().BoolVar(&allowTerminal, "allow-terminal", false, "allow --output-dir - to print decrypted objects on a terminal")
	return cmd
}

// printSummary reports what was written and, per reason, what was not.
func printSummary(w io.Writer, sum *decrypt.Summary) {
	calls := "n/a (the apiserver's transformers)"
	if sum.PluginCalls >= 0 {
		calls = fmt.Sprint(sum.PluginCalls)
	}
	fmt.Fprintf(w, "selected %d, written %d, failed %d, plugin Decrypt calls %s\n",
		sum.Selected, sum.Written, len(sum.Failures), calls)
	if len(sum.Failures) == 0 {
		return
	}
	byReason := sum.ByReason()
	fmt.Fprintln(w, "\nNot recovered:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, r := range sum.Reasons() {
		fmt.Fprintf(tw, "  %s\t%d\n", r, byReason[r])
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tREASON\tERROR")
	for _, f := range sum.Failures {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Key, f.Reason, f.Error)
	}
	tw.Flush()
}
