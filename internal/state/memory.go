package state

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"slices"
	"strings"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/xbzrle"
)

// zeroPage is a page of zeros: the comparison operand for zero-page
// elision and the data handed to page callbacks for zero-page records.
var zeroPage [PageSize]byte

func isZeroPage(p []byte) bool { return bytes.Equal(p, zeroPage[:]) }

// MemorySummary summarizes guest memory: its size, how many of its pages
// are not all zeros, and SHA-256 over those pages in ascending
// guest-physical order, each hashed as its guest-physical address (uint64,
// little-endian) followed by its 4096 bytes. Zero pages do not contribute,
// so the hash depends only on memory contents, not on how a stream chunked,
// compressed or elided them.
type MemorySummary struct {
	Size         uint64
	NonZeroPages uint64
	SHA256       [32]byte
}

// memHasher builds a MemorySummary from pages given in ascending order.
type memHasher struct {
	h       hash.Hash
	pages   uint64
	last    uint64
	started bool
	ordered bool
}

func newMemHasher() *memHasher { return &memHasher{h: sha256.New(), ordered: true} }

// add hashes one page; it stops (ordered = false) at the first page that
// does not follow the previous one in ascending gpa order.
func (m *memHasher) add(gpa uint64, data []byte) {
	if !m.ordered {
		return
	}
	if m.started && gpa <= m.last {
		m.ordered = false
		return
	}
	m.started, m.last = true, gpa
	if isZeroPage(data) {
		return
	}
	m.pages++
	var a [8]byte
	le.PutUint64(a[:], gpa)
	m.h.Write(a[:])
	m.h.Write(data)
}

func (m *memHasher) summary(size uint64) MemorySummary {
	s := MemorySummary{Size: size, NonZeroPages: m.pages}
	m.h.Sum(s.SHA256[:0])
	return s
}

// sortedRegions returns the regions ascending by GPA.
func sortedRegions(regions []guestmem.Region) []guestmem.Region {
	s := slices.Clone(regions)
	slices.SortFunc(s, func(a, b guestmem.Region) int {
		switch {
		case a.GPA < b.GPA:
			return -1
		case a.GPA > b.GPA:
			return 1
		}
		return 0
	})
	return s
}

// checkMemRegions checks that regions are page-aligned and lie within mem.
func checkMemRegions(mem []byte, regions []guestmem.Region) error {
	for i, r := range regions {
		if r.GPA%PageSize != 0 || r.Size%PageSize != 0 || r.Offset%PageSize != 0 {
			return fmt.Errorf("memory region %d (gpa %#x size %#x offset %#x) is not page-aligned", i, r.GPA, r.Size, r.Offset)
		}
		if r.Offset > uint64(len(mem)) || r.Size > uint64(len(mem))-r.Offset {
			return fmt.Errorf("memory region %d (offset %#x size %#x) lies beyond the %#x bytes of memory", i, r.Offset, r.Size, len(mem))
		}
		if r.GPA+r.Size < r.GPA {
			return fmt.Errorf("memory region %d (gpa %#x size %#x) overflows", i, r.GPA, r.Size)
		}
	}
	return nil
}

// SummarizeMemory computes the MemorySummary of a memory image (indexed by
// memfd offset, as guestmem.Memory.Bytes) laid out by regions. It equals
// the summary a Reader computes from a stream of the same memory.
func SummarizeMemory(mem []byte, regions []guestmem.Region) (MemorySummary, error) {
	if err := checkMemRegions(mem, regions); err != nil {
		return MemorySummary{}, err
	}
	h := newMemHasher()
	var size uint64
	for _, r := range sortedRegions(regions) {
		size += r.Size
		for off := uint64(0); off < r.Size; off += PageSize {
			h.add(r.GPA+off, mem[r.Offset+off:r.Offset+off+PageSize])
		}
	}
	if !h.ordered {
		return MemorySummary{}, errors.New("memory regions overlap")
	}
	return h.summary(size), nil
}

// pageRecord is one page record of a memory chunk, checked against the
// memory layout.
type pageRecord struct {
	enc  uint8
	gpa  uint64 // the page
	off  uint64 // its offset in the memory file
	data []byte // raw: the page's PageSize bytes; delta: the xbzrle delta
	from uint64 // dup: the memory-file offset of the page to copy
}

// errNeedsMemory refuses delta and dup records where there is no memory
// to apply them to.
const errNeedsMemory = "delta and dup records need the receiver's memory (they are only valid on the migration wire, applied with ApplyPageChunk)"

// layoutOffset returns the memory-file offset of the page at gpa, or false
// when it is outside the layout.
func layoutOffset(regions []guestmem.Region, gpa uint64) (uint64, bool) {
	i := regionOf(regions, gpa)
	if i < 0 {
		return 0, false
	}
	return regions[i].Offset + (gpa - regions[i].GPA), true
}

// parseChunk parses a memory chunk's content, checking every record
// against the layout (a dup's source page too) and every delta's
// well-formedness before handing the record to rec, in order. Delta and
// dup records are refused unless refs is set. rec's error ends the parse
// and is returned as is.
func parseChunk(p []byte, regions []guestmem.Region, refs bool, rec func(r pageRecord) error) (uint64, error) {
	if len(p) < 4 {
		return 0, fmt.Errorf("payload of %d bytes has no record count", len(p))
	}
	n := le.Uint32(p)
	if n == 0 || n > ChunkPages {
		return 0, fmt.Errorf("%d page records, 1 to %d allowed", n, ChunkPages)
	}
	p = p[4:]
	var r pageRecord
	for i := uint32(0); i < n; i++ {
		if len(p) < pageRecordHeader {
			return 0, fmt.Errorf("page record %d: %d bytes left, a record header needs %d", i, len(p), pageRecordHeader)
		}
		pfn := le.Uint64(p)
		r = pageRecord{enc: p[8]}
		p = p[pageRecordHeader:]
		if pfn > ^uint64(0)/PageSize {
			return 0, fmt.Errorf("page record %d: page frame number %#x out of range", i, pfn)
		}
		r.gpa = pfn * PageSize
		var ok bool
		if r.off, ok = layoutOffset(regions, r.gpa); !ok {
			return 0, fmt.Errorf("page record %d: guest-physical address %#x is outside the memory layout", i, r.gpa)
		}
		switch r.enc {
		case PageZero:
			r.data = zeroPage[:]
		case PageRaw:
			if len(p) < PageSize {
				return 0, fmt.Errorf("page record %d (gpa %#x): %d bytes of data, %d expected", i, r.gpa, len(p), PageSize)
			}
			r.data = p[:PageSize:PageSize]
			p = p[PageSize:]
		case PageDelta, PageDup:
			if !refs {
				return 0, fmt.Errorf("page record %d (gpa %#x): %s", i, r.gpa, errNeedsMemory)
			}
			if r.enc == PageDup {
				if len(p) < 8 {
					return 0, fmt.Errorf("page record %d (gpa %#x): dup record: %d bytes left, the source page frame number needs 8", i, r.gpa, len(p))
				}
				from := le.Uint64(p)
				p = p[8:]
				if from > ^uint64(0)/PageSize {
					return 0, fmt.Errorf("page record %d (gpa %#x): dup source page frame number %#x out of range", i, r.gpa, from)
				}
				if r.from, ok = layoutOffset(regions, from*PageSize); !ok {
					return 0, fmt.Errorf("page record %d (gpa %#x): dup source guest-physical address %#x is outside the memory layout", i, r.gpa, from*PageSize)
				}
				break
			}
			if len(p) < 2 {
				return 0, fmt.Errorf("page record %d (gpa %#x): delta record: %d bytes left, the delta length needs 2", i, r.gpa, len(p))
			}
			l := int(le.Uint16(p))
			p = p[2:]
			if l > MaxDeltaLength {
				return 0, fmt.Errorf("page record %d (gpa %#x): delta of %d bytes, at most %d allowed", i, r.gpa, l, MaxDeltaLength)
			}
			if len(p) < l {
				return 0, fmt.Errorf("page record %d (gpa %#x): %d bytes of delta, %d expected", i, r.gpa, len(p), l)
			}
			r.data = p[:l:l]
			p = p[l:]
			if err := xbzrle.Check(r.data, PageSize); err != nil {
				return 0, fmt.Errorf("page record %d (gpa %#x): bad delta: %s", i, r.gpa, strings.TrimPrefix(err.Error(), "xbzrle: "))
			}
		default:
			return 0, fmt.Errorf("page record %d (gpa %#x): unknown encoding %d", i, r.gpa, r.enc)
		}
		if err := rec(r); err != nil {
			return 0, err
		}
	}
	if len(p) != 0 {
		return 0, fmt.Errorf("%d unexpected bytes after %d page records", len(p), n)
	}
	return uint64(n), nil
}
