package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/bits"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/ferry-vmm/ferry/internal/guestlog"
	"github.com/ferry-vmm/ferry/internal/testguest"
)

// fillLayout is what the guest's console says about its memory: the
// working set from the start lines and the fill area from the fill lines.
type fillLayout struct {
	wsLo, wsHi     uint64 // working set [lo, hi) in bytes, all CPUs together
	fillLo, fillHi uint64 // fill area
	fillPages      uint64
	cpus           int // CPUs that printed a fill line
}

// readFillLayout checks the fill and start lines against each other: one
// fill line per CPU, all before any start line, slices contiguous and right
// after the working set.
func readFillLayout(t *testing.T, lines []guestlog.Line, content string) fillLayout {
	t.Helper()
	var fl fillLayout
	fl.wsLo, fl.fillLo = ^uint64(0), ^uint64(0)
	var bootBase, bootPages uint64
	slices := map[uint64][2]uint64{}
	sawStart := false
	for _, l := range lines {
		switch l.Kind {
		case guestlog.KindBoot:
			bootBase, bootPages = l.MustUint("fill_base"), l.MustUint("fill_pages")
		case guestlog.KindFill:
			if sawStart {
				t.Fatalf("fill line after a start line: %s", l.Raw)
			}
			if l.Fields["content"] != content {
				t.Fatalf("fill line %q: want content=%s", l.Raw, content)
			}
			base, pages := l.MustUint("base"), l.MustUint("pages")
			slices[l.MustUint("cpu")] = [2]uint64{base, pages}
			fl.fillLo, fl.fillHi = min(fl.fillLo, base), max(fl.fillHi, base+pages*4096)
			fl.fillPages += pages
		case guestlog.KindStart:
			sawStart = true
			base, pages := l.MustUint("base"), l.MustUint("pages")
			fl.wsLo, fl.wsHi = min(fl.wsLo, base), max(fl.wsHi, base+pages*4096)
		}
	}
	fl.cpus = len(slices)
	if fl.fillHi-fl.fillLo != fl.fillPages*4096 {
		t.Fatalf("fill slices %v are not contiguous", slices)
	}
	if bootBase != fl.fillLo || bootPages != fl.fillPages {
		t.Fatalf("boot line says fill %#x+%d pages, fill lines %#x+%d", bootBase, bootPages, fl.fillLo, fl.fillPages)
	}
	if sawStart && fl.wsHi != fl.fillLo {
		t.Fatalf("working set [%#x, %#x) not right before the fill area at %#x", fl.wsLo, fl.wsHi, fl.fillLo)
	}
	return fl
}

// waitStarts waits until every CPU printed its start line (so every fill
// line is out too).
func waitStarts(t *testing.T, vm *VM, out *testguest.Console, cpus int) []guestlog.Line {
	t.Helper()
	waitLine(t, vm, out, func(guestlog.Line) bool {
		lines, _ := parseConsole(t, out)
		n := 0
		for _, l := range lines {
			if l.Kind == guestlog.KindStart {
				n++
			}
		}
		return n == cpus
	})
	lines, _ := parseConsole(t, out)
	return lines
}

// TestFillCheckExit boots the verify workload with a checked fill area and
// lets it exit by itself: fill lines for both CPUs, a clean fill check on
// each, a clean exit.
func TestFillCheckExit(t *testing.T) {
	testguest.RequireKVM(t)
	var out testguest.Console
	vm, err := New(Config{MemSize: 256 << 20, CPUs: 2, Kernel: testguest.Image(t), Console: &out,
		Cmdline: "workload=verify size=8M fill=16M content=mixed fill_check=1 exit_after=2s"})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exit, err := vm.Run(ctx)
	t.Logf("console:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	if exit.Reason != ExitGuest || exit.Status != 0 {
		t.Fatalf("exit %+v", exit)
	}
	lines, sum := parseConsole(t, &out)
	if err := sum.Healthy(); err != nil {
		t.Fatal(err)
	}
	if !sum.Exited || sum.FillPages != 4096 || sum.FillChecked != 4096 {
		t.Fatalf("summary %+v: want an exit line and 4096 fill pages filled and checked", sum)
	}
	fl := readFillLayout(t, lines, "mixed")
	if fl.cpus != 2 || fl.wsHi-fl.wsLo != 8<<20 || fl.fillPages != 4096 {
		t.Fatalf("layout %+v: want 2 CPUs filling 4096 pages after an 8 MiB working set", fl)
	}
	checks := 0
	for _, l := range lines {
		if l.Kind == guestlog.KindFillCheck {
			checks++
			if l.MustUint("bad") != 0 || l.MustUint("pages") != 2048 {
				t.Fatalf("fill check %q", l.Raw)
			}
		}
	}
	if checks != 2 {
		t.Fatalf("%d fillcheck lines, want 2", checks)
	}
}

// TestFillCheckDetectsCorruption changes one word of the fill area behind
// the guest's back: the check at exit must name it and fail the exit.
func TestFillCheckDetectsCorruption(t *testing.T) {
	vm, out := bootGuest(t, 2, "workload=idle size=4M fill=8M content=text fill_check=1 exit_after=3s")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	fl := readFillLayout(t, waitStarts(t, vm, out, 2), "text")
	target := fl.fillHi - 5*4096 + 0x28 // in the last CPU's slice
	if err := vm.Pause(); err != nil {
		t.Fatal(err)
	}
	word, err := vm.Memory().Slice(target, 8)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint64(word, binary.LittleEndian.Uint64(word)^0x2000)
	vm.Resume()
	exit, err := vm.Wait()
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	_, sum := parseConsole(t, out)
	if exit.Reason != ExitGuest || exit.Status != 1 || sum.ExitErrors != 1 || len(sum.Failures) != 1 {
		t.Fatalf("exit %+v, summary %+v: want status 1 and one error\n%s", exit, sum, out.String())
	}
	f := sum.Failures[0]
	if f.Fields["what"] != "fill" || f.MustUint("gpa") != target || f.MustUint("offset") != 0x28 ||
		f.MustUint("page") != (target-fl.fillLo)/4096 || f.Fields["content"] != "text" || f.MustUint("words") != 1 {
		t.Fatalf("guest reported %q, want a fill failure at gpa %#x", f.Raw, target)
	}
	if f.MustUint("expected")^f.MustUint("found") != 0x2000 {
		t.Fatalf("guest reported %q: expected^found should be the flipped bit", f.Raw)
	}
	t.Logf("guest reported: %s", f.Raw)
}

// TestFillUntouchedByWorkloads runs the dirty and verify workloads over a
// working set with a fill area after it: KVM's dirty log must show no
// write to the fill area once the workloads run, and its bytes must not
// change.
func TestFillUntouchedByWorkloads(t *testing.T) {
	for _, w := range []string{"dirty", "verify"} {
		t.Run(w, func(t *testing.T) {
			vm, out := bootGuest(t, 2, "workload="+w+" size=8M fill=16M pattern=random")
			if err := vm.Start(); err != nil {
				t.Fatal(err)
			}
			waitLine(t, vm, out, func(l guestlog.Line) bool { return guestlog.IsBeat(l) })
			lines, _ := parseConsole(t, out)
			fl := readFillLayout(t, lines, "mixed")
			area, err := vm.Memory().Slice(fl.fillLo, fl.fillHi-fl.fillLo)
			if err != nil {
				t.Fatal(err)
			}
			before := bytes.Clone(area)
			if err := vm.StartDirtyLog(); err != nil {
				t.Fatal(err)
			}
			seen := len(lines)
			waitBeatsPerCPU(t, vm, out, 2, 5)
			bitmap := make([]uint64, vm.DirtyBitmapWords())
			if _, err := vm.FetchDirty(bitmap); err != nil {
				t.Fatal(err)
			}
			vm.Stop()
			if _, err := vm.Wait(); err != nil {
				t.Fatal(err)
			}
			ws, fill := 0, 0
			for i, word := range bitmap {
				for word != 0 {
					b := bits.TrailingZeros64(word)
					word &^= 1 << b
					gpa := uint64(i*64+b) * 4096
					switch {
					case gpa >= fl.wsLo && gpa < fl.wsHi:
						ws++
					case gpa >= fl.fillLo && gpa < fl.fillHi:
						fill++
					}
				}
			}
			all, sum := parseConsole(t, out)
			if err := sum.Healthy(); err != nil {
				t.Fatalf("%v\n%s", err, out.String())
			}
			t.Logf("%d beats while logging: %d working-set pages dirty, %d fill pages dirty", len(all)-seen, ws, fill)
			if ws == 0 || fill != 0 {
				t.Fatalf("dirty pages: %d in the working set, %d in the fill area: want some and none", ws, fill)
			}
			if !bytes.Equal(before, area) {
				t.Fatal("the fill area changed while the workload ran")
			}
		})
	}
}

// classifyPage tells the fill content classes apart from the host: zero,
// text (printable ASCII and newlines), or binary (random or repeat, told
// apart by whether the page occurs more than once).
func classifyPage(p []byte) string {
	zero, text := true, true
	for _, b := range p {
		if b != 0 {
			zero = false
		}
		if (b < 0x20 || b > 0x7e) && b != '\n' {
			text = false
		}
	}
	switch {
	case zero:
		return "zero"
	case text:
		return "text"
	}
	return "binary"
}

func zstdRatio(t *testing.T, enc *zstd.Encoder, b []byte) float64 {
	t.Helper()
	if len(b) == 0 {
		t.Fatal("nothing to compress")
	}
	return float64(len(b)) / float64(len(enc.EncodeAll(b, nil)))
}

// TestFillContent reads the fill area from the host for every content=
// and checks its classes: the mix by page, text that compresses like text,
// random that does not, repeat pages that are copies of 16 images.
func TestFillContent(t *testing.T) {
	enc, err := zstd.NewWriter(nil) // the default level, zstd -3's equivalent
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	for _, content := range []string{"mixed", "text", "repeat", "random", "zero"} {
		t.Run(content, func(t *testing.T) {
			vm, out := bootGuest(t, 2, "workload=idle size=2M fill=32M seed=7 content="+content)
			if err := vm.Start(); err != nil {
				t.Fatal(err)
			}
			lines := waitStarts(t, vm, out, 2)
			vm.Stop()
			if _, err := vm.Wait(); err != nil {
				t.Fatal(err)
			}
			fl := readFillLayout(t, lines, content)
			area, err := vm.Memory().Slice(fl.fillLo, fl.fillHi-fl.fillLo)
			if err != nil {
				t.Fatal(err)
			}
			classes := map[string][]byte{}
			count := map[string]int{}
			copies := map[string]int{}
			for p := 0; p < len(area); p += 4096 {
				copies[string(area[p:p+4096])]++
			}
			for p := 0; p < len(area); p += 4096 {
				page := area[p : p+4096]
				c := classifyPage(page)
				if c == "binary" {
					c = "random"
					if copies[string(page)] > 1 {
						c = "repeat"
					}
				}
				count[c]++
				classes[c] = append(classes[c], page...)
			}
			images := 0
			for page, n := range copies {
				if n > 1 && classifyPage([]byte(page)) == "binary" {
					images++
				}
			}
			n := float64(fl.fillPages)
			t.Logf("%d pages: %d text, %d repeat (%d distinct), %d random, %d zero; whole area zstd %.2fx",
				fl.fillPages, count["text"], count["repeat"], images, count["random"], count["zero"], zstdRatio(t, enc, area))
			want := map[string]float64{content: 1}
			if content == "mixed" {
				want = map[string]float64{"text": 0.4, "repeat": 0.2, "random": 0.2, "zero": 0.2}
			}
			for _, c := range []string{"text", "repeat", "random", "zero"} {
				if got := float64(count[c]) / n; got < want[c]-0.03 || got > want[c]+0.03 {
					t.Errorf("%s pages: %.3f of the fill, want %.2f", c, got, want[c])
				}
			}
			if want["repeat"] > 0 && images != 16 {
				t.Errorf("repeat pages are copies of %d distinct images, want 16", images)
			}
			if b := classes["text"]; want["text"] > 0 {
				r := zstdRatio(t, enc, b)
				perPage := 0
				for p := 0; p < len(b); p += 4096 {
					perPage += len(enc.EncodeAll(b[p:p+4096], nil))
				}
				t.Logf("text: zstd %.2fx, page by page %.2fx; starts %q", r, float64(len(b))/float64(perPage), b[:160])
				if r < 3 || r > 4.5 {
					t.Errorf("text compresses %.2fx with zstd, want 3-4.5x", r)
				}
				if !bytes.Contains(b, []byte(" the ")) || !bytes.Contains(b, []byte(".\n")) {
					t.Errorf("text does not look like English")
				}
			}
			if b := classes["random"]; want["random"] > 0 {
				if r := zstdRatio(t, enc, b); r > 1.01 {
					t.Errorf("random compresses %.3fx with zstd, want none", r)
				}
			}
			if b := classes["repeat"]; want["repeat"] > 0 {
				// Each image alone is incompressible; only dedup gains.
				if r := zstdRatio(t, enc, b[:4096]); r > 1.01 {
					t.Errorf("a repeat image compresses %.3fx alone, want none", r)
				}
			}
		})
	}
}

// TestFillConfig checks the fit rules: without size= the working set is
// what the fill leaves; a fill that does not fit is a configuration error.
func TestFillConfig(t *testing.T) {
	t.Run("shrinks-working-set", func(t *testing.T) {
		vm, out := bootGuest(t, 2, "workload=dirty fill=64M rate=10M")
		if err := vm.Start(); err != nil {
			t.Fatal(err)
		}
		waitBeatsPerCPU(t, vm, out, 2, 1)
		vm.Stop()
		if _, err := vm.Wait(); err != nil {
			t.Fatal(err)
		}
		lines, sum := parseConsole(t, out)
		if err := sum.Healthy(); err != nil {
			t.Fatalf("%v\n%s", err, out.String())
		}
		fl := readFillLayout(t, lines, "mixed")
		var regionMB uint64
		for _, l := range lines {
			if l.Kind == guestlog.KindBoot {
				regionMB = l.MustUint("region_mb")
			}
		}
		t.Logf("working set %d MiB, fill %d MiB", (fl.wsHi-fl.wsLo)>>20, fl.fillPages>>8)
		if fl.fillPages != 64<<8 || fl.wsHi-fl.wsLo < 64<<20 || (fl.wsHi-fl.wsLo)>>20 != regionMB {
			t.Fatalf("layout %+v, boot region_mb=%d", fl, regionMB)
		}
	})
	for _, cmd := range []string{"size=200M fill=200M", "fill=1G"} {
		t.Run(cmd, func(t *testing.T) { requireConfigFailure(t, "workload=verify "+cmd) })
	}
}

// requireConfigFailure boots a one-CPU guest with cmdline and requires it
// to refuse its layout: exit status 2 and one FAIL what=config line.
func requireConfigFailure(t *testing.T, cmdline string) {
	t.Helper()
	vm, out := bootGuest(t, 1, cmdline)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	exit, err := vm.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, sum := parseConsole(t, out)
	if exit.Reason != ExitGuest || exit.Status != 2 || len(sum.Failures) != 1 || sum.Failures[0].Fields["what"] != "config" {
		t.Fatalf("exit %+v: want status 2 and a config failure\n%s", exit, out.String())
	}
	t.Logf("guest reported: %s", sum.Failures[0].Raw)
}
