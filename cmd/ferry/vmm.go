package main

import (
	"context"
	"errors"
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
			if incoming {
				vm, err = receiveVM(f.name, listen, daemonSock, id, pool, rec)
			} else {
				vm, err = startVM(f, rec)
			}
			if err != nil {
				return err
			}
			defer vm.Close()
			srv, err := control.Serve(controlSock, f.name, vm, logger)
			if err != nil {
				vm.Stop()
				return err
			}
			defer srv.Close()
			srv.SetConsole(rec)
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
	fl.StringVar(&dataDir, "data-dir", "", "the daemon's data directory (identity, trust pool)")
	fl.StringVar(&controlSock, "control", "", "control socket path")
	fl.StringVar(&consoleLog, "console-log", "", "file the serial console is appended to")
	fl.StringVar(&daemonSock, "daemon-socket", "", "the daemon's API socket")
	fl.BoolVar(&incoming, "incoming", false, "wait for a migration instead of booting")
	fl.StringVar(&listen, "listen", "", "with --incoming: address to accept the migration on")
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

// receiveVM accepts one trusted migration stream and returns the VM running.
func receiveVM(name, listen, daemonSock string, id *trust.Identity, pool *trust.Pool, console io.Writer) (*vmm.VM, error) {
	log := newLogger(true)
	ln, err := trust.Listen("tcp", listen, id, pool, log)
	if err != nil {
		return nil, err
	}
	fmt.Printf("LISTEN %s\n", ln.Addr())
	type acc struct {
		c   net.Conn
		err error
	}
	ch := make(chan acc, 1)
	go func() { c, err := ln.Accept(); ch <- acc{c, err} }()
	var conn net.Conn
	select {
	case a := <-ch:
		if a.err != nil {
			ln.Close()
			return nil, a.err
		}
		conn = a.c
	case <-time.After(2 * time.Minute):
		ln.Close()
		return nil, errors.New("no migration arrived within 2 minutes")
	}
	ln.Close()
	dst := &migration.Destination{
		Config: vmm.Config{Console: console, Logger: log},
		Log:    log,
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
	vm, rep, err := dst.Run(context.Background(), conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("incoming migration: %w", err)
	}
	log.Info("migration received", "id", rep.ID, "pages", rep.PagesLoaded, "restore", rep.RestoreTime)
	go func() { <-vm.Done(); conn.Close() }()
	return vm, nil
}
