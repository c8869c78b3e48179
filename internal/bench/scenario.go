package bench

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
)

// Spec is one run to make, independent of the system that makes it.
type Spec struct {
	Scenario  string
	Technique string        // precopy, postcopy, hybrid, offline
	Variant   string        // optimization set (optimizations, offline)
	Systems   []string      // only these systems (nil: all)
	Guest     Guest         // memory, CPUs, workload, command line
	HB        time.Duration // the guest's heartbeat interval

	PrecopyFor    time.Duration // hybrid: pre-copy before post-copy
	ForceAfter    time.Duration // precopy: force the switch after this
	DowntimeLimit time.Duration // pre-copy's target

	Warmup, Settle time.Duration
	seq            int
}

// vmName is unique per run, so consoles and sockets never mix.
func (s *Spec) vmName() string { return fmt.Sprintf("bench%d", s.seq) }

// label names the run in progress lines and tables.
func (s *Spec) label(system string) string {
	parts := []string{system, s.Technique}
	if s.Technique == "hybrid" {
		parts[1] = fmt.Sprintf("hybrid(%s)", s.PrecopyFor)
	}
	if s.Variant != "" {
		parts = append(parts, s.Variant)
	}
	if s.Guest.Workload == "dirty" && s.Scenario != "idle" {
		parts = append(parts, fmt.Sprintf("ws=%s rate=%s/s", sizeText(s.Guest.WorkingSet), sizeText(s.Guest.DirtyRate)))
	}
	parts = append(parts, fmt.Sprintf("mem=%s", sizeText(int64(s.Guest.MemMiB)<<20)))
	return strings.Join(parts, " ")
}

func (s *Spec) runsOn(system string) bool {
	return s.Systems == nil || slices.Contains(s.Systems, system)
}

// warmUp waits for the guest's first heartbeats on the source, then lets
// the workload run for the warm-up time so a baseline exists.
func (s *Spec) warmUp(ctx context.Context, src *guestlog.Recorder) error {
	boot, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := WaitBeats(boot, src, 3, "booting on the source"); err != nil {
		return err
	}
	return sleep(ctx, s.Warmup)
}

// settle waits for the guest to beat on the destination, then lets it run
// there, so its checks of the memory it touches have time to report.
func (s *Spec) settle(ctx context.Context, dst *guestlog.Recorder) error {
	resumed, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := WaitBeats(resumed, dst, 1, "running on the destination"); err != nil {
		return err
	}
	return sleep(ctx, s.Settle)
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// profile holds the sizes a profile uses: quick fits in minutes on a
// 2-core machine, full reproduces the seed paper's scale.
type profile struct {
	name        string
	mem         int   // MiB, Scenario I guest
	ws          int64 // Scenario I working set
	rates       []int64
	force       time.Duration
	wsSizes     []int64 // Scenario II working sets
	hybrids     []time.Duration
	idleMem     []int
	idlePost    bool
	optMem      int
	optFill     int64
	optFerry    []string
	optQEMU     []string
	offlineMem  int
	offlineFill int64
	warmup      time.Duration
	settle      time.Duration
}

const (
	kib = int64(1) << 10
	mib = int64(1) << 20
	gib = int64(1) << 30
)

var profiles = map[string]profile{
	"quick": {
		name: "quick", mem: 512, ws: 256 * mib,
		rates: []int64{10 * mib, 1 * gib}, force: 15 * time.Second,
		wsSizes: []int64{256 * mib, 768 * mib}, hybrids: []time.Duration{3 * time.Second},
		idleMem: []int{1024, 2048},
		optMem:  512, optFill: 256 * mib, optFerry: []string{"none", "zstd", "all"}, optQEMU: []string{"none", "multifd4-zstd"},
		offlineMem: 512, offlineFill: 256 * mib,
		warmup: 2 * time.Second, settle: 2 * time.Second,
	},
	"full": {
		name: "full", mem: 1024, ws: 512 * mib,
		rates: []int64{10 * mib, 100 * mib, 1 * gib}, force: 60 * time.Second,
		// The test guest's working set is one RAM range: below the 3 GiB
		// MMIO hole, at most ~3 GiB.
		wsSizes: []int64{256 * mib, 1 * gib, 2 * gib, 3 * gib},
		hybrids: []time.Duration{3 * time.Second, 5 * time.Second, 10 * time.Second},
		idleMem: []int{1024, 2048, 4096, 8192}, idlePost: true,
		optMem: 1024, optFill: 640 * mib,
		optFerry:   []string{"none", "zstd", "lz4", "delta", "dedup", "streams4", "all"},
		optQEMU:    []string{"none", "xbzrle", "multifd4", "multifd4-zstd"},
		offlineMem: 1024, offlineFill: 640 * mib,
		warmup: 3 * time.Second, settle: 3 * time.Second,
	},
}

// Scenarios are the names `ferry bench` accepts, in the order they run.
var Scenarios = []string{"dirty-rate", "working-set", "idle", "optimizations", "offline", "smoke"}

// scenarioAliases accept the seed paper's names.
var scenarioAliases = map[string]string{"scenario1": "dirty-rate", "scenario-i": "dirty-rate", "scenario2": "working-set", "scenario-ii": "working-set"}

// ResolveScenarios checks names ("all" is every scenario but smoke).
func ResolveScenarios(names []string) ([]string, error) {
	var out []string
	for _, n := range names {
		n = strings.ToLower(n)
		if a, ok := scenarioAliases[n]; ok {
			n = a
		}
		switch {
		case n == "all":
			out = append(out, Scenarios[:len(Scenarios)-1]...)
		case slices.Contains(Scenarios, n):
			out = append(out, n)
		default:
			return nil, fmt.Errorf("unknown scenario %q: choose from %s, all", n, strings.Join(Scenarios, ", "))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("name at least one scenario: %s, all", strings.Join(Scenarios, ", "))
	}
	return slices.Compact(out), nil
}

// specs lists the runs of a scenario in a profile.
func specs(scenario string, p profile) []Spec {
	// 50 ms beats: each line costs the guest ~100 port writes (exits), so
	// shorter intervals slow the workload itself; a guest whose clock stops
	// while it is paused still shows its downtime as gap − interval.
	const hb = 50 * time.Millisecond
	base := Spec{Scenario: scenario, HB: hb, DowntimeLimit: 300 * time.Millisecond, ForceAfter: p.force, Warmup: p.warmup, Settle: p.settle}
	dirty := func(mem int, ws, rate int64) Guest {
		return dirtyGuest(mem, ws, rate, 0, "", hb)
	}
	var out []Spec
	add := func(s Spec) { out = append(out, s) }
	techniques := func(s Spec, hybrids []time.Duration) {
		for _, t := range []string{"precopy", "postcopy"} {
			s.Technique = t
			add(s)
		}
		for _, h := range hybrids {
			s.Technique, s.PrecopyFor = "hybrid", h
			add(s)
		}
	}
	switch scenario {
	case "dirty-rate":
		for _, rate := range p.rates {
			s := base
			s.Guest = dirty(p.mem, p.ws, rate)
			techniques(s, []time.Duration{5 * time.Second})
		}
	case "working-set":
		for _, ws := range p.wsSizes {
			s := base
			s.Guest = dirty(int(ws/mib)+256, ws, 1*gib)
			techniques(s, p.hybrids)
		}
	case "idle":
		for _, mem := range p.idleMem {
			s := base
			// A nearly idle guest: 1 MiB rewritten slowly keeps the
			// heartbeats (the downtime probe) going and nothing else.
			s.Guest = dirty(mem, 1*mib, 256*kib)
			s.Technique = "precopy"
			add(s)
			if p.idlePost {
				s.Technique = "postcopy"
				add(s)
			}
		}
	case "optimizations":
		for system, variants := range map[string][]string{"ferry": p.optFerry, "qemu": p.optQEMU} {
			for _, v := range variants {
				s := base
				s.Guest = dirtyGuest(p.optMem, 64*mib, 20*mib, p.optFill, "mixed", hb)
				s.Technique, s.Variant, s.Systems = "precopy", v, []string{system}
				add(s)
			}
		}
		slices.SortStableFunc(out, func(a, b Spec) int { return strings.Compare(a.Systems[0], b.Systems[0]) })
	case "offline":
		for _, v := range []string{"raw", "zstd"} {
			s := base
			s.Guest = dirtyGuest(p.offlineMem, 64*mib, 20*mib, p.offlineFill, "mixed", hb)
			s.Technique, s.Variant = "offline", v
			if v == "zstd" {
				s.Systems = []string{"ferry"} // QEMU 7.2 has no compressed save to a file
			}
			add(s)
		}
	case "smoke":
		s := base
		s.Guest = dirty(256, 32*mib, 64*mib)
		s.Technique, s.Warmup, s.Settle = "precopy", time.Second, time.Second
		add(s)
	}
	return out
}

func dirtyGuest(mem int, ws, rate, fill int64, content string, hb time.Duration) Guest {
	cmd := fmt.Sprintf("workload=dirty size=%d rate=%d check=1 hb=%dms cpus=1", ws, rate, hb.Milliseconds())
	if fill > 0 {
		cmd += fmt.Sprintf(" fill=%d content=%s", fill, content)
	}
	return Guest{MemMiB: mem, CPUs: 1, Workload: "dirty", WorkingSet: ws, DirtyRate: rate, Fill: fill, Content: content, Cmdline: cmd}
}

// sizeText is a short size: 512M, 1G, 10M, 256K.
func sizeText(n int64) string {
	switch {
	case n >= gib && n%gib == 0:
		return fmt.Sprintf("%dG", n/gib)
	case n >= mib && n%mib == 0:
		return fmt.Sprintf("%dM", n/mib)
	case n >= kib && n%kib == 0:
		return fmt.Sprintf("%dK", n/kib)
	}
	return fmt.Sprint(n)
}
