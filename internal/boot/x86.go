package boot

import "github.com/ferry-vmm/ferry/internal/guestmem"

// Selectors in the loader's GDT. Linux's boot protocol requires __BOOT_CS
// = 0x10 and __BOOT_DS = 0x18; PVH only needs flat segments, and uses the
// same numbers.
const (
	CodeSelector = 0x10
	DataSelector = 0x18
	gdtEntries   = 4
	GDTLimit     = gdtEntries*8 - 1
)

// Control register and EFER bits used by the entry states.
const (
	cr0PE    = 1 << 0
	cr0ET    = 1 << 4
	cr0PG    = 1 << 31
	cr4PAE   = 1 << 5
	eferLME  = 1 << 8
	eferLMA  = 1 << 10
	rflagsRS = 1 << 1 // reserved, always 1
)

// Descriptor access bytes and flags nibbles.
const (
	accPresent = 0x80
	accS       = 0x10 // code or data segment
	typeCodeRX = 0xB  // execute/read, accessed
	typeDataRW = 0x3  // read/write, accessed

	flagG  = 0x8
	flagDB = 0x4
	flagL  = 0x2
)

// descriptor builds an 8-byte segment descriptor.
func descriptor(base, limit uint32, access, flags uint8) uint64 {
	return uint64(limit&0xFFFF) |
		uint64(base&0xFFFFFF)<<16 |
		uint64(access)<<40 |
		uint64((limit>>16)&0xF)<<48 |
		uint64(flags&0xF)<<52 |
		uint64(base>>24)<<56
}

var (
	descCode32 = descriptor(0, 0xFFFFF, accPresent|accS|typeCodeRX, flagG|flagDB)
	descCode64 = descriptor(0, 0xFFFFF, accPresent|accS|typeCodeRX, flagG|flagL)
	descData   = descriptor(0, 0xFFFFF, accPresent|accS|typeDataRW, flagG|flagDB)
)

// gdtFor returns the GDT the loader writes for mode: null, null, code at
// 0x10, data at 0x18.
func gdtFor(m Mode) [gdtEntries]uint64 {
	code := descCode32
	if m == ModeLinux64 {
		code = descCode64
	}
	return [gdtEntries]uint64{0, 0, code, descData}
}

func decodeDescriptor(sel uint16, d uint64) Segment {
	access := uint8(d >> 40)
	flags := uint8(d>>52) & 0xF
	limit := uint32(d&0xFFFF) | uint32((d>>48)&0xF)<<16
	s := Segment{
		Selector: sel,
		Base:     (d>>16)&0xFFFFFF | ((d>>56)&0xFF)<<24,
		Type:     access & 0xF,
		S:        access&accS != 0,
		DPL:      (access >> 5) & 3,
		Present:  access&accPresent != 0,
		AVL:      flags&1 != 0,
		L:        flags&flagL != 0,
		DB:       flags&flagDB != 0,
		G:        flags&flagG != 0,
	}
	if s.G {
		limit = limit<<12 | 0xFFF
	}
	s.Limit = limit
	return s
}

func writeGDT(mem *guestmem.Memory, m Mode) error {
	var buf [gdtEntries * 8]byte
	for i, d := range gdtFor(m) {
		le.PutUint64(buf[i*8:], d)
	}
	return mem.Write(GDTAddr, buf[:])
}

// Page table entry bits.
const (
	ptePresent = 1 << 0
	pteRW      = 1 << 1
	ptePS      = 1 << 7 // 2 MiB page in a page directory
)

// writePageTables identity-maps the first 4 GiB with 2 MiB pages: one PML4,
// one PDPT and four page directories at PML4Addr..PDAddr+16 KiB.
func writePageTables(mem *guestmem.Memory) error {
	const pages = 6
	buf := make([]byte, pages*guestmem.PageSize)
	pml4 := buf[0:guestmem.PageSize]
	pdpt := buf[guestmem.PageSize : 2*guestmem.PageSize]
	le.PutUint64(pml4, PDPTAddr|ptePresent|pteRW)
	for i := range 4 {
		le.PutUint64(pdpt[i*8:], uint64(PDAddr+i*guestmem.PageSize)|ptePresent|pteRW)
		pd := buf[(2+i)*guestmem.PageSize : (3+i)*guestmem.PageSize]
		for j := range 512 {
			addr := uint64(i*512+j) << 21
			le.PutUint64(pd[j*8:], addr|ptePresent|pteRW|ptePS)
		}
	}
	return mem.Write(PML4Addr, buf)
}
