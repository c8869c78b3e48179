package snapshot

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/testguest"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

func bootVerify(t *testing.T, mem uint64, cpus int, cmdline string) (*vmm.VM, *testguest.Console) {
	t.Helper()
	testguest.RequireKVM(t)
	con := &testguest.Console{}
	vm, err := vmm.New(vmm.Config{MemSize: mem, CPUs: cpus, Kernel: testguest.Image(t), Cmdline: cmdline, Console: con})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	return vm, con
}

// waitBeats waits until every CPU has printed at least n verify heartbeats.
func waitBeats(t *testing.T, vm *vmm.VM, con *testguest.Console, cpus, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		per := map[uint64]int{}
		for _, l := range con.Lines() {
			if l.Kind == guestlog.KindVerify {
				per[l.MustUint("cpu")]++
			}
		}
		ok := len(per) == cpus
		for _, c := range per {
			ok = ok && c >= n
		}
		if ok {
			return
		}
		select {
		case <-vm.Done():
			_, err := vm.Wait()
			t.Fatalf("VM ended early: %v\n%s", err, con.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("guest did not beat %d times\n%s", n, con.String())
}

func restoreFrom(t *testing.T, b []byte) (*vmm.VM, *testguest.Console, RestoreReport) {
	t.Helper()
	con := &testguest.Console{}
	vm, rep, err := Restore(bytes.NewReader(b), vmm.Config{Console: con})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm, con, rep
}

func requireClean(t *testing.T, what string, con *testguest.Console) guestlog.Summary {
	t.Helper()
	s := con.Summary()
	if len(s.Failures) > 0 || len(s.Exceptions) > 0 || s.ExitErrors > 0 {
		t.Fatalf("%s: guest reported problems\n%s", what, con.String())
	}
	return s
}

// TestSaveRestoreVerifyGuest saves a 2-vCPU verify guest in the middle of
// its work and continues it in a new VM: its own checks must stay clean
// (memory, registers, TSC) through several more seconds of work.
func TestSaveRestoreVerifyGuest(t *testing.T) {
	vm, con := bootVerify(t, 256<<20, 2, "workload=verify size=64M")
	waitBeats(t, vm, con, 2, 5)
	var buf bytes.Buffer
	rep, err := Save(vm, &buf, SaveOptions{Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	requireClean(t, "before save", con)
	t.Logf("saved: paused %s, %d bytes, %d pages written, %d zero pages skipped", rep.Paused, rep.BytesWritten, rep.PagesWritten, rep.PagesSkipped)
	if rep.PagesWritten == 0 || rep.PagesSkipped == 0 || rep.BytesWritten != uint64(buf.Len()) {
		t.Fatalf("implausible report %+v (buffer %d bytes)", rep, buf.Len())
	}
	vm2, con2, rrep := restoreFrom(t, buf.Bytes())
	t.Logf("restored in %s, %d pages", rrep.Duration, rrep.PagesLoaded)
	if rrep.PagesLoaded != rep.PagesWritten {
		t.Fatalf("restored %d pages, saved %d", rrep.PagesLoaded, rep.PagesWritten)
	}
	if err := vm2.Start(); err != nil {
		t.Fatal(err)
	}
	// Several more seconds of work: every CPU sweeps its memory again and
	// again and soaks its registers hundreds of times.
	waitBeats(t, vm2, con2, 2, 30)
	if err := vm2.Pause(); err != nil {
		t.Fatal(err)
	}
	s := requireClean(t, "after restore", con2)
	// The restored guest continues its sequence rather than rebooting.
	first := con2.Lines()[0]
	if first.Kind != guestlog.KindVerify || first.MustUint("seq") < 5 {
		t.Fatalf("restored guest's first line %q is not a continuation", first.Raw)
	}
	t.Logf("restored guest: %d clean heartbeats, warnings: %v", s.Heartbeats, rrep.Warnings)
}

// decodeState reads a state stream into a Machine and a memory summary.
func decodeState(t *testing.T, b []byte) (*state.Machine, state.MemorySummary) {
	t.Helper()
	r, err := state.NewReader(bytes.NewReader(b), state.ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var m state.Machine
	if _, err := r.ReadAll(&m, func(uint64, []byte) error { return nil }); err != nil {
		t.Fatal(err)
	}
	sum, _ := r.MemorySummary()
	return &m, sum
}

// TestCaptureRestoreCaptureEqual: the state read back from a restored VM
// equals the saved one except for fields documented as volatile.
func TestCaptureRestoreCaptureEqual(t *testing.T) {
	vm, con := bootVerify(t, 256<<20, 2, "workload=verify size=32M")
	waitBeats(t, vm, con, 2, 3)
	var buf bytes.Buffer
	if _, err := Save(vm, &buf, SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	saved, savedMem := decodeState(t, buf.Bytes())
	vm2, _, _ := restoreFrom(t, buf.Bytes())
	again, err := vm2.Capture()
	if err != nil {
		t.Fatal(err)
	}
	if diffs := state.Diff(saved, again, false); len(diffs) > 0 {
		for _, d := range diffs {
			t.Errorf("%s: saved %s, restored %s", d.Path, d.A, d.B)
		}
	}
	var buf2 bytes.Buffer
	if _, err := Save2(vm2, &buf2); err != nil {
		t.Fatal(err)
	}
	_, mem2 := decodeState(t, buf2.Bytes())
	if savedMem.SHA256 != mem2.SHA256 || savedMem.NonZeroPages != mem2.NonZeroPages {
		t.Fatalf("memory differs after restore: %d pages %x vs %d pages %x", savedMem.NonZeroPages, savedMem.SHA256[:8], mem2.NonZeroPages, mem2.SHA256[:8])
	}
	t.Logf("%d vCPUs, %d MSRs each, %d non-zero pages: equal", len(saved.VCPUs), len(saved.VCPUs[0].MSRs), savedMem.NonZeroPages)
}

// Save2 writes a VM that has not started (just restored) without pausing.
func Save2(vm *vmm.VM, w *bytes.Buffer) (SaveReport, error) {
	var rep SaveReport
	return rep, write(vm, w, SaveOptions{}, &rep)
}

// TestRepeatedSaveRestore saves and restores the same guest 20 times while
// it verifies itself, then lets the last copy run and checks it is clean.
func TestRepeatedSaveRestore(t *testing.T) {
	const cycles = 20
	vm, con := bootVerify(t, 128<<20, 2, "workload=verify size=32M")
	waitBeats(t, vm, con, 2, 1)
	var paused time.Duration
	var lastSeq uint64
	for i := 0; i < cycles; i++ {
		time.Sleep(150 * time.Millisecond)
		var buf bytes.Buffer
		rep, err := Save(vm, &buf, SaveOptions{Compress: i%4 == 3})
		if err != nil {
			_, werr := vm.Wait()
			t.Fatalf("cycle %d: %v (VM: %v)\n%s", i, err, werr, con.String())
		}
		paused += rep.Paused
		requireClean(t, fmt.Sprintf("cycle %d", i), con)
		for _, l := range con.Lines() {
			if l.Kind == guestlog.KindVerify && l.MustUint("cpu") == 0 {
				if s := l.MustUint("seq"); s < lastSeq {
					t.Fatalf("cycle %d: heartbeat sequence went back from %d to %d", i, lastSeq, s)
				} else {
					lastSeq = s
				}
			}
		}
		vm2, con2, _ := restoreFrom(t, buf.Bytes())
		if err := vm2.Start(); err != nil {
			t.Fatal(err)
		}
		vm, con = vm2, con2
	}
	waitBeats(t, vm, con, 2, 3)
	if err := vm.Pause(); err != nil {
		t.Fatal(err)
	}
	requireClean(t, "final", con)
	t.Logf("%d save/restore cycles, mean pause %s, guest heartbeat seq reached %d", cycles, paused/cycles, lastSeq)
}

func savedBytes(t *testing.T) []byte {
	vm, con := bootVerify(t, 64<<20, 2, "workload=verify size=16M")
	waitBeats(t, vm, con, 2, 1)
	var buf bytes.Buffer
	if _, err := Save(vm, &buf, SaveOptions{}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestCorruptStateRefused: truncated, bit-flipped and version-mismatched
// files are refused with a message naming the problem, and no VM results.
func TestCorruptStateRefused(t *testing.T) {
	good := savedBytes(t)
	try := func(name string, b []byte, want ...string) {
		t.Helper()
		vm, _, err := Restore(bytes.NewReader(b), vmm.Config{})
		if err == nil {
			vm.Close()
			t.Fatalf("%s: accepted", name)
		}
		if vm != nil {
			t.Fatalf("%s: a VM came back with the error", name)
		}
		msg := err.Error()
		for _, w := range want {
			if !strings.Contains(msg, w) {
				t.Fatalf("%s: error %q does not mention %q", name, msg, w)
			}
		}
		t.Logf("%s: %s", name, msg)
	}
	for _, cut := range []int{0, 10, 100, 2000, len(good) / 2, len(good) - 100, len(good) - 1} {
		try(fmt.Sprintf("truncated at %d", cut), good[:cut])
	}
	for _, off := range []int{200, 3000, len(good) / 3, len(good) - 50} {
		b := append([]byte(nil), good...)
		b[off] ^= 0x10
		try(fmt.Sprintf("bit flip at %d", off), b, "section")
	}
	b := append([]byte(nil), good...)
	binary.LittleEndian.PutUint32(b[8:], state.FormatVersion+1)
	try("version mismatch", b, "version")
}

// TestRestoreRefusesMissingCPUFeature doctors a saved CPUID table to use a
// feature this host lacks: restore must refuse before any vCPU runs.
func TestRestoreRefusesMissingCPUFeature(t *testing.T) {
	vm, con := bootVerify(t, 64<<20, 1, "workload=verify size=16M")
	waitBeats(t, vm, con, 1, 1)
	if err := vm.Pause(); err != nil {
		t.Fatal(err)
	}
	m, err := vm.Capture()
	if err != nil {
		t.Fatal(err)
	}
	sys, err := kvm.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close()
	host, err := sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	_ = host
	// What this host gives a vCPU is the captured table itself: a bit
	// missing there is a feature the host cannot provide.
	var hostLeaf7 uint32
	for _, e := range m.VCPUs[0].CPUID {
		if e.Function == 7 && e.Index == 0 {
			hostLeaf7 = e.EBX
		}
	}
	bit := -1
	for i := 0; i < 32; i++ {
		if hostLeaf7&(1<<i) == 0 && i != 6 && i != 13 { // 6, 13: FDP_EXCPTN_ONLY / ZERO_FCS_FDS are not features
			bit = i
			break
		}
	}
	if bit < 0 {
		t.Skip("host supports every leaf 7 EBX feature; nothing to doctor")
	}
	for i := range m.VCPUs {
		for j, e := range m.VCPUs[i].CPUID {
			if e.Function == 7 && e.Index == 0 {
				m.VCPUs[i].CPUID[j].EBX |= 1 << bit
			}
		}
	}
	m.Header.CPUIDFingerprint = state.CPUIDFingerprint(m.VCPUs[0].CPUID)
	var buf bytes.Buffer
	w, err := state.NewWriter(&buf, m.Header, state.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteMachine(m); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteMemory(vm.Memory().Bytes(), vm.Memory().Regions()); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	vm2, _, err := Restore(&buf, vmm.Config{})
	if err == nil {
		vm2.Close()
		t.Fatal("restore accepted a guest using a feature the host lacks")
	}
	if !strings.Contains(err.Error(), "cannot provide CPU features") {
		t.Fatalf("unexpected error: %v", err)
	}
	t.Logf("refused: %v", err)
}
