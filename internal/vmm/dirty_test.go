package vmm

import (
	"math/bits"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestlog"
)

// TestDirtyLogTracksGuestWrites starts dirty logging, lets a sequential
// dirty guest sweep its whole working set at least once (by its own
// count), and checks that KVM's log holds every page of the working set
// and hardly anything outside it.
func TestDirtyLogTracksGuestWrites(t *testing.T) {
	vm, out := bootGuest(t, 2, "workload=dirty size=32M rate=200M pattern=seq")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	waitLine(t, vm, out, func(l guestlog.Line) bool { return l.Kind == guestlog.KindHeartbeat && l.MustUint("seq") >= 2 })
	var lo, hi uint64 = ^uint64(0), 0
	lines, _ := parseConsole(t, out)
	slice := map[uint64]uint64{}
	for _, l := range lines {
		if l.Kind == guestlog.KindStart {
			base, pages := l.MustUint("base"), l.MustUint("pages")
			lo, hi = min(lo, base/4096), max(hi, base/4096+pages)
			slice[l.MustUint("cpu")] = pages
		}
	}
	if err := vm.StartDirtyLog(); err != nil {
		t.Fatal(err)
	}
	bitmap := make([]uint64, vm.DirtyBitmapWords())
	// Heartbeats printed after logging began: once every CPU has written
	// more pages than its slice holds, sequential order has touched all.
	// A CPU's first heartbeat after that point may count pages written
	// before logging began, so it is left out.
	seen := len(lines)
	waitLineTimeout(t, vm, out, time.Minute, func(guestlog.Line) bool {
		all, _ := parseConsole(t, out)
		written := map[uint64]uint64{}
		first := map[uint64]bool{}
		for _, l := range all[seen:] {
			if l.Kind != guestlog.KindHeartbeat {
				continue
			}
			cpu := l.MustUint("cpu")
			if !first[cpu] {
				first[cpu] = true
				continue
			}
			written[cpu] += l.MustUint("pages")
		}
		for cpu, pages := range slice {
			if written[cpu] < pages+512 {
				return false
			}
		}
		return true
	})
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
	t.Logf("%d dirty pages: %d of the %d in the working set [%#x, %#x), %d elsewhere (stacks, console lock, kernel)", n, inside, hi-lo, lo, hi, outside)
	if uint64(inside) != hi-lo || outside > 64 {
		t.Fatalf("dirty log does not match the guest's writes: inside %d of %d, outside %d", inside, hi-lo, outside)
	}
	if err := vm.StopDirtyLog(); err != nil {
		t.Fatal(err)
	}
}
