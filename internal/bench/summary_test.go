package bench

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// sumTestSet is a synthetic benchmark covering every scenario, with the
// awkward cases the renderers must survive: failed runs, a run whose
// guest saw errors, zero downtimes, a forced stop, an unknown scenario.
func sumTestSet() *Set {
	s := &Set{
		Version: ResultVersion, Started: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC), Profile: "full",
		Machine: Machine{CPU: "Test CPU 9000", CPUs: 8, MemoryGiB: 32, Kernel: "6.12.0", KVM: "PVM", QEMU: "7.2.0", Ferry: "v0.test"},
		Link:    Link{Rate: "1Gbit", Latency: 500 * time.Microsecond},
	}
	add := func(r Result) { s.Results = append(s.Results, r) }
	sumTestSmoke(add)
	sumTestDirtyRate(add)
	sumTestWorkingSet(add)
	sumTestIdle(add)
	sumTestOptimizations(add)
	sumTestOffline(add)
	add(sumTestRun("custom-thing", "ferry", "precopy", 512, 0, 0, 30*time.Millisecond))
	return s
}

const (
	sumTestMiB = int64(1) << 20
	sumTestGiB = int64(1) << 30
)

func sumTestRun(scenario, system, technique string, mem int, ws, rate int64, downtime time.Duration) Result {
	r := Result{
		Version: ResultVersion, Scenario: scenario, System: system, Technique: technique,
		Guest:    Guest{MemMiB: mem, CPUs: 1, Workload: "dirty", WorkingSet: ws, DirtyRate: rate},
		Link:     Link{Rate: "1Gbit", Latency: 500 * time.Microsecond},
		Finished: true, Downtime: downtime, HeartbeatGap: downtime + 20*time.Millisecond,
		TotalTime:    2*time.Second + 30*downtime,
		BytesForward: uint64(mem) << 20, BytesBack: 1 << 20,
		Baseline: 1000, Degradation: 0.05, GuestChecked: 4096,
	}
	r.Label = fmt.Sprintf("%s %s mem=%d", system, technique, mem)
	return r
}

func sumTestSmoke(add func(Result)) {
	add(sumTestRun("smoke", "ferry", "precopy", 256, 32*sumTestMiB, 20*sumTestMiB, 12*time.Millisecond))
	add(sumTestRun("smoke", "qemu", "precopy", 256, 32*sumTestMiB, 20*sumTestMiB, 48*time.Millisecond))
}

// sumTestDirtyRate gives ferry's pre-copy a quarter of QEMU's downtime at
// every rate, so the comparison line has a known answer.
func sumTestDirtyRate(add func(Result)) {
	for i, rate := range []int64{10 * sumTestMiB, 100 * sumTestMiB, sumTestGiB} {
		for _, sys := range []string{"ferry", "qemu"} {
			f := time.Duration(1)
			if sys == "qemu" {
				f = 4
			}
			pre := sumTestRun("dirty-rate", sys, "precopy", 1024, 512*sumTestMiB, rate, f*time.Duration(10<<(3*i))*time.Millisecond)
			pre.ForcedStop = sys == "qemu" && rate == sumTestGiB
			post := sumTestRun("dirty-rate", sys, "postcopy", 1024, 512*sumTestMiB, rate, 0) // below the heartbeat's resolution
			hyb := sumTestRun("dirty-rate", sys, "hybrid", 1024, 512*sumTestMiB, rate, f*8*time.Millisecond)
			hyb.PrecopyFor = 5 * time.Second
			if rate == sumTestGiB {
				for _, r := range []*Result{&pre, &post, &hyb} {
					r.Timeline = sumTestTimeline(r.Technique == "postcopy")
				}
			}
			if sys == "qemu" && rate == 100*sumTestMiB {
				post.Finished = false
				post.Error = "postcopy: destination: userfaultfd: " + strings.Repeat("very long reason ", 10) + "\nsecond line"
			}
			if sys == "ferry" && rate == 10*sumTestMiB {
				hyb.GuestErrors = 3
				hyb.Downtime = 777 * time.Millisecond // must not reach a plot
			}
			add(pre)
			add(post)
			add(hyb)
		}
	}
}

func sumTestTimeline(dip bool) []RatePoint {
	var tl []RatePoint
	for i := range 200 {
		t := float64(i) * 0.1
		rel, host := 1.0, "source"
		if t > 8 {
			host = "destination"
		}
		if dip && t > 8 && t < 14 {
			rel = 0.3
		}
		tl = append(tl, RatePoint{T: t, Relative: rel, Host: host})
	}
	return tl
}

func sumTestWorkingSet(add func(Result)) {
	for _, ws := range []int64{256 * sumTestMiB, sumTestGiB, 4 * sumTestGiB} {
		mem := int(ws/sumTestMiB) + 256
		for _, sys := range []string{"ferry", "qemu"} {
			add(sumTestRun("working-set", sys, "precopy", mem, ws, sumTestGiB, time.Duration(ws/sumTestMiB)*time.Millisecond))
			add(sumTestRun("working-set", sys, "postcopy", mem, ws, sumTestGiB, 15*time.Millisecond))
			for _, h := range []time.Duration{3, 5, 10} {
				r := sumTestRun("working-set", sys, "hybrid", mem, ws, sumTestGiB, 12*time.Millisecond)
				r.PrecopyFor = h * time.Second
				add(r)
			}
		}
	}
}

func sumTestIdle(add func(Result)) {
	for _, mem := range []int{1024, 2048, 4096, 8192} {
		for _, sys := range []string{"ferry", "qemu"} {
			r := sumTestRun("idle", sys, "precopy", mem, sumTestMiB, 256<<10, 5*time.Millisecond)
			if sys == "qemu" && mem == 8192 {
				r.Finished = false // the harness gave up without an error
			}
			add(r)
		}
	}
}

func sumTestOptimizations(add func(Result)) {
	variants := map[string][]string{
		"ferry": {"none", "zstd", "lz4", "delta", "dedup", "streams4", "all"},
		"qemu":  {"none", "xbzrle", "multifd4", "multifd4-zstd"},
	}
	for _, sys := range []string{"qemu", "ferry"} {
		for i, v := range variants[sys] {
			r := sumTestRun("optimizations", sys, "precopy", 1024, 64*sumTestMiB, 20*sumTestMiB, time.Duration(20+i)*time.Millisecond)
			r.Variant = v
			r.BytesForward = uint64(1024-100*i) << 20
			add(r)
		}
	}
}

func sumTestOffline(add func(Result)) {
	for _, c := range []struct {
		sys, variant string
		state        uint64
	}{{"ferry", "raw", 700 << 20}, {"ferry", "zstd", 200 << 20}, {"qemu", "raw", 800 << 20}} {
		r := sumTestRun("offline", c.sys, "offline", 1024, 64*sumTestMiB, 20*sumTestMiB, 3*time.Second)
		r.Variant = c.variant
		r.Offline = &Offline{StateBytes: c.state, Compressed: c.variant == "zstd",
			SaveTime: 800 * time.Millisecond, TransferTime: time.Duration(c.state>>20) * 10 * time.Millisecond, RestoreTime: 400 * time.Millisecond}
		add(r)
	}
	failed := sumTestRun("offline", "qemu", "offline", 1024, 64*sumTestMiB, 20*sumTestMiB, 0)
	failed.Variant, failed.Finished, failed.Error = "zstd", false, "qemu: no compressed save"
	add(failed)
}

func sumTestSummary(t *testing.T, s *Set) string {
	t.Helper()
	var b strings.Builder
	if err := WriteSummary(&b, s); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestWriteSummaryHeaderAndSections(t *testing.T) {
	out := sumTestSummary(t, sumTestSet())
	for _, want := range []string{
		"# ferry bench results", "Test CPU 9000, 8 CPUs, 32 GiB", "KVM: PVM", "QEMU: 7.2.0", "ferry: v0.test",
		"- link: 1Gbit, 0.5 ms latency", "profile full",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("summary lacks %q", want)
		}
	}
	// Sections come in the fixed order, unknown scenarios last.
	last := -1
	for _, sc := range []string{"(`smoke`)", "(`dirty-rate`)", "(`working-set`)", "(`idle`)", "(`optimizations`)", "(`offline`)", "(`custom-thing`)"} {
		i := strings.Index(out, sc)
		if i < 0 || i < last {
			t.Fatalf("section %s missing or out of order:\n%s", sc, out)
		}
		last = i
	}
}

func TestWriteSummaryRowsAndFlags(t *testing.T) {
	s := sumTestSet()
	out := sumTestSummary(t, s)
	rows := 0
	for line := range strings.Lines(out) {
		if strings.HasPrefix(line, "| ferry") || strings.HasPrefix(line, "| qemu") {
			rows++
		}
	}
	if rows != len(s.Results) {
		t.Errorf("%d table rows, want one per run (%d)", rows, len(s.Results))
	}
	for _, want := range []string{
		"**guest saw 3 errors**", "**failed**: guest memory check",
		"**failed**: postcopy: destination: userfaultfd: very long", "…",
		"**did not finish**", "ok, forced stop-and-copy", "**failed**: qemu: no compressed save",
		"hybrid (5 s pre-copy)", "| 10 MiB/s |", "| 1 GiB/s |", "| multifd4-zstd |",
		"0.0 ms", "ok (4096 pages)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("summary lacks %q", want)
		}
	}
	if strings.Contains(out, "second line") {
		t.Error("a failed run's error was not shortened to its first line")
	}
}

func TestWriteSummaryComparison(t *testing.T) {
	out := sumTestSummary(t, sumTestSet())
	section := out[strings.Index(out, "(`dirty-rate`)"):strings.Index(out, "(`working-set`)")]
	// ferry's pre-copy downtime is a quarter of QEMU's at all three rates.
	if !strings.Contains(section, "- precopy (3 matched points): downtime 0.25 (ferry 4.0× lower)") {
		t.Errorf("dirty-rate comparison wrong:\n%s", section)
	}
	// Post-copy: the failed QEMU run leaves two rates; both downtimes
	// are 0, counted as 1 ms, so equal.
	if !strings.Contains(section, "- postcopy (2 matched points): downtime 1.00 (about equal)") {
		t.Errorf("dirty-rate post-copy comparison wrong:\n%s", section)
	}
	opt := out[strings.Index(out, "(`optimizations`)"):strings.Index(out, "(`offline`)")]
	if !strings.Contains(opt, "best variant by bytes: ferry all, QEMU multifd4-zstd:") {
		t.Errorf("optimizations comparison lacks the best variants:\n%s", opt)
	}
	if !strings.Contains(opt, "| -10% |") {
		t.Errorf("optimizations lack the bytes-vs-none column:\n%s", opt)
	}
}

func TestWriteSummaryCommonParameters(t *testing.T) {
	out := sumTestSummary(t, sumTestSet())
	section := out[strings.Index(out, "(`dirty-rate`)"):strings.Index(out, "(`working-set`)")]
	if !strings.Contains(section, "All runs: memory 1 GiB, vCPUs 1, workload dirty, working set 512 MiB.") {
		t.Errorf("dirty-rate section does not state the shared parameters:\n%s", section)
	}
	if strings.Contains(section, "| working set |") {
		t.Error("a constant parameter got a column")
	}
}

func TestWriteSummaryEmptySet(t *testing.T) {
	out := sumTestSummary(t, &Set{})
	if !strings.Contains(out, "machine: unknown") || !strings.Contains(out, "0 runs, 0 failed") {
		t.Errorf("empty set summary:\n%s", out)
	}
}

func TestSumHelpers(t *testing.T) {
	for d, want := range map[time.Duration]string{
		0: "0.0 ms", 1500 * time.Microsecond: "1.5 ms", 250 * time.Millisecond: "250 ms",
		2500 * time.Millisecond: "2.50 s", 150 * time.Second: "150 s",
	} {
		if got := sumDuration(d); got != want {
			t.Errorf("sumDuration(%v) = %q, want %q", d, got, want)
		}
	}
	if got := sumMedian([]float64{5, 1, 3, 2}); got != 2.5 {
		t.Errorf("median = %v", got)
	}
	if got := sumShorten("a|b\nc", 10); got != "a|b" {
		t.Errorf("shorten = %q", got)
	}
	if got := sumCell("a|b"); got != `a\|b` {
		t.Errorf("cell = %q", got)
	}
	if got := sumVerdict(0.5); got != "0.50 (ferry 2.0× lower)" {
		t.Errorf("verdict = %q", got)
	}
	if got := sumSize(1 << 30); got != "1 GiB" {
		t.Errorf("size = %q", got)
	}
}
