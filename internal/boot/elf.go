package boot

import (
	"bytes"
	"fmt"
)

// A minimal ELF reader for PVH kernels. It reads only what booting needs
// (the file header, program headers, and notes in PT_NOTE segments or, as a
// fallback, SHT_NOTE sections) and checks every offset and size against the
// file before touching it. Allocation is bounded by the number of program
// headers, which is bounded by the file size.

const (
	elfClass32  = 1
	elfClass64  = 2
	elfData2LSB = 1

	etExec = 2

	em386    = 3
	emX86_64 = 62

	ptLoad = 1
	ptNote = 4

	shtNote   = 7
	pnXNum    = 0xFFFF
	shnUndef  = 0
	elf32Ehdr = 52
	elf64Ehdr = 64
	elf32Phdr = 32
	elf64Phdr = 56
	elf32Shdr = 40
	elf64Shdr = 64

	// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY: the physical
	// address of the 32-bit PVH entry point.
	xenElfnotePhys32Entry = 18

	elfErrPrefix = "kernel image: "
)

// elfSegment is one PT_LOAD segment.
type elfSegment struct {
	index int    // program header index, for errors
	paddr uint64 // load address
	memsz uint64
	data  []byte // file contents (p_filesz bytes of the image)
}

type elfImage struct {
	class    int
	segments []elfSegment
	entry    uint64 // PVH 32-bit entry point
}

func elfErr(format string, args ...any) error {
	return fmt.Errorf(elfErrPrefix+format, args...)
}

// rangeIn reports whether [off, off+n) lies inside a buffer of length size.
func rangeIn(off, n uint64, size int) bool {
	return off <= uint64(size) && n <= uint64(size)-off
}

type elfHeader struct {
	class            int
	phoff, shoff     uint64
	phentsize, phnum uint64
	shentsize, shnum uint64
}

func parseELFHeader(b []byte) (elfHeader, error) {
	var h elfHeader
	if len(b) < 16 {
		return h, elfErr("truncated ELF identification (%d bytes)", len(b))
	}
	switch b[4] {
	case elfClass32:
		h.class = 32
	case elfClass64:
		h.class = 64
	default:
		return h, elfErr("unknown ELF class %d (want 1 for ELF32 or 2 for ELF64)", b[4])
	}
	if b[5] != elfData2LSB {
		return h, elfErr("ELF data encoding %d is not little-endian", b[5])
	}
	if b[6] != 1 {
		return h, elfErr("unknown ELF version %d", b[6])
	}
	ehsize := elf32Ehdr
	if h.class == 64 {
		ehsize = elf64Ehdr
	}
	if len(b) < ehsize {
		return h, elfErr("truncated ELF%d header (%d of %d bytes)", h.class, len(b), ehsize)
	}
	if t := le.Uint16(b[16:]); t != etExec {
		return h, elfErr("ELF type %d is not an executable (ET_EXEC)", t)
	}
	if m := le.Uint16(b[18:]); m != em386 && m != emX86_64 {
		return h, elfErr("ELF machine %d is not x86 (EM_386 or EM_X86_64)", m)
	}
	var minPh, minSh uint64
	if h.class == 64 {
		h.phoff = le.Uint64(b[32:])
		h.shoff = le.Uint64(b[40:])
		h.phentsize = uint64(le.Uint16(b[54:]))
		h.phnum = uint64(le.Uint16(b[56:]))
		h.shentsize = uint64(le.Uint16(b[58:]))
		h.shnum = uint64(le.Uint16(b[60:]))
		minPh, minSh = elf64Phdr, elf64Shdr
	} else {
		h.phoff = uint64(le.Uint32(b[28:]))
		h.shoff = uint64(le.Uint32(b[32:]))
		h.phentsize = uint64(le.Uint16(b[42:]))
		h.phnum = uint64(le.Uint16(b[44:]))
		h.shentsize = uint64(le.Uint16(b[46:]))
		h.shnum = uint64(le.Uint16(b[48:]))
		minPh, minSh = elf32Phdr, elf32Shdr
	}
	if h.phnum == pnXNum {
		return h, elfErr("extended program header count (PN_XNUM) is not supported")
	}
	if h.phnum == 0 {
		return h, elfErr("ELF file has no program headers")
	}
	if h.phentsize < minPh {
		return h, elfErr("ELF program header size %d is smaller than %d", h.phentsize, minPh)
	}
	// phnum < 2^16 and phentsize < 2^16: the product cannot overflow.
	if !rangeIn(h.phoff, h.phnum*h.phentsize, len(b)) {
		return h, elfErr("ELF program header table [%#x, +%d*%d) extends past end of file (%d bytes)", h.phoff, h.phnum, h.phentsize, len(b))
	}
	if h.shoff == 0 || h.shnum == 0 {
		h.shoff, h.shnum = 0, 0 // no section table
	} else if h.shentsize < minSh {
		return h, elfErr("ELF section header size %d is smaller than %d", h.shentsize, minSh)
	} else if !rangeIn(h.shoff, h.shnum*h.shentsize, len(b)) {
		return h, elfErr("ELF section header table [%#x, +%d*%d) extends past end of file (%d bytes)", h.shoff, h.shnum, h.shentsize, len(b))
	}
	return h, nil
}

// parseELF validates an ELF PVH kernel and collects its loadable segments
// and PVH entry point. It does not touch guest memory.
func parseELF(b []byte) (*elfImage, error) {
	h, err := parseELFHeader(b)
	if err != nil {
		return nil, err
	}
	img := &elfImage{class: h.class}
	var entry uint64
	found := false
	// Note segments and sections may overlap (a PT_NOTE segment usually
	// covers the SHT_NOTE sections); a crafted file could make every one
	// of thousands of headers cover the whole file. Bound the bytes of
	// notes examined so parsing stays linear in the file size.
	noteBudget := 2 * uint64(len(b))
	spend := func(n uint64) error {
		if n > noteBudget {
			return elfErr("ELF note segments and sections overlap excessively (more than twice the file size in total)")
		}
		noteBudget -= n
		return nil
	}
	for i := range int(h.phnum) {
		ph := b[h.phoff+uint64(i)*h.phentsize:][:h.phentsize]
		var typ uint32
		var off, paddr, filesz, memsz, align uint64
		if h.class == 64 {
			typ = le.Uint32(ph[0:])
			off = le.Uint64(ph[8:])
			paddr = le.Uint64(ph[24:])
			filesz = le.Uint64(ph[32:])
			memsz = le.Uint64(ph[40:])
			align = le.Uint64(ph[48:])
		} else {
			typ = le.Uint32(ph[0:])
			off = uint64(le.Uint32(ph[4:]))
			paddr = uint64(le.Uint32(ph[12:]))
			filesz = uint64(le.Uint32(ph[16:]))
			memsz = uint64(le.Uint32(ph[20:]))
			align = uint64(le.Uint32(ph[28:]))
		}
		switch typ {
		case ptLoad:
			if filesz > memsz {
				return nil, elfErr("ELF program header %d: file size %#x exceeds memory size %#x", i, filesz, memsz)
			}
			if !rangeIn(off, filesz, len(b)) {
				return nil, elfErr("ELF program header %d extends past end of file", i)
			}
			if memsz == 0 {
				continue
			}
			if paddr+memsz < paddr {
				return nil, elfErr("ELF program header %d: segment [%#x, +%#x) wraps the address space", i, paddr, memsz)
			}
			img.segments = append(img.segments, elfSegment{index: i, paddr: paddr, memsz: memsz, data: b[off : off+filesz]})
		case ptNote:
			if !rangeIn(off, filesz, len(b)) {
				return nil, elfErr("ELF program header %d extends past end of file", i)
			}
			if found {
				continue
			}
			if err := spend(filesz); err != nil {
				return nil, err
			}
			e, ok, err := findPVHNote(b[off:off+filesz], align, fmt.Sprintf("note segment (program header %d)", i))
			if err != nil {
				return nil, err
			}
			entry, found = e, ok
		}
	}
	if !found && h.shnum > 0 {
		for i := range int(h.shnum) {
			sh := b[h.shoff+uint64(i)*h.shentsize:][:h.shentsize]
			if le.Uint32(sh[4:]) != shtNote {
				continue
			}
			var off, size, align uint64
			if h.class == 64 {
				off, size, align = le.Uint64(sh[24:]), le.Uint64(sh[32:]), le.Uint64(sh[48:])
			} else {
				off, size, align = uint64(le.Uint32(sh[16:])), uint64(le.Uint32(sh[20:])), uint64(le.Uint32(sh[32:]))
			}
			if !rangeIn(off, size, len(b)) {
				return nil, elfErr("ELF section header %d (SHT_NOTE) extends past end of file", i)
			}
			if err := spend(size); err != nil {
				return nil, err
			}
			e, ok, err := findPVHNote(b[off:off+size], align, fmt.Sprintf("note section %d", i))
			if err != nil {
				return nil, err
			}
			if ok {
				entry, found = e, true
				break
			}
		}
	}
	if !found {
		return nil, elfErr("no PVH entry note (Xen ELF note %d); ferry boots ELF kernels only through PVH", xenElfnotePhys32Entry)
	}
	if len(img.segments) == 0 {
		return nil, elfErr("ELF file has no loadable (PT_LOAD) segments")
	}
	inside := false
	for _, s := range img.segments {
		if entry >= s.paddr && entry-s.paddr < uint64(len(s.data)) {
			inside = true
			break
		}
	}
	if !inside {
		return nil, elfErr("PVH entry point %#x is not inside the file contents of any PT_LOAD segment", entry)
	}
	img.entry = entry
	return img, nil
}

// findPVHNote walks the notes in buf looking for the Xen PVH entry note.
// Notes are padded to 4 bytes unless the container asks for 8.
func findPVHNote(buf []byte, align uint64, where string) (entry uint64, found bool, err error) {
	pad := uint64(4)
	if align == 8 {
		pad = 8
	}
	roundUp := func(n uint64) uint64 { return (n + pad - 1) &^ (pad - 1) }
	p := uint64(0)
	n := uint64(len(buf))
	for n-p >= 12 {
		namesz := uint64(le.Uint32(buf[p:]))
		descsz := uint64(le.Uint32(buf[p+4:]))
		typ := le.Uint32(buf[p+8:])
		p += 12
		// namesz, descsz < 2^32, so the rounding cannot overflow.
		if roundUp(namesz) > n-p {
			return 0, false, elfErr("malformed ELF note in %s: name (%d bytes) extends past the end of the notes", where, namesz)
		}
		name := buf[p : p+namesz]
		p += roundUp(namesz)
		if descsz > n-p {
			return 0, false, elfErr("malformed ELF note in %s: descriptor (%d bytes) extends past the end of the notes", where, descsz)
		}
		desc := buf[p : p+descsz]
		if roundUp(descsz) > n-p {
			p = n // last note, padding missing: tolerated
		} else {
			p += roundUp(descsz)
		}
		if typ != xenElfnotePhys32Entry || !bytes.Equal(bytes.TrimRight(name, "\x00"), []byte("Xen")) {
			continue
		}
		switch len(desc) {
		case 4:
			entry = uint64(le.Uint32(desc))
		case 8:
			entry = le.Uint64(desc)
		default:
			return 0, false, elfErr("PVH entry note (Xen ELF note %d) in %s has a %d-byte value, want 4 or 8", xenElfnotePhys32Entry, where, len(desc))
		}
		if entry > 0xFFFF_FFFF {
			return 0, false, elfErr("PVH entry point %#x in %s is above 4 GiB", entry, where)
		}
		return entry, true, nil
	}
	return 0, false, nil
}
