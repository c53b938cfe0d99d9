package main

import "github.com/spf13/cobra"

// addToolCmds adds the operator tools.
func addToolCmds(root *cobra.Command) {}
