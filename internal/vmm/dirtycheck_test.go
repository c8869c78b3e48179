package vmm

import (
	"encoding/binary"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

// dirtySlice is one CPU's slice of the dirty workload with check=1, from
// its start line: data pages from base, the generation table after them.
type dirtySlice struct {
	base, pages       uint64 // the whole slice
	table, tablePages uint64
	dataPages, region uint64 // pages the workload writes; working-set base
}

func dirtySlices(t *testing.T, lines []guestlog.Line) map[uint64]dirtySlice {
	t.Helper()
	var region uint64
	out := map[uint64]dirtySlice{}
	for _, l := range lines {
		switch l.Kind {
		case guestlog.KindBoot:
			region = l.MustUint("region")
		case guestlog.KindStart:
			s := dirtySlice{base: l.MustUint("base"), pages: l.MustUint("pages"),
				table: l.MustUint("table"), tablePages: l.MustUint("table_pages"), region: region}
			s.dataPages = s.pages - s.tablePages
			if s.tablePages != (s.pages*4+4095)/4096 || s.table != s.base+s.dataPages*4096 {
				t.Fatalf("start line %q: want a %d-page table at the end of the slice", l.Raw, (s.pages*4+4095)/4096)
			}
			out[l.MustUint("cpu")] = s
		}
	}
	return out
}

// checkDirtyMemory reads a stopped check=1 guest's working set from the
// host: every page with a generation holds what docs/guest.md says, word
// k of working-set page pg at generation g being (pg<<32 | g) + k. The
// VM may stop while a CPU rewrites a page, before it stores the page's
// new generation: one page per CPU may hold a prefix of generation g+1.
func checkDirtyMemory(t *testing.T, vm *VM, s dirtySlice) (written uint64) {
	t.Helper()
	table, err := vm.Memory().Slice(s.table, s.dataPages*4)
	if err != nil {
		t.Fatal(err)
	}
	data, err := vm.Memory().Slice(s.base, s.dataPages*4096)
	if err != nil {
		t.Fatal(err)
	}
	inFlight := 0
	for p := uint64(0); p < s.dataPages; p++ {
		g := uint64(binary.LittleEndian.Uint32(table[p*4:]))
		if g == 0 {
			continue
		}
		written++
		pg := (s.base-s.region)/4096 + p
		next := g + 1
		if next == 1<<32 {
			next = 1
		}
		newer := 0 // words of generation g+1, all before the first of g
		for k := uint64(0); k < 512; k++ {
			got := binary.LittleEndian.Uint64(data[p*4096+k*8:])
			if got == (pg<<32|next)+k && newer == int(k) {
				newer++
				continue
			}
			if want := (pg<<32 | g) + k; got != want {
				t.Fatalf("page %#x (gpa %#x) generation %d word %d: %#x, want %#x", pg, s.base+p*4096, g, k, got, want)
			}
		}
		if newer > 0 {
			if inFlight++; inFlight > 1 {
				t.Fatalf("page %#x (gpa %#x) generation %d: %d words of the next one, and another page too", pg, s.base+p*4096, g, newer)
			}
			t.Logf("page %#x was being rewritten: %d words of generation %d", pg, newer, next)
		}
	}
	return written
}

// TestDirtyCheck runs the dirty workload with check=1, paced and flat out,
// for a few seconds: every CPU's heartbeats carry checked (growing) and
// errors (zero), and the memory left behind matches its generations.
func TestDirtyCheck(t *testing.T) {
	for _, tc := range []struct{ name, cmd string }{
		{"seq-full", "pattern=seq"},
		{"random-rate", "pattern=random rate=100M"},
		{"hotcold-rate", "pattern=hotcold rate=100M"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const cpus = 2
			vm, out := bootGuest(t, cpus, "workload=dirty size=64M check=1 "+tc.cmd)
			if err := vm.Start(); err != nil {
				t.Fatal(err)
			}
			waitBeatsPerCPU(t, vm, out, cpus, 25) // 2.5 s
			vm.Stop()
			if _, err := vm.Wait(); err != nil {
				t.Fatalf("%v\n%s", err, out.String())
			}
			lines, sum := parseConsole(t, out)
			if err := sum.Healthy(); err != nil {
				t.Fatalf("%v\n%s", err, out.String())
			}
			if !sum.Checking || sum.Checked == 0 || sum.BeatErrors != 0 {
				t.Fatalf("summary %+v: want checked pages and no errors", sum)
			}
			last := map[uint64]uint64{}
			beats := map[uint64]int{}
			for _, l := range lines {
				if l.Kind != guestlog.KindHeartbeat {
					continue
				}
				cpu := l.MustUint("cpu")
				c, err := l.Uint("checked")
				if err != nil {
					t.Fatal(err)
				}
				if e, err := l.Uint("errors"); err != nil || e != 0 {
					t.Fatalf("heartbeat %q: want errors=0", l.Raw)
				}
				// Cumulative: it never goes back. A paced CPU also beats
				// while it waits, so a beat with pages=0 may repeat it.
				p, _ := l.Uint("pages")
				if c < last[cpu] || (beats[cpu] >= 10 && p > 0 && c == last[cpu]) {
					t.Fatalf("heartbeat %q: checked %d after %d", l.Raw, c, last[cpu])
				}
				last[cpu], beats[cpu] = c, beats[cpu]+1
			}
			for cpu, n := range beats {
				if n < 10 || last[cpu] == 0 {
					t.Fatalf("cpu %d: %d beats, %d pages checked", cpu, n, last[cpu])
				}
			}
			if strings.Contains(tc.cmd, "rate=") {
				checkDirtyRate(t, lines, 100<<20)
			}
			var written uint64
			for cpu, s := range dirtySlices(t, lines) {
				w := checkDirtyMemory(t, vm, s)
				t.Logf("cpu %d: %d pages checked, %d of %d data pages written, memory matches its generations", cpu, last[cpu], w, s.dataPages)
				written += w
			}
			if written == 0 {
				t.Fatal("no page has a generation")
			}
		})
	}
}

// TestDirtyCheckDetectsCorruption changes two pages of the running dirty
// workload (check=1) from the host, one all over and one in a single word
// mid-page: the guest must name each page and its first bad word before
// it rewrites the page, count each page once, keep running clean after
// that, and exit with status 1.
func TestDirtyCheckDetectsCorruption(t *testing.T) {
	// pattern=seq at 100 MB/s over 2 × 32 MiB: each CPU comes round to
	// every page about every 0.65 s.
	vm, out := bootGuest(t, 2, "workload=dirty size=64M rate=100M pattern=seq check=1 exit_after=10s")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	// checked > 0 on a seq sweep: every page of CPU 1 has been written.
	waitLine(t, vm, out, func(l guestlog.Line) bool {
		return l.Kind == guestlog.KindHeartbeat && l.MustUint("cpu") == 1 && l.MustUint("checked") > 0
	})
	lines, _ := parseConsole(t, out)
	s := dirtySlices(t, lines)[1]
	whole := s.base + (s.dataPages-3)*4096  // every word changed
	word := s.base + (s.dataPages-100)*4096 // one word changed, at 0x7c8
	const garbage = 0x5a5a00ff00ff5a5a
	if err := vm.Pause(); err != nil {
		t.Fatal(err)
	}
	page, err := vm.Memory().Slice(whole, 4096)
	if err != nil {
		t.Fatal(err)
	}
	for k := 0; k < 4096; k += 8 {
		binary.LittleEndian.PutUint64(page[k:], binary.LittleEndian.Uint64(page[k:])^garbage)
	}
	page, err = vm.Memory().Slice(word, 4096)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint64(page[0x7c8:], binary.LittleEndian.Uint64(page[0x7c8:])^0x100)
	resumed := time.Now()
	vm.Resume()
	waitLine(t, vm, out, func(guestlog.Line) bool {
		_, sum := parseConsole(t, out)
		return len(sum.Failures) >= 2
	})
	took := time.Since(resumed)
	_, sum := parseConsole(t, out)
	for _, c := range []struct {
		gpa, offset, words, flip uint64
	}{{whole, 0, 512, garbage}, {word, 0x7c8, 1, 0x100}} {
		pg := (c.gpa - s.region) / 4096
		var fail guestlog.Line
		for _, f := range sum.Failures {
			if f.MustUint("page") == pg {
				fail = f
			}
		}
		t.Logf("guest reported: %s", fail.Raw)
		if fail.Fields["what"] != "mem" || fail.MustUint("cpu") != 1 || fail.MustUint("gpa") != c.gpa+c.offset ||
			fail.MustUint("offset") != c.offset || fail.MustUint("words") != c.words {
			t.Fatalf("guest reported %q, want a mem failure of page %#x at gpa %#x, %d words", fail.Raw, pg, c.gpa+c.offset, c.words)
		}
		want := (pg<<32 | fail.MustUint("gen")) + c.offset/8
		if fail.MustUint("expected") != want || fail.MustUint("found") != want^c.flip {
			t.Fatalf("guest reported %q: want expected %#x found %#x", fail.Raw, want, want^c.flip)
		}
	}
	t.Logf("both pages reported %v after the resume", took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("detection took %v", took)
	}
	exit, err := vm.Wait()
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	lines, sum = parseConsole(t, out)
	if exit.Reason != ExitGuest || exit.Status != 1 || sum.ExitErrors != 2 || len(sum.Failures) != 2 || sum.BeatErrors != 2 {
		t.Fatalf("exit %+v, summary %+v: want status 1, two failures, two errors\n%s", exit, sum, out.String())
	}
	if err := sum.Healthy(); err == nil {
		t.Fatal("Healthy() accepts a guest that found corruption")
	}
	// The pages were rewritten after the report: later sweeps are clean
	// and CPU 0 never saw anything.
	var after int
	for _, l := range lines {
		if l.Kind != guestlog.KindHeartbeat {
			continue
		}
		if e := l.MustUint("errors"); e > 2*l.MustUint("cpu") {
			t.Fatalf("heartbeat %q: want no error on cpu 0, two on cpu 1", l.Raw)
		} else if e == 2 {
			after++
		}
	}
	if after < 10 {
		t.Fatalf("only %d heartbeats after the failures", after)
	}
}

// TestDirtyCheckConfig: a slice with no room for the generation table
// and a page is a configuration error, like the other layout errors.
func TestDirtyCheckConfig(t *testing.T) {
	requireConfigFailure(t, "workload=dirty size=4K check=1")
}

// TestDirtyCheckCost measures what check=1 costs the dirty workload flat
// out on one CPU over a 256 MiB working set: pages written per second with
// and without the check, as the 90th percentile of the 100 ms beats past
// the first second (a busy host drags the others down). It asserts only
// that both run.
func TestDirtyCheckCost(t *testing.T) {
	if testing.Short() {
		t.Skip("measurement")
	}
	testguest.RequireKVM(t)
	img := testguest.Image(t)
	rates := map[string]float64{}
	for _, check := range []string{"0", "1"} {
		out := &testguest.Console{}
		vm, err := New(Config{MemSize: 512 << 20, CPUs: 1, Kernel: img, Console: out,
			Cmdline: "workload=dirty size=256M check=" + check})
		if err != nil {
			t.Fatal(err)
		}
		if err := vm.Start(); err != nil {
			vm.Close()
			t.Fatal(err)
		}
		waitBeatsPerCPU(t, vm, out, 1, 40)
		vm.Stop()
		_, err = vm.Wait()
		vm.Close()
		if err != nil {
			t.Fatal(err)
		}
		lines, sum := parseConsole(t, out)
		if err := sum.Healthy(); err != nil {
			t.Fatalf("%v\n%s", err, out.String())
		}
		var beats []float64
		for _, l := range lines {
			if l.Kind == guestlog.KindHeartbeat && l.MustUint("seq") >= 10 {
				beats = append(beats, float64(l.MustUint("rate")))
			}
		}
		if len(beats) == 0 {
			t.Fatalf("check=%s: no steady-state heartbeats\n%s", check, out.String())
		}
		sort.Float64s(beats)
		rates[check] = beats[len(beats)*9/10]
		t.Logf("check=%s: %.0f MB/s written (%.0f pages/s; p90 of %d beats), %d pages checked",
			check, rates[check]/1e6, rates[check]/4096, len(beats), sum.Checked)
		if rates[check] == 0 {
			t.Errorf("check=%s: nothing written", check)
		}
	}
	t.Logf("check=1 writes at %.0f%% of check=0's rate", 100*rates["1"]/rates["0"])
}
