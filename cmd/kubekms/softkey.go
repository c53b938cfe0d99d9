package main

import (
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/keyservice/softkey"
)

func newSoftkeyCmd() *cobra.Command {
	var uri string
	cmd := &cobra.Command{
		Use:   "softkey",
		Short: "Manage the embedded keyring (the softkey key service)",
		Args:  cobra.NoArgs, // an unknown subcommand is an error, not the help text
		RunE: func(*cobra.Command, []string) error {
			return errors.New("give a subcommand: rotate, list, disable or enable")
		},
	}
	cmd.PersistentFlags().StringVar(&uri, "key-uri", defaultKeyURI(), "keyring: softkey:///abs/path.json")
	path := func() (string, error) {
		if uri == "" {
			return "", errNoKeyURI
		}
		return softkey.ParseURI(uri)
	}

	var all bool
	var version int
	setDisabled := func(disabled bool) func(*cobra.Command, []string) error {
		return func(cmd *cobra.Command, _ []string) error {
			p, err := path()
			if err != nil {
				return err
			}
			if all == cmd.Flags().Changed("version") {
				return errors.New("give exactly one of --version N or --all")
			}
			var ring *softkey.Keyring
			if all {
				ring, err = softkey.SetAllDisabled(p, disabled)
			} else {
				ring, err = softkey.SetDisabled(p, version, disabled)
			}
			if err != nil {
				return err
			}
			return printRing(cmd, ring)
		}
	}
	rotate := &cobra.Command{
		Use:   "rotate",
		Short: "Add a key version and make it primary (a running plugin picks it up; old versions still decrypt)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := path()
			if err != nil {
				return err
			}
			ring, err := softkey.Rotate(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "primary is now %s\n", ring.KeyID(ring.Primary))
			return nil
		},
	}
	list := &cobra.Command{
		Use:   "list",
		Short: "List key versions (never the keys)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := path()
			if err != nil {
				return err
			}
			ring, err := softkey.Load(p)
			if err != nil {
				return err
			}
			return printRing(cmd, ring)
		},
	}
	disable := &cobra.Command{
		Use:   "disable",
		Short: "Revoke key versions: the plugin drops the local KEKs they wrapped and refuses their data",
		Long: `Disable one key version (--version N) or all of them (--all). A disabled version neither wraps
nor unwraps: a running plugin drops the local KEKs it wrapped and refuses their data. The primary
version cannot be disabled alone (every Encrypt would fail while old data still decrypts): rotate
first and disable the old version, or disable all versions to revoke the whole key.`,
		Args: cobra.NoArgs,
		RunE: setDisabled(true),
	}
	enable := &cobra.Command{Use: "enable", Short: "Re-enable key versions", Args: cobra.NoArgs, RunE: setDisabled(false)}
	for _, c := range []*cobra.Command{disable, enable} {
		intVar(c.Flags(), &version, "version", 0, 1, 1<<30, "key version (the primary only with --all, or after a rotation)")
		c.Flags().BoolVar(&all, "all", false, "all versions (disable: revoke the whole key)")
	}
	cmd.AddCommand(rotate, list, disable, enable)
	cmd.AddCommand(newSoftkeyShareCmds(path)...)
	return cmd
}

func printRing(cmd *cobra.Command, ring *softkey.Keyring) error {
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "VERSION\tKEY ID\tCREATED\tSTATE")
	for _, v := range ring.Versions {
		state := "enabled"
		if v.Disabled {
			state = "disabled"
		}
		if v.Version == ring.Primary {
			state += ",primary"
		}
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\n", v.Version, ring.KeyID(v.Version), v.Created.Format(time.RFC3339), state)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(cmd.OutOrStdout(), "fingerprint %s\n", softkey.Fingerprint(ring))
	return err
}
