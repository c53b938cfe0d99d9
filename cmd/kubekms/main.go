// Command kubekms is a Kubernetes KMS v2 plugin with a local key hierarchy,
// and the operator tools around it.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubekms:", err)
		os.Exit(exitCode(err))
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "kubekms",
		Short:         "Kubernetes KMS v2 plugin with a local key hierarchy, and tools for keys in etcd",
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newServeCmd(), newSoftkeyCmd(), newStatusCmd(), newInventoryCmd(), newDecryptCmd(), newMigrateCmd())
	root.AddCommand(newRotateCmd())
	return root
}

// exitError carries a specific exit code (e.g. inventory's --fail-on-stale).
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func exitCode(err error) int {
	if e, ok := err.(*exitError); ok {
		return e.code
	}
	return 1
}
