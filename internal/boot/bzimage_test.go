package boot

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

func TestLoadBzImage(t *testing.T) {
	const memSize = 64 << 20
	mem := newMem(t, memSize)
	spec := defaultBz()
	img := buildBz(spec)
	initrd := pattern(1<<20+123, 0x55)
	const cmdline = "console=ttyS0 panic=-1"
	e, err := Load(mem, Options{Kernel: img, Initrd: initrd, Cmdline: cmdline, CPUs: 4})
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	le := binary.LittleEndian

	// Entry state.
	if e.Mode != ModeLinux64 || e.Image != ImageBzImage {
		t.Errorf("mode %v image %q", e.Mode, e.Image)
	}
	if e.RIP != spec.pref+0x200 || e.RSI != ZeroPageAddr || e.RBX != 0 || e.CR3 != PML4Addr {
		t.Errorf("RIP %#x RSI %#x RBX %#x CR3 %#x", e.RIP, e.RSI, e.RBX, e.CR3)
	}
	if e.CR0&(cr0PE|cr0PG) != cr0PE|cr0PG || e.CR4&cr4PAE == 0 || e.EFER != eferLME|eferLMA || e.RFLAGS&(1<<9) != 0 {
		t.Errorf("CR0 %#x CR4 %#x EFER %#x RFLAGS %#x: want long mode, interrupts off", e.CR0, e.CR4, e.EFER, e.RFLAGS)
	}
	if e.KernelStart != spec.pref || e.KernelEnd != spec.pref+uint64(spec.initSize) {
		t.Errorf("kernel [%#x, %#x)", e.KernelStart, e.KernelEnd)
	}
	if cs := e.CodeSegment(); !cs.L || cs.DB || cs.Type != 0xB || cs.Selector != 0x10 || !cs.Present {
		t.Errorf("code segment %+v, want 64-bit", cs)
	}
	if ds := e.DataSegment(); ds.Type != 0x3 || ds.Selector != 0x18 || !ds.Present || ds.Limit != 0xFFFFFFFF {
		t.Errorf("data segment %+v", ds)
	}
	gdt := read(t, mem, GDTAddr, 32)
	if le.Uint64(gdt[0:]) != 0 || le.Uint64(gdt[0x10:]) != 0x00AF9B000000FFFF || le.Uint64(gdt[0x18:]) != 0x00CF93000000FFFF {
		t.Errorf("GDT %x", gdt)
	}

	// Kernel placed at pref_address.
	if !bytes.Equal(read(t, mem, spec.pref, uint64(len(spec.kernel))), spec.kernel) {
		t.Error("protected-mode kernel not at pref_address")
	}

	// Zero page.
	zp := read(t, mem, ZeroPageAddr, 4096)
	low := bytes.Clone(zp[:0x1F1])
	low[zpE820Entries] = 0
	clear(low[0x070:0x078]) // acpi_rsdp_addr, checked below
	if !bytes.Equal(low, make([]byte, 0x1F1)) {
		t.Error("zero page before the setup header is not zero (boot sector leaked?)")
	}
	hdrEnd := 0x202 + int(img[0x201])
	changed := map[int]bool{}
	for _, r := range [][2]int{{0x210, 1}, {0x211, 1}, {0x214, 4}, {0x218, 8}, {0x224, 2}, {0x228, 4}, {0x250, 8}} {
		for i := r[0]; i < r[0]+r[1]; i++ {
			changed[i] = true
		}
	}
	for i := 0x1F1; i < hdrEnd; i++ {
		if !changed[i] && zp[i] != img[i] {
			t.Errorf("zero page byte %#x = %#x, image has %#x", i, zp[i], img[i])
		}
	}
	if !bytes.Equal(zp[hdrEnd:zpE820Table], make([]byte, zpE820Table-hdrEnd)) {
		t.Error("zero page after the header is not zero")
	}
	check := func(name string, got, want uint64) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %#x, want %#x", name, got, want)
		}
	}
	check("type_of_loader", uint64(zp[0x210]), 0xFF)
	check("loadflags", uint64(zp[0x211]), lfLoadedHigh|lfCanUseHeap)
	check("code32_start", uint64(le.Uint32(zp[0x214:])), spec.pref)
	check("heap_end_ptr", uint64(le.Uint16(zp[0x224:])), 0xFE00)
	check("cmd_line_ptr", uint64(le.Uint32(zp[0x228:])), CmdlineAddr)
	check("ext_cmd_line_ptr", uint64(le.Uint32(zp[0x0C8:])), 0)
	check("ramdisk_image", uint64(le.Uint32(zp[0x218:])), e.InitrdAddr)
	check("ramdisk_size", uint64(le.Uint32(zp[0x21C:])), uint64(len(initrd)))
	check("ext_ramdisk_image", uint64(le.Uint32(zp[0x0C0:])), 0)
	check("ext_ramdisk_size", uint64(le.Uint32(zp[0x0C4:])), 0)
	check("setup_data", le.Uint64(zp[0x250:]), 0)
	check("acpi_rsdp_addr", le.Uint64(zp[0x070:]), ACPIAddr)
	check("entry RSDPAddr", e.RSDPAddr, ACPIAddr)
	check("version", uint64(le.Uint16(zp[0x206:])), 0x020F)

	e820 := mem.E820()
	check("e820_entries", uint64(zp[0x1E8]), uint64(len(e820)))
	for i, r := range e820 {
		ent := zp[0x2D0+20*i:]
		got := guestmem.E820Entry{Addr: le.Uint64(ent[0:]), Size: le.Uint64(ent[8:]), Type: le.Uint32(ent[16:])}
		if got != r {
			t.Errorf("e820[%d] = %+v, want %+v", i, got, r)
		}
	}

	if got := read(t, mem, CmdlineAddr, uint64(len(cmdline)+1)); string(got) != cmdline+"\x00" {
		t.Errorf("cmdline %q", got)
	}

	// Initrd: page-aligned, highest below the top of RAM, clear of the kernel.
	if e.InitrdAddr%4096 != 0 || e.InitrdAddr+e.InitrdSize > memSize || e.InitrdAddr+e.InitrdSize+4096 <= memSize {
		t.Errorf("initrd at %#x+%#x is not the highest page-aligned slot below %#x", e.InitrdAddr, e.InitrdSize, memSize)
	}
	if e.InitrdAddr < e.KernelEnd {
		t.Errorf("initrd at %#x overlaps the kernel ending at %#x", e.InitrdAddr, e.KernelEnd)
	}
	if !bytes.Equal(read(t, mem, e.InitrdAddr, e.InitrdSize), initrd) {
		t.Error("initrd contents differ")
	}

	// Page tables: identity map of 4 GiB with 2 MiB pages.
	pml4 := read(t, mem, PML4Addr, 4096)
	check("PML4[0]", le.Uint64(pml4), PDPTAddr|3)
	check("PML4[1]", le.Uint64(pml4[8:]), 0)
	pdpt := read(t, mem, PDPTAddr, 4096)
	for i := range 4 {
		check("PDPT", le.Uint64(pdpt[8*i:]), uint64(PDAddr+i*4096)|3)
		pd := read(t, mem, uint64(PDAddr+i*4096), 4096)
		for j := range 512 {
			if got, want := le.Uint64(pd[8*j:]), uint64(i*512+j)<<21|0x83; got != want {
				t.Fatalf("PD[%d][%d] = %#x, want %#x", i, j, got, want)
			}
		}
	}
	check("PDPT[4]", le.Uint64(pdpt[32:]), 0)

	// MP table for 4 CPUs.
	checkMPTable(t, mem, 4)
	checkACPI(t, mem, 4)
}

func TestLoadBzImagePlacement(t *testing.T) {
	const memSize = 64 << 20
	mem := newMem(t, memSize)

	t.Run("no pref_address", func(t *testing.T) {
		s := defaultBz()
		s.pref = 0
		e, err := Load(mem, Options{Kernel: buildBz(s)})
		if err != nil {
			t.Fatal(err)
		}
		// Loaded at 1 MiB; it runs from 1 MiB aligned up to kernel_alignment.
		if e.RIP != 0x100200 || e.KernelStart != 0x100000 || e.KernelEnd != 0x200000+uint64(s.initSize) {
			t.Errorf("RIP %#x kernel [%#x, %#x)", e.RIP, e.KernelStart, e.KernelEnd)
		}
	})
	t.Run("not relocatable", func(t *testing.T) {
		s := defaultBz()
		s.relocatable = false
		e, err := Load(mem, Options{Kernel: buildBz(s)})
		if err != nil {
			t.Fatal(err)
		}
		// Loaded at 1 MiB; moves itself to pref_address.
		if e.RIP != 0x100200 || e.KernelStart != 0x100000 || e.KernelEnd != s.pref+uint64(s.initSize) {
			t.Errorf("RIP %#x kernel [%#x, %#x)", e.RIP, e.KernelStart, e.KernelEnd)
		}
		if !bytes.Equal(read(t, mem, 0x100000, uint64(len(s.kernel))), s.kernel) {
			t.Error("kernel not at 1 MiB")
		}
	})
	t.Run("setup_sects 0 means 4", func(t *testing.T) {
		s := defaultBz()
		s.setupSects = 0
		img := buildBz(s)
		if len(img) != 5*512+len(s.kernel) {
			t.Fatalf("builder: %d bytes", len(img))
		}
		if _, err := Load(mem, Options{Kernel: img}); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(read(t, mem, s.pref, uint64(len(s.kernel))), s.kernel) {
			t.Error("kernel not taken from after 5 sectors")
		}
	})
	t.Run("initrd_addr_max", func(t *testing.T) {
		s := defaultBz()
		s.initrdMax = 0x2FFFFFF
		e, err := Load(mem, Options{Kernel: buildBz(s), Initrd: pattern(5000, 1)})
		if err != nil {
			t.Fatal(err)
		}
		if e.InitrdAddr != 0x3000000-0x2000 {
			t.Errorf("initrd at %#x, want %#x", e.InitrdAddr, 0x3000000-0x2000)
		}
	})
	t.Run("initrd below the kernel", func(t *testing.T) {
		// RAM above the kernel is too small: the initrd goes below it.
		s := defaultBz()
		s.initSize = memSize - 0x1000000 - 0x1000
		e, err := Load(mem, Options{Kernel: buildBz(s), Initrd: pattern(0x3000, 1)})
		if err != nil {
			t.Fatal(err)
		}
		if e.InitrdAddr != 0x1000000-0x3000 {
			t.Errorf("initrd at %#x, want %#x", e.InitrdAddr, 0x1000000-0x3000)
		}
	})
	t.Run("no initrd", func(t *testing.T) {
		_, err := Load(mem, Options{Kernel: buildBz(defaultBz())})
		if err != nil {
			t.Fatal(err)
		}
		zp := read(t, mem, ZeroPageAddr, 4096)
		if binary.LittleEndian.Uint32(zp[0x218:]) != 0 || binary.LittleEndian.Uint32(zp[0x21C:]) != 0 {
			t.Error("ramdisk fields set without an initrd")
		}
	})
	t.Run("maximum command line", func(t *testing.T) {
		cl := strings.Repeat("x", 0x7FF)
		if _, err := Load(mem, Options{Kernel: buildBz(defaultBz()), Cmdline: cl}); err != nil {
			t.Fatal(err)
		}
		if got := read(t, mem, CmdlineAddr, 0x800); string(got) != cl+"\x00" {
			t.Error("long command line not written")
		}
	})
}

func TestBzImageErrors(t *testing.T) {
	mem := newMem(t, 32<<20)
	mod := func(f func(*bzSpec)) []byte {
		s := defaultBz()
		f(&s)
		return buildBz(s)
	}
	valid := buildBz(defaultBz())
	tests := []struct {
		name    string
		img     []byte
		initrd  []byte
		cmdline string
		want    string
	}{
		{name: "protocol 2.06", img: mod(func(s *bzSpec) { s.version = 0x0206 }),
			want: "bzImage: boot protocol 2.06 too old, need >= 2.12 for 64-bit entry"},
		{name: "protocol 2.11", img: mod(func(s *bzSpec) { s.version = 0x020B }),
			want: "bzImage: boot protocol 2.11 too old"},
		{name: "no 64-bit entry", img: mod(func(s *bzSpec) { s.xloadflags = 0x2 }),
			want: "bzImage: kernel has no 64-bit entry point (XLF_KERNEL_64 clear in xloadflags)"},
		{name: "zImage", img: mod(func(s *bzSpec) { s.loadflags = 0 }),
			want: "bzImage: LOADED_HIGH is clear"},
		{name: "short header", img: mod(func(s *bzSpec) { s.jump = 0x30 }),
			want: "bzImage: setup header ends at 0x232, too short for boot protocol 2.15"},
		{name: "no protected-mode kernel", img: valid[:4*512],
			want: "bzImage: setup code (3 sectors, 2048 bytes) extends to or past end of file"},
		{name: "setup sects past EOF", img: func() []byte { b := bytes.Clone(valid); b[0x1F1] = 200; return b }(),
			want: "bzImage: setup code (200 sectors"},
		{name: "truncated header", img: valid[:0x240],
			want: "bzImage: setup header ends at 0x26c, past end of file (576 bytes)"},
		{name: "truncated before version", img: valid[:0x206],
			want: "bzImage: truncated setup header (518 bytes)"},
		{name: "tiny kernel", img: mod(func(s *bzSpec) { s.kernel = make([]byte, 0x100) }),
			want: "too short to contain the 64-bit entry point"},
		{name: "cmdline too long", img: valid, cmdline: strings.Repeat("a", 0x800),
			want: "bzImage: command line is 2048 bytes, the kernel accepts at most 2047 (cmdline_size)"},
		{name: "init_size beyond RAM", img: mod(func(s *bzSpec) { s.initSize = 0x2000000 }),
			want: "bzImage: kernel runtime area (init_size 0x2000000 at 0x1000000): [0x1000000, 0x3000000) is not inside guest RAM"},
		{name: "pref_address beyond RAM", img: mod(func(s *bzSpec) { s.pref = 0x40000000 }),
			want: "is not inside guest RAM"},
		{name: "non-relocatable pref in low memory", img: mod(func(s *bzSpec) { s.relocatable = false; s.pref = 0x8000 }),
			want: "overlaps the boot stack"},
		{name: "alignment overflow", img: mod(func(s *bzSpec) { s.pref = ^uint64(0) - 10 }),
			want: "runtime start address overflows"},
		{name: "initrd too big", img: valid, initrd: make([]byte, 20<<20),
			want: "boot: initrd (20971520 bytes) does not fit in guest RAM below 0x2000000"},
		{name: "initrd_addr_max below kernel", img: mod(func(s *bzSpec) { s.initrdMax = 0xFFFFF }), initrd: []byte{1},
			want: "initrd (1 bytes) does not fit"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(mem, Options{Kernel: tc.img, Initrd: tc.initrd, Cmdline: tc.cmdline})
			wantErr(t, err, tc.want)
		})
	}
}

func TestBzImageTruncated(t *testing.T) {
	mem := newMem(t, 32<<20)
	img := buildBz(defaultBz())
	for n := 0; n < len(img); n += 7 {
		if _, err := Load(mem, Options{Kernel: img[:n]}); err == nil && n < 4*512+0x201 {
			t.Errorf("bzImage truncated to %d bytes was accepted", n)
		}
	}
}
