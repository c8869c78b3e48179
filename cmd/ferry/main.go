// Command ferry is the ferry virtual machine monitor and live-migration
// tool. Each subcommand lives in its own file; they drive internal/vmm (and,
// later, the daemon and migration packages) and own only flag parsing and
// what the user sees.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "ferry:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "ferry",
		Short:         "ferry runs KVM virtual machines and moves them between hosts while they run",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.PersistentFlags().StringVar(&daemonSocket, "daemon", defaultDaemonSocket(), "the host daemon's API socket ($FERRY_DAEMON)")
	root.AddCommand(newRunCmd(), newSaveCmd(), newRestoreCmd(), newInspectCmd(), newStateCmd(),
		newDaemonCmd(), newPsCmd(), newStopCmd(), newConsoleCmd(), newNodesCmd(), newMigrateCmd(), newVMMCmd(), newBenchCmd(), newLabCmd(), newLabAgentCmd())
	return root
}
