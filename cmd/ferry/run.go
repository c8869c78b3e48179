package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-vmm/ferry/internal/control"
	"github.com/ferry-vmm/ferry/internal/units"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

type runFlags struct {
	guest   string
	kernel  string
	initrd  string
	cmdline string
	mem     string
	cpus    int
	name    string
	verbose bool
	detach  bool
	rng     bool
}

func newRunCmd() *cobra.Command {
	var f runFlags
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Run a VM in the foreground with its serial console on stdout (Ctrl-C stops it)",
		Example: `  ferry run --guest test --mem 512M --cpus 2 --cmdline "workload=dirty size=256M rate=200M pattern=random"
  ferry run --kernel build/linux/vmlinux --initrd build/linux/initrd.cpio.gz --cmdline "console=ttyS0" --mem 1G --cpus 2`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error { return runVM(cmd, f) },
	}
	fl := cmd.Flags()
	fl.StringVar(&f.guest, "guest", "", `bundled guest to run: "test" (the ferry test guest)`)
	fl.StringVar(&f.kernel, "kernel", "", "kernel image: Linux bzImage, or ELF with a PVH entry note")
	fl.StringVar(&f.initrd, "initrd", "", "initial ramdisk")
	fl.StringVar(&f.cmdline, "cmdline", "", "kernel command line (for the test guest: its workload options)")
	fl.StringVar(&f.mem, "mem", "512M", "guest memory (K, M, G suffixes; multiple of 2 MiB)")
	fl.IntVar(&f.cpus, "cpus", 1, "number of vCPUs")
	fl.BoolVar(&f.rng, "rng", false, "give the guest a virtio entropy device (virtio-rng over PCI; Linux loads virtio_pci and virtio_rng for it)")
	fl.StringVar(&f.name, "name", "", "VM name for `ferry save --vm NAME` and friends (default vm-PID)")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log VMM events to stderr")
	fl.BoolVarP(&f.detach, "detach", "d", false, "run under the host daemon instead of in the foreground (needs --name)")
	return cmd
}

func runVM(cmd *cobra.Command, f runFlags) error {
	if f.detach {
		return runDetached(cmd, f)
	}
	logger := newLogger(f.verbose)
	vm, err := buildVM(f, cmd.OutOrStdout(), logger)
	if err != nil {
		return err
	}
	defer vm.Close()
	return runForeground(cmd, vm, f.name, logger)
}

// buildVM makes a VM from run flags.
func buildVM(f runFlags, console io.Writer, logger *slog.Logger) (*vmm.VM, error) {
	kernelPath, err := resolveKernel(f.guest, f.kernel)
	if err != nil {
		return nil, err
	}
	mem, err := units.ParseBytes(f.mem)
	if err != nil {
		return nil, fmt.Errorf("--mem: %w", err)
	}
	kernel, err := os.ReadFile(kernelPath)
	if err != nil {
		return nil, fmt.Errorf("reading kernel: %w", err)
	}
	var initrd []byte
	if f.initrd != "" {
		if initrd, err = os.ReadFile(f.initrd); err != nil {
			return nil, fmt.Errorf("reading initrd: %w", err)
		}
	}
	return vmm.New(vmm.Config{
		MemSize: mem, CPUs: f.cpus, Kernel: kernel, Initrd: initrd, Cmdline: f.cmdline, RNG: f.rng,
		Console: console, Logger: logger,
	})
}

// runForeground serves the VM's control socket, runs it with the console on
// stdio until it ends or Ctrl-C, and reports how it ended.
func runForeground(cmd *cobra.Command, vm *vmm.VM, name string, logger *slog.Logger) error {
	if name == "" {
		name = fmt.Sprintf("vm-%d", os.Getpid())
	}
	sock := control.SocketPath(name)
	srv, err := control.Serve(sock, name, vm, logger)
	if err != nil {
		return err
	}
	defer srv.Close()
	fmt.Fprintf(cmd.ErrOrStderr(), "ferry: VM %q running, control socket %s\n", name, sock)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go forwardInput(os.Stdin, vm)
	started := time.Now()
	exit, err := vm.Run(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.ErrOrStderr(), "ferry: VM ended after %s: %s", time.Since(started).Round(time.Millisecond), exit.Reason)
	if exit.Reason == vmm.ExitGuest {
		fmt.Fprintf(cmd.ErrOrStderr(), " (status %d)", exit.Status)
	}
	fmt.Fprintln(cmd.ErrOrStderr())
	if exit.Reason == vmm.ExitGuest && exit.Status != 0 {
		return fmt.Errorf("guest exited with status %d", exit.Status)
	}
	return nil
}

// forwardInput feeds the host's stdin to the guest's serial port.
func forwardInput(r io.Reader, vm *vmm.VM) {
	buf := make([]byte, 4096)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			vm.Serial.Enqueue(buf[:n])
		}
		if err != nil {
			return
		}
	}
}

// resolveKernel picks the kernel file from --guest or --kernel.
func resolveKernel(guest, kernel string) (string, error) {
	switch {
	case guest != "" && kernel != "":
		return "", errors.New("give either --guest or --kernel, not both")
	case kernel != "":
		return kernel, nil
	case guest == "test":
		return findTestGuest()
	case guest != "":
		return "", fmt.Errorf("unknown guest %q (known: test)", guest)
	}
	return "", errors.New("nothing to run: give --guest test or --kernel PATH")
}

// findTestGuest looks for the bundled test guest image: $FERRY_GUEST, next
// to the ferry binary, or in the source tree's build directory.
func findTestGuest() (string, error) {
	if p := os.Getenv("FERRY_GUEST"); p != "" {
		return p, nil
	}
	var candidates []string
	if exe, err := os.Executable(); err == nil {
		dir := filepath.Dir(exe)
		candidates = append(candidates,
			filepath.Join(dir, "ferry-guest.elf"),
			filepath.Join(dir, "..", "build", "guest", "ferry-guest.elf"),
			filepath.Join(dir, "..", "share", "ferry", "ferry-guest.elf"))
	}
	candidates = append(candidates, filepath.Join("build", "guest", "ferry-guest.elf"))
	for _, c := range candidates {
		if _, err := os.Stat(c); err == nil {
			return c, nil
		}
	}
	return "", fmt.Errorf("test guest image not found (looked in %v); build it with `make`", candidates)
}

func newLogger(verbose bool) *slog.Logger {
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

// newLeveledLogger logs at info level, or debug when verbose.
func newLeveledLogger(verbose bool) *slog.Logger {
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}
