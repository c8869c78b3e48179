package boot

import (
	"fmt"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// Xen PVH boot ABI (xen/include/public/arch-x86/hvm/start_info.h).
const (
	hvmStartMagic   = 0x336ec578
	hvmStartVersion = 1

	startInfoSize    = 56 // struct hvm_start_info, version 1
	modlistEntSize   = 32 // struct hvm_modlist_entry
	memmapEntSize    = 24 // struct hvm_memmap_table_entry
	maxMemmapEntries = 128

	// Offsets in struct hvm_start_info.
	siMagic         = 0
	siVersion       = 4
	siFlags         = 8
	siNrModules     = 12
	siModlistPaddr  = 16
	siCmdlinePaddr  = 24
	siRsdpPaddr     = 32
	siMemmapPaddr   = 40
	siMemmapEntries = 48
)

func loadPVH(mem *guestmem.Memory, img *elfImage, opts Options, cpus int) (*Entry, error) {
	// Validate every placement before writing anything.
	kernStart, kernEnd := ^uint64(0), uint64(0)
	occupied := make([]span, 0, len(img.segments)+1)
	for _, s := range img.segments {
		what := fmt.Sprintf(elfErrPrefix+"ELF program header %d", s.index)
		if err := checkPlacement(mem, s.paddr, s.memsz, what); err != nil {
			return nil, err
		}
		kernStart = min(kernStart, s.paddr)
		kernEnd = max(kernEnd, s.paddr+s.memsz)
		occupied = append(occupied, span{s.paddr, s.paddr + s.memsz, what})
	}

	e := &Entry{
		Mode:         ModePVH32,
		RIP:          img.entry,
		RSP:          BootStackTop,
		RBX:          StartInfoAddr,
		GDTBase:      GDTAddr,
		GDTLimit:     GDTLimit,
		CodeSelector: CodeSelector,
		DataSelector: DataSelector,
		CR0:          cr0PE | cr0ET,
		RFLAGS:       rflagsRS,
		Image:        ImageELFPVH,
		KernelStart:  kernStart,
		KernelEnd:    kernEnd,
	}

	if len(opts.Initrd) > 0 {
		// The initrd must be reachable from 32-bit mode: keep it in the
		// RAM below the MMIO hole.
		ceiling := min(lowRAMTop(mem), 1<<32)
		size := uint64(len(opts.Initrd))
		occupied = append(occupied, span{0, guestmem.HighMemory, "low memory"})
		a, ok := placeHigh(occupied, size, guestmem.HighMemory, ceiling, guestmem.PageSize)
		if !ok {
			return nil, fmt.Errorf("boot: initrd (%d bytes) does not fit in guest RAM between %#x and %#x beside the kernel", size, guestmem.HighMemory, ceiling)
		}
		e.InitrdAddr, e.InitrdSize = a, size
	}

	e820 := memoryMap(mem, opts.PCI)
	if len(e820) > maxMemmapEntries {
		return nil, fmt.Errorf("boot: memory map has %d entries, at most %d fit", len(e820), maxMemmapEntries)
	}

	// Write.
	for _, s := range img.segments {
		dst, err := mem.Slice(s.paddr, s.memsz)
		if err != nil {
			return nil, fmt.Errorf(elfErrPrefix+"ELF program header %d: %w", s.index, err)
		}
		n := copy(dst, s.data)
		clear(dst[n:])
	}
	if e.InitrdSize > 0 {
		if err := mem.Write(e.InitrdAddr, opts.Initrd); err != nil {
			return nil, fmt.Errorf("boot: writing initrd: %w", err)
		}
	}

	page := make([]byte, guestmem.PageSize)
	si := page[:startInfoSize]
	le.PutUint32(si[siMagic:], hvmStartMagic)
	le.PutUint32(si[siVersion:], hvmStartVersion)
	le.PutUint32(si[siFlags:], 0)
	le.PutUint64(si[siCmdlinePaddr:], CmdlineAddr)
	le.PutUint64(si[siRsdpPaddr:], ACPIAddr)
	if e.InitrdSize > 0 {
		le.PutUint32(si[siNrModules:], 1)
		le.PutUint64(si[siModlistPaddr:], ModlistAddr)
		mod := page[ModlistAddr-StartInfoAddr:][:modlistEntSize]
		le.PutUint64(mod[0:], e.InitrdAddr)
		le.PutUint64(mod[8:], e.InitrdSize)
		le.PutUint64(mod[16:], 0) // no module command line
	}
	le.PutUint64(si[siMemmapPaddr:], MemmapAddr)
	le.PutUint32(si[siMemmapEntries:], uint32(len(e820)))
	mm := page[MemmapAddr-StartInfoAddr:]
	for i, r := range e820 {
		ent := mm[i*memmapEntSize:][:memmapEntSize]
		le.PutUint64(ent[0:], r.Addr)
		le.PutUint64(ent[8:], r.Size)
		le.PutUint32(ent[16:], r.Type)
	}
	if err := mem.Write(StartInfoAddr, page); err != nil {
		return nil, fmt.Errorf("boot: writing start_info: %w", err)
	}
	if err := writeCmdline(mem, opts.Cmdline); err != nil {
		return nil, fmt.Errorf("boot: writing command line: %w", err)
	}
	if err := writeGDT(mem, ModePVH32); err != nil {
		return nil, fmt.Errorf("boot: writing GDT: %w", err)
	}
	if err := writeFirmwareTables(mem, cpus, opts.PCI, e); err != nil {
		return nil, err
	}
	return e, nil
}

// The start_info page must have room for the largest memory map.
var _ [guestmem.PageSize - (MemmapAddr - StartInfoAddr) - maxMemmapEntries*memmapEntSize]struct{}
