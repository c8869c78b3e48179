package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/ferry-vmm/ferry/internal/daemon"
	"github.com/ferry-vmm/ferry/internal/migration"
	"github.com/ferry-vmm/ferry/internal/units"
)

// DefaultDataDir is where a daemon keeps its identity, trust pool and VMs.
const DefaultDataDir = "/var/lib/ferry"

// daemonSocket is the CLI's way to its host daemon: --daemon, $FERRY_DAEMON,
// or the default data directory's socket.
var daemonSocket string

func defaultDaemonSocket() string {
	if s := os.Getenv("FERRY_DAEMON"); s != "" {
		return s
	}
	return filepath.Join(DefaultDataDir, "api.sock")
}

func callDaemon(req daemon.Request, each func(daemon.Response)) (*daemon.Response, error) {
	c, err := daemon.Dial(daemonSocket)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return daemon.Call(c, req, each)
}

func newDaemonCmd() *cobra.Command {
	var cfg daemon.Config
	var verbose bool
	cmd := &cobra.Command{
		Use:   "daemon --listen ADDR --data-dir DIR",
		Short: "Run the host daemon: VMs in their own processes, the API, incoming migrations",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.Log = newLeveledLogger(verbose)
			d, err := daemon.New(cfg)
			if err != nil {
				return err
			}
			id, created := d.Identity()
			if created {
				fmt.Fprintf(cmd.OutOrStdout(), "ferry daemon: created host identity %s\n", id.Name)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "ferry daemon: fingerprint %s\n", id.Fingerprint)
			fmt.Fprintf(cmd.OutOrStdout(), "ferry daemon: peers on %s (TLS 1.3, trusted hosts only), CLI on %s\n", id.Listen, d.SocketPath())
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return d.Serve(ctx)
		},
	}
	cmd.Flags().StringVar(&cfg.Listen, "listen", "0.0.0.0:7700", "TCP address for other daemons")
	cmd.Flags().StringVar(&cfg.DataDir, "data-dir", DefaultDataDir, "identity, trust pool, VM sockets and logs")
	cmd.Flags().StringVar(&cfg.Socket, "socket", "", "CLI socket (default DATA-DIR/api.sock)")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "debug logging")
	return cmd
}

func runDetached(cmd *cobra.Command, f runFlags) error {
	if f.name == "" {
		return errors.New("--detach needs --name")
	}
	req := daemon.Request{Op: "run", Name: f.name, Guest: f.guest, Cmdline: f.cmdline, Mem: f.mem, CPUs: f.cpus, RNG: f.rng}
	var err error
	if f.kernel != "" {
		if req.Kernel, err = filepath.Abs(f.kernel); err != nil {
			return err
		}
	}
	if f.initrd != "" {
		if req.Initrd, err = filepath.Abs(f.initrd); err != nil {
			return err
		}
	}
	r, err := callDaemon(req, nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(cmd.OutOrStdout(), "VM %s running (pid %d); `ferry console %s` shows its console\n", r.VM.Name, r.VM.PID, r.VM.Name)
	return nil
}

func newPsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "ps",
		Short: "List the VMs of the host daemon",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := callDaemon(daemon.Request{Op: "ps"}, nil)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tSTATE\tPID\tMEM\tCPUS\tUPTIME")
			for _, v := range r.VMs {
				fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%d\t%s\n", v.Name, v.State, v.PID, v.Mem, v.CPUs, time.Since(v.Started).Round(time.Second))
			}
			return w.Flush()
		},
	}
}

func newStopCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "stop NAME",
		Short: "Stop a VM run by the host daemon",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			_, err := callDaemon(daemon.Request{Op: "stop", Name: args[0]}, nil)
			return err
		},
	}
}

func newConsoleCmd() *cobra.Command {
	var noFollow bool
	cmd := &cobra.Command{
		Use:   "console NAME",
		Short: "Show a VM's serial console and follow it; lines typed go to the guest (Ctrl-C leaves, the VM runs on)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			if !noFollow {
				go forwardConsoleInput(cmd.InOrStdin(), args[0])
			}
			_, err := callDaemon(daemon.Request{Op: "console", Name: args[0], Follow: !noFollow}, func(r daemon.Response) {
				io.WriteString(out, r.Console)
			})
			return err
		},
	}
	cmd.Flags().BoolVar(&noFollow, "no-follow", false, "print what is there and return")
	return cmd
}

func newNodesCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "nodes", Short: "Manage the hosts this host trusts (mutual TLS between daemons)"}
	var fp, name string
	trustCmd := &cobra.Command{
		Use:   "trust ADDR --fingerprint SHA256:...",
		Short: "Trust the daemon at ADDR after checking on the wire that it has this fingerprint",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := callDaemon(daemon.Request{Op: "nodes-trust", Addr: args[0], Fingerprint: fp, Name: name}, nil)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "trusted %s (%s); it must trust this host too before migrations work\n", r.Nodes[0].Address, r.Nodes[0].Fingerprint)
			return nil
		},
	}
	trustCmd.Flags().StringVar(&fp, "fingerprint", "", "the fingerprint the other daemon printed when it started")
	trustCmd.Flags().StringVar(&name, "name", "", "a label for the host")
	trustCmd.MarkFlagRequired("fingerprint")
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List trusted hosts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := callDaemon(daemon.Request{Op: "nodes-ls"}, nil)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ADDRESS\tNAME\tFINGERPRINT\tADDED")
			for _, n := range r.Nodes {
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", n.Address, n.Name, n.Fingerprint, n.Added.Format(time.RFC3339))
			}
			return w.Flush()
		},
	}
	rm := &cobra.Command{
		Use:   "rm FINGERPRINT|NAME|ADDR",
		Short: "Stop trusting a host",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := callDaemon(daemon.Request{Op: "nodes-rm", Fingerprint: args[0]}, nil)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %s (%s)\n", r.Nodes[0].Address, r.Nodes[0].Fingerprint)
			return nil
		},
	}
	cmd.AddCommand(trustCmd, ls, rm)
	return cmd
}

func newMigrateCmd() *cobra.Command {
	var to, mode, bandwidth, deltaCache, dirtyLimit string
	var p migration.Params
	var asJSON, cancel, set, finish, resume bool
	cmd := &cobra.Command{
		Use:   "migrate NAME --to ADDR",
		Short: "Move a running VM to the daemon at ADDR while it runs",
		Long: `Move a running VM to the daemon at ADDR while it runs.

Modes:
  auto      (default) watch the guest's writes for a second, predict every
            technique on them and the link, and pick one within
            --downtime-limit, --max-total-time and --require-rollback:
            pre-copy when it converges, else one pre-copy pass then
            post-copy; a stalled pre-copy switches to post-copy
  precopy   copy memory while the guest runs, pass after pass, then stop it
            briefly for the rest (--postcopy-on-stall: switch to post-copy
            instead of a forced stop-and-copy when passes stop shrinking)
  stopcopy  stop the guest, copy everything, resume it there
  postcopy  resume the guest there at once; pages follow in the background
            while the guest's faults are served first
  demand    resume the guest there at once; send only what it touches
            (ends when it has every page, when it stops, or with --finish)
  hybrid    pre-copy bounded by --precopy-time or --precopy-passes, then
            post-copy (or done, if pre-copy converged within the bound)

In post-copy the guest runs at the destination and its memory is split
between the hosts: it cannot be cancelled, and if the link breaks the guest
waits (its vCPUs block on missing pages) while the source re-opens the link
on its own; --resume makes it try at once. If the link stays down past
--recovery-timeout, the destination stops the guest rather than run it
with missing memory.

--dry-run prints the predictions (total time, downtime, bytes for each
technique, and what auto would pick) without moving anything: it measures
the link to ADDR (or takes --bandwidth) and samples the guest's writes for
two seconds.`,
		Example: `  ferry migrate web --to 10.0.0.2:7700                    # auto
  ferry migrate web --to 10.0.0.2:7700 --dry-run          # predictions only
  ferry migrate web --to 10.0.0.2:7700 --mode precopy --downtime-limit 50ms
  ferry migrate web --to 10.0.0.2:7700 --mode hybrid --precopy-time 5s
  ferry migrate web --to 10.0.0.2:7700 --mode precopy --postcopy-on-stall
  ferry migrate web --to 10.0.0.2:7700 --mode stopcopy --json
  ferry migrate --cancel web
  ferry migrate --set web --bandwidth 500Mbit
  ferry migrate --finish web      # end a demand-paging migration: push the rest
  ferry migrate --resume web      # re-open a broken post-copy link now`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			bw, err := units.ParseRate(bandwidth)
			if err != nil {
				return err
			}
			name := args[0]
			req := daemon.Request{Name: name}
			req.Bandwidth = bw
			switch {
			case cancel:
				req.Op = "cancel"
			case set:
				req.Op = "set"
			case finish:
				req.Op = "finish"
			case resume:
				req.Op = "retry-link"
			}
			if req.Op != "" {
				_, err := callDaemon(req, nil)
				return err
			}
			if to == "" {
				return errors.New("--to ADDR is required")
			}
			p.Mode, p.Bandwidth = mode, bw
			if p.DirtyLimit, err = units.ParseRate(dirtyLimit); err != nil {
				return fmt.Errorf("--dirty-limit: %w", err)
			}
			dc, err := units.ParseBytes(deltaCache)
			if err != nil {
				return fmt.Errorf("--delta-cache: %w", err)
			}
			p.DeltaCache = int64(dc)
			if _, err := p.Options(); err != nil {
				return err
			}
			req.Op, req.To, req.Params = "migrate", to, p
			if p.DryRun {
				return runPredict(cmd, req, asJSON)
			}
			return runMigrate(cmd, req, asJSON)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&to, "to", "", "the destination daemon's address")
	fl.StringVar(&mode, "mode", "auto", "auto, precopy, stopcopy, postcopy, demand or hybrid")
	fl.BoolVar(&p.DryRun, "dry-run", false, "print the predictions for every technique; move nothing")
	fl.DurationVar(&p.MaxTotalTime, "max-total-time", 0, "auto: the migration should end within this (0: no bound)")
	fl.BoolVar(&p.RequireRollback, "require-rollback", false, "auto: never post-copy (only pre-copy can fall back to the source)")
	fl.DurationVar(&p.DowntimeLimit, "downtime-limit", migration.DefaultDowntimeLimit, "pre-copy switches over once the rest fits in this")
	fl.IntVar(&p.MaxIterations, "max-iterations", migration.DefaultMaxIterations, "force the switch after this many pre-copy passes")
	fl.DurationVar(&p.PrecopyTimeout, "precopy-timeout", migration.DefaultPrecopyTimeout, "force the switch after this long in pre-copy")
	fl.DurationVar(&p.PrecopyTime, "precopy-time", 0, "hybrid: pre-copy for at most this long, then post-copy (default 5s)")
	fl.IntVar(&p.PrecopyPasses, "precopy-passes", 0, "hybrid: at most this many pre-copy passes, then post-copy")
	fl.BoolVar(&p.PostcopyOnStall, "postcopy-on-stall", false, "precopy: switch to post-copy when passes stop shrinking")
	fl.DurationVar(&p.RecoveryTimeout, "recovery-timeout", migration.DefaultRecoveryTimeout, "post-copy: how long the source keeps re-opening a broken link")
	fl.StringVar(&bandwidth, "bandwidth", "", "cap the transfer, e.g. 1Gbit, 500Mbit, 100MB (per second); default unlimited")
	fl.StringVar(&p.Codec, "compress", "none", "compress page chunks: none, zstd[:1-22|fastest|default|better|best], lz4[:fast|1-9|hc]")
	fl.BoolVar(&p.Dedup, "dedup", false, "send a page identical to one the destination holds as a reference to it")
	fl.BoolVar(&p.Delta, "delta", false, "send re-dirtied pages as XBZRLE deltas to their previous version")
	fl.StringVar(&deltaCache, "delta-cache", "64M", "memory for --delta's previous page versions")
	fl.IntVar(&p.Workers, "workers", 0, "goroutines encoding and compressing chunks (default: one per CPU)")
	fl.IntVar(&p.Streams, "streams", 1, "TCP connections carrying pre-copy pages (each page always on the same one)")
	fl.BoolVar(&p.AutoConverge, "auto-converge", false, "pre-copy: slow the guest's vCPUs in steps while it dirties memory faster than the link carries it")
	fl.StringVar(&dirtyLimit, "dirty-limit", "", "pre-copy: throttle the guest whenever it dirties more than this per second, e.g. 50MB or 400Mbit")
	fl.BoolVar(&asJSON, "json", false, "print the final report as JSON")
	fl.BoolVar(&cancel, "cancel", false, "cancel the running migration of NAME (the guest stays here; not in post-copy)")
	fl.BoolVar(&set, "set", false, "change --bandwidth of the running migration of NAME")
	fl.BoolVar(&finish, "finish", false, "end the demand-paging migration of NAME: push every page still needed")
	fl.BoolVar(&resume, "resume", false, "re-open the broken post-copy link of NAME's migration now")
	cmd.MarkFlagsMutuallyExclusive("cancel", "set", "finish", "resume")
	return cmd
}

// runPredict prints what `--dry-run` predicts.
func runPredict(cmd *cobra.Command, req daemon.Request, asJSON bool) error {
	r, err := callDaemon(req, nil)
	if err != nil {
		return err
	}
	if r.Prediction == nil {
		return errors.New("the daemon returned no prediction")
	}
	if asJSON {
		enc := json.NewEncoder(cmd.OutOrStdout())
		enc.SetIndent("", "  ")
		return enc.Encode(r.Prediction)
	}
	r.Prediction.WriteTable(cmd.OutOrStdout())
	return nil
}

func runMigrate(cmd *cobra.Command, req daemon.Request, asJSON bool) error {
	out, errOut := cmd.OutOrStdout(), cmd.ErrOrStderr()
	tty := false
	if f, ok := errOut.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	var lastLine time.Time
	r, err := callDaemon(req, func(r daemon.Response) {
		if r.Progress == nil {
			return
		}
		if tty {
			fmt.Fprintf(errOut, "\r\033[K%s", r.Progress.Line())
			return
		}
		if time.Since(lastLine) >= time.Second || (r.Progress.Phase != migration.PhasePreCopy && r.Progress.Phase != migration.PhasePostCopy) {
			fmt.Fprintln(errOut, r.Progress.Line())
			lastLine = time.Now()
		}
	})
	if tty {
		fmt.Fprintln(errOut)
	}
	var rep *migration.Report
	if r != nil {
		rep = r.Migration
	}
	if rep != nil {
		if asJSON {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			enc.Encode(rep)
		} else {
			rep.WriteTable(out)
		}
	}
	return err
}

// forwardConsoleInput sends what is typed to the guest's serial port, a
// chunk (a line, on a terminal in cooked mode) at a time.
func forwardConsoleInput(in io.Reader, name string) {
	buf := make([]byte, 4096)
	for {
		n, err := in.Read(buf)
		if n > 0 {
			if _, cerr := callDaemon(daemon.Request{Op: "console-input", Name: name, Input: append([]byte(nil), buf[:n]...)}, nil); cerr != nil {
				fmt.Fprintln(os.Stderr, "ferry: console input:", cerr)
				return
			}
		}
		if err != nil {
			return
		}
	}
}
