package boot

import (
	"strings"
	"sync"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// fuzzSeeds are small valid and invalid images. They are kept small
// because the fuzzer's minimizer is quadratic in the input length; run
// with -fuzzminimizetime=5s or so all the same.
func fuzzSeeds() [][]byte {
	small := func(class, noteSize int) []byte {
		return buildELF(elfSpec{
			class: class,
			segs: []elfSeg{
				{paddr: 0x100000, data: pattern(0x40, 0x11)},
				{paddr: 0x200000, data: pattern(0x20, 0x22), memsz: 0x1000},
			},
			notes: pvhNote(0x100010, noteSize),
		})
	}
	noteSec := buildELF(elfSpec{
		class:       32,
		segs:        []elfSeg{{paddr: 0x100000, data: pattern(0x200, 1), memsz: 0x1000}},
		notes:       pvhNote(0x100000, 8),
		noteSection: true,
	})
	lowSeg := buildELF(elfSpec{
		segs:  []elfSeg{{paddr: 0x10000, data: pattern(0x100, 1)}, {paddr: 0xf00000, data: pattern(0x100, 2), memsz: 0x100000}},
		notes: append(note("GNU", 3, pattern(20, 3)), pvhNote(0x10000, 4)...),
	})
	bz := defaultBz()
	bz.pref = 0x400000 // fits in the fuzzing guest's 16 MiB
	bz.kernel = pattern(0x300, 4)
	smallBz := buildBz(bz)
	bz.relocatable = false
	bz.setupSects = 0
	nonReloc := buildBz(bz)
	bz.version = 0x0206
	old := buildBz(bz)
	return [][]byte{
		small(64, 8), small(32, 4), noteSec, lowSeg, smallBz, nonReloc, old,
		nil, []byte("\x7fELF"), []byte("garbage"),
	}
}

func FuzzProbe(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, err := Probe(b)
		if err == nil && kind != ImageELFPVH && kind != ImageBzImage {
			t.Fatalf("Probe returned kind %q without error", kind)
		}
		if err != nil && kind != "" {
			t.Fatalf("Probe returned kind %q with error %v", kind, err)
		}
		if err != nil && err.Error() == "" {
			t.Fatal("empty error message")
		}
	})
}

// One guest memory per fuzzing process: creating a memfd per input would
// dominate the run time.
var (
	fuzzMemOnce sync.Once
	fuzzMem     *guestmem.Memory
	fuzzMemErr  error
	fuzzMemMu   sync.Mutex
	fuzzInitrd  []byte
)

const fuzzMemSize = guestmem.MinSize

// sharedFuzzMem returns the process's fuzzing memory, locked; call the
// returned function to unlock it.
func sharedFuzzMem(t *testing.T) (*guestmem.Memory, func()) {
	fuzzMemOnce.Do(func() {
		fuzzMem, fuzzMemErr = guestmem.New(fuzzMemSize)
		fuzzInitrd = make([]byte, fuzzMemSize)
	})
	if fuzzMemErr != nil {
		t.Fatal(fuzzMemErr)
	}
	fuzzMemMu.Lock()
	return fuzzMem, fuzzMemMu.Unlock
}

// checkLoaded checks the invariants of a successful Load.
func checkLoaded(t *testing.T, mem *guestmem.Memory, e *Entry, initrdLen int) {
	t.Helper()
	if e.RIP < e.KernelStart || e.RIP >= e.KernelEnd {
		t.Fatalf("entry %#x outside kernel [%#x, %#x)", e.RIP, e.KernelStart, e.KernelEnd)
	}
	if e.KernelEnd > mem.Size() || e.KernelStart >= e.KernelEnd {
		t.Fatalf("kernel [%#x, %#x) outside %d bytes of RAM", e.KernelStart, e.KernelEnd, mem.Size())
	}
	if e.InitrdSize != uint64(initrdLen) {
		t.Fatalf("initrd size %d, want %d", e.InitrdSize, initrdLen)
	}
	if initrdLen > 0 {
		if e.InitrdAddr%guestmem.PageSize != 0 || e.InitrdAddr < guestmem.HighMemory || e.InitrdAddr+e.InitrdSize > mem.Size() {
			t.Fatalf("initrd at [%#x, +%#x)", e.InitrdAddr, e.InitrdSize)
		}
		if e.Image == ImageBzImage && e.InitrdAddr < e.KernelEnd && e.InitrdAddr+e.InitrdSize > e.KernelStart {
			t.Fatalf("initrd [%#x, +%#x) overlaps kernel [%#x, %#x)", e.InitrdAddr, e.InitrdSize, e.KernelStart, e.KernelEnd)
		}
	}
	if e.Mode == ModePVH32 && (e.RIP > 0xFFFFFFFF || e.RBX != StartInfoAddr) {
		t.Fatalf("PVH entry %+v", e)
	}
	if e.Mode == ModeLinux64 && (e.CR3 != PML4Addr || e.RSI != ZeroPageAddr) {
		t.Fatalf("Linux64 entry %+v", e)
	}
	if mpf, err := mem.Slice(MPTableAddr, mpfSize); err != nil || string(mpf[:4]) != "_MP_" || checksum(mpf) != 0 {
		t.Fatal("MP floating pointer missing")
	}
	if rsdp, err := mem.Slice(ACPIAddr, rsdpSize); err != nil || e.RSDPAddr != ACPIAddr || string(rsdp[:8]) != "RSD PTR " || checksum(rsdp) != 0 {
		t.Fatal("ACPI RSDP missing")
	}
}

func FuzzLoad(f *testing.F) {
	for i, s := range fuzzSeeds() {
		f.Add(s, uint16(i*3), "console=ttyS0", uint8(i))
	}
	f.Add(fuzzSeeds()[0], uint16(12<<10), "", uint8(200))
	f.Fuzz(func(t *testing.T, kernel []byte, initrdKiB uint16, cmdline string, cpus uint8) {
		mem, unlock := sharedFuzzMem(t)
		defer unlock()

		// Initrd sizes from 0 to the RAM size in 1 KiB steps (odd sizes too).
		n := int(initrdKiB) * 1024
		if n > len(fuzzInitrd) {
			n = len(fuzzInitrd)
		}
		if n > 0 {
			n -= int(initrdKiB % 7)
		}
		opts := Options{Kernel: kernel, Initrd: fuzzInitrd[:n], Cmdline: cmdline, CPUs: int(cpus)}
		kind, perr := Probe(kernel)
		e, err := Load(mem, opts)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		if perr != nil {
			t.Fatalf("Load succeeded but Probe failed: %v", perr)
		}
		if e.Image != kind {
			t.Fatalf("Load loaded %q, Probe says %q", e.Image, kind)
		}
		checkLoaded(t, mem, e, n)
	})
}

// FuzzLoadBzImageHeader fuzzes the setup header fields that steer
// placement, on an otherwise well-formed bzImage.
func FuzzLoadBzImageHeader(f *testing.F) {
	d := defaultBz()
	f.Add(d.version, d.setupSects, d.jump, d.loadflags, d.xloadflags, d.relocatable, d.align, uint64(0x400000), d.initSize, d.cmdlineSize, d.initrdMax, uint16(0x40), uint32(0), uint16(0), uint8(1))
	f.Add(d.version, uint8(0), d.jump, d.loadflags, d.xloadflags, false, d.align, uint64(0), uint32(0x3000000), uint32(10), uint32(0x37FFFFFF), uint16(0x1000), uint32(5<<20), uint16(10), uint8(41))
	f.Add(uint16(0x020C), uint8(1), uint8(0x62), uint8(0x81), uint16(1), true, uint32(0), uint64(0x100000), uint32(0), uint32(0), uint32(0xFFFFFFFF), uint16(1), uint32(60<<20), uint16(0), uint8(0))
	f.Fuzz(func(t *testing.T, version uint16, sects, jump, loadflags uint8, xlf uint16, reloc bool,
		align uint32, pref uint64, initSize, cmdlineSize, initrdMax uint32, kernelParas uint16, initrdLen uint32, cmdlineLen uint16, cpus uint8) {
		mem, unlock := sharedFuzzMem(t)
		defer unlock()
		img := buildBz(bzSpec{
			version: version, setupSects: sects, jump: jump, loadflags: loadflags, xloadflags: xlf,
			relocatable: reloc, align: align, pref: pref, initSize: initSize, cmdlineSize: cmdlineSize,
			initrdMax: initrdMax, kernel: make([]byte, int(kernelParas)*16),
		})
		n := int(initrdLen % (uint32(len(fuzzInitrd)) + 1))
		opts := Options{Kernel: img, Initrd: fuzzInitrd[:n], Cmdline: strings.Repeat("c", int(cmdlineLen)), CPUs: int(cpus)}
		e, err := Load(mem, opts)
		if err != nil {
			return
		}
		checkLoaded(t, mem, e, n)
		if e.Image != ImageBzImage {
			t.Fatalf("image %q", e.Image)
		}
		if uint64(cmdlineLen) > uint64(cmdlineSize) {
			t.Fatalf("command line of %d bytes accepted with cmdline_size %d", cmdlineLen, cmdlineSize)
		}
		if n > 0 && e.InitrdAddr+e.InitrdSize-1 > uint64(initrdMax) {
			t.Fatalf("initrd ends at %#x above initrd_addr_max %#x", e.InitrdAddr+e.InitrdSize, initrdMax)
		}
		if e.KernelStart < guestmem.HighMemory {
			t.Fatalf("kernel at %#x below 1 MiB", e.KernelStart)
		}
	})
}

// FuzzLoadELFSegments fuzzes the program header values of an otherwise
// well-formed PVH ELF.
func FuzzLoadELFSegments(f *testing.F) {
	f.Add(true, uint64(0x100000), uint16(0x3000), uint64(0x3000), uint64(0x200000), uint16(0x800), uint64(0x5000), uint64(0x100010), uint8(4), uint32(10000), uint8(2))
	f.Add(false, uint64(0x10000), uint16(0x100), uint64(0x100), uint64(0xf00000), uint16(0x100), uint64(0x100000), uint64(0x10000), uint8(8), uint32(0), uint8(0))
	f.Add(true, uint64(0x9f000), uint16(0x100), uint64(0x100), uint64(0xffffffffffff0000), uint16(0), uint64(0x20000), uint64(0x9f000), uint8(8), uint32(1<<20), uint8(99))
	f.Fuzz(func(t *testing.T, elf64 bool, p0 uint64, f0 uint16, m0, p1 uint64, f1 uint16, m1, entry uint64, noteSize uint8, initrdLen uint32, cpus uint8) {
		mem, unlock := sharedFuzzMem(t)
		defer unlock()
		class := 32
		if elf64 {
			class = 64
		}
		img := buildELF(elfSpec{
			class: class,
			segs: []elfSeg{
				{paddr: p0, data: make([]byte, f0), memsz: m0},
				{paddr: p1, data: make([]byte, f1), memsz: m1},
			},
			notes: pvhNote(entry, int(noteSize%9)),
		})
		n := int(initrdLen % (uint32(len(fuzzInitrd)) + 1))
		e, err := Load(mem, Options{Kernel: img, Initrd: fuzzInitrd[:n], CPUs: int(cpus)})
		if err != nil {
			return
		}
		checkLoaded(t, mem, e, n)
		if e.Image != ImageELFPVH {
			t.Fatalf("image %q", e.Image)
		}
		for _, s := range []span{{p0, p0 + max(m0, uint64(f0)), ""}, {p1, p1 + max(m1, uint64(f1)), ""}} {
			if s.end == s.start {
				continue
			}
			for _, l := range lowStructures {
				if s.overlaps(l) {
					t.Fatalf("segment [%#x, %#x) overlapping %s accepted", s.start, s.end, l.what)
				}
			}
			if n > 0 && s.overlaps(span{e.InitrdAddr, e.InitrdAddr + e.InitrdSize, ""}) {
				t.Fatalf("initrd [%#x, +%#x) overlaps segment [%#x, %#x)", e.InitrdAddr, e.InitrdSize, s.start, s.end)
			}
		}
	})
}
