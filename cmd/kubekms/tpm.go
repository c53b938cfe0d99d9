package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/keyservice/tpm"
)

func newTPMCmd() *cobra.Command {
	var uri, node string
	cmd := &cobra.Command{
		Use:   "tpm",
		Short: "Provision this node's TPM key (the tpm key service) and print its peers-file line",
	}
	cmd.PersistentFlags().StringVar(&uri, "key-uri", "", "tpm:///dev/tpmrm0?handle=0x81000100-0x8100010f[&pcrs=7]")
	host, _ := os.Hostname()
	cmd.PersistentFlags().StringVar(&node, "node", host, "node label in the peers-file line")
	_ = cmd.MarkPersistentFlagRequired("key-uri")
	provision := &cobra.Command{
		Use:   "provision",
		Short: "Create a new TPM key at the next free handle of the range (bound to the URI's PCRs); again = a rotation",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			line, err := tpm.Provision(cmd.Context(), uri, node)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), line)
			return nil
		},
	}
	public := &cobra.Command{
		Use:   "public",
		Short: "Print the peers-file line of this node's current TPM key",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			line, err := tpm.PublicLine(cmd.Context(), uri, node)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), line)
			return nil
		},
	}
	cmd.AddCommand(provision, public)
	return cmd
}
