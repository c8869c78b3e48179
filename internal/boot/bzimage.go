package boot

import (
	"fmt"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// Linux x86 boot protocol (Documentation/arch/x86/boot.rst). Offsets are
// into the bzImage file and, identically, into struct boot_params (the
// zero page), whose setup header is a copy of the file's.
const (
	zpACPIRSDPAddr    = 0x070
	zpExtRamdiskImage = 0x0C0
	zpExtRamdiskSize  = 0x0C4
	zpExtCmdLinePtr   = 0x0C8
	zpE820Entries     = 0x1E8
	zpE820Table       = 0x2D0
	zpE820Max         = 128
	zpE820EntSize     = 20
	zpSize            = 4096

	hdrStart         = 0x1F1 // setup_sects: first byte of struct setup_header
	hdrSetupSects    = 0x1F1
	hdrJump          = 0x200 // 2-byte short jump; its offset byte gives the header length
	hdrMagicOff      = 0x202 // "HdrS"
	hdrVersion       = 0x206
	hdrTypeOfLoader  = 0x210
	hdrLoadflags     = 0x211
	hdrCode32Start   = 0x214
	hdrRamdiskImage  = 0x218
	hdrRamdiskSize   = 0x21C
	hdrHeapEndPtr    = 0x224
	hdrCmdLinePtr    = 0x228
	hdrInitrdAddrMax = 0x22C
	hdrKernelAlign   = 0x230
	hdrRelocatable   = 0x234
	hdrXLoadflags    = 0x236
	hdrCmdlineSize   = 0x238
	hdrSetupData     = 0x250
	hdrPrefAddress   = 0x258
	hdrInitSize      = 0x260
	hdrMinEnd        = 0x264 // a 2.12 header reaches at least past init_size
	hdrMaxEnd        = 0x290 // struct setup_header ends by here in boot_params

	minProtocol = 0x020C // 2.12: xloadflags with XLF_KERNEL_64

	lfLoadedHigh  = 0x01
	lfCanUseHeap  = 0x80
	xlfKernel64   = 0x01
	loaderUnknown = 0xFF // type_of_loader: no assigned ID
	heapEndPtr    = 0xFE00
	entry64Offset = 0x200 // 64-bit entry point relative to the load address

	bzErrPrefix = "bzImage: "
)

type bzImage struct {
	version       uint16
	header        []byte // file bytes [hdrStart, header end)
	kernel        []byte // protected-mode kernel
	relocatable   bool
	kernelAlign   uint64
	prefAddress   uint64
	initSize      uint64
	cmdlineSize   uint64
	initrdAddrMax uint64
}

func bzErr(format string, args ...any) error {
	return fmt.Errorf(bzErrPrefix+format, args...)
}

func protoString(v uint16) string { return fmt.Sprintf("%d.%02d", v>>8, v&0xFF) }

// parseBzImage validates a bzImage's setup header. It does not touch guest
// memory.
func parseBzImage(b []byte) (*bzImage, error) {
	if len(b) < hdrVersion+2 {
		return nil, bzErr("truncated setup header (%d bytes)", len(b))
	}
	img := &bzImage{version: le.Uint16(b[hdrVersion:])}
	if img.version < minProtocol {
		return nil, bzErr("boot protocol %s too old, need >= %s for 64-bit entry", protoString(img.version), protoString(minProtocol))
	}
	end := hdrMagicOff + int(b[hdrJump+1])
	if end < hdrMinEnd {
		return nil, bzErr("setup header ends at %#x, too short for boot protocol %s (needs %#x)", end, protoString(img.version), hdrMinEnd)
	}
	end = min(end, hdrMaxEnd)
	if len(b) < end {
		return nil, bzErr("setup header ends at %#x, past end of file (%d bytes)", end, len(b))
	}
	img.header = b[hdrStart:end]
	if b[hdrLoadflags]&lfLoadedHigh == 0 {
		return nil, bzErr("LOADED_HIGH is clear: a zImage (loaded below 1 MiB) is not supported")
	}
	if le.Uint16(b[hdrXLoadflags:])&xlfKernel64 == 0 {
		return nil, bzErr("kernel has no 64-bit entry point (XLF_KERNEL_64 clear in xloadflags)")
	}
	sects := int(b[hdrSetupSects])
	if sects == 0 {
		sects = 4
	}
	setupSize := (sects + 1) * 512
	if setupSize < end {
		return nil, bzErr("setup code (%d sectors) is shorter than the setup header", sects)
	}
	if setupSize >= len(b) {
		return nil, bzErr("setup code (%d sectors, %d bytes) extends to or past end of file (%d bytes): no protected-mode kernel", sects, setupSize, len(b))
	}
	img.kernel = b[setupSize:]
	if len(img.kernel) <= entry64Offset {
		return nil, bzErr("protected-mode kernel (%d bytes) is too short to contain the 64-bit entry point at +%#x", len(img.kernel), entry64Offset)
	}
	img.relocatable = b[hdrRelocatable] != 0
	img.kernelAlign = uint64(le.Uint32(b[hdrKernelAlign:]))
	img.prefAddress = le.Uint64(b[hdrPrefAddress:])
	img.initSize = uint64(le.Uint32(b[hdrInitSize:]))
	img.cmdlineSize = uint64(le.Uint32(b[hdrCmdlineSize:]))
	img.initrdAddrMax = uint64(le.Uint32(b[hdrInitrdAddrMax:]))
	return img, nil
}

// alignUp rounds x up to a multiple of a (a > 0); ok is false on overflow.
func alignUp(x, a uint64) (uint64, bool) {
	if a <= 1 {
		return x, true
	}
	r := x % a
	if r == 0 {
		return x, true
	}
	if x+(a-r) < x {
		return 0, false
	}
	return x + (a - r), true
}

// checkKernelRange checks that [start, start+size) can hold kernel memory:
// RAM below the MMIO hole, clear of the loader's structures.
func checkKernelRange(mem *guestmem.Memory, start, size uint64, what string) error {
	if err := checkPlacement(mem, start, size, what); err != nil {
		return err
	}
	if top := lowRAMTop(mem); start+size > top {
		return fmt.Errorf("%s: [%#x, %#x) is not inside guest RAM below %#x", what, start, start+size, top)
	}
	return nil
}

func loadBzImage(mem *guestmem.Memory, img *bzImage, opts Options, cpus int) (*Entry, error) {
	if uint64(len(opts.Cmdline)) > img.cmdlineSize {
		return nil, bzErr("command line is %d bytes, the kernel accepts at most %d (cmdline_size)", len(opts.Cmdline), img.cmdlineSize)
	}
	klen := uint64(len(img.kernel))

	// Load address: pref_address for a relocatable kernel if it fits,
	// otherwise 1 MiB.
	load := uint64(KernelMinAddr)
	if img.relocatable && img.prefAddress >= KernelMinAddr &&
		checkKernelRange(mem, img.prefAddress, max(klen, img.initSize), "") == nil {
		load = img.prefAddress
	}
	if err := checkKernelRange(mem, load, klen, bzErrPrefix+"protected-mode kernel"); err != nil {
		return nil, err
	}
	// The kernel runs (decompresses itself) at its runtime start address
	// and needs init_size bytes from there (boot.rst, init_size).
	var runtime uint64
	if img.relocatable {
		runtime = max(load, img.prefAddress)
		var ok bool
		if runtime, ok = alignUp(runtime, img.kernelAlign); !ok {
			return nil, bzErr("runtime start address overflows (kernel_alignment %#x)", img.kernelAlign)
		}
	} else {
		runtime = img.prefAddress
		if runtime == 0 {
			runtime = load
		}
	}
	// A kernel cannot need less than its own size there.
	need := max(img.initSize, klen)
	if err := checkKernelRange(mem, runtime, need, fmt.Sprintf(bzErrPrefix+"kernel runtime area (init_size %#x at %#x)", img.initSize, runtime)); err != nil {
		return nil, err
	}
	kernStart := min(load, runtime)
	kernEnd := max(load+klen, runtime+need)

	e := &Entry{
		Mode:         ModeLinux64,
		RIP:          load + entry64Offset,
		RSP:          BootStackTop,
		RSI:          ZeroPageAddr,
		CR3:          PML4Addr,
		GDTBase:      GDTAddr,
		GDTLimit:     GDTLimit,
		CodeSelector: CodeSelector,
		DataSelector: DataSelector,
		CR0:          cr0PE | cr0ET | cr0PG,
		CR4:          cr4PAE,
		EFER:         eferLME | eferLMA,
		RFLAGS:       rflagsRS,
		Image:        ImageBzImage,
		KernelStart:  kernStart,
		KernelEnd:    kernEnd,
	}

	if len(opts.Initrd) > 0 {
		// initrd_addr_max is the highest address the initrd may occupy.
		ceiling := min(img.initrdAddrMax+1, lowRAMTop(mem))
		size := uint64(len(opts.Initrd))
		occupied := []span{
			{0, guestmem.HighMemory, "low memory"},
			{load, load + klen, "kernel"},
			{runtime, runtime + need, "kernel runtime area"},
		}
		a, ok := placeHigh(occupied, size, guestmem.HighMemory, ceiling, guestmem.PageSize)
		if !ok {
			return nil, fmt.Errorf("boot: initrd (%d bytes) does not fit in guest RAM below %#x (initrd_addr_max %#x) beside the kernel at [%#x, %#x)", size, ceiling, img.initrdAddrMax, kernStart, kernEnd)
		}
		e.InitrdAddr, e.InitrdSize = a, size
	}

	e820 := memoryMap(mem, opts.PCI)
	if len(e820) > zpE820Max {
		return nil, fmt.Errorf("boot: memory map has %d entries, the zero page holds at most %d", len(e820), zpE820Max)
	}

	// Zero page.
	zp := make([]byte, zpSize)
	copy(zp[hdrStart:], img.header)
	zp[hdrTypeOfLoader] = loaderUnknown
	zp[hdrLoadflags] |= lfLoadedHigh | lfCanUseHeap
	le.PutUint32(zp[hdrCode32Start:], uint32(load))
	le.PutUint16(zp[hdrHeapEndPtr:], heapEndPtr)
	le.PutUint32(zp[hdrCmdLinePtr:], uint32(CmdlineAddr))
	le.PutUint32(zp[zpExtCmdLinePtr:], uint32(uint64(CmdlineAddr)>>32))
	le.PutUint32(zp[hdrRamdiskImage:], uint32(e.InitrdAddr))
	le.PutUint32(zp[hdrRamdiskSize:], uint32(e.InitrdSize))
	le.PutUint32(zp[zpExtRamdiskImage:], uint32(e.InitrdAddr>>32))
	le.PutUint32(zp[zpExtRamdiskSize:], uint32(e.InitrdSize>>32))
	le.PutUint64(zp[hdrSetupData:], 0) // no setup_data chain
	// acpi_rsdp_addr is read by kernels since 5.0 (the boot protocol
	// documents it with 2.14); older ones treat these bytes as padding and
	// find the RSDP by scanning the BIOS area.
	le.PutUint64(zp[zpACPIRSDPAddr:], ACPIAddr)
	zp[zpE820Entries] = uint8(len(e820))
	for i, r := range e820 {
		ent := zp[zpE820Table+i*zpE820EntSize:][:zpE820EntSize]
		le.PutUint64(ent[0:], r.Addr)
		le.PutUint64(ent[8:], r.Size)
		le.PutUint32(ent[16:], r.Type)
	}

	// Write.
	if err := mem.Write(load, img.kernel); err != nil {
		return nil, fmt.Errorf(bzErrPrefix+"writing kernel: %w", err)
	}
	if e.InitrdSize > 0 {
		if err := mem.Write(e.InitrdAddr, opts.Initrd); err != nil {
			return nil, fmt.Errorf("boot: writing initrd: %w", err)
		}
	}
	if err := mem.Write(ZeroPageAddr, zp); err != nil {
		return nil, fmt.Errorf("boot: writing zero page: %w", err)
	}
	if err := writeCmdline(mem, opts.Cmdline); err != nil {
		return nil, fmt.Errorf("boot: writing command line: %w", err)
	}
	if err := writePageTables(mem); err != nil {
		return nil, fmt.Errorf("boot: writing page tables: %w", err)
	}
	if err := writeGDT(mem, ModeLinux64); err != nil {
		return nil, fmt.Errorf("boot: writing GDT: %w", err)
	}
	if err := writeFirmwareTables(mem, cpus, opts.PCI, e); err != nil {
		return nil, err
	}
	return e, nil
}
