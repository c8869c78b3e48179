package boot

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

func TestLoadPVH(t *testing.T) {
	for _, tc := range []struct {
		name    string
		class   int
		section bool
		valSize int
	}{
		{"elf64-note4", 64, false, 4},
		{"elf64-note8", 64, false, 8},
		{"elf32-note4", 32, false, 4},
		{"elf32-section-note8", 32, true, 8},
		{"elf64-section-note4", 64, true, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const memSize = 64 << 20
			mem := newMem(t, memSize)
			// Dirty the bss area so the test sees it being zeroed.
			copy(read(t, mem, 0x200000, 0x5000), bytes.Repeat([]byte{0xAA}, 0x5000))

			text := pattern(0x3000, 0x11)
			data := pattern(0x800, 0x22)
			img := buildELF(elfSpec{
				class: tc.class,
				segs: []elfSeg{
					{paddr: 0x100000, data: text},
					{paddr: 0x200000, data: data, memsz: 0x5000},
				},
				notes:       append(note("Xen", 6, []byte("linux\x00")), pvhNote(0x100010, tc.valSize)...),
				noteSection: tc.section,
			})
			initrd := pattern(10000, 0x44)
			const cmdline = "console=ttyS0 root=/dev/vda"
			e, err := Load(mem, Options{Kernel: img, Initrd: initrd, Cmdline: cmdline, CPUs: 2})
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if e.Mode != ModePVH32 || e.Image != ImageELFPVH {
				t.Errorf("mode %v image %q, want pvh32 elf-pvh", e.Mode, e.Image)
			}
			if e.RIP != 0x100010 || e.RBX != StartInfoAddr || e.CR3 != 0 || e.RSI != 0 {
				t.Errorf("RIP %#x RBX %#x CR3 %#x RSI %#x", e.RIP, e.RBX, e.CR3, e.RSI)
			}
			if e.GDTBase != GDTAddr || e.GDTLimit != 31 || e.CodeSelector != 0x10 || e.DataSelector != 0x18 {
				t.Errorf("GDT %#x/%d selectors %#x %#x", e.GDTBase, e.GDTLimit, e.CodeSelector, e.DataSelector)
			}
			if e.CR0&cr0PE == 0 || e.CR0&cr0PG != 0 || e.EFER != 0 || e.CR4 != 0 {
				t.Errorf("CR0 %#x CR4 %#x EFER %#x: want protected mode, paging off", e.CR0, e.CR4, e.EFER)
			}
			if e.KernelStart != 0x100000 || e.KernelEnd != 0x205000 {
				t.Errorf("kernel [%#x, %#x)", e.KernelStart, e.KernelEnd)
			}

			// Segments and bss.
			if !bytes.Equal(read(t, mem, 0x100000, 0x3000), text) {
				t.Error("text segment not copied to p_paddr")
			}
			if !bytes.Equal(read(t, mem, 0x200000, 0x800), data) {
				t.Error("data segment not copied to p_paddr")
			}
			if !bytes.Equal(read(t, mem, 0x200800, 0x5000-0x800), make([]byte, 0x5000-0x800)) {
				t.Error("bss not zeroed")
			}

			// Initrd: page-aligned, as high as possible in low RAM.
			if e.InitrdSize != uint64(len(initrd)) || e.InitrdAddr%guestmem.PageSize != 0 {
				t.Fatalf("initrd at %#x size %d", e.InitrdAddr, e.InitrdSize)
			}
			if e.InitrdAddr+e.InitrdSize > memSize || e.InitrdAddr+e.InitrdSize+guestmem.PageSize <= memSize {
				t.Errorf("initrd at %#x is not as high as possible in %d MiB", e.InitrdAddr, memSize>>20)
			}
			if !bytes.Equal(read(t, mem, e.InitrdAddr, e.InitrdSize), initrd) {
				t.Error("initrd contents differ")
			}

			// start_info.
			si := read(t, mem, StartInfoAddr, startInfoSize)
			le := binary.LittleEndian
			check := func(name string, got, want uint64) {
				t.Helper()
				if got != want {
					t.Errorf("start_info.%s = %#x, want %#x", name, got, want)
				}
			}
			check("magic", uint64(le.Uint32(si[0:])), 0x336ec578)
			check("version", uint64(le.Uint32(si[4:])), 1)
			check("flags", uint64(le.Uint32(si[8:])), 0)
			check("nr_modules", uint64(le.Uint32(si[12:])), 1)
			check("modlist_paddr", le.Uint64(si[16:]), ModlistAddr)
			check("cmdline_paddr", le.Uint64(si[24:]), CmdlineAddr)
			check("rsdp_paddr", le.Uint64(si[32:]), ACPIAddr)
			check("memmap_paddr", le.Uint64(si[40:]), MemmapAddr)
			e820 := mem.E820()
			check("memmap_entries", uint64(le.Uint32(si[48:])), uint64(len(e820)))

			mod := read(t, mem, le.Uint64(si[16:]), 32)
			check("modlist[0].paddr", le.Uint64(mod[0:]), e.InitrdAddr)
			check("modlist[0].size", le.Uint64(mod[8:]), uint64(len(initrd)))
			check("modlist[0].cmdline_paddr", le.Uint64(mod[16:]), 0)

			mm := read(t, mem, MemmapAddr, uint64(24*len(e820)))
			for i, r := range e820 {
				ent := mm[i*24:]
				got := guestmem.E820Entry{Addr: le.Uint64(ent[0:]), Size: le.Uint64(ent[8:]), Type: le.Uint32(ent[16:])}
				if got != r || le.Uint32(ent[20:]) != 0 {
					t.Errorf("memmap[%d] = %+v, want %+v", i, got, r)
				}
			}

			cl := read(t, mem, CmdlineAddr, uint64(len(cmdline)+1))
			if string(cl) != cmdline+"\x00" {
				t.Errorf("cmdline %q", cl)
			}

			// GDT: flat 32-bit code and data.
			gdt := read(t, mem, GDTAddr, 32)
			if le.Uint64(gdt[0x10:]) != 0x00CF9B000000FFFF || le.Uint64(gdt[0x18:]) != 0x00CF93000000FFFF {
				t.Errorf("GDT %x", gdt)
			}
			cs, ds := e.CodeSegment(), e.DataSegment()
			if cs.Base != 0 || cs.Limit != 0xFFFFFFFF || cs.Type != 0xB || !cs.DB || cs.L || !cs.G || !cs.S || !cs.Present || cs.Selector != 0x10 {
				t.Errorf("code segment %+v", cs)
			}
			if ds.Base != 0 || ds.Limit != 0xFFFFFFFF || ds.Type != 0x3 || !ds.DB || !ds.G || !ds.S || !ds.Present || ds.Selector != 0x18 {
				t.Errorf("data segment %+v", ds)
			}
			if e.MPTable != MPTableAddr || string(read(t, mem, MPTableAddr, 4)) != "_MP_" {
				t.Errorf("MP table not written (entry says %#x)", e.MPTable)
			}
			if e.RSDPAddr != ACPIAddr {
				t.Errorf("entry says RSDP at %#x", e.RSDPAddr)
			}
			checkMPTable(t, mem, 2)
			checkACPI(t, mem, 2)
		})
	}
}

func TestLoadPVHNoInitrd(t *testing.T) {
	mem := newMem(t, 16<<20)
	e, err := Load(mem, Options{Kernel: simpleELF(64)})
	if err != nil {
		t.Fatal(err)
	}
	si := read(t, mem, StartInfoAddr, startInfoSize)
	if n := binary.LittleEndian.Uint32(si[12:]); n != 0 || binary.LittleEndian.Uint64(si[16:]) != 0 {
		t.Errorf("nr_modules %d modlist %#x without initrd", n, binary.LittleEndian.Uint64(si[16:]))
	}
	if e.InitrdAddr != 0 || e.InitrdSize != 0 {
		t.Errorf("initrd %#x+%d without initrd", e.InitrdAddr, e.InitrdSize)
	}
	if c := read(t, mem, CmdlineAddr, 1); c[0] != 0 {
		t.Errorf("empty command line not NUL-terminated")
	}
}

// The initrd must avoid kernel segments placed high in RAM.
func TestLoadPVHInitrdAvoidsKernel(t *testing.T) {
	const memSize = 16 << 20
	mem := newMem(t, memSize)
	img := buildELF(elfSpec{
		segs: []elfSeg{
			{paddr: 0x100000, data: pattern(0x1000, 1)},
			{paddr: memSize - 0x3000, data: pattern(0x1000, 2), memsz: 0x2800},
		},
		notes: pvhNote(0x100000, 4),
	})
	initrd := pattern(0x2000, 3)
	e, err := Load(mem, Options{Kernel: img, Initrd: initrd})
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(memSize - 0x5000); e.InitrdAddr != want {
		t.Errorf("initrd at %#x, want %#x (just below the high segment)", e.InitrdAddr, want)
	}
	if !bytes.Equal(read(t, mem, memSize-0x3000, 0x1000), pattern(0x1000, 2)) {
		t.Error("initrd overwrote the kernel")
	}

	// An initrd bigger than the free RAM is refused.
	_, err = Load(mem, Options{Kernel: img, Initrd: make([]byte, memSize)})
	wantErr(t, err, "initrd (16777216 bytes) does not fit")
}

// ELF segments may use free memory below 1 MiB, but not the loader's
// structures.
func TestLoadPVHLowSegments(t *testing.T) {
	mem := newMem(t, 16<<20)
	ok := buildELF(elfSpec{
		segs:  []elfSeg{{paddr: 0x10000, data: pattern(0x1000, 1)}, {paddr: 0x100000, data: pattern(0x100, 2)}},
		notes: pvhNote(0x10000, 4),
	})
	if _, err := Load(mem, Options{Kernel: ok}); err != nil {
		t.Fatalf("segment in free low memory: %v", err)
	}
	for _, tc := range []struct {
		paddr uint64
		what  string
	}{
		{0x0, "the real-mode IVT, BIOS data area and GDT"},
		{0x7800, "the zero page / PVH start_info"},
		{0x8F00, "the boot stack"},
		{0xA000, "the boot page tables"},
		{0x2F000, "the command line"},
		{0x9F000, "the EBDA, MP and ACPI tables and BIOS area"},
		{0xE0800, "the EBDA, MP and ACPI tables and BIOS area"},
		{0xFFF00, "the EBDA, MP and ACPI tables and BIOS area"},
	} {
		img := buildELF(elfSpec{
			segs:  []elfSeg{{paddr: 0x100000, data: pattern(0x100, 2)}, {paddr: tc.paddr, data: pattern(0x1000, 1)}},
			notes: pvhNote(0x100000, 4),
		})
		_, err := Load(mem, Options{Kernel: img})
		wantErr(t, err, fmt.Sprintf("kernel image: ELF program header 1: [%#x, %#x) overlaps %s", tc.paddr, tc.paddr+0x1000, tc.what))
	}
}

func TestELFErrors(t *testing.T) {
	valid := simpleELF(64)
	le := binary.LittleEndian
	mod := func(f func(b []byte)) []byte {
		b := bytes.Clone(valid)
		f(b)
		return b
	}
	tests := []struct {
		name string
		img  []byte
		want string
	}{
		{"no note", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}}),
			"kernel image: no PVH entry note (Xen ELF note 18); ferry boots ELF kernels only through PVH"},
		{"other xen notes only", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: note("Xen", 6, []byte("linux\x00"))}),
			"no PVH entry note"},
		{"note 18 of another owner", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: note("GNU", 18, []byte{0, 0, 0x10, 0})}),
			"no PVH entry note"},
		{"program header past EOF", mod(func(b []byte) { le.PutUint64(b[64+56+8:], uint64(len(b))) }),
			"kernel image: ELF program header 1 extends past end of file"},
		{"program header table past EOF", mod(func(b []byte) { le.PutUint16(b[56:], 1000) }),
			"kernel image: ELF program header table"},
		{"no program headers", mod(func(b []byte) { le.PutUint16(b[56:], 0) }),
			"ELF file has no program headers"},
		{"short phentsize", mod(func(b []byte) { le.PutUint16(b[54:], 20) }),
			"ELF program header size 20 is smaller than 56"},
		{"big-endian", mod(func(b []byte) { b[5] = 2 }), "not little-endian"},
		{"bad class", mod(func(b []byte) { b[4] = 3 }), "unknown ELF class 3"},
		{"shared object", mod(func(b []byte) { le.PutUint16(b[16:], 3) }), "ELF type 3 is not an executable (ET_EXEC)"},
		{"arm64", mod(func(b []byte) { le.PutUint16(b[18:], 183) }), "ELF machine 183 is not x86"},
		{"filesz > memsz", mod(func(b []byte) { le.PutUint64(b[64+40:], 0x10) }),
			"ELF program header 0: file size 0x3000 exceeds memory size 0x10"},
		{"segment wraps", mod(func(b []byte) { le.PutUint64(b[64+24:], ^uint64(0)-0x100) }),
			"ELF program header 0: segment [0xfffffffffffffeff, +0x3000) wraps the address space"},
		{"segment outside RAM", mod(func(b []byte) { le.PutUint64(b[64+56+24:], 0x80000000) }),
			"kernel image: ELF program header 1: [0x80000000, 0x80005000) is not inside guest RAM"},
		{"entry outside segments", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: pvhNote(0x300000, 4)}),
			"PVH entry point 0x300000 is not inside"},
		{"entry above 4G", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: pvhNote(1<<32, 8)}),
			"PVH entry point 0x100000000 in note segment (program header 1) is above 4 GiB"},
		{"bad note value size", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: note("Xen", 18, []byte{1, 2})}),
			"has a 2-byte value, want 4 or 8"},
		{"note name past end", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: []byte{200, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, 'X', 'e', 'n', 0}}),
			"malformed ELF note in note segment (program header 1): name (200 bytes)"},
		{"note desc past end", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: []byte{4, 0, 0, 0, 40, 0, 0, 0, 18, 0, 0, 0, 'X', 'e', 'n', 0, 1, 2, 3, 4}}),
			"descriptor (40 bytes) extends past the end of the notes"},
		{"no loadable segments", buildELF(elfSpec{notes: pvhNote(0x100000, 4)}),
			"no loadable (PT_LOAD) segments"},
		{"truncated header", valid[:40], "kernel image: truncated ELF64 header (40 of 64 bytes)"},
		{"truncated ident", valid[:10], "kernel image: truncated ELF identification (10 bytes)"},
		{"section table past EOF", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: pvhNote(0x100000, 4), noteSection: true})[:200],
			"ELF section header table"},
	}
	mem := newMem(t, 16<<20)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(mem, Options{Kernel: tc.img})
			wantErr(t, err, tc.want)
		})
	}
}

// Every truncation of a valid image must be rejected (or, for truncations
// that only drop trailing padding, accepted) without a panic.
func TestELFTruncated(t *testing.T) {
	mem := newMem(t, 16<<20)
	for _, class := range []int{32, 64} {
		img := simpleELF(class)
		for n := 0; n < len(img); n++ {
			if _, err := Load(mem, Options{Kernel: img[:n]}); err == nil {
				// Only padding after the last segment may go.
				if n < len(img)-16 {
					t.Errorf("ELF%d truncated to %d of %d bytes was accepted", class, n, len(img))
				}
			}
		}
	}
}

// Many note sections covering the same bytes must not make parsing
// quadratic: the notes examined are bounded by the file size.
func TestELFNoteBudget(t *testing.T) {
	le := binary.LittleEndian
	// 48 KiB of zero bytes parse as empty notes.
	base := buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}, notes: make([]byte, 48<<10), noteSection: true})
	shoff := le.Uint64(base[40:])
	sh := base[shoff+64 : shoff+128]
	img := bytes.Clone(base[:shoff+64])
	for range 200 {
		img = append(img, sh...)
	}
	le.PutUint16(img[60:], 201)
	_, err := Probe(img)
	wantErr(t, err, "overlap excessively")

	// A few overlapping ones are fine.
	le.PutUint16(img[60:], 3)
	_, err = Probe(img[:shoff+64*3])
	wantErr(t, err, "no PVH entry note")
}
