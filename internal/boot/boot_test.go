package boot

import (
	"os"
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

func TestProbe(t *testing.T) {
	old := defaultBz()
	old.version = 0x0206
	for _, tc := range []struct {
		name string
		img  []byte
		kind string
		err  string
	}{
		{"elf64", simpleELF(64), "elf-pvh", ""},
		{"elf32", simpleELF(32), "elf-pvh", ""},
		{"bzimage", buildBz(defaultBz()), "bzimage", ""},
		{"empty", nil, "", "kernel image is empty"},
		{"garbage", []byte("#!/bin/sh\necho hello\n"), "", "unrecognised kernel image format (neither ELF nor bzImage)"},
		{"elf without note", buildELF(elfSpec{segs: []elfSeg{{paddr: 0x100000, data: []byte{1}}}}), "", "no PVH entry note"},
		{"old bzimage", buildBz(old), "", "boot protocol 2.06 too old"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kind, err := Probe(tc.img)
			if tc.err != "" {
				wantErr(t, err, tc.err)
				return
			}
			if err != nil || kind != tc.kind {
				t.Fatalf("Probe = %q, %v; want %q", kind, err, tc.kind)
			}
		})
	}
}

func TestLoadGeneralErrors(t *testing.T) {
	mem := newMem(t, 16<<20)
	_, err := Load(mem, Options{})
	wantErr(t, err, "kernel image is empty")
	_, err = Load(mem, Options{Kernel: []byte("MZ not a kernel")})
	wantErr(t, err, "unrecognised kernel image format")
	_, err = Load(mem, Options{Kernel: simpleELF(64), Cmdline: strings.Repeat("x", CmdlineMax)})
	wantErr(t, err, "command line is 65536 bytes, at most 65535 fit")
	_, err = Load(mem, Options{Kernel: simpleELF(64), Cmdline: "a\x00b"})
	wantErr(t, err, "NUL")
	_, err = Load(nil, Options{Kernel: simpleELF(64)})
	wantErr(t, err, "no guest memory")
	// The largest command line fits in its area.
	cl := strings.Repeat("y", CmdlineMax-1)
	if _, err := Load(mem, Options{Kernel: simpleELF(64), Cmdline: cl}); err != nil {
		t.Fatal(err)
	}
	if got := read(t, mem, CmdlineAddr, CmdlineMax); string(got) != cl+"\x00" {
		t.Error("64 KiB command line not written")
	}
}

// The fixed structures must not overlap one another, and each must lie in
// the span reserved for it.
func TestLayout(t *testing.T) {
	for i, a := range lowStructures {
		if a.end <= a.start || a.end > guestmem.HighMemory {
			t.Errorf("bad span %+v", a)
		}
		for _, b := range lowStructures[i+1:] {
			if a.overlaps(b) {
				t.Errorf("%s [%#x,%#x) overlaps %s [%#x,%#x)", a.what, a.start, a.end, b.what, b.start, b.end)
			}
		}
	}
	within := func(name string, start, end uint64) {
		t.Helper()
		for _, s := range lowStructures {
			if start >= s.start && end <= s.end {
				return
			}
		}
		t.Errorf("%s [%#x, %#x) is not inside one reserved span", name, start, end)
	}
	within("BDA words", BDAEBDASegment, BDABaseMemKiB+2)
	within("GDT", GDTAddr, GDTAddr+gdtEntries*8)
	within("zero page", ZeroPageAddr, ZeroPageAddr+zpSize)
	within("start_info", StartInfoAddr, StartInfoAddr+startInfoSize)
	within("modlist", ModlistAddr, ModlistAddr+modlistEntSize)
	within("memmap", MemmapAddr, MemmapAddr+maxMemmapEntries*memmapEntSize)
	within("stack", BootStackTop-0x100, BootStackTop)
	within("page tables", PML4Addr, PDAddr+4*guestmem.PageSize)
	within("cmdline", CmdlineAddr, CmdlineAddr+CmdlineMax)
	within("MP table (EBDA)", MPTableAddr, MPTableAddr+mpfSize+uint64(mpTableSize(MPMaxEBDACPUs)))
	within("MP table (BIOS area)", MPHighAddr, MPHighAddr+uint64(mpTableSize(MPMaxCPUs)))
	if StartInfoAddr+startInfoSize > ModlistAddr || ModlistAddr+modlistEntSize > MemmapAddr {
		t.Error("start_info, modlist and memmap overlap")
	}
	if mpfSize+mpTableSize(MPMaxEBDACPUs) > 1024 || mpfSize+mpTableSize(MPMaxEBDACPUs+1) <= 1024 {
		t.Errorf("MPMaxEBDACPUs = %d is not the largest count that fits in 1 KiB", MPMaxEBDACPUs)
	}
}

func TestPlaceHigh(t *testing.T) {
	const M = 1 << 20
	occ := []span{{0, M, ""}, {10 * M, 12 * M, ""}, {11 * M, 13 * M, ""}, {15 * M, 16 * M, ""}}
	for _, tc := range []struct {
		size, ceiling uint64
		want          uint64
		ok            bool
	}{
		{0x1000, 16 * M, 15*M - 0x1000, true},
		{2 * M, 16 * M, 13 * M, true},
		{3 * M, 16 * M, 7 * M, true},
		{9 * M, 16 * M, M, true},
		{9*M + 1, 16 * M, 0, false},
		{0x1800, 14*M + 0x1000, 14*M - 0x1000, true}, // aligned down
		{0, 16 * M, 0, false},
		{M, M / 2, 0, false},
	} {
		got, ok := placeHigh(occ, tc.size, M, tc.ceiling, 0x1000)
		if got != tc.want || ok != tc.ok {
			t.Errorf("placeHigh(size %#x, ceiling %#x) = %#x, %v; want %#x, %v", tc.size, tc.ceiling, got, ok, tc.want, tc.ok)
		}
	}
}

// TestRealKernels boots real kernels into memory when pointed at them:
// FERRY_TEST_BZIMAGE (a bzImage) and FERRY_TEST_VMLINUX (an uncompressed
// vmlinux with a PVH note).
func TestRealKernels(t *testing.T) {
	for _, env := range []string{"FERRY_TEST_BZIMAGE", "FERRY_TEST_VMLINUX"} {
		t.Run(env, func(t *testing.T) {
			path := os.Getenv(env)
			if path == "" {
				t.Skipf("%s not set", env)
			}
			img, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			kind, err := Probe(img)
			if err != nil {
				t.Fatalf("Probe: %v", err)
			}
			mem := newMem(t, 256<<20)
			e, err := Load(mem, Options{Kernel: img, Initrd: make([]byte, 8<<20), Cmdline: "console=ttyS0", CPUs: 2})
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			t.Logf("%s: %s entry %#x kernel [%#x, %#x) initrd %#x+%#x", path, kind, e.RIP, e.KernelStart, e.KernelEnd, e.InitrdAddr, e.InitrdSize)
		})
	}
}
