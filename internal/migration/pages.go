package migration

import (
	"encoding/binary"
	"math/bits"

	"github.com/ferry-vmm/ferry/internal/guestmem"
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
