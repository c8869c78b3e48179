package vmm

import (
	"math/bits"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
)

// TestDirtyLogTracksGuestWrites runs a dirty guest whose writes are
// confined to its working set and checks that KVM's log reports pages
// there, none outside it, and a count consistent with the guest's own.
func TestDirtyLogTracksGuestWrites(t *testing.T) {
	vm, out := bootGuest(t, 2, "workload=dirty size=32M rate=100M pattern=random")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	waitLine(t, vm, out, func(l guestlog.Line) bool { return l.Kind == guestlog.KindHeartbeat && l.MustUint("seq") >= 2 })
	var lo, hi uint64 = ^uint64(0), 0
	lines, _ := parseConsole(t, out)
	for _, l := range lines {
		if l.Kind == guestlog.KindStart {
			base, pages := l.MustUint("base"), l.MustUint("pages")
			lo, hi = min(lo, base/4096), max(hi, base/4096+pages)
		}
	}
	if err := vm.StartDirtyLog(); err != nil {
		t.Fatal(err)
	}
	bitmap := make([]uint64, vm.DirtyBitmapWords())
	if _, err := vm.FetchDirty(bitmap); err != nil { // discard what set-up saw
		t.Fatal(err)
	}
	clear(bitmap)
	time.Sleep(500 * time.Millisecond)
	n, err := vm.FetchDirty(bitmap)
	if err != nil {
		t.Fatal(err)
	}
	inside, outside := 0, 0
	for w, word := range bitmap {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &^= 1 << b
			pfn := uint64(w*64 + b)
			if pfn >= lo && pfn < hi {
				inside++
			} else {
				outside++
			}
		}
	}
	t.Logf("%d dirty pages in 0.5 s: %d in the working set [%#x, %#x), %d elsewhere (stacks, console lock, kernel)", n, inside, lo, hi, outside)
	// 100 MB/s of random page writes over 8192 pages for 0.5 s touch most
	// of the working set; outside it only a few pages (stacks, per-CPU
	// data) may change.
	if inside < 4000 || outside > 64 {
		t.Fatalf("dirty log does not match the guest's writes: inside %d, outside %d", inside, outside)
	}
	if err := vm.StopDirtyLog(); err != nil {
		t.Fatal(err)
	}
}
