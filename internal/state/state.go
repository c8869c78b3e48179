// Package state owns ferry's machine-state data model and its versioned,
// self-describing binary encoding. The same encoding is used for save files
// (ferry save / restore / inspect / state diff) and on the live-migration
// wire, so it is written once, here.
//
// The package is pure data: it never touches KVM file descriptors and never
// runs a VM. Capturing a Machine from a live VM and restoring one into a new
// VM is the vmm package's job; this package only describes, encodes,
// decodes, summarizes and compares machine states.
//
// The byte-level format is specified in docs/state-format.md. In short: a
// file header (magic, format version, architecture, CPU feature
// fingerprint, memory layout) protected by a CRC32C, then a sequence of
// typed, length-prefixed, CRC32C-protected sections (one per vCPU, the
// interrupt controllers, the PIT, the kvmclock, the devices, the PCI bus
// and its virtio functions when the machine has them, and a stream
// of memory chunks), closed by an end section that counts the sections and
// checksums their checksums so that truncation at a section boundary is
// detected. Decoding never panics and never allocates more than a
// documented bound or the input actually present.
package state

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"slices"

	"github.com/ferry-vmm/ferry/internal/devices"
	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/pci"
	"github.com/ferry-vmm/ferry/internal/virtio"
)

// FormatVersion is the version of the encoding this package writes and the
// only one it reads.
const FormatVersion = 1

// ArchX86_64 is the only architecture of format version 1.
const ArchX86_64 = "x86_64"

// Header flags. Bits 0-31 are informational: a reader ignores the ones it
// does not know. Bits 32-63 announce incompatible features: a reader refuses
// a file with any of them set that it does not know (format version 1
// defines none).
const (
	// FlagMemoryCompressed says memory chunks may be zstd-compressed.
	FlagMemoryCompressed uint64 = 1 << 0

	flagsIncompatible uint64 = 0xFFFF_FFFF_0000_0000
	flagsKnown               = FlagMemoryCompressed
)

// Machine is the complete state of a paused virtual machine except its
// memory, which travels as a separate stream of pages.
type Machine struct {
	Header  Header
	VCPUs   []VCPU
	PIC     [2]kvm.PICState // master, slave
	IOAPIC  kvm.IOAPICState
	PIT     kvm.PITState2
	Clock   kvm.ClockData
	Devices Devices
	PCI     *PCI // the PCI bus and its functions; nil: the machine has none (then no section is written)
}

// Header describes the machine a state belongs to. It is written first so
// that a reader (or a migration destination) can check compatibility before
// it reads anything else.
type Header struct {
	FormatVersion uint32 // set by the Writer; the file's version when read
	Arch          string // "x86_64"
	CPUs          uint32 // number of vCPUs; vCPU ids are 0..CPUs-1
	MemSize       uint64 // bytes of guest RAM (the sum of the region sizes)
	// Regions is the guest-physical memory layout, ascending by GPA.
	Regions []guestmem.Region
	// CPUIDFingerprint is CPUIDFingerprint of the CPUID table given to
	// vCPU 0.
	CPUIDFingerprint [32]byte
	CreatedUnixNano  int64
	Producer         string // "ferry <version>"
	Flags            uint64 // Flag* bits
}

// VCPU is one virtual CPU's architectural state as KVM exposes it.
type VCPU struct {
	ID     uint32
	Regs   kvm.Regs
	Sregs  kvm.Sregs   // always present
	Sregs2 *kvm.Sregs2 // when the host has KVM_CAP_SREGS2 (has PDPTRs)
	FPU    kvm.FPU
	// XSave is the whole XSAVE area as KVM_GET_XSAVE(2) returned it (4096
	// bytes, or the KVM_CAP_XSAVE2 size); empty when the host has no XSAVE.
	XSave     []byte
	XCRs      kvm.XCRs
	MSRs      []kvm.MSREntry // sorted by index, no duplicates
	LAPIC     kvm.LAPICState
	Events    kvm.VCPUEvents
	DebugRegs kvm.DebugRegs
	MPState   kvm.MPState
	CPUID     []kvm.CPUIDEntry // as given to KVM_SET_CPUID2, order kept
	TSCKHz    uint32
}

// Devices is the state of ferry's emulated devices.
type Devices struct {
	Serial devices.SerialState // COM1
	CMOS   devices.CMOSState
	I8042  devices.I8042State
	Post   devices.PostState
}

// PCI is the PCI bus's state.
type PCI struct {
	Bus    pci.BusState     // every function's configuration space (host bridge included) and the conf1 address register
	Virtio []VirtioFunction // the virtio functions on the bus, in slot order
}

// VirtioFunction is one virtio-over-PCI function.
type VirtioFunction struct {
	Slot  int          // its slot on bus 0 (1..31)
	Type  uint16       // virtio device type (virtio.DeviceType: 4 = entropy, 1 = net, 2 = block)
	State virtio.State // the transport's and device's state
}

// cpuidEntrySize is the encoded size of one CPUID entry: function, index,
// flags, EAX, EBX, ECX, EDX as little-endian uint32 (the reserved words of
// struct kvm_cpuid_entry2 are not stored).
const cpuidEntrySize = 28

func appendCPUIDEntry(b []byte, e kvm.CPUIDEntry) []byte {
	for _, v := range [...]uint32{e.Function, e.Index, e.Flags, e.EAX, e.EBX, e.ECX, e.EDX} {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	return b
}

// CPUIDFingerprint identifies a CPUID table: SHA-256 over its entries in
// canonical order (ascending by function, index, flags, EAX, EBX, ECX, EDX),
// each encoded as seven little-endian uint32 (function, index, flags, EAX,
// EBX, ECX, EDX). The order in which the entries were given does not change
// the fingerprint; any change to any value does.
func CPUIDFingerprint(entries []kvm.CPUIDEntry) [32]byte {
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b kvm.CPUIDEntry) int {
		return cmp.Or(
			cmp.Compare(a.Function, b.Function), cmp.Compare(a.Index, b.Index),
			cmp.Compare(a.Flags, b.Flags), cmp.Compare(a.EAX, b.EAX),
			cmp.Compare(a.EBX, b.EBX), cmp.Compare(a.ECX, b.ECX),
			cmp.Compare(a.EDX, b.EDX))
	})
	buf := make([]byte, 0, len(sorted)*cpuidEntrySize)
	for _, e := range sorted {
		buf = appendCPUIDEntry(buf, e)
	}
	return sha256.Sum256(buf)
}
