package boot

import (
	"encoding/binary"
	"fmt"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// checkMPTable parses the MP table in guest memory the way a guest would
// and checks it describes cpus processors on a PC-like interrupt layout.
func checkMPTable(t *testing.T, mem *guestmem.Memory, cpus int) {
	t.Helper()
	le := binary.LittleEndian

	// The floating pointer must be in the first KiB of the EBDA, which the
	// BDA points at.
	bda := read(t, mem, 0x40E, 2)
	if seg := le.Uint16(bda); uint64(seg)<<4 != guestmem.EBDAStart {
		t.Errorf("BDA EBDA segment %#x", seg)
	}
	mpf := read(t, mem, MPTableAddr, 16)
	if string(mpf[:4]) != "_MP_" {
		t.Fatalf("no _MP_ signature at %#x: %q", MPTableAddr, mpf[:4])
	}
	if checksum(mpf) != 0 {
		t.Error("MP floating pointer checksum is wrong")
	}
	if mpf[8] != 1 || mpf[9] != 4 || mpf[11] != 0 {
		t.Errorf("floating pointer length %d rev %d feature1 %d", mpf[8], mpf[9], mpf[11])
	}
	mpcAddr := uint64(le.Uint32(mpf[4:]))
	hdr := read(t, mem, mpcAddr, 44)
	if string(hdr[:4]) != "PCMP" {
		t.Fatalf("no PCMP signature at %#x", mpcAddr)
	}
	length := uint64(le.Uint16(hdr[4:]))
	mpc := read(t, mem, mpcAddr, length)
	if checksum(mpc) != 0 {
		t.Error("MP configuration table checksum is wrong")
	}
	if mpc[6] != 4 || string(mpc[8:16]) != "FERRY   " || le.Uint32(mpc[36:]) != 0xFEE00000 {
		t.Errorf("rev %d OEM %q LAPIC %#x", mpc[6], mpc[8:16], le.Uint32(mpc[36:]))
	}
	if cpus <= MPMaxEBDACPUs {
		if mpcAddr != MPTableAddr+16 || mpcAddr+length > guestmem.LowRAMEnd {
			t.Errorf("table for %d CPUs at [%#x, %#x) is not inside the EBDA", cpus, mpcAddr, mpcAddr+length)
		}
	} else if mpcAddr != MPHighAddr || mpcAddr+length > guestmem.HighMemory {
		t.Errorf("table for %d CPUs at [%#x, %#x), want it in the BIOS area", cpus, mpcAddr, mpcAddr+length)
	}

	count := int(le.Uint16(mpc[34:]))
	p := 44
	var procs []int
	bsps := 0
	ioapicID := -1
	ioints := map[int]int{} // ISA IRQ -> pin for INT entries
	extintPins := 0
	lints := map[int]int{} // LINT pin -> kind
	lastType := -1
	for i := range count {
		if p >= len(mpc) {
			t.Fatalf("entry %d starts past the table end", i)
		}
		typ := int(mpc[p])
		if typ < lastType {
			t.Errorf("entry %d of type %d after type %d: not sorted", i, typ, lastType)
		}
		lastType = typ
		switch typ {
		case 0:
			e := mpc[p : p+20]
			if e[3]&1 == 0 {
				t.Errorf("CPU %d not enabled", e[1])
			}
			if e[3]&2 != 0 {
				bsps++
				if e[1] != 0 {
					t.Errorf("BSP flag on APIC ID %d", e[1])
				}
			}
			if e[2] != 0x14 {
				t.Errorf("APIC version %#x", e[2])
			}
			procs = append(procs, int(e[1]))
			p += 20
		case 1:
			if mpc[p+1] != 0 || string(mpc[p+2:p+8]) != "ISA   " {
				t.Errorf("bus entry %q", mpc[p:p+8])
			}
			p += 8
		case 2:
			ioapicID = int(mpc[p+1])
			if mpc[p+2] != 0x11 || mpc[p+3]&1 == 0 || le.Uint32(mpc[p+4:]) != 0xFEC00000 {
				t.Errorf("IOAPIC entry %x", mpc[p:p+8])
			}
			p += 8
		case 3:
			if int(mpc[p+6]) != ioapicID {
				t.Errorf("I/O interrupt to IOAPIC %d, IOAPIC is %d", mpc[p+6], ioapicID)
			}
			irq, pin := int(mpc[p+5]), int(mpc[p+7])
			switch mpc[p+1] {
			case 0:
				if _, dup := ioints[irq]; dup {
					t.Errorf("ISA IRQ %d listed twice", irq)
				}
				ioints[irq] = pin
			case 3:
				extintPins++
			default:
				t.Errorf("I/O interrupt entry of kind %d", mpc[p+1])
			}
			p += 8
		case 4:
			if mpc[p+6] != 0xFF {
				t.Errorf("local interrupt for APIC %d, want all", mpc[p+6])
			}
			lints[int(mpc[p+7])] = int(mpc[p+1])
			p += 8
		default:
			t.Fatalf("unknown entry type %d", typ)
		}
	}
	if p != len(mpc) {
		t.Errorf("entries end at %d, table length %d", p, len(mpc))
	}
	if len(procs) != cpus || bsps != 1 {
		t.Errorf("%d processors (%d BSP), want %d (1 BSP)", len(procs), bsps, cpus)
	}
	for i, id := range procs {
		if id != i {
			t.Errorf("processor %d has APIC ID %d", i, id)
		}
	}
	if ioapicID != cpus {
		t.Errorf("IOAPIC ID %d, want %d", ioapicID, cpus)
	}
	// KVM's default routing: the PIT (ISA IRQ 0) is on GSI 0 = pin 0, and
	// every other ISA IRQ on the pin of its number.
	if TimerIOAPICPin != 0 {
		t.Errorf("TimerIOAPICPin = %d, want 0", TimerIOAPICPin)
	}
	for irq := 0; irq < 16; irq++ {
		if irq == 2 {
			if _, ok := ioints[2]; ok {
				t.Error("ISA IRQ 2 (cascade) has an entry")
			}
			continue
		}
		if pin, ok := ioints[irq]; !ok || pin != irq {
			t.Errorf("IRQ%d on pin %d (present %v), want identity", irq, pin, ok)
		}
	}
	if extintPins != 0 {
		t.Errorf("%d ExtINT entries on IOAPIC pins, want none (ExtINT is on LINT0)", extintPins)
	}
	if want := 44 + cpus*20 + 8 + 8 + 15*8 + 2*8; int(length) != want {
		t.Errorf("table length %d, want %d", length, want)
	}
	if lints[0] != 3 || lints[1] != 1 {
		t.Errorf("LINT0 kind %d, LINT1 kind %d; want ExtINT(3), NMI(1)", lints[0], lints[1])
	}
}

func TestMPTable(t *testing.T) {
	mem := newMem(t, 16<<20)
	for _, cpus := range []int{1, 2, 8, MPMaxEBDACPUs, MPMaxEBDACPUs + 1, 128, MPMaxCPUs} {
		t.Run(fmt.Sprint(cpus), func(t *testing.T) {
			if _, err := writeMPTable(mem, cpus); err != nil {
				t.Fatal(err)
			}
			checkMPTable(t, mem, cpus)
		})
	}
	if MPMaxEBDACPUs < 32 {
		t.Errorf("only %d CPUs fit in the EBDA", MPMaxEBDACPUs)
	}
	for _, cpus := range []int{-1, MPMaxCPUs + 1, 1000} {
		if _, _, _, err := buildMPTable(cpus); err == nil {
			t.Errorf("MP table for %d CPUs accepted", cpus)
		}
	}
}

// Load writes the MP table in both modes and refuses impossible counts.
func TestLoadCPUs(t *testing.T) {
	mem := newMem(t, 16<<20)
	e, err := Load(mem, Options{Kernel: simpleELF(64), CPUs: 0})
	if err != nil {
		t.Fatal(err)
	}
	if e.MPTable != MPTableAddr {
		t.Errorf("MP table at %#x", e.MPTable)
	}
	checkMPTable(t, mem, 1)
	if _, err := Load(mem, Options{Kernel: simpleELF(64), CPUs: 64}); err != nil {
		t.Fatal(err)
	}
	checkMPTable(t, mem, 64)
	_, err = Load(mem, Options{Kernel: simpleELF(64), CPUs: 255})
	wantErr(t, err, "255 CPUs requested, the MP table describes at most 254")
	_, err = Load(mem, Options{Kernel: simpleELF(64), CPUs: -2})
	wantErr(t, err, "invalid CPU count -2")
}
