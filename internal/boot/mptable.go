package boot

import (
	"fmt"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// Intel MultiProcessor Specification 1.4 table.
//
// The floating pointer structure always sits at the start of the EBDA
// (MPTableAddr), one of the places guests scan. The configuration table
// follows it in the EBDA when it fits in the EBDA's 1 KiB (up to
// MPMaxEBDACPUs processors), otherwise it goes to MPHighAddr in the BIOS
// area; both are reported reserved in the E820 map.
const (
	LocalAPICAddr = 0xFEE0_0000
	IOAPICAddr    = 0xFEC0_0000

	// TimerIOAPICPin is the IOAPIC pin the table gives ISA IRQ 0 (the
	// PIT). PC firmware puts it on pin 2 (with the 8259's ExtINT output on
	// pin 0), but ferry keeps KVM's default GSI routing, where the
	// in-kernel PIT raises GSI 0 and GSI 0 drives IOAPIC pin 0, so ISA IRQ
	// 0 is on pin 0 here, like every other ISA IRQ on the pin of its
	// number. The ACPI MADT agrees (it has no IRQ 0 override). The 8259's
	// ExtINT output reaches the CPUs through LAPIC LINT0 (the local
	// interrupt entries), not through the IOAPIC.
	TimerIOAPICPin = 0

	// MPMaxCPUs is the most processors the table can describe: APIC IDs
	// are 8 bits, 0xFF is the broadcast ID and the IOAPIC takes the ID
	// after the last processor.
	MPMaxCPUs = 254
	// MPMaxEBDACPUs is the most processors whose table fits in the EBDA.
	MPMaxEBDACPUs = (ebdaSize - mpfSize - mpcFixedSize) / mpcCPUSize

	ebdaSize = guestmem.LowRAMEnd - guestmem.EBDAStart

	mpfSize       = 16
	mpcHeaderSize = 44
	mpcCPUSize    = 20
	mpcBusSize    = 8
	mpcIOAPICSize = 8
	mpcIntSize    = 8
	mpcLIntSize   = 8
	mpIOIntCount  = 15 // ISA IRQs 0, 1 and 3..15 on the pins of the same number
	mpLIntCount   = 2
	mpcFixedSize  = mpcHeaderSize + mpcBusSize + mpcIOAPICSize + mpIOIntCount*mpcIntSize + mpLIntCount*mpcLIntSize

	mpSpecRev = 4 // MP spec 1.4

	mpEntryCPU    = 0
	mpEntryBus    = 1
	mpEntryIOAPIC = 2
	mpEntryIOInt  = 3
	mpEntryLInt   = 4

	mpIntINT    = 0
	mpIntNMI    = 1
	mpIntExtINT = 3

	mpCPUEnabled = 1 << 0
	mpCPUBSP     = 1 << 1

	mpAPICVersion   = 0x14
	mpIOAPICVersion = 0x11
	mpIOAPICEnabled = 1

	// CPU signature (family 6) and feature flags (FPU, APIC) reported in
	// the processor entries; guests take the real values from CPUID.
	mpCPUSignature = 0x600
	mpCPUFeatures  = 1<<0 | 1<<9

	mpISABus    = 0
	mpAllLAPICs = 0xFF
	mpOEMID     = "FERRY   "
	mpProductID = "FERRY VMM   "
)

// mpTableSize returns the size of the configuration table for cpus
// processors.
func mpTableSize(cpus int) int { return mpcFixedSize + cpus*mpcCPUSize }

// buildMPTable returns the floating pointer structure (to be written at
// MPTableAddr) and the configuration table (to be written at its address,
// which the floating pointer references).
func buildMPTable(cpus int) (mpf, mpc []byte, mpcAddr uint64, err error) {
	if cpus < 1 || cpus > MPMaxCPUs {
		return nil, nil, 0, fmt.Errorf("boot: MP table: %d CPUs is outside 1..%d", cpus, MPMaxCPUs)
	}
	mpcAddr = MPTableAddr + mpfSize
	if cpus > MPMaxEBDACPUs {
		mpcAddr = MPHighAddr
	}
	ioapicID := uint8(cpus)

	mpc = make([]byte, mpTableSize(cpus))
	copy(mpc[0:4], "PCMP")
	le.PutUint16(mpc[4:], uint16(len(mpc)))
	mpc[6] = mpSpecRev
	copy(mpc[8:16], mpOEMID)
	copy(mpc[16:28], mpProductID)
	le.PutUint32(mpc[36:], LocalAPICAddr)

	p := mpcHeaderSize
	entries := 0
	for i := range cpus {
		e := mpc[p : p+mpcCPUSize]
		e[0] = mpEntryCPU
		e[1] = uint8(i) // local APIC ID
		e[2] = mpAPICVersion
		e[3] = mpCPUEnabled
		if i == 0 {
			e[3] |= mpCPUBSP
		}
		le.PutUint32(e[4:], mpCPUSignature)
		le.PutUint32(e[8:], mpCPUFeatures)
		p += mpcCPUSize
		entries++
	}

	bus := mpc[p : p+mpcBusSize]
	bus[0] = mpEntryBus
	bus[1] = mpISABus
	copy(bus[2:8], "ISA   ")
	p += mpcBusSize
	entries++

	io := mpc[p : p+mpcIOAPICSize]
	io[0] = mpEntryIOAPIC
	io[1] = ioapicID
	io[2] = mpIOAPICVersion
	io[3] = mpIOAPICEnabled
	le.PutUint32(io[4:], IOAPICAddr)
	p += mpcIOAPICSize
	entries++

	// I/O interrupt assignments following KVM's default GSI routing: ISA
	// IRQ n on IOAPIC pin n, the PIT's IRQ 0 included (see
	// TimerIOAPICPin). ISA IRQ 2 is the 8259 cascade and has no entry.
	// Flags 0: polarity and trigger conform to the bus (ISA: active high,
	// edge).
	ioint := func(kind, irq, pin uint8) {
		e := mpc[p : p+mpcIntSize]
		e[0] = mpEntryIOInt
		e[1] = kind
		e[4] = mpISABus
		e[5] = irq
		e[6] = ioapicID
		e[7] = pin
		p += mpcIntSize
		entries++
	}
	ioint(mpIntINT, 0, TimerIOAPICPin)
	for irq := uint8(1); irq < 16; irq++ {
		if irq != 2 { // the 8259 cascade
			ioint(mpIntINT, irq, irq)
		}
	}

	// Local interrupts: ExtINT on LINT0 and NMI on LINT1 of every CPU.
	lint := func(kind, pin uint8) {
		e := mpc[p : p+mpcLIntSize]
		e[0] = mpEntryLInt
		e[1] = kind
		e[4] = mpISABus
		e[5] = 0
		e[6] = mpAllLAPICs
		e[7] = pin
		p += mpcLIntSize
		entries++
	}
	lint(mpIntExtINT, 0)
	lint(mpIntNMI, 1)

	if p != len(mpc) {
		return nil, nil, 0, fmt.Errorf("boot: MP table: built %d bytes, expected %d", p, len(mpc))
	}
	le.PutUint16(mpc[34:], uint16(entries))
	mpc[7] = -checksum(mpc)

	mpf = make([]byte, mpfSize)
	copy(mpf[0:4], "_MP_")
	le.PutUint32(mpf[4:], uint32(mpcAddr))
	mpf[8] = 1 // length in 16-byte paragraphs
	mpf[9] = mpSpecRev
	// mpf[11] feature byte 1 = 0: a configuration table is present.
	// mpf[12] bit 7 (IMCR) = 0: virtual wire mode.
	mpf[10] = -checksum(mpf)
	return mpf, mpc, mpcAddr, nil
}

func checksum(b []byte) uint8 {
	var s uint8
	for _, c := range b {
		s += c
	}
	return s
}

// writeMPTable writes the MP floating pointer and configuration table for
// cpus processors and returns the floating pointer's address.
func writeMPTable(mem *guestmem.Memory, cpus int) (uint64, error) {
	mpf, mpc, mpcAddr, err := buildMPTable(cpus)
	if err != nil {
		return 0, err
	}
	if err := mem.Write(MPTableAddr, mpf); err != nil {
		return 0, fmt.Errorf("boot: writing MP floating pointer: %w", err)
	}
	if err := mem.Write(mpcAddr, mpc); err != nil {
		return 0, fmt.Errorf("boot: writing MP configuration table: %w", err)
	}
	if err := writeBDA(mem); err != nil {
		return 0, fmt.Errorf("boot: writing BIOS data area: %w", err)
	}
	return MPTableAddr, nil
}
