// Command kubekms is a Kubernetes KMS v2 plugin with a local key hierarchy,
// and the operator tools around it.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	go func() {
		// The first SIGINT/SIGTERM cancels ctx (a graceful stop); after it
		// the default action applies again, so a second one always ends
		// the process.
		<-ctx.Done()
		stop()
	}()
	err := run(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubekms:", err)
		os.Exit(exitCode(err))
	}
}

// run executes the command. A panic is a bug: it is reported with its stack
// and exits 1, not Go's 2, which some commands use for a finding (stale
// objects, objects that failed).
func run(ctx context.Context) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("internal error (a bug, please report it): %v\n%s", r, debug.Stack())
		}
	}()
	return newRootCmd().ExecuteContext(ctx)
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
	root.AddCommand(newManifestsCmd())
	root.AddCommand(newTPMCmd())
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
