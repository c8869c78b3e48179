package migration

import (
	"encoding/binary"
	"fmt"
	"math/bits"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/wire"
)

// pageIndex maps between the memfd page index (what dirty bitmaps and
// guestmem.Memory.Bytes() use) and guest-physical addresses (what the
// wire carries).
type pageIndex struct {
	regions []guestmem.Region
}

func (p pageIndex) gpa(idx uint64) uint64 {
	off := idx * guestmem.PageSize
	for _, r := range p.regions {
		if off >= r.Offset && off < r.Offset+r.Size {
			return r.GPA + (off - r.Offset)
		}
	}
	return ^uint64(0)
}

func isZeroPage(b []byte) bool {
	// Eight bytes at a time; the compiler turns each into one load.
	for i := 0; i+32 <= len(b); i += 32 {
		if binary.LittleEndian.Uint64(b[i:])|binary.LittleEndian.Uint64(b[i+8:])|
			binary.LittleEndian.Uint64(b[i+16:])|binary.LittleEndian.Uint64(b[i+24:]) != 0 {
			return false
		}
	}
	return true
}

// forEachSet calls f for every set bit's index in bitmap, in order.
func forEachSet(bitmap []uint64, f func(idx uint64) error) error {
	for w, word := range bitmap {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &^= 1 << b
			if err := f(uint64(w*64 + b)); err != nil {
				return err
			}
		}
	}
	return nil
}

func countSet(bitmap []uint64) uint64 {
	var n uint64
	for _, w := range bitmap {
		n += uint64(bits.OnesCount64(w))
	}
	return n
}

// index maps a guest page frame number to its memfd page index.
func (p pageIndex) index(pfn uint64) (uint64, bool) {
	gpa := pfn * guestmem.PageSize
	for _, r := range p.regions {
		if gpa >= r.GPA && gpa-r.GPA < r.Size {
			return (r.Offset + gpa - r.GPA) / guestmem.PageSize, true
		}
	}
	return 0, false
}

func hasBit(bm []uint64, i uint64) bool { return bm[i/64]&(1<<(i%64)) != 0 }
func setBit(bm []uint64, i uint64)      { bm[i/64] |= 1 << (i % 64) }
func clearBit(bm []uint64, i uint64)    { bm[i/64] &^= 1 << (i % 64) }

// rangesOf lists the pages set in bm as guest page-frame ranges, in
// ascending order (the memfd order is the guest-physical order).
func (p pageIndex) rangesOf(bm []uint64) []wire.PageRange {
	var out []wire.PageRange
	forEachSet(bm, func(idx uint64) error {
		pfn := p.gpa(idx) / guestmem.PageSize
		if n := len(out); n > 0 && out[n-1].StartPFN+out[n-1].Count == pfn {
			out[n-1].Count++
		} else {
			out = append(out, wire.PageRange{StartPFN: pfn, Count: 1})
		}
		return nil
	})
	return out
}

// bitmapOf is the inverse of rangesOf; every page must be guest RAM.
func (p pageIndex) bitmapOf(rs []wire.PageRange, words int) ([]uint64, error) {
	bm := make([]uint64, words)
	for _, r := range rs {
		for pfn := r.StartPFN; pfn < r.StartPFN+r.Count; pfn++ {
			idx, ok := p.index(pfn)
			if !ok || idx/64 >= uint64(words) {
				return nil, fmt.Errorf("page %#x is not guest RAM", pfn*guestmem.PageSize)
			}
			setBit(bm, idx)
		}
	}
	return bm, nil
}

// warm counts one more pass in which the pages set in dirty were written.
func (x *sender) warm(dirty []uint64) {
	if x.heat == nil {
		x.heat = make([]uint8, len(dirty)*64)
	}
	forEachSet(dirty, func(idx uint64) error {
		if x.heat[idx] < 255 {
			x.heat[idx]++
		}
		return nil
	})
}

// hotPasses is how many passes a page must have been dirtied in to be
// sent at the end of a pass.
const hotPasses = 2

// forEachByHeat calls f for the pages set in todo: first those the guest
// dirtied in fewer than hotPasses passes, in address order, then the hot
// ones. A hot page sent late has less time to be dirtied again before
// the pass ends (page ordering, as the seed paper lists it).
func (x *sender) forEachByHeat(todo []uint64, f func(idx uint64) error) error {
	if x.heat == nil {
		return forEachSet(todo, f)
	}
	for _, hot := range []bool{false, true} {
		err := forEachSet(todo, func(idx uint64) error {
			if (x.heat[idx] >= hotPasses) != hot {
				return nil
			}
			return f(idx)
		})
		if err != nil {
			return err
		}
	}
	return nil
}
