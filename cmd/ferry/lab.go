package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/ferry-vmm/ferry/internal/lab"
)

// newLabAgentCmd is the agent inside a lab host (started by its /init;
// docs/lab.md). Hidden: it is the lab's, not a user's.
func newLabAgentCmd() *cobra.Command {
	var listen, tokenFile string
	cmd := &cobra.Command{
		Use:    "lab-agent --listen ADDR --token-file PATH",
		Short:  "Serve the lab's requests inside an emulated lab host",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			tok, err := os.ReadFile(tokenFile)
			if err != nil {
				return err
			}
			a, err := lab.NewAgent(string(tok), slog.New(slog.NewTextHandler(os.Stderr, nil)))
			if err != nil {
				return err
			}
			l, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("lab-agent: %w", err)
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return a.Serve(ctx, l)
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "10.0.2.15:7000", "address to serve on (the host's control NIC)")
	cmd.Flags().StringVar(&tokenFile, "token-file", "/run/ferry-lab.token", "file holding the token every request must carry")
	return cmd
}

// newLabCmd runs the lab's demonstration (docs/lab.md): emulated SVM
// hosts, a guest moved live between them.
func newLabCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "lab", Short: "Run ferry on emulated hosts with hardware virtualization (QEMU TCG + SVM)"}
	var guest, modes, imageDir, buildDir string
	var mem int
	run := &cobra.Command{
		Use:   "run [--guest linux|test] [--modes precopy,postcopy]",
		Short: "Boot two emulated hosts, run a guest on one and move it live to the other and back",
		Example: `  make lab                                   # builds everything, then: ferry lab run
  ferry lab run --guest test --modes precopy,postcopy,hybrid`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			root := filepath.Join(filepath.Dir(exe), "..")
			if buildDir == "" {
				buildDir = filepath.Join(root, "build")
			}
			if imageDir == "" {
				imageDir = filepath.Join(buildDir, "lab")
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return lab.Demo(ctx, lab.DemoConfig{
				Guest: guest,
				Modes: strings.Split(modes, ","),
				Lab: lab.Config{Hosts: 2, MemMB: mem, ImageDir: imageDir, Ferry: exe,
					Guest:  filepath.Join(buildDir, "guest", "ferry-guest.elf"),
					Linux:  filepath.Join(buildDir, "linux", "vmlinuz"),
					Initrd: filepath.Join(buildDir, "linux", "initrd.cpio.gz")},
			}, cmd.OutOrStdout())
		},
	}
	run.Flags().StringVar(&guest, "guest", "linux", "linux (Debian's kernel with the checker) or test (ferry's test guest)")
	run.Flags().StringVar(&modes, "modes", "precopy,postcopy", "one live migration per mode, alternating direction")
	run.Flags().IntVar(&mem, "host-mem", 3072, "each emulated host's RAM in MiB")
	run.Flags().StringVar(&imageDir, "image-dir", "", "the host image (scripts/lab-host.sh; default BUILD/lab)")
	run.Flags().StringVar(&buildDir, "build-dir", "", "where the guest images are (default: build/ next to bin/)")
	cmd.AddCommand(run)
	return cmd
}
