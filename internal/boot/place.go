package boot

import (
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

var le = binary.LittleEndian

// span is a half-open guest-physical range [start, end).
type span struct {
	start, end uint64
	what       string
}

func (s span) overlaps(o span) bool { return s.start < o.end && o.start < s.end }

// lowStructures are the fixed ranges the loader itself writes (see the
// layout table in boot.go). Both boot modes reserve all of them.
var lowStructures = []span{
	{0, 0x1000, "the real-mode IVT, BIOS data area and GDT"},
	{ZeroPageAddr, 0x8000, "the zero page / PVH start_info"},
	{0x8000, 0x9000, "the boot stack"},
	{PML4Addr, PDAddr + 4*guestmem.PageSize, "the boot page tables"},
	{CmdlineAddr, CmdlineAddr + CmdlineMax, "the command line"},
	{guestmem.EBDAStart, guestmem.HighMemory, "the EBDA, MP and ACPI tables and BIOS area"},
}

// checkPlacement verifies that [start, start+size) is guest RAM within one
// region and overlaps none of the loader's own structures. what names the
// range in errors ("kernel image: ELF program header 2").
func checkPlacement(mem *guestmem.Memory, start, size uint64, what string) error {
	end := start + size
	if end < start {
		return fmt.Errorf("%s: range [%#x, +%#x) wraps the address space", what, start, size)
	}
	if _, err := mem.Slice(start, size); err != nil {
		return fmt.Errorf("%s: [%#x, %#x) is not inside guest RAM (%d MiB)", what, start, end, mem.Size()>>20)
	}
	r := span{start, end, ""}
	for _, s := range lowStructures {
		if r.overlaps(s) {
			return fmt.Errorf("%s: [%#x, %#x) overlaps %s at [%#x, %#x)", what, start, end, s.what, s.start, s.end)
		}
	}
	return nil
}

// placeHigh finds the highest address a, a multiple of align, with
// floor <= a and a+size <= ceiling, such that [a, a+size) overlaps none of
// the occupied ranges. It runs in O(n log n) in the number of ranges.
func placeHigh(occupied []span, size, floor, ceiling, align uint64) (uint64, bool) {
	if size == 0 || align == 0 || ceiling < floor || size > ceiling-floor {
		return 0, false
	}
	// Merge the occupied ranges into a sorted list of disjoint ranges.
	occ := make([]span, 0, len(occupied))
	for _, s := range occupied {
		if s.end > s.start {
			occ = append(occ, s)
		}
	}
	sort.Slice(occ, func(i, j int) bool { return occ[i].start < occ[j].start })
	merged := occ[:0]
	for _, s := range occ {
		if n := len(merged); n > 0 && s.start <= merged[n-1].end {
			if s.end > merged[n-1].end {
				merged[n-1].end = s.end
			}
			continue
		}
		merged = append(merged, s)
	}
	// Try the gaps from the top down.
	for k := len(merged); k >= 0; k-- {
		upper, lower := ceiling, floor
		if k < len(merged) && merged[k].start < upper {
			upper = merged[k].start
		}
		if k > 0 && merged[k-1].end > lower {
			lower = merged[k-1].end
		}
		if upper <= lower || upper-lower < size {
			continue
		}
		if a := (upper - size) / align * align; a >= lower {
			return a, true
		}
	}
	return 0, false
}
