package main

import (
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-vmm/ferry/internal/bench"
)

func newBenchCmd() *cobra.Command {
	var cfg bench.Config
	var systems, link, render string
	cmd := &cobra.Command{
		Use:   "bench SCENARIO... [--profile quick|full] [--out DIR]",
		Short: "Benchmark ferry's migrations against QEMU's on the same guest over a shaped link (needs root)",
		Long: `ferry bench builds two hosts on this machine (two network namespaces joined
by a veth pair shaped with tc), runs a ferry daemon in each, and moves the
test guest with every technique; the same runs are made with QEMU (microvm,
KVM) driven over QMP. Downtime comes from the guest's heartbeats, bytes from
the veth counters, degradation from the workload's own reports: the same
measurement for both systems.

Scenarios: dirty-rate (the seed paper's Scenario I), working-set (Scenario
II), idle, optimizations, offline, smoke; "all" is all but smoke.
Results go to DIR: results.json, runs/*.json, summary.md and plots.`,
		Example: `  sudo ferry bench all --profile quick
  sudo ferry bench dirty-rate working-set --profile full --out results/
  sudo ferry bench optimizations --link 10Gbit --systems ferry
  ferry bench --render results/results.json     # redraw tables and plots`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if render != "" {
				set, err := bench.ReadSet(render)
				if err != nil {
					return err
				}
				return bench.WriteOutputs(filepath.Dir(render), set)
			}
			cfg.Scenarios = args
			cfg.Systems = strings.Split(systems, ",")
			cfg.Link.Rate = link
			cfg.Log = cmd.OutOrStdout()
			exe, err := os.Executable()
			if err != nil {
				return err
			}
			cfg.Ferry = exe
			if cfg.Guest, err = findTestGuest(); err != nil {
				return err
			}
			if cfg.Guest, err = filepath.Abs(cfg.Guest); err != nil {
				return err
			}
			if cfg.Out == "" {
				cfg.Out = filepath.Join("bench-results", time.Now().Format("20060102-150405"))
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			set, err := bench.Run(ctx, cfg)
			if set != nil {
				fmt.Fprintf(cmd.OutOrStdout(), "%d runs in %.0f s; results in %s (summary.md, results.json, plots)\n", len(set.Results), set.Duration, cfg.Out)
			}
			return err
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&cfg.Profile, "profile", "quick", "quick (minutes, small guests) or full (the seed paper's scale)")
	fl.StringVar(&cfg.Out, "out", "", "results directory (default bench-results/TIME)")
	fl.StringVar(&link, "link", "1Gbit", "link rate between the two hosts: e.g. 1Gbit, 10Gbit, 500Mbit, unlimited")
	fl.DurationVar(&cfg.Link.Latency, "latency", 0, "added one-way latency on each side (needs the kernel's netem)")
	fl.StringVar(&systems, "systems", "ferry,qemu", "systems to measure, comma-separated")
	fl.StringVar(&render, "render", "", "redraw summary.md and plots from a results.json; run nothing")
	return cmd
}
