package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-vmm/ferry/internal/control"
	"github.com/ferry-vmm/ferry/internal/snapshot"
	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/units"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

func newSaveCmd() *cobra.Command {
	var vmName, socket, out string
	var compress, resume, asJSON bool
	cmd := &cobra.Command{
		Use:   "save --vm NAME --out FILE",
		Short: "Pause a running VM at a consistent point and write its full state and memory to FILE",
		Example: `  ferry save --vm web --out web.ferry             # save and stop
  ferry save --vm web --out web.ferry --resume    # save and keep running
  ferry save --socket /run/ferry/web.sock --out web.ferry --compress`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out FILE is required")
			}
			sock, err := pickSocket(vmName, socket)
			if err != nil {
				return err
			}
			abs, err := filepath.Abs(out)
			if err != nil {
				return err
			}
			req := control.Request{Op: "save", Path: abs, Resume: resume}
			req.Compress = compress
			resp, err := control.Call(sock, req, 0)
			if err != nil {
				return fmt.Errorf("save: %w", err)
			}
			r := resp.Save
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(r)
			}
			after := "VM stopped"
			if r.Resumed {
				after = "VM resumed"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "saved %s: %d vCPUs, %s memory\n", r.Path, r.VCPUs, units.FormatBytes(r.MemoryBytes))
			fmt.Fprintf(cmd.OutOrStdout(), "  guest paused   %s (Δs)\n", r.Paused.Round(time.Microsecond))
			fmt.Fprintf(cmd.OutOrStdout(), "  bytes written  %s (%d)\n", units.FormatBytes(r.BytesWritten), r.BytesWritten)
			fmt.Fprintf(cmd.OutOrStdout(), "  pages written  %d, zero pages skipped %d, compressed %v\n", r.PagesWritten, r.PagesSkipped, r.Compressed)
			fmt.Fprintf(cmd.OutOrStdout(), "  %s\n", after)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&vmName, "vm", "", "name of the VM (from ferry run --name)")
	fl.StringVar(&socket, "socket", "", "control socket of the VM (instead of --vm)")
	fl.StringVar(&out, "out", "", "state file to write")
	fl.BoolVar(&compress, "compress", false, "compress memory with zstd")
	fl.BoolVar(&resume, "resume", false, "resume the VM after saving (default: stop it)")
	fl.BoolVar(&asJSON, "json", false, "print the report as JSON")
	return cmd
}

func pickSocket(name, socket string) (string, error) {
	switch {
	case name != "" && socket != "":
		return "", errors.New("give --vm or --socket, not both")
	case socket != "":
		return socket, nil
	case name != "":
		return control.SocketPath(name), nil
	}
	return "", errors.New("which VM? give --vm NAME or --socket PATH")
}

func newRestoreCmd() *cobra.Command {
	var name string
	var verbose bool
	cmd := &cobra.Command{
		Use:   "restore FILE",
		Short: "Continue a saved VM in this process, console on stdio (Ctrl-C stops it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			logger := newLogger(verbose)
			vm, rep, err := snapshot.RestoreFile(args[0], vmm.Config{Console: cmd.OutOrStdout(), Logger: logger})
			if err != nil {
				return err
			}
			defer vm.Close()
			for _, w := range rep.Warnings {
				fmt.Fprintf(cmd.ErrOrStderr(), "ferry: warning: %s\n", w)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "ferry: restored %s in %s (Δr): %d vCPUs, %s, %d pages loaded\n",
				rep.Path, rep.Duration.Round(time.Microsecond), rep.VCPUs, units.FormatBytes(rep.MemoryBytes), rep.PagesLoaded)
			return runForeground(cmd, vm, name, logger)
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "VM name for its control socket (default vm-PID)")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "log VMM events to stderr")
	return cmd
}

func newInspectCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect FILE",
		Short: "Show everything a state file holds: registers, MSRs, LAPIC, irqchip, timers, devices, memory summary",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			m, sum, warnings, err := loadState(args[0])
			if err != nil {
				return err
			}
			rep := state.Describe(m)
			rep.AddMemory(sum)
			for _, w := range warnings {
				fmt.Fprintf(cmd.ErrOrStderr(), "ferry: warning: %s\n", w)
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(rep)
			}
			return rep.WriteText(cmd.OutOrStdout())
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	return cmd
}

// loadState reads a whole state file, hashing memory instead of keeping it.
func loadState(path string) (*state.Machine, state.MemorySummary, []string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, state.MemorySummary{}, nil, err
	}
	defer f.Close()
	r, err := state.NewReader(bufio.NewReaderSize(f, 1<<20), state.ReaderOptions{RequireEOF: true})
	if err != nil {
		return nil, state.MemorySummary{}, nil, fmt.Errorf("%s: %w", path, err)
	}
	var m state.Machine
	warnings, err := r.ReadAll(&m, func(uint64, []byte) error { return nil })
	if err != nil {
		return nil, state.MemorySummary{}, nil, fmt.Errorf("%s: %w", path, err)
	}
	sum, _ := r.MemorySummary()
	return &m, sum, warnings, nil
}

func newStateCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "state", Short: "Work with saved machine states"}
	var volatile bool
	diff := &cobra.Command{
		Use:   "diff A B",
		Short: "Compare two saved states field by field (volatile fields such as the TSC are left out unless --volatile)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, sa, _, err := loadState(args[0])
			if err != nil {
				return err
			}
			b, sb, _, err := loadState(args[1])
			if err != nil {
				return err
			}
			diffs := state.Diff(a, b, volatile)
			if sa.SHA256 != sb.SHA256 || sa.NonZeroPages != sb.NonZeroPages {
				diffs = append(diffs, state.Difference{Path: "memory",
					A: fmt.Sprintf("%d non-zero pages, sha256 %x", sa.NonZeroPages, sa.SHA256[:8]),
					B: fmt.Sprintf("%d non-zero pages, sha256 %x", sb.NonZeroPages, sb.SHA256[:8])})
			}
			for _, d := range diffs {
				fmt.Fprintf(cmd.OutOrStdout(), "%s: %s -> %s\n", d.Path, d.A, d.B)
			}
			if len(diffs) > 0 {
				return fmt.Errorf("states differ in %d fields", len(diffs))
			}
			fmt.Fprintln(cmd.OutOrStdout(), "states are equal")
			return nil
		},
	}
	diff.Flags().BoolVar(&volatile, "volatile", false, "also compare volatile fields (TSC, clocks, timer counts)")
	cmd.AddCommand(diff)
	return cmd
}
