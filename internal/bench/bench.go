// Package bench runs ferry's migration benchmarks: it builds two hosts on
// one machine (network namespaces joined by a shaped veth pair), runs the
// same guest and workload on ferry and on QEMU, moves it with each
// technique, and measures every system the same way: downtime from the
// guest's heartbeats, bytes from the kernel's link counters, degradation
// from the workload's own reports. It writes JSON, markdown and plots.
//
// It sits beside the CLI: it drives ferry through the ferry binary and its
// daemons, and QEMU through internal/qemu. It must not import the
// migration, vmm or kvm packages: both systems are measured from outside.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/units"
	"github.com/ferry-vmm/ferry/internal/version"
)

// Config is one `ferry bench` invocation.
type Config struct {
	Scenarios []string
	Profile   string // "quick" or "full"
	Out       string // results directory
	Link      LinkConfig
	Systems   []string // "ferry", "qemu"
	Ferry     string   // the ferry binary
	Guest     string   // the test guest image
	Log       io.Writer
}

// system is one hypervisor under test.
type system interface {
	Name() string
	Start(ctx context.Context) error
	Close()
	Migrate(ctx context.Context, s *Spec, obs *Observation) error
	Offline(ctx context.Context, s *Spec, obs *Observation) error
}

// Run makes every run of the configured scenarios and writes the results.
func Run(ctx context.Context, cfg Config) (*Set, error) {
	p, ok := profiles[cfg.Profile]
	if !ok {
		return nil, fmt.Errorf("unknown profile %q: quick or full", cfg.Profile)
	}
	scenarios, err := ResolveScenarios(cfg.Scenarios)
	if err != nil {
		return nil, err
	}
	if err := RequireRoot(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.Out, "runs"), 0o755); err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp("", "ferry-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	lab, err := NewLab(ctx, cfg.Link)
	if err != nil {
		return nil, err
	}
	defer lab.Close()
	systems, err := startSystems(ctx, cfg, lab, work)
	for _, s := range systems {
		defer s.Close()
	}
	if err != nil {
		return nil, err
	}
	set := &Set{Version: ResultVersion, Started: time.Now(), Profile: p.name, Machine: describeMachine(), Link: Link{Rate: linkName(cfg.Link.Rate), Latency: cfg.Link.Latency}}
	var all []Spec
	for _, sc := range scenarios {
		all = append(all, specs(sc, p)...)
	}
	total := 0
	for i := range all {
		all[i].seq = i
		for _, sys := range systems {
			if all[i].runsOn(sys.Name()) {
				total++
			}
		}
	}
	n := 0
	for i := range all {
		for _, sys := range systems {
			if !all[i].runsOn(sys.Name()) {
				continue
			}
			n++
			r := runOne(ctx, sys, lab, &all[i], set.Link, filepath.Join(cfg.Out, "runs", fmt.Sprintf("%03d-%s", n, sys.Name())))
			fmt.Fprintf(cfg.Log, "[%d/%d] %s\n", n, total, r.oneLine())
			set.Results = append(set.Results, r)
			if err := writeRun(cfg.Out, n, &r); err != nil {
				return set, err
			}
			if ctx.Err() != nil {
				return set, ctx.Err()
			}
		}
	}
	set.Duration = time.Since(set.Started).Seconds()
	return set, WriteOutputs(cfg.Out, set)
}

func startSystems(ctx context.Context, cfg Config, lab *Lab, work string) ([]system, error) {
	var out []system
	for _, name := range cfg.Systems {
		var s system
		switch name {
		case "ferry":
			s = newFerrySystem(lab, cfg.Ferry, cfg.Guest, work)
		case "qemu":
			s = newQEMUSystem(lab, cfg.Guest, work)
		default:
			return out, fmt.Errorf("unknown system %q: ferry or qemu", name)
		}
		if err := s.Start(ctx); err != nil {
			return out, fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// runOne makes one run and measures it; a failed run is a result too.
// The guest's consoles are kept next to the run's JSON, as consoles
// (prefix.source.log, prefix.destination.log).
func runOne(ctx context.Context, sys system, lab *Lab, s *Spec, link Link, prefix string) Result {
	r := Result{Version: ResultVersion, Scenario: s.Scenario, System: sys.Name(), Technique: s.Technique,
		PrecopyFor: s.PrecopyFor, Variant: s.Variant, Label: s.label(sys.Name()), Guest: s.Guest, Link: link, Started: time.Now()}
	srcLog, err := os.Create(prefix + ".source.log")
	if err != nil {
		r.Error = err.Error()
		return r
	}
	defer srcLog.Close()
	dstLog, err := os.Create(prefix + ".destination.log")
	if err != nil {
		r.Error = err.Error()
		return r
	}
	defer dstLog.Close()
	obs := newObservation(lab, srcLog, dstLog)
	if s.Technique == "offline" {
		err = sys.Offline(ctx, s, obs)
	} else {
		err = sys.Migrate(ctx, s, obs)
	}
	r.Finished = err == nil
	if err != nil {
		r.Error = err.Error()
	}
	obs.fill(&r, s.HB)
	r.Guest = guestAsSeen(r.Guest, obs.Src.Lines())
	if r.GuestErrors > 0 && r.Error == "" {
		r.Error = fmt.Sprintf("the guest saw %d errors", r.GuestErrors)
	}
	return r
}

// guestAsSeen corrects the working set to what the guest's boot line says
// it used: it clamps size= to its largest free RAM range.
func guestAsSeen(g Guest, lines []guestlog.TimedLine) Guest {
	for _, tl := range lines {
		if tl.Line.Kind != guestlog.KindBoot {
			continue
		}
		if mb, err := tl.Line.Uint("region_mb"); err == nil && g.WorkingSet > 0 && int64(mb)<<20 < g.WorkingSet {
			g.WorkingSetAsked, g.WorkingSet = g.WorkingSet, int64(mb)<<20
		}
		break
	}
	return g
}

// oneLine is the progress line of a run.
func (r *Result) oneLine() string {
	if r.Error != "" && !r.Finished {
		return fmt.Sprintf("%s: FAILED: %s", r.Label, r.Error)
	}
	s := fmt.Sprintf("%s: downtime %s, total %s, %s → / %s ←, degradation %.0f%%, guest checked %d pages, %d errors",
		r.Label, r.Downtime.Round(time.Millisecond), r.TotalTime.Round(10*time.Millisecond),
		units.FormatBytes(r.BytesForward), units.FormatBytes(r.BytesBack), 100*r.Degradation, r.GuestChecked, r.GuestErrors)
	if r.ForcedStop {
		s += " (forced stop-and-copy)"
	}
	if r.Offline != nil {
		o := r.Offline
		s = fmt.Sprintf("%s: state %s, save %s, transfer %s, restore %s, downtime %s, %d errors", r.Label, units.FormatBytes(o.StateBytes),
			o.SaveTime.Round(time.Millisecond), o.TransferTime.Round(time.Millisecond), o.RestoreTime.Round(time.Millisecond), r.Downtime.Round(time.Millisecond), r.GuestErrors)
	}
	return s
}

func writeRun(dir string, n int, r *Result) error {
	name := fmt.Sprintf("%03d-%s-%s-%s.json", n, r.Scenario, r.System, strings.ReplaceAll(r.Technique, "/", "-"))
	return writeJSON(filepath.Join(dir, "runs", name), r)
}

// WriteOutputs writes results.json, summary.md and the plots.
func WriteOutputs(dir string, set *Set) error {
	if err := writeJSON(filepath.Join(dir, "results.json"), set); err != nil {
		return err
	}
	// A plot that fails must not cost the tables: write what there is.
	plots, plotErr := WritePlots(dir, set)
	f, err := os.Create(filepath.Join(dir, "summary.md"))
	if err != nil {
		return err
	}
	err = WriteSummary(f, set)
	if err == nil {
		err = WriteMarkdownPlots(f, plots)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && plotErr != nil {
		err = fmt.Errorf("plots: %w", plotErr)
	}
	return err
}

// ReadSet reads a results.json written by Run.
func ReadSet(path string) (*Set, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var s Set
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if s.Version != ResultVersion {
		return nil, fmt.Errorf("%s: results version %d, this ferry reads version %d", path, s.Version, ResultVersion)
	}
	return &s, nil
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func linkName(rate string) string {
	if rate == "" {
		return "unlimited"
	}
	return rate
}

// describeMachine states where the numbers come from.
func describeMachine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Ferry: version.Version, KVM: "VMX/SVM"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		if _, err := fmt.Sscanf(string(b), "MemTotal: %d kB", &kb); err == nil {
			m.MemoryGiB = int((kb + 512*1024) >> 20)
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		m.KVM = "PVM (no VMX/SVM: guest CPL 0 emulated)"
	}
	if out, err := exec.Command("qemu-system-x86_64", "--version").Output(); err == nil {
		m.QEMU = strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
	}
	return m
}

// ErrNoQEMU is returned when the QEMU system is asked for but missing.
var ErrNoQEMU = errors.New("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
