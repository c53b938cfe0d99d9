package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/kubekms/kubekms/keyservice/softkey"
)

// newSoftkeyShareCmds are the commands that keep one keyring on several
// control-plane nodes: fingerprint, export, import, stage, promote.
func newSoftkeyShareCmds(path func() (string, error)) []*cobra.Command {
	fingerprint := &cobra.Command{
		Use:   "fingerprint",
		Short: "Print the keyring's fingerprint: equal on two nodes exactly when they hold the same keyring",
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
			fmt.Fprintf(cmd.OutOrStdout(), "%s  ring %s, primary v%d, %d version(s)\n",
				softkey.Fingerprint(ring), ring.RingID, ring.Primary, len(ring.Versions))
			return nil
		},
	}

	var to string
	export := &cobra.Command{
		Use:   "export",
		Short: "Write the keyring (with its keys) for `softkey import` on another control-plane node",
		Long: `Writes the keyring, keys included, to --to (a new file, mode 0600) or to stdout (--to -,
refused on a terminal), e.g.: kubekms softkey export --to - | ssh node2 kubekms softkey import --from -
The fingerprint goes to stderr: compare it with what import prints on the other node.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := path()
			if err != nil {
				return err
			}
			if to == "" {
				return errors.New("--to is required (a new file, or - for stdout)")
			}
			data, err := softkey.Export(p)
			if err != nil {
				return err
			}
			if to == "-" {
				if isTerminal(cmd.OutOrStdout()) {
					return errors.New("refusing to print keys on a terminal: redirect stdout or give --to FILE")
				}
				if _, err := cmd.OutOrStdout().Write(data); err != nil {
					return err
				}
			} else if err := writeNewFile(to, data); err != nil {
				return err
			}
			ring, _ := softkey.Load(p)
			fmt.Fprintf(cmd.ErrOrStderr(), "exported keyring %s, fingerprint %s\n", ring.RingID, softkey.Fingerprint(ring))
			return nil
		},
	}
	export.Flags().StringVar(&to, "to", "", "file to write (created 0600, must not exist), or - for stdout")

	var from, expect string
	imp := &cobra.Command{
		Use:   "import",
		Short: "Make this node's keyring equal to one exported on another node (never loses a key)",
		Long: `Reads a keyring written by softkey export (--from FILE, or - for stdin) and makes this node's
keyring equal to it, under the keyring's lock; a running plugin picks it up. Refused (nothing
changed) when it would lose a key: another keyring (ring ID), an export that lacks a version this
node has, or a version whose key differs (the keyrings were rotated independently). Creates the
keyring (0600) if this node has none. --expect-fingerprint refuses an export whose fingerprint is
not the one the exporting node printed.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := path()
			if err != nil {
				return err
			}
			var data []byte
			switch from {
			case "":
				return errors.New("--from is required (a file, or - for stdin)")
			case "-":
				data, err = io.ReadAll(io.LimitReader(cmd.InOrStdin(), 16<<20))
			default:
				data, err = os.ReadFile(from)
			}
			if err != nil {
				return fmt.Errorf("read export: %w", err)
			}
			if expect != "" {
				if err := softkey.CheckFingerprint(data, expect); err != nil {
					return err
				}
			}
			res, err := softkey.Import(p, data)
			if err != nil {
				return fmt.Errorf("import into %s: %w", p, err)
			}
			w := cmd.OutOrStdout()
			switch {
			case res.Created:
				fmt.Fprintf(w, "created keyring %s with version(s) %v, primary v%d\n", p, res.Added, res.Primary)
			case len(res.Added) == 0 && len(res.StateChanged) == 0 && res.Primary == res.PrimaryBefore:
				fmt.Fprintln(w, "already up to date")
			default:
				fmt.Fprintf(w, "added version(s) %v, enabled/disabled %v, primary v%d (was v%d)\n", res.Added, res.StateChanged, res.Primary, res.PrimaryBefore)
			}
			fmt.Fprintf(w, "fingerprint %s\n", res.Fingerprint)
			return nil
		},
	}
	imp.Flags().StringVar(&from, "from", "", "the exported keyring: a file, or - for stdin")
	imp.Flags().StringVar(&expect, "expect-fingerprint", "", "refuse an export with another fingerprint")

	stage := &cobra.Command{
		Use:   "stage",
		Short: "Add a key version that is not yet primary (step 1 of a rotation on several nodes)",
		Long: `Adds a key version without making it primary: nothing is wrapped under it yet. The rotation of a
keyring shared by several control-plane nodes: stage on one node, export/import it to every node
(compare the fingerprints), start kubekms rotate (without --key-uri: it waits for the rotation,
then converges, migrates and verifies), and promote it on every node. While the nodes are promoted
one after another each can read what the others write, because all hold the new version already.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := path()
			if err != nil {
				return err
			}
			ring, n, err := softkey.Stage(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "staged version %d (primary is still v%d), fingerprint %s\n", n, ring.Primary, softkey.Fingerprint(ring))
			return nil
		},
	}

	var version int
	promote := &cobra.Command{
		Use:   "promote",
		Short: "Make a staged version primary (after every node holds it)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p, err := path()
			if err != nil {
				return err
			}
			if version == 0 {
				return errors.New("--version is required")
			}
			ring, err := softkey.Promote(p, version)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "primary is now %s, fingerprint %s\n", ring.KeyID(ring.Primary), softkey.Fingerprint(ring))
			return nil
		},
	}
	intVar(promote.Flags(), &version, "version", 0, 1, 1<<30, "the version to make primary")
	return []*cobra.Command{fingerprint, export, imp, stage, promote}
}

// writeNewFile writes data to a new file of mode 0600 (never over one).
func writeNewFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}
