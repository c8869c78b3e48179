package boot

import (
	"encoding/binary"
	"fmt"
)

// PCIConfig describes the guest's PCI bus 0 to the firmware tables: the
// DSDT declares a host bridge (\_SB.PCI0) with these windows as its
// resources, the MCFG table the ECAM window, and the memory map reserves
// the ECAM window. The zero value means no PCI bus.
type PCIConfig struct {
	ECAMBase        uint64 // MMIO; 1 MiB for bus 0 (ECAMSize)
	MemBase, MemEnd uint64 // 32-bit MMIO window for BARs, [MemBase, MemEnd)
	IOBase, IOEnd   uint64 // port window for IO BARs, [IOBase, IOEnd)
}

// ECAMSize is the ECAM window of one bus: 32 devices x 8 functions x 4 KiB.
const ECAMSize = 1 << 20

// Enabled reports whether c describes a bus.
func (c PCIConfig) Enabled() bool { return c.ECAMBase != 0 }

func (c PCIConfig) validate() error {
	if !c.Enabled() {
		return nil
	}
	switch {
	case c.ECAMBase%ECAMSize != 0 || c.ECAMBase+ECAMSize > 1<<32:
		return fmt.Errorf("boot: PCI: ECAM window at %#x is not 1 MiB aligned below 4 GiB", c.ECAMBase)
	case c.MemBase >= c.MemEnd || c.MemEnd > 1<<32:
		return fmt.Errorf("boot: PCI: memory window [%#x, %#x) is empty or above 4 GiB", c.MemBase, c.MemEnd)
	case c.IOBase >= c.IOEnd || c.IOEnd > 1<<16 || c.IOBase < 0xd00:
		return fmt.Errorf("boot: PCI: I/O window [%#x, %#x) is empty, beyond 64 KiB or overlaps the legacy ports", c.IOBase, c.IOEnd)
	}
	return nil
}

// AML encoding (ACPI 6.3, chapter 20), just what the DSDT needs.
const (
	amlZero        = 0x00
	amlOne         = 0x01
	amlName        = 0x08
	amlBytePrefix  = 0x0a
	amlWordPrefix  = 0x0b
	amlDWordPrefix = 0x0c
	amlScope       = 0x10
	amlBuffer      = 0x11
	amlPackage     = 0x12
	amlExtPrefix   = 0x5b
	amlDevice      = 0x82 // after amlExtPrefix
)

// amlPkgLength encodes a PkgLength for a body of n bytes: the length
// counts the encoding itself.
func amlPkgLength(n int) []byte {
	for extra := 0; extra <= 3; extra++ {
		total := n + 1 + extra
		if extra == 0 && total < 1<<6 {
			return []byte{byte(total)}
		}
		if extra > 0 && total < 1<<(4+8*extra) {
			b := []byte{byte(extra<<6 | total&0x0f)}
			for i := 0; i < extra; i++ {
				b = append(b, byte(total>>(4+8*i)))
			}
			return b
		}
	}
	panic(fmt.Sprintf("aml: package of %d bytes", n)) // not reachable for tables ferry builds
}

// amlPkg is op, PkgLength and body.
func amlPkg(op []byte, body ...[]byte) []byte {
	var b []byte
	for _, p := range body {
		b = append(b, p...)
	}
	return append(append(append([]byte(nil), op...), amlPkgLength(len(b))...), b...)
}

// amlNameSeg checks a 4-character name segment.
func amlNameSeg(s string) []byte {
	if len(s) != 4 {
		panic("aml: name segment " + s)
	}
	return []byte(s)
}

func amlInt(v uint64) []byte {
	switch {
	case v == 0:
		return []byte{amlZero}
	case v == 1:
		return []byte{amlOne}
	case v <= 0xff:
		return []byte{amlBytePrefix, byte(v)}
	case v <= 0xffff:
		return binary.LittleEndian.AppendUint16([]byte{amlWordPrefix}, uint16(v))
	case v <= 0xffffffff:
		return binary.LittleEndian.AppendUint32([]byte{amlDWordPrefix}, uint32(v))
	}
	return binary.LittleEndian.AppendUint64([]byte{0x0e}, v)
}

// amlNamed is Name (seg, value).
func amlNamed(seg string, value []byte) []byte {
	return append(append([]byte{amlName}, amlNameSeg(seg)...), value...)
}

// amlEISAID compresses a PNP ID ("PNP0A03") as ASL's EISAID() does:
// three letters of 5 bits and four hex digits, as a DWordConst.
func amlEISAID(id string) []byte {
	if len(id) != 7 {
		panic("aml: EISA ID " + id)
	}
	var hex uint32
	fmt.Sscanf(id[3:], "%04X", &hex)
	c := func(i int) uint32 { return uint32(id[i]-'@') & 0x1f }
	b := []byte{
		byte(c(0)<<2 | c(1)>>3),
		byte(c(1)<<5 | c(2)),
		byte(hex >> 8),
		byte(hex),
	}
	return append([]byte{amlDWordPrefix}, b...)
}

// amlBufferOf is Buffer () { data }.
func amlBufferOf(data []byte) []byte {
	return amlPkg([]byte{amlBuffer}, amlInt(uint64(len(data))), data)
}

// Resource descriptors (ACPI 6.3, 6.4).
const (
	resIO        = 0x47 // small I/O port descriptor, 8 bytes
	resEnd       = 0x79 // small end tag
	resDWordAddr = 0x87
	resWordAddr  = 0x88
	resTypeMem   = 0
	resTypeIO    = 1
	resTypeBus   = 2
	// General flags: minimum and maximum fixed, positive decode,
	// resource producer (the bridge hands the range to its children).
	resFixedProducer = 0x0c
	resMemRW         = 0x01 // type-specific flags: read-write, non-cacheable
	resIOEntire      = 0x03 // type-specific flags: ISA and non-ISA ranges
)

func resWord(typ, specific byte, min, max uint64) []byte {
	b := []byte{resWordAddr, 13, 0, typ, resFixedProducer, specific}
	for _, v := range []uint64{0, min, max, 0, max - min + 1} { // granularity, min, max, translation, length
		b = binary.LittleEndian.AppendUint16(b, uint16(v))
	}
	return b
}

func resDWord(typ, specific byte, min, max uint64) []byte {
	b := []byte{resDWordAddr, 23, 0, typ, resFixedProducer, specific}
	for _, v := range []uint64{0, min, max, 0, max - min + 1} {
		b = binary.LittleEndian.AppendUint32(b, uint32(v))
	}
	return b
}

// pciHostBridgeCRS is the host bridge's _CRS: bus 0, the configuration
// ports, every other port range, and the 32-bit BAR window. The BAR
// window is what Linux accepts BAR addresses in without reassigning them.
func pciHostBridgeCRS(c PCIConfig) []byte {
	var r []byte
	r = append(r, resWord(resTypeBus, 0, 0, 0)...)
	r = append(r, resIO, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08) // IO (Decode16, 0xCF8, 0xCF8, 1, 8), consumed
	r = append(r, resWord(resTypeIO, resIOEntire, 0, 0xcf7)...)
	r = append(r, resWord(resTypeIO, resIOEntire, 0xd00, 0xffff)...)
	r = append(r, resDWord(resTypeMem, resMemRW, c.MemBase, c.MemEnd-1)...)
	r = append(r, resEnd, 0) // checksum 0: "treated as correct"
	return r
}

// dsdtAMLFor returns the DSDT's definition block:
//
//	Name (_S5, Package (0x04) { 0x05, 0x05, Zero, Zero })
//	Scope (\_SB) {                     // with a PCI bus only
//	    Device (PCI0) {
//	        Name (_HID, EisaId ("PNP0A03"))   // PCI host bridge
//	        Name (_SEG, Zero)  Name (_BBN, Zero)  Name (_UID, Zero)
//	        Name (_CRS, ResourceTemplate () { bus 0, ports, BAR window })
//	    }
//	}
//
// \_S5 gives SLP_TYPa and SLP_TYPb for the soft-off state. The host
// bridge is a plain PCI one (PNP0A03, no _OSC): ferry's functions have no
// PCI Express capabilities; the MCFG table still gives Linux the ECAM
// window. There is no _PRT: every device interrupts through MSI-X and
// declares no INTx pin.
func dsdtAMLFor(c PCIConfig) []byte {
	b := append(amlNamed("_S5_", []byte{}),
		amlPkg([]byte{amlPackage}, []byte{0x04}, amlInt(ACPISleepTypeS5), amlInt(ACPISleepTypeS5), amlInt(0), amlInt(0))...)
	if !c.Enabled() {
		return b
	}
	dev := amlPkg([]byte{amlExtPrefix, amlDevice}, amlNameSeg("PCI0"),
		amlNamed("_HID", amlEISAID("PNP0A03")),
		amlNamed("_SEG", amlInt(0)),
		amlNamed("_BBN", amlInt(0)),
		amlNamed("_UID", amlInt(0)),
		amlNamed("_CRS", amlBufferOf(pciHostBridgeCRS(c))),
	)
	// At the top of the DSDT, _SB_ is \_SB (iasl writes it without the
	// root prefix too).
	scope := amlPkg([]byte{amlScope}, amlNameSeg("_SB_"), dev)
	return append(b, scope...)
}
