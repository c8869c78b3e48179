package boot

import (
	"fmt"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// ACPI tables (ACPI 6.3 layouts).
//
// Debian's cloud kernel and other modern x86 kernels are built without
// CONFIG_X86_MPPARSE and ignore the MP table; they find the processors and
// the I/O APIC only through the ACPI MADT. The loader therefore writes a
// small, static set of tables into the BIOS area, in both boot modes:
//
//	RSDP  "RSD PTR "  revision 2, points at the XSDT (no RSDT)
//	XSDT              FADT, MADT, MCFG (with a PCI bus)
//	FADT  "FACP"      revision 6.3, points at the DSDT and the FACS
//	FACS              required on a platform that is not hardware-reduced
//	DSDT              AML: Name (\_S5, Package () {5, 5, 0, 0}), and with a
//	                  PCI bus its host bridge \_SB.PCI0 (aml.go)
//	MADT  "APIC"      local APIC per vCPU, I/O APIC, SCI override, LINT1 NMI
//	MCFG              with a PCI bus: its ECAM window (bus 0)
//
// The RSDP sits at ACPIAddr, 16-byte aligned inside [0xE0000, 0x100000), so
// a guest's legacy BIOS scan finds it; the loader also hands its address
// over directly (PVH start_info.rsdp_paddr, Linux boot_params.acpi_rsdp_addr).
// Everything lies in [ACPIAddr, ACPIEnd), below the MP table's overflow
// location MPHighAddr and inside the range guestmem reports reserved in the
// E820 map ([0x9FC00, 0x100000)), so the guest keeps it intact. The tables
// could be reported as ACPI reclaimable memory (E820 type 3) instead, but
// they are small and the reserved window already covers them.
//
// # Interrupt routing
//
// The MADT describes the routing ferry's KVM setup really has. ferry uses
// KVM's default GSI routing (it never calls KVM_SET_GSI_ROUTING): GSI n
// drives IOAPIC pin n and, for n < 16, PIC input n; the in-kernel PIT
// raises GSI 0. ISA IRQ n is therefore GSI n for every n, which is what an
// OS assumes for ISA IRQs without an Interrupt Source Override. So there is
// deliberately no IRQ 0 -> GSI 2 override, unlike on PC firmware (and QEMU,
// which reroutes GSI 0 to pin 2 to match it): with that override Linux
// would program the PIT on IOAPIC pin 2, where KVM never delivers it, and
// fall back to "8254 timer not connected to IO-APIC" paths. The one
// override is for the SCI, ISA IRQ 9, declared level-triggered active-high
// (as QEMU declares it): the SCI is level-triggered by definition, and KVM
// ignores the polarity bit, so a VMM that asserts GSI 9 while an enabled
// status bit is set and deasserts it when the guest clears it matches.
//
// # Why the FADT is not hardware-reduced, and what it declares
//
// A hardware-reduced FADT (HW_REDUCED_ACPI, as Firecracker and Cloud
// Hypervisor use) tells Linux there is no legacy hardware: it then skips
// the PIT-based timer setup and replaces the 8259 with a null PIC
// (acpi_generic_reduced_hw_init). ferry's guests have an in-kernel 8259
// pair and PIT, the i8042 and the CMOS RTC, so the FADT describes a
// PC-like platform instead. For such a platform ACPICA requires the PM1a
// event and control blocks: with either missing it reports a firmware
// error ("Required FADT field Pm1aEventBlock has zero address and/or
// length"), and without the event block acpi_enable_subsystem() fails
// when it disables the fixed events through PM1_EN (AE_BAD_ADDRESS), so
// Linux prints "ACPI: Unable to enable ACPI" and turns ACPI off after boot
// (the MADT has been used by then, so the CPUs would still come up, but
// the guest would run without ACPI). TestACPIExec shows both with
// ACPICA's acpiexec. Everything else of the fixed hardware is optional
// and left out:
//
//   - PM timer: optional since ACPI 5.0A, and ACPICA treats it so; Linux
//     simply has no acpi_pm clocksource (it uses kvm-clock and the TSC);
//     TMR_VAL_EXT is clear;
//   - GPE blocks: optional; none;
//   - SMI_CMD = 0: no SMM mode switch, the platform is always in ACPI mode
//     (ACPICA's acpi_hw_get_mode() reports ACPI mode without touching any
//     register), so ACPI_ENABLE/ACPI_DISABLE are 0;
//   - PM1b, PM2 blocks: none; C2/C3: latencies above the limits say "not
//     supported"; PROC_C1 says HLT works;
//   - PWR_BUTTON and SLP_BUTTON set: no fixed-feature buttons (no button
//     device in the DSDT either); FIX_RTC set: no RTC wake status;
//   - RESET_REG: the i8042 command port, value 0xFE (ferry's i8042 resets
//     the machine on it, exactly what Linux would try next anyway);
//   - IAPC_BOOT_ARCH: legacy ISA devices and an 8042 present (so Linux
//     probes the i8042), no VGA; the CMOS RTC is present (with a century
//     register, CENTURY = 0x32, which ferry's CMOS implements).
//
// The PM1a blocks sit at ACPIPM1EventPort and ACPIPM1ControlPort, I/O
// ports no ferry device uses today. While no device claims them, reads
// return all ones and writes are dropped (the bus's behaviour for
// unclaimed ports), which ACPICA copes with: clearing the fixed-event
// enables succeeds, an enable bit it sets reads back as set, and with
// nothing raising GSI 9 the SCI handler never runs (acpiexec, whose port
// reads also return all ones, starts up cleanly on these tables). A VMM
// that wants ACPI power-off implements the PM1a registers there (PM1_STS
// write-one-to-clear, PM1_EN read/write, PM1_CNT with SCI_EN reading 1)
// and powers the machine off when the guest writes SLP_EN (bit 13) with
// SLP_TYP (bits 10-12) = ACPISleepTypeS5, the value the DSDT's \_S5
// object gives. Until then a guest's ACPI power-off attempt has no
// effect: Linux waits ten seconds and then carries on as it would without
// a power-off method.
const (
	// ACPIAddr is where the RSDP is written; the other tables follow it.
	ACPIAddr = 0xE_0000
	// ACPIEnd is the end of the window reserved for the tables.
	ACPIEnd = MPHighAddr

	// ACPISCIIRQ is the ISA IRQ (and GSI) of the System Control Interrupt.
	ACPISCIIRQ = 9
	// ACPIPM1EventPort is the PM1a event block: PM1_STS (16 bits) at the
	// port, PM1_EN (16 bits) at the port + 2.
	ACPIPM1EventPort = 0x600
	// ACPIPM1ControlPort is the PM1a control block (PM1_CNT, 16 bits).
	ACPIPM1ControlPort = 0x604
	// ACPISleepTypeS5 is the SLP_TYP value the DSDT's \_S5 gives: the
	// guest writes it with SLP_EN to PM1_CNT to power off.
	ACPISleepTypeS5 = 5
	// ACPIResetPort and ACPIResetValue are the FADT reset register: the
	// i8042 command port and its pulse-reset command.
	ACPIResetPort  = 0x64
	ACPIResetValue = 0xFE
	// ACPICenturyIndex is the CMOS index of the RTC century register.
	ACPICenturyIndex = 0x32

	pm1EventLen   = 4
	pm1ControlLen = 2

	acpiHeaderSize = 36
	rsdpSize       = 36
	facsSize       = 64
	fadtSize       = 276 // ACPI 6.0 and later (up to the hypervisor vendor ID)
	madtFixedSize  = acpiHeaderSize + 8
	madtLAPICSize  = 8
	madtIOAPICSize = 12
	madtISOSize    = 10
	madtNMISize    = 6

	rsdpRevision = 2 // ACPI 2.0 and later: XSDT address, extended checksum
	xsdtRevision = 1
	fadtRevision = 6 // with fadtMinor: ACPI 6.3
	fadtMinor    = 3
	madtRevision = 5 // ACPI 6.3
	dsdtRevision = 2 // 2 and above: AML integers are 64 bits
	facsVersion  = 2

	acpiOEMID       = "FERRY "   // 6 bytes
	acpiOEMTableID  = "FERRYVMM" // 8 bytes
	acpiOEMRevision = 1
	acpiCreatorID   = "FRRY"
	acpiCreatorRev  = 1
	acpiHypervisor  = "FERRYVMM" // FADT hypervisor vendor identity

	// Generic Address Structure address spaces and access sizes.
	gasSystemIO  = 1
	gasAccByte   = 1
	gasAccWord   = 2
	gasSize      = 12
	pmProfileNil = 0 // Preferred_PM_Profile: unspecified

	// FADT flags.
	fadtWBINVD      = 1 << 0
	fadtProcC1      = 1 << 2
	fadtPwrButton   = 1 << 4
	fadtSlpButton   = 1 << 5
	fadtFixRTC      = 1 << 6
	fadtResetRegSup = 1 << 10
	fadtHeadless    = 1 << 12

	// FADT IA-PC boot architecture flags.
	iapcLegacyDevices = 1 << 0
	iapc8042          = 1 << 1
	iapcNoVGA         = 1 << 2

	// MADT.
	madtPCATCompat   = 1 << 0
	madtTypeLAPIC    = 0
	madtTypeIOAPIC   = 1
	madtTypeISO      = 2
	madtTypeLAPICNMI = 4
	madtLAPICEnabled = 1 << 0
	madtAllCPUs      = 0xFF
	madtPolarityHigh = 1      // MPS INTI flags: polarity active high
	madtTriggerLevel = 3 << 2 // MPS INTI flags: trigger level

	// FADT field offsets.
	fadtFirmwareCtrl  = 36
	fadtDSDT          = 40
	fadtPMProfile     = 45
	fadtSCIInt        = 46
	fadtSMICmd        = 48
	fadtPM1aEvtBlk    = 56
	fadtPM1aCntBlk    = 64
	fadtPMTmrBlk      = 76
	fadtPM1EvtLen     = 88
	fadtPM1CntLen     = 89
	fadtPMTmrLen      = 91
	fadtPLvl2Lat      = 96
	fadtPLvl3Lat      = 98
	fadtCentury       = 108
	fadtIAPCBootArch  = 109
	fadtFlags         = 112
	fadtResetReg      = 116
	fadtResetValue    = 128
	fadtMinorVersion  = 131
	fadtXFirmwareCtrl = 132
	fadtXDSDT         = 140
	fadtXPM1aEvtBlk   = 148
	fadtXPM1aCntBlk   = 172
	fadtXPMTmrBlk     = 208
	fadtHypervisorID  = 268

	// Latencies above these limits mean C2 / C3 are not supported.
	noC2Latency = 0xFFF
	noC3Latency = 0xFFF
)

// acpiLayout gives the offsets of the tables inside the ACPI blob, which
// is written at ACPIAddr.
type acpiLayout struct {
	rsdp, facs, dsdt, fadt, xsdt, madt, mcfg, size int
	dsdtLen, xsdtLen                               int // whole tables, header included
}

func align(x, a int) int { return (x + a - 1) / a * a }

// madtSize returns the size of the MADT for cpus processors.
func madtSize(cpus int) int {
	return madtFixedSize + cpus*madtLAPICSize + madtIOAPICSize + madtISOSize + madtNMISize
}

func acpiLayoutFor(cpus int, pci PCIConfig) acpiLayout {
	var l acpiLayout
	tables := 2 // FADT, MADT
	if pci.Enabled() {
		tables++ // MCFG
	}
	l.dsdtLen = acpiHeaderSize + len(dsdtAMLFor(pci))
	l.xsdtLen = acpiHeaderSize + tables*8
	l.rsdp = 0
	l.facs = align(l.rsdp+rsdpSize, 64) // the FACS must be 64-byte aligned
	l.dsdt = align(l.facs+facsSize, 16)
	l.fadt = align(l.dsdt+l.dsdtLen, 16)
	l.xsdt = align(l.fadt+fadtSize, 16)
	l.madt = align(l.xsdt+l.xsdtLen, 16)
	l.size = l.madt + madtSize(cpus)
	if pci.Enabled() {
		l.mcfg = align(l.size, 16)
		l.size = l.mcfg + mcfgSize
	}
	return l
}

// acpiHeader fills in a system description table header; the checksum is
// set by sealTable once the body is complete.
func acpiHeader(t []byte, sig string, rev uint8) {
	copy(t[0:4], sig)
	le.PutUint32(t[4:], uint32(len(t)))
	t[8] = rev
	copy(t[10:16], acpiOEMID)
	copy(t[16:24], acpiOEMTableID)
	le.PutUint32(t[24:], acpiOEMRevision)
	copy(t[28:32], acpiCreatorID)
	le.PutUint32(t[32:], acpiCreatorRev)
}

// sealTable sets the header checksum so that the table's bytes sum to 0.
func sealTable(t []byte) {
	t[9] = 0
	t[9] = -checksum(t)
}

// putGAS writes a Generic Address Structure for an I/O port register.
func putGAS(b []byte, bitWidth, access uint8, port uint64) {
	b[0] = gasSystemIO
	b[1] = bitWidth
	b[2] = 0 // bit offset
	b[3] = access
	le.PutUint64(b[4:], port)
}

// buildACPI returns the ACPI tables for cpus processors as one blob to be
// written at ACPIAddr, and where each table is in it.
func buildACPI(cpus int, pci PCIConfig) ([]byte, acpiLayout, error) {
	if cpus < 1 || cpus > MPMaxCPUs {
		return nil, acpiLayout{}, fmt.Errorf("boot: ACPI tables: %d CPUs is outside 1..%d", cpus, MPMaxCPUs)
	}
	if err := pci.validate(); err != nil {
		return nil, acpiLayout{}, err
	}
	l := acpiLayoutFor(cpus, pci)
	if ACPIAddr+l.size > ACPIEnd {
		return nil, acpiLayout{}, fmt.Errorf("boot: ACPI tables for %d CPUs need %d bytes, more than the %d at %#x", cpus, l.size, ACPIEnd-ACPIAddr, ACPIAddr)
	}
	blob := make([]byte, l.size)
	addr := func(off int) uint64 { return ACPIAddr + uint64(off) }

	// FACS: no waking vector, global lock free, no flags.
	facs := blob[l.facs : l.facs+facsSize]
	copy(facs[0:4], "FACS")
	le.PutUint32(facs[4:], facsSize)
	facs[32] = facsVersion

	// DSDT.
	dsdt := blob[l.dsdt : l.dsdt+l.dsdtLen]
	acpiHeader(dsdt, "DSDT", dsdtRevision)
	copy(dsdt[acpiHeaderSize:], dsdtAMLFor(pci))
	sealTable(dsdt)

	// FADT.
	fadt := blob[l.fadt : l.fadt+fadtSize]
	acpiHeader(fadt, "FACP", fadtRevision)
	// The FACS is below 4 GiB: FIRMWARE_CTRL holds it and X_FIRMWARE_CTRL
	// must then be zero. The DSDT goes in both DSDT and X_DSDT.
	le.PutUint32(fadt[fadtFirmwareCtrl:], uint32(addr(l.facs)))
	le.PutUint32(fadt[fadtDSDT:], uint32(addr(l.dsdt)))
	fadt[fadtPMProfile] = pmProfileNil
	le.PutUint16(fadt[fadtSCIInt:], ACPISCIIRQ)
	le.PutUint32(fadt[fadtSMICmd:], 0)
	le.PutUint32(fadt[fadtPM1aEvtBlk:], ACPIPM1EventPort)
	le.PutUint32(fadt[fadtPM1aCntBlk:], ACPIPM1ControlPort)
	le.PutUint32(fadt[fadtPMTmrBlk:], 0)
	fadt[fadtPM1EvtLen] = pm1EventLen
	fadt[fadtPM1CntLen] = pm1ControlLen
	fadt[fadtPMTmrLen] = 0
	le.PutUint16(fadt[fadtPLvl2Lat:], noC2Latency)
	le.PutUint16(fadt[fadtPLvl3Lat:], noC3Latency)
	fadt[fadtCentury] = ACPICenturyIndex
	le.PutUint16(fadt[fadtIAPCBootArch:], iapcLegacyDevices|iapc8042|iapcNoVGA)
	le.PutUint32(fadt[fadtFlags:], fadtWBINVD|fadtProcC1|fadtPwrButton|fadtSlpButton|fadtFixRTC|fadtResetRegSup|fadtHeadless)
	putGAS(fadt[fadtResetReg:], 8, gasAccByte, ACPIResetPort)
	fadt[fadtResetValue] = ACPIResetValue
	fadt[fadtMinorVersion] = fadtMinor
	le.PutUint64(fadt[fadtXFirmwareCtrl:], 0)
	le.PutUint64(fadt[fadtXDSDT:], addr(l.dsdt))
	putGAS(fadt[fadtXPM1aEvtBlk:], 8*pm1EventLen, gasAccWord, ACPIPM1EventPort)
	putGAS(fadt[fadtXPM1aCntBlk:], 8*pm1ControlLen, gasAccWord, ACPIPM1ControlPort)
	// X_PM_TMR_BLK, X_GPE0/1_BLK, sleep control/status: all zero (absent).
	copy(fadt[fadtHypervisorID:], acpiHypervisor)
	sealTable(fadt)

	// MADT.
	madt := blob[l.madt : l.madt+madtSize(cpus)]
	acpiHeader(madt, "APIC", madtRevision)
	le.PutUint32(madt[36:], LocalAPICAddr)
	le.PutUint32(madt[40:], madtPCATCompat) // dual 8259s present
	p := madtFixedSize
	for i := range cpus {
		e := madt[p : p+madtLAPICSize]
		e[0] = madtTypeLAPIC
		e[1] = madtLAPICSize
		e[2] = uint8(i) // ACPI processor UID
		e[3] = uint8(i) // local APIC ID, as KVM assigns it (vCPU id)
		le.PutUint32(e[4:], madtLAPICEnabled)
		p += madtLAPICSize
	}
	io := madt[p : p+madtIOAPICSize]
	io[0] = madtTypeIOAPIC
	io[1] = madtIOAPICSize
	io[2] = uint8(cpus) // I/O APIC ID, the same as in the MP table
	le.PutUint32(io[4:], IOAPICAddr)
	le.PutUint32(io[8:], 0) // GSI base: pins 0-23 are GSIs 0-23
	p += madtIOAPICSize
	iso := madt[p : p+madtISOSize]
	iso[0] = madtTypeISO
	iso[1] = madtISOSize
	iso[2] = 0 // ISA
	iso[3] = ACPISCIIRQ
	le.PutUint32(iso[4:], ACPISCIIRQ)
	le.PutUint16(iso[8:], madtPolarityHigh|madtTriggerLevel)
	p += madtISOSize
	nmi := madt[p : p+madtNMISize]
	nmi[0] = madtTypeLAPICNMI
	nmi[1] = madtNMISize
	nmi[2] = madtAllCPUs
	le.PutUint16(nmi[3:], 0) // conforms to the bus: edge, active high
	nmi[5] = 1               // LINT1
	p += madtNMISize
	if p != len(madt) {
		return nil, acpiLayout{}, fmt.Errorf("boot: MADT: built %d bytes, expected %d", p, len(madt))
	}
	sealTable(madt)

	// XSDT.
	xsdt := blob[l.xsdt : l.xsdt+l.xsdtLen]
	acpiHeader(xsdt, "XSDT", xsdtRevision)
	le.PutUint64(xsdt[acpiHeaderSize:], addr(l.fadt))
	le.PutUint64(xsdt[acpiHeaderSize+8:], addr(l.madt))
	if pci.Enabled() {
		le.PutUint64(xsdt[acpiHeaderSize+16:], addr(l.mcfg))
		buildMCFG(blob[l.mcfg:l.mcfg+mcfgSize], pci)
	}
	sealTable(xsdt)

	// RSDP: the first 20 bytes (the ACPI 1.0 structure) have their own
	// checksum, and the extended checksum covers all 36 bytes.
	rsdp := blob[l.rsdp : l.rsdp+rsdpSize]
	copy(rsdp[0:8], "RSD PTR ")
	copy(rsdp[9:15], acpiOEMID)
	rsdp[15] = rsdpRevision
	le.PutUint32(rsdp[16:], 0) // no RSDT: ACPI 2.0+ guests use the XSDT
	le.PutUint32(rsdp[20:], rsdpSize)
	le.PutUint64(rsdp[24:], addr(l.xsdt))
	rsdp[8] = -checksum(rsdp[:20])
	rsdp[32] = -checksum(rsdp)
	return blob, l, nil
}

// writeACPI writes the ACPI tables for cpus processors and returns the
// RSDP's address.
func writeACPI(mem *guestmem.Memory, cpus int, pci PCIConfig) (uint64, error) {
	blob, _, err := buildACPI(cpus, pci)
	if err != nil {
		return 0, err
	}
	if err := mem.Write(ACPIAddr, blob); err != nil {
		return 0, fmt.Errorf("boot: writing ACPI tables: %w", err)
	}
	return ACPIAddr, nil
}

// writeFirmwareTables writes what firmware would leave for the guest to
// find its CPUs and interrupt routing: the MP table and the ACPI tables.
func writeFirmwareTables(mem *guestmem.Memory, cpus int, pci PCIConfig, e *Entry) error {
	mp, err := writeMPTable(mem, cpus)
	if err != nil {
		return err
	}
	rsdp, err := writeACPI(mem, cpus, pci)
	if err != nil {
		return err
	}
	e.MPTable, e.RSDPAddr = mp, rsdp
	return nil
}

// mcfgSize is the MCFG table with one allocation (bus 0 of segment 0).
const mcfgSize = acpiHeaderSize + 8 + 16

// buildMCFG writes the MCFG table: the ECAM window of PCI segment 0,
// buses 0 to 0 (PCI Firmware Specification 3.0, 4.1.2).
func buildMCFG(t []byte, pci PCIConfig) {
	acpiHeader(t, "MCFG", 1)
	e := t[acpiHeaderSize+8:]
	le.PutUint64(e[0:], pci.ECAMBase)
	le.PutUint16(e[8:], 0) // segment group
	e[10], e[11] = 0, 0    // start and end bus
	sealTable(t)
}

// memoryMap is guest RAM's memory map with the ECAM window reserved, as
// Linux wants it before it uses the MCFG table ("MMCONFIG ... reserved in
// E820").
func memoryMap(mem *guestmem.Memory, pci PCIConfig) []guestmem.E820Entry {
	m := mem.E820()
	if pci.Enabled() {
		m = append(m, guestmem.E820Entry{Addr: pci.ECAMBase, Size: ECAMSize, Type: guestmem.E820Reserved})
	}
	return m
}
