package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-vmm/ferry/internal/control"
	"github.com/ferry-vmm/ferry/internal/daemon"
	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/migration"
	"github.com/ferry-vmm/ferry/internal/trust"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

// newVMMCmd is the VMM process the daemon runs for each VM (one process
// per VM, so that one guest's failure cannot take the others down). Not
// meant to be typed by people.
func newVMMCmd() *cobra.Command {
	var f runFlags
	var dataDir, controlSock, consoleLog, daemonSock, listen string
	var incoming bool
	var recovery time.Duration
	cmd := &cobra.Command{
		Use:    "vmm",
		Short:  "Run one VM as a daemon's VMM process (internal)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			logger := newLogger(true)
			id, _, err := trust.LoadOrCreate(dataDir)
			if err != nil {
				return err
			}
			pool, err := trust.OpenPool(dataDir)
			if err != nil {
				return err
			}
			console, err := os.OpenFile(consoleLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
			if err != nil {
				return err
			}
			defer console.Close()
			rec := guestlog.NewRecorder(console)
			var vm *vmm.VM
			var incomingDone func() error
			if incoming {
				vm, incomingDone, err = receiveVM(f.name, listen, daemonSock, recovery, id, pool, rec)
			} else {
				vm, err = startVM(f, rec)
			}
			if err != nil {
				return err
			}
			defer vm.Close()
			const filling = "the incoming post-copy migration is still bringing the guest's memory"
			var held []string
			if incomingDone != nil {
				held = []string{filling}
			}
			srv, err := control.Serve(controlSock, f.name, vm, logger, held...)
			if err != nil {
				vm.Stop()
				return err
			}
			defer srv.Close()
			srv.SetConsole(rec)
			if incomingDone != nil {
				// Held from the first request (Serve): released once
				// every page is here.
				release := srv.Hold(filling)
				go func() { incomingDone(); release() }()
			}
			srv.EnableMigration(&control.MigrationEnv{
				Dial: func(ctx context.Context, addr string) (net.Conn, error) {
					return trust.Dial(ctx, "tcp", addr, id, pool, logger)
				},
				Resolve: func(ctx context.Context, addr, mid string) (bool, error) {
					return daemon.Resolve(ctx, id, pool, addr, mid)
				},
				Done: func(r *migration.Report) { logger.Info("migrated away", "id", r.ID, "downtime", r.Downtime) },
			})
			if !incoming {
				fmt.Println("READY")
			}
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, syscall.SIGTERM, os.Interrupt)
			go func() { <-sigs; vm.Stop() }()
			exit, err := vm.Wait()
			if err != nil {
				return err
			}
			logger.Info("VM ended", "reason", exit.Reason.String(), "status", exit.Status)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.name, "name", "", "VM name")
	fl.StringVar(&f.guest, "guest", "", "bundled guest")
	fl.StringVar(&f.kernel, "kernel", "", "kernel image")
	fl.StringVar(&f.initrd, "initrd", "", "initrd")
	fl.StringVar(&f.cmdline, "cmdline", "", "kernel command line")
	fl.StringVar(&f.mem, "mem", "512M", "memory")
	fl.IntVar(&f.cpus, "cpus", 1, "vCPUs")
	fl.BoolVar(&f.rng, "rng", false, "a virtio entropy device")
	fl.StringVar(&dataDir, "data-dir", "", "the daemon's data directory (identity, trust pool)")
	fl.StringVar(&controlSock, "control", "", "control socket path")
	fl.StringVar(&consoleLog, "console-log", "", "file the serial console is appended to")
	fl.StringVar(&daemonSock, "daemon-socket", "", "the daemon's API socket")
	fl.BoolVar(&incoming, "incoming", false, "wait for a migration instead of booting")
	fl.StringVar(&listen, "listen", "", "with --incoming: address to accept the migration on")
	fl.DurationVar(&recovery, "recovery-timeout", 0, "with --incoming: how long a post-copy guest waits for a broken link before it is stopped")
	return cmd
}

func startVM(f runFlags, console io.Writer) (*vmm.VM, error) {
	vm, err := buildVM(f, console, newLogger(true))
	if err != nil {
		return nil, err
	}
	if err := vm.Start(); err != nil {
		vm.Close()
		return nil, err
	}
	return vm, nil
}

// receiveVM accepts one trusted migration and returns the VM running. In
// post-copy the guest runs before all of its memory is here: the
// migration goes on in the background, and if it fails the VM ends with
// its error (vm.Wait returns it) instead of running on with missing pages.
func receiveVM(name, listen, daemonSock string, recovery time.Duration, id *trust.Identity, pool *trust.Pool, console io.Writer) (*vmm.VM, func() error, error) {
	log := newLogger(true)
	ln, err := trust.Listen("tcp", listen, id, pool, log)
	if err != nil {
		return nil, nil, err
	}
	fmt.Printf("LISTEN %s\n", ln.Addr())
	dst := &migration.Destination{
		Config:          vmm.Config{Console: console, Logger: log},
		Log:             log,
		AcceptTimeout:   2 * time.Minute,
		RecoveryTimeout: recovery,
		Commit: func(mid string) error {
			c, err := daemon.Dial(daemonSock)
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = daemon.Call(c, daemon.Request{Op: "commit", ID: mid, Name: name}, nil)
			return err
		},
	}
	vm, rep, err := dst.Run(context.Background(), ln)
	if err != nil {
		return nil, nil, fmt.Errorf("incoming migration: %w", err)
	}
	log.Info("migration received; guest running", "id", rep.ID, "pages", rep.PagesLoaded, "restore", rep.RestoreTime)
	done := make(chan error, 1)
	go func() {
		err := dst.Wait()
		done <- err
		if err != nil {
			log.Error("incoming migration failed after the guest resumed", "id", rep.ID, "err", err)
			return
		}
		if p := dst.Report().Postcopy; p != nil {
			log.Info("post-copy done", "id", rep.ID, "end", p.End, "faults", p.Faults, "fault_p99", p.FaultP99, "residency", p.Residency)
		}
	}()
	return vm, func() error { return <-done }, nil
}
