// Package boot owns placing a guest kernel and its boot structures in guest
// memory and describing the state the boot vCPU must start in.
//
// It understands two kinds of kernel image:
//
//   - an ELF executable carrying a Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY),
//     entered in 32-bit protected mode with paging off and EBX pointing at an
//     hvm_start_info structure (the Xen PVH boot ABI);
//   - a Linux bzImage, entered at its 64-bit entry point in long mode with
//     RSI pointing at the zero page (the Linux x86 boot protocol, 2.12 or
//     later).
//
// For both it also writes ACPI tables (RSDP, XSDT, FADT, FACS, DSDT, MADT;
// see acpi.go), through which modern kernels find the application
// processors and the I/O APIC, and an Intel MultiProcessor Specification
// 1.4 table describing the same machine for kernels that use that instead.
//
// The package writes into a guestmem.Memory and returns an Entry; loading the
// Entry into a vCPU is the VMM's job. It must not import the kvm or vmm
// packages. Every input (the kernel image above all) is untrusted: malformed
// images are rejected with an error naming what is wrong, never with a panic,
// and no allocation is sized by a field of the image beyond the image's own
// size.
package boot

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// Fixed guest-physical layout of the structures the loader writes below
// 1 MiB. None of them overlap; a kernel segment or an initrd that would
// overlap any of the reserved ranges below is refused (both boot modes
// reserve all of them). ELF segments may use the gaps between them:
// [0x1000, 0x7000), [0xF000, 0x20000) and [0x30000, 0x9FC00).
//
//	start     end (excl.)  contents
//	0x00000   0x01000      reserved page:
//	  0x00000   0x00400      real-mode IVT (left zero)
//	  0x00400   0x00500      BIOS data area: the loader sets the EBDA
//	                         segment (0x40E) and base memory size (0x413)
//	                         so guests find the MP table
//	  0x00500   0x00520      GDT: null, null, code (0x10), data (0x18)
//	0x07000   0x08000      zero page (Linux boot_params, 4 KiB), or for PVH:
//	                         0x7000 hvm_start_info (56 bytes)
//	                         0x7040 hvm_modlist_entry[1] (initrd)
//	                         0x7080 hvm_memmap_table_entry[<=128]
//	0x08000   0x09000      boot stack (RSP = 0x8FF0)
//	0x09000   0x0A000      PML4 (Linux64 only)
//	0x0A000   0x0B000      PDPT
//	0x0B000   0x0F000      4 page directories, 2 MiB pages, identity 0-4 GiB
//	0x20000   0x30000      kernel command line, NUL-terminated (<= 64 KiB)
//	0x9FC00   0xA0000      EBDA: MP floating pointer + MP configuration table
//	0xA0000   0xE0000      unused (the legacy VGA and option ROM window)
//	0xE0000   0xF0000      ACPI tables (0xE0000-0xE0A58 for 254 CPUs):
//	                         0xE0000 RSDP (36 bytes, 16-byte aligned, where
//	                                 the guest's BIOS-area scan finds it)
//	                         0xE0040 FACS (64 bytes, 64-byte aligned)
//	                         then, 16-byte aligned: DSDT, FADT, XSDT, and the
//	                         MADT (72 + 8 bytes per CPU)
//	0xF0000   0x100000     MP configuration table when it exceeds the EBDA
//	                       (more than MPMaxEBDACPUs CPUs)
//	0x100000  ...          kernel (bzImage: pref_address or 1 MiB; ELF:
//	                       p_paddr of each PT_LOAD); initrd as high as it
//	                       fits in RAM below the MMIO hole
//
// guestmem reports [0x9FC00, 0x100000) as reserved in the E820 map, so the
// guest leaves the MP and ACPI tables alone; the rest of the low structures
// are in ordinary RAM and are only needed until the kernel has copied what
// it uses.
const (
	BDAEBDASegment = 0x40E // BIOS data area: EBDA segment (u16)
	BDABaseMemKiB  = 0x413 // BIOS data area: base memory in KiB (u16)

	GDTAddr       = 0x500
	ZeroPageAddr  = 0x7000 // Linux boot_params
	StartInfoAddr = 0x7000 // PVH hvm_start_info (same page, other mode)
	ModlistAddr   = 0x7040
	MemmapAddr    = 0x7080
	BootStackTop  = 0x8FF0
	PML4Addr      = 0x9000
	PDPTAddr      = 0xA000
	PDAddr        = 0xB000 // four consecutive page directories
	CmdlineAddr   = 0x20000
	CmdlineMax    = 0x10000 // bytes including the terminating NUL
	MPTableAddr   = guestmem.EBDAStart
	MPHighAddr    = 0xF0000

	// KernelMinAddr is the lowest address a bzImage kernel is loaded at.
	KernelMinAddr = guestmem.HighMemory
)

// Mode is the processor mode the boot vCPU starts in.
type Mode int

const (
	ModePVH32   Mode = iota // 32-bit protected mode, paging off, EBX = start_info (Xen PVH ABI)
	ModeLinux64             // 64-bit long mode, Linux boot protocol, RSI = zero page
)

func (m Mode) String() string {
	switch m {
	case ModePVH32:
		return "pvh32"
	case ModeLinux64:
		return "linux64"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Image kinds reported by Probe and Entry.Image.
const (
	ImageELFPVH  = "elf-pvh"
	ImageBzImage = "bzimage"
)

// Entry describes the initial state of the boot vCPU. All referenced
// structures (GDT, page tables) are already written to guest memory.
//
// General-purpose registers not listed (RAX, RCX, RDX, RDI, RBP, R8-R15) must
// be zero, and interrupts disabled (RFLAGS = RFLAGS field, IF clear). CS must
// be loaded with CodeSegment() and DS, ES, FS, GS, SS with DataSegment().
type Entry struct {
	Mode     Mode
	RIP      uint64
	RSP      uint64
	RBX      uint64 // PVH: start_info GPA
	RSI      uint64 // Linux: zero page GPA
	CR3      uint64 // Linux64: identity-mapped page tables (PML4) written by the loader; 0 for PVH
	GDTBase  uint64 // GDT written by the loader
	GDTLimit uint16

	CodeSelector, DataSelector uint16 // selectors in that GDT (flat 32-bit for PVH, 64-bit code for Linux64)

	// Control registers for Mode: PVH32 has CR0.PE only (paging off);
	// Linux64 has CR0.PE|PG, CR4.PAE and EFER.LME|LMA.
	CR0, CR4, EFER uint64
	RFLAGS         uint64 // 0x2: only the reserved bit, interrupts off

	// Informational: what was loaded where.
	Image       string // ImageELFPVH or ImageBzImage
	KernelStart uint64 // lowest guest-physical byte of the kernel
	KernelEnd   uint64 // end (exclusive) of the kernel, including bss/init_size
	InitrdAddr  uint64 // 0 if no initrd
	InitrdSize  uint64
	MPTable     uint64 // MP floating pointer structure
	RSDPAddr    uint64 // ACPI RSDP (also given to the guest in start_info or boot_params)
}

// Segment describes a segment register's hidden state, decoded from the
// descriptor the loader wrote into the GDT. Limit is in bytes (already
// scaled by the granularity bit), as KVM's kvm_segment expects.
type Segment struct {
	Selector uint16
	Base     uint64
	Limit    uint32
	Type     uint8 // 4-bit descriptor type
	S        bool  // code/data (not system) descriptor
	DPL      uint8
	Present  bool
	AVL      bool
	L        bool // 64-bit code
	DB       bool // 32-bit default operand size
	G        bool // 4 KiB granularity
}

// CodeSegment returns the CS state matching the GDT the loader wrote.
func (e *Entry) CodeSegment() Segment {
	return decodeDescriptor(e.CodeSelector, gdtFor(e.Mode)[e.CodeSelector/8])
}

// DataSegment returns the DS/ES/FS/GS/SS state matching the GDT the loader
// wrote.
func (e *Entry) DataSegment() Segment {
	return decodeDescriptor(e.DataSelector, gdtFor(e.Mode)[e.DataSelector/8])
}

// Options says what to boot.
type Options struct {
	Kernel  []byte // bzImage or ELF with a PVH note
	Initrd  []byte // optional
	Cmdline string
	CPUs    int       // number of vCPUs (0 means 1); described in the ACPI MADT and the MP table so guests (Linux) find and start the APs
	PCI     PCIConfig // the PCI bus described in the DSDT, MCFG and memory map; zero: none
}

// Probe reports what kind of image b is without loading it ("elf-pvh",
// "bzimage") or a clear error saying why it cannot be booted.
func Probe(b []byte) (kind string, err error) {
	defer recoverAsError(&err)
	switch detect(b) {
	case ImageELFPVH:
		if _, err := parseELF(b); err != nil {
			return "", err
		}
		return ImageELFPVH, nil
	case ImageBzImage:
		if _, err := parseBzImage(b); err != nil {
			return "", err
		}
		return ImageBzImage, nil
	}
	return "", detectError(b)
}

// Load detects the image type, places everything in mem and returns the
// entry state. On error the contents of mem are unspecified but nothing
// outside the structures documented above, the kernel's own ranges and the
// initrd's range has been written.
func Load(mem *guestmem.Memory, opts Options) (entry *Entry, err error) {
	defer recoverAsError(&err)
	if mem == nil {
		return nil, errors.New("boot: no guest memory")
	}
	cpus := opts.CPUs
	if cpus == 0 {
		cpus = 1
	}
	if cpus < 0 {
		return nil, fmt.Errorf("boot: invalid CPU count %d", opts.CPUs)
	}
	if cpus > MPMaxCPUs {
		return nil, fmt.Errorf("boot: %d CPUs requested, the MP table describes at most %d (8-bit APIC IDs)", cpus, MPMaxCPUs)
	}
	if err := checkLowRAM(mem); err != nil {
		return nil, err
	}
	if len(opts.Cmdline)+1 > CmdlineMax {
		return nil, fmt.Errorf("boot: command line is %d bytes, at most %d fit", len(opts.Cmdline), CmdlineMax-1)
	}
	if bytes.IndexByte([]byte(opts.Cmdline), 0) >= 0 {
		return nil, errors.New("boot: command line contains a NUL byte")
	}
	switch detect(opts.Kernel) {
	case ImageELFPVH:
		img, err := parseELF(opts.Kernel)
		if err != nil {
			return nil, err
		}
		return loadPVH(mem, img, opts, cpus)
	case ImageBzImage:
		img, err := parseBzImage(opts.Kernel)
		if err != nil {
			return nil, err
		}
		return loadBzImage(mem, img, opts, cpus)
	}
	return nil, detectError(opts.Kernel)
}

var elfMagic = []byte("\x7fELF")

// detect classifies b by its magic numbers only.
func detect(b []byte) string {
	if bytes.HasPrefix(b, elfMagic) {
		return ImageELFPVH
	}
	if len(b) >= hdrMagicOff+4 && string(b[hdrMagicOff:hdrMagicOff+4]) == "HdrS" {
		return ImageBzImage
	}
	return ""
}

func detectError(b []byte) error {
	if len(b) == 0 {
		return errors.New("kernel image is empty")
	}
	return errors.New("unrecognised kernel image format (neither ELF nor bzImage)")
}

// recoverAsError is a last-resort safety net: every input is validated
// before use, but should a bug slip through, the VMM gets an error rather
// than a crash.
func recoverAsError(err *error) {
	if r := recover(); r != nil {
		*err = fmt.Errorf("boot: internal error while loading kernel image: %v", r)
	}
}

// checkLowRAM makes sure the first MiB is RAM: every fixed structure lives
// there.
func checkLowRAM(mem *guestmem.Memory) error {
	if _, err := mem.Slice(0, guestmem.HighMemory); err != nil {
		return fmt.Errorf("boot: guest RAM does not cover the first MiB: %w", err)
	}
	return nil
}

// lowRAMTop is the end of the RAM region that starts at address 0 (the
// MMIO hole or the end of RAM).
func lowRAMTop(mem *guestmem.Memory) uint64 {
	for _, r := range mem.Regions() {
		if r.GPA == 0 {
			return r.Size
		}
	}
	return 0
}

// writeCmdline writes the NUL-terminated command line at CmdlineAddr.
func writeCmdline(mem *guestmem.Memory, cmdline string) error {
	buf := make([]byte, len(cmdline)+1)
	copy(buf, cmdline)
	return mem.Write(CmdlineAddr, buf)
}

// writeBDA points the BIOS data area at the EBDA that holds the MP table.
func writeBDA(mem *guestmem.Memory) error {
	var seg, kib [2]byte
	le.PutUint16(seg[:], uint16(guestmem.EBDAStart>>4))
	le.PutUint16(kib[:], uint16(guestmem.EBDAStart>>10))
	if err := mem.Write(BDAEBDASegment, seg[:]); err != nil {
		return err
	}
	return mem.Write(BDABaseMemKiB, kib[:])
}
