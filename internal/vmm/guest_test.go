package vmm

import (
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

func bootGuest(t *testing.T, cpus int, cmdline string) (*VM, *testguest.Console) {
	t.Helper()
	testguest.RequireKVM(t)
	img := testguest.Image(t)
	out := &testguest.Console{}
	vm, err := New(Config{MemSize: 256 << 20, CPUs: cpus, Kernel: img, Cmdline: cmdline, Console: out})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm, out
}

func parseConsole(t *testing.T, out *testguest.Console) ([]guestlog.Line, guestlog.Summary) {
	t.Helper()
	text := out.String()
	text = text[:strings.LastIndex(text, "\n")+1] // only complete lines
	lines, err := guestlog.ParseAll(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	return lines, guestlog.Summarize(lines)
}

// TestWorkloads boots the test guest with 1 and 2 vCPUs and each workload,
// lets every CPU report a few heartbeats, stops it, and checks its reports.
// (The exit path is TestBootTestGuest's; nothing here depends on timing.)
func TestWorkloads(t *testing.T) {
	for _, cpus := range []int{1, 2} {
		for _, w := range []string{"idle", "dirty", "verify"} {
			t.Run(fmt.Sprintf("%s-%dcpu", w, cpus), func(t *testing.T) {
				cmd := "workload=" + w + " size=64M"
				if w == "dirty" {
					cmd += " rate=100M pattern=hotcold"
				}
				vm, out := bootGuest(t, cpus, cmd)
				if err := vm.Start(); err != nil {
					t.Fatal(err)
				}
				beats := 6
				if w == "idle" {
					beats = 2 // idle beats once a second
				}
				waitBeatsPerCPU(t, vm, out, cpus, beats)
				vm.Stop()
				if _, err := vm.Wait(); err != nil {
					t.Fatalf("%v\n%s", err, out.String())
				}
				lines, sum := parseConsole(t, out)
				if err := sum.Healthy(); err != nil {
					t.Fatalf("%v\n%s", err, out.String())
				}
				if sum.CPUs != uint64(cpus) {
					t.Fatalf("guest saw %d CPUs, want %d", sum.CPUs, cpus)
				}
				started := map[uint64]bool{}
				for _, l := range lines {
					if l.Kind == guestlog.KindStart {
						started[l.MustUint("cpu")] = true
					}
				}
				if len(started) != cpus {
					t.Fatalf("%d CPUs started the workload, want %d", len(started), cpus)
				}
				if w == "dirty" {
					checkDirtyRate(t, lines, 100<<20)
				}
			})
		}
	}
}

// waitBeatsPerCPU waits (up to a minute) until every CPU printed n heartbeats.
func waitBeatsPerCPU(t *testing.T, vm *VM, out *testguest.Console, cpus, n int) {
	t.Helper()
	waitLineTimeout(t, vm, out, time.Minute, func(guestlog.Line) bool {
		lines, _ := parseConsole(t, out)
		per := map[uint64]int{}
		for _, l := range lines {
			if guestlog.IsBeat(l) {
				per[l.MustUint("cpu")]++
			}
		}
		for c := 0; c < cpus; c++ {
			if per[uint64(c)] < n {
				return false
			}
		}
		return true
	})
}

// checkDirtyRate checks the dirty workload writes and keeps to its pace
// once warmed up (after each CPU's third heartbeat), summed over CPUs.
func checkDirtyRate(t *testing.T, lines []guestlog.Line, target uint64) {
	t.Helper()
	var pages uint64
	var beats int
	perCPU := map[uint64]int{}
	for _, l := range lines {
		if l.Kind != guestlog.KindHeartbeat {
			continue
		}
		cpu := l.MustUint("cpu")
		perCPU[cpu]++
		if perCPU[cpu] > 3 { // past warm-up (first touches fault pages in)
			pages += l.MustUint("pages")
			beats++
		}
	}
	if beats == 0 {
		t.Fatal("no steady-state heartbeats")
	}
	cpus := uint64(len(perCPU))
	rate := pages * 4096 * 10 * cpus / uint64(beats) // 100 ms beats
	t.Logf("dirty rate %d MB/s (target %d MB/s)", rate>>20, target>>20)
	// Pacing is behaviour: the guest must never write faster than asked.
	// How close it gets below the target depends on the host's load.
	if pages == 0 || rate > target*3/2 {
		t.Errorf("dirty rate %d B/s: not paced to the target %d", rate, target)
	}
}

// TestOracleDetectsMemoryCorruption changes one word of the verify
// workload's memory behind the guest's back: the guest must name it.
func TestOracleDetectsMemoryCorruption(t *testing.T) {
	vm, out := bootGuest(t, 2, "workload=verify size=64M")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	waitLine(t, vm, out, func(l guestlog.Line) bool { return l.Kind == guestlog.KindVerify && l.MustUint("cpu") == 1 })
	var base, pages uint64
	lines, _ := parseConsole(t, out)
	for _, l := range lines {
		if l.Kind == guestlog.KindStart && l.MustUint("cpu") == 1 {
			base, pages = l.MustUint("base"), l.MustUint("pages")
		}
	}
	if pages == 0 {
		t.Fatal("no start line for cpu 1")
	}
	target := base + (pages-3)*4096 + 0x18
	if err := vm.Pause(); err != nil {
		t.Fatal(err)
	}
	word, err := vm.Memory().Slice(target, 8)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint64(word, binary.LittleEndian.Uint64(word)^0x100)
	vm.Resume()
	fail := waitLine(t, vm, out, func(l guestlog.Line) bool { return l.Kind == guestlog.KindFail })
	if fail.Fields["what"] != "mem" || fail.MustUint("gpa") != target || fail.MustUint("offset") != 0x18 {
		t.Fatalf("guest reported %q, want a mem failure at gpa %#x", fail.Raw, target)
	}
	t.Logf("guest reported: %s", fail.Raw)
}

// TestOracleDetectsRegisterCorruption flips a bit of xmm3 while the guest
// soaks its registers: the guest must report the register.
func TestOracleDetectsRegisterCorruption(t *testing.T) {
	vm, out := bootGuest(t, 1, "workload=verify size=16M")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	waitLine(t, vm, out, func(l guestlog.Line) bool { return l.Kind == guestlog.KindVerify })
	for try := 0; try < 200; try++ {
		if err := vm.Pause(); err != nil {
			t.Fatal(err)
		}
		fpu, err := vm.VCPU(0).GetFPU()
		if err != nil {
			t.Fatal(err)
		}
		fpu.XMM[3][5] ^= 0x40
		if err := vm.VCPU(0).SetFPU(fpu); err != nil {
			t.Fatal(err)
		}
		vm.Resume()
		time.Sleep(5 * time.Millisecond)
		_, sum := parseConsole(t, out)
		for _, f := range sum.Failures {
			if f.Fields["what"] == "reg" && strings.HasSuffix(f.Fields["reg"], "mm3.q0") {
				t.Logf("after %d tries guest reported: %s", try+1, f.Raw)
				return
			}
			t.Fatalf("unexpected failure report %q", f.Raw)
		}
	}
	t.Fatalf("guest never noticed xmm3 corruption\n%s", out.String())
}

// waitLine waits up to 30 s for a console line matching ok.
func waitLine(t *testing.T, vm *VM, out *testguest.Console, ok func(guestlog.Line) bool) guestlog.Line {
	t.Helper()
	return waitLineTimeout(t, vm, out, 30*time.Second, ok)
}

func waitLineTimeout(t *testing.T, vm *VM, out *testguest.Console, d time.Duration, ok func(guestlog.Line) bool) guestlog.Line {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		lines, _ := parseConsole(t, out)
		for _, l := range lines {
			if ok(l) {
				return l
			}
		}
		select {
		case <-vm.Done():
			_, err := vm.Wait()
			t.Fatalf("VM ended (%v) before the expected line\n%s", err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("expected line not seen\n%s", out.String())
	return guestlog.Line{}
}
