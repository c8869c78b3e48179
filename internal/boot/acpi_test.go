package boot

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// parsedACPI is what checkACPI found in guest memory.
type parsedACPI struct {
	rsdp   uint64
	tables map[string][]byte // by signature, including "RSD PTR " and "FACS"
	spans  []span            // where each structure is
}

// findRSDP scans for the RSDP the way Linux's acpi_find_root_pointer does:
// the first KiB of the EBDA (located through the BDA), then the BIOS area
// 0xE0000-0xFFFFF, on 16-byte boundaries, accepting a candidate whose
// checksums are right. It returns every valid RSDP found.
func findRSDP(t *testing.T, mem *guestmem.Memory) []uint64 {
	t.Helper()
	le := binary.LittleEndian
	valid := func(b []byte) bool {
		if string(b[:8]) != "RSD PTR " || checksum(b[:20]) != 0 {
			return false
		}
		if b[15] >= 2 {
			n := int(le.Uint32(b[20:]))
			return n >= 36 && n <= len(b) && checksum(b[:n]) == 0
		}
		return true
	}
	var found []uint64
	ebda := uint64(le.Uint16(read(t, mem, 0x40E, 2))) << 4
	for _, r := range [][2]uint64{{ebda, ebda + 1024}, {0xE0000, 0x100000}} {
		area := read(t, mem, r[0], r[1]-r[0])
		for off := uint64(0); off+36 <= uint64(len(area)); off += 16 {
			if valid(area[off:min(off+64, uint64(len(area)))]) {
				found = append(found, r[0]+off)
			}
		}
	}
	return found
}

// checkACPI parses the ACPI tables in guest memory as a guest would and
// checks that they describe cpus processors on ferry's interrupt routing.
// Layout values are spelled out from the ACPI specification rather than
// taken from acpi.go.
func checkACPI(t *testing.T, mem *guestmem.Memory, cpus int) *parsedACPI {
	t.Helper()
	le := binary.LittleEndian
	p := &parsedACPI{tables: map[string][]byte{}}

	rsdps := findRSDP(t, mem)
	if len(rsdps) != 1 || rsdps[0] != 0xE0000 {
		t.Fatalf("RSDPs found at %#x, want exactly one at 0xe0000", rsdps)
	}
	p.rsdp = rsdps[0]
	rsdp := read(t, mem, p.rsdp, 36)
	if rsdp[15] != 2 || le.Uint32(rsdp[20:]) != 36 || le.Uint32(rsdp[16:]) != 0 || string(rsdp[9:15]) != "FERRY " {
		t.Errorf("RSDP revision %d length %d RSDT %#x OEM %q", rsdp[15], le.Uint32(rsdp[20:]), le.Uint32(rsdp[16:]), rsdp[9:15])
	}
	p.tables["RSD PTR "] = rsdp
	p.spans = append(p.spans, span{p.rsdp, p.rsdp + 36, "RSDP"})

	inWindow := func(what string, a, n uint64) {
		t.Helper()
		if a < 0xE0000 || a+n > MPHighAddr {
			t.Errorf("%s at [%#x, %#x) is outside [0xe0000, %#x)", what, a, a+n, MPHighAddr)
		}
	}
	table := func(a uint64, sig string, rev uint8) []byte {
		t.Helper()
		if a == 0 || a > 0xFFFFF {
			t.Fatalf("%s at %#x, not in the BIOS area", sig, a)
		}
		hdr := read(t, mem, a, 36)
		if string(hdr[:4]) != sig {
			t.Fatalf("table at %#x has signature %q, want %q", a, hdr[:4], sig)
		}
		n := uint64(le.Uint32(hdr[4:]))
		if n < 36 || n > 0x10000 {
			t.Fatalf("%s length %d", sig, n)
		}
		inWindow(sig, a, n)
		b := read(t, mem, a, n)
		if checksum(b) != 0 {
			t.Errorf("%s checksum is wrong", sig)
		}
		if b[8] != rev {
			t.Errorf("%s revision %d, want %d", sig, b[8], rev)
		}
		if string(b[10:16]) != "FERRY " || string(b[16:24]) != "FERRYVMM" {
			t.Errorf("%s OEM %q %q", sig, b[10:16], b[16:24])
		}
		if _, dup := p.tables[sig]; dup {
			t.Errorf("second %s table at %#x", sig, a)
		}
		p.tables[sig] = b
		p.spans = append(p.spans, span{a, a + n, sig})
		return b
	}

	// XSDT: the FADT and the MADT.
	xsdt := table(le.Uint64(rsdp[24:]), "XSDT", 1)
	if (len(xsdt)-36)%8 != 0 {
		t.Fatalf("XSDT length %d leaves a partial entry", len(xsdt))
	}
	entries := map[string]uint64{}
	for off := 36; off < len(xsdt); off += 8 {
		a := le.Uint64(xsdt[off:])
		sig := string(read(t, mem, a, 4))
		entries[sig] = a
	}
	if len(entries) != 2 || entries["FACP"] == 0 || entries["APIC"] == 0 || len(xsdt) != 36+2*8 {
		t.Fatalf("XSDT entries %v, want FACP and APIC", entries)
	}

	// FADT, ACPI 6.3, not hardware-reduced.
	fadt := table(entries["FACP"], "FACP", 6)
	if len(fadt) != 276 || fadt[131] != 3 {
		t.Fatalf("FADT length %d minor version %d, want 276 and 3", len(fadt), fadt[131])
	}
	check := func(name string, got, want uint64) {
		t.Helper()
		if got != want {
			t.Errorf("%s = %#x, want %#x", name, got, want)
		}
	}
	flags := le.Uint32(fadt[112:])
	check("FADT HW_REDUCED_ACPI", uint64(flags>>20&1), 0)
	check("FADT WBINVD", uint64(flags&1), 1)
	check("FADT PWR_BUTTON|SLP_BUTTON", uint64(flags>>4&3), 3)
	check("FADT TMR_VAL_EXT", uint64(flags>>8&1), 0)
	check("FADT RESET_REG_SUP", uint64(flags>>10&1), 1)
	boot := le.Uint16(fadt[109:])
	check("IAPC_BOOT_ARCH legacy devices + 8042", uint64(boot&3), 3)
	check("IAPC_BOOT_ARCH CMOS RTC not present", uint64(boot>>5&1), 0)
	check("SCI_INT", uint64(le.Uint16(fadt[46:])), 9)
	check("SMI_CMD", uint64(le.Uint32(fadt[48:])), 0)
	check("PM1a_EVT_BLK", uint64(le.Uint32(fadt[56:])), 0x600)
	check("PM1b_EVT_BLK", uint64(le.Uint32(fadt[60:])), 0)
	check("PM1a_CNT_BLK", uint64(le.Uint32(fadt[64:])), 0x604)
	check("PM1b_CNT_BLK", uint64(le.Uint32(fadt[68:])), 0)
	check("PM2_CNT_BLK", uint64(le.Uint32(fadt[72:])), 0)
	check("PM_TMR_BLK", uint64(le.Uint32(fadt[76:])), 0)
	check("GPE0_BLK", uint64(le.Uint32(fadt[80:])), 0)
	check("GPE1_BLK", uint64(le.Uint32(fadt[84:])), 0)
	check("PM1_EVT_LEN", uint64(fadt[88]), 4)
	check("PM1_CNT_LEN", uint64(fadt[89]), 2)
	check("PM2_CNT_LEN/PM_TMR_LEN/GPE0_BLK_LEN/GPE1_BLK_LEN", uint64(le.Uint32(fadt[90:])), 0)
	check("P_LVL2_LAT > 100", uint64(min(le.Uint16(fadt[96:]), 101)), 101)
	check("P_LVL3_LAT > 1000", uint64(min(le.Uint16(fadt[98:]), 1001)), 1001)
	check("CENTURY", uint64(fadt[108]), 0x32)
	gas := func(name string, off int, width uint8, addr uint64) {
		t.Helper()
		g := fadt[off : off+12]
		if addr == 0 {
			check(name, le.Uint64(g[4:]), 0)
			return
		}
		if g[0] != 1 || g[1] != width || g[2] != 0 || le.Uint64(g[4:]) != addr {
			t.Errorf("%s = %x, want system I/O %#x, %d bits", name, g, addr, width)
		}
	}
	gas("RESET_REG", 116, 8, 0x64)
	check("RESET_VALUE", uint64(fadt[128]), 0xFE)
	gas("X_PM1a_EVT_BLK", 148, 32, 0x600)
	gas("X_PM1b_EVT_BLK", 160, 0, 0)
	gas("X_PM1a_CNT_BLK", 172, 16, 0x604)
	gas("X_PM1b_CNT_BLK", 184, 0, 0)
	gas("X_PM2_CNT_BLK", 196, 0, 0)
	gas("X_PM_TMR_BLK", 208, 0, 0)
	gas("X_GPE0_BLK", 220, 0, 0)
	gas("X_GPE1_BLK", 232, 0, 0)

	// FACS through FIRMWARE_CTRL (below 4 GiB, so X_FIRMWARE_CTRL is 0).
	facsAddr := uint64(le.Uint32(fadt[36:]))
	check("X_FIRMWARE_CTRL", le.Uint64(fadt[132:]), 0)
	if facsAddr%64 != 0 {
		t.Errorf("FACS at %#x is not 64-byte aligned", facsAddr)
	}
	facs := read(t, mem, facsAddr, 64)
	if string(facs[:4]) != "FACS" || le.Uint32(facs[4:]) != 64 || facs[32] != 2 {
		t.Errorf("FACS %x", facs)
	}
	if !bytes.Equal(facs[8:32], make([]byte, 24)) || !bytes.Equal(facs[33:], make([]byte, 31)) {
		t.Errorf("FACS has non-zero fields: %x", facs)
	}
	inWindow("FACS", facsAddr, 64)
	p.tables["FACS"] = facs
	p.spans = append(p.spans, span{facsAddr, facsAddr + 64, "FACS"})

	// DSDT through both DSDT and X_DSDT: \_S5 and nothing else.
	dsdtAddr := uint64(le.Uint32(fadt[40:]))
	check("X_DSDT", le.Uint64(fadt[140:]), dsdtAddr)
	dsdt := table(dsdtAddr, "DSDT", 2)
	wantAML := []byte{0x08, '_', 'S', '5', '_', 0x12, 0x08, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00}
	if !bytes.Equal(dsdt[36:], wantAML) {
		t.Errorf("DSDT AML % x, want % x", dsdt[36:], wantAML)
	}

	// MADT.
	madt := table(entries["APIC"], "APIC", 5)
	if want := 44 + 8*cpus + 12 + 10 + 6; len(madt) != want {
		t.Errorf("MADT length %d, want %d", len(madt), want)
	}
	check("MADT local APIC address", uint64(le.Uint32(madt[36:])), 0xFEE00000)
	check("MADT flags", uint64(le.Uint32(madt[40:])), 1) // PCAT_COMPAT
	var lapics []int
	ioapics, nmis := 0, 0
	overrides := map[uint8][2]uint64{} // source IRQ -> GSI, flags
	apicIDs := map[int]string{}
	for off := 44; off < len(madt); {
		if off+2 > len(madt) || madt[off+1] < 2 || off+int(madt[off+1]) > len(madt) {
			t.Fatalf("MADT entry at %d runs past the table", off)
		}
		e := madt[off : off+int(madt[off+1])]
		switch e[0] {
		case 0:
			if len(e) != 8 {
				t.Fatalf("local APIC entry length %d", len(e))
			}
			i := len(lapics)
			if int(e[2]) != i || int(e[3]) != i || le.Uint32(e[4:]) != 1 {
				t.Errorf("local APIC entry %d: UID %d APIC ID %d flags %#x, want %d %d enabled", i, e[2], e[3], le.Uint32(e[4:]), i, i)
			}
			if prev, dup := apicIDs[int(e[3])]; dup {
				t.Errorf("APIC ID %d used by %s and a processor", e[3], prev)
			}
			apicIDs[int(e[3])] = fmt.Sprintf("processor %d", i)
			lapics = append(lapics, int(e[3]))
		case 1:
			if len(e) != 12 {
				t.Fatalf("I/O APIC entry length %d", len(e))
			}
			ioapics++
			check("I/O APIC ID", uint64(e[2]), uint64(cpus))
			check("I/O APIC address", uint64(le.Uint32(e[4:])), 0xFEC00000)
			check("I/O APIC GSI base", uint64(le.Uint32(e[8:])), 0)
			if prev, dup := apicIDs[int(e[2])]; dup {
				t.Errorf("I/O APIC ID %d already used by %s", e[2], prev)
			}
			apicIDs[int(e[2])] = "the I/O APIC"
		case 2:
			if len(e) != 10 || e[2] != 0 {
				t.Fatalf("interrupt source override % x", e)
			}
			if _, dup := overrides[e[3]]; dup {
				t.Errorf("IRQ %d overridden twice", e[3])
			}
			overrides[e[3]] = [2]uint64{uint64(le.Uint32(e[4:])), uint64(le.Uint16(e[8:]))}
		case 4:
			nmis++
			if len(e) != 6 || e[2] != 0xFF || le.Uint16(e[3:]) != 0 || e[5] != 1 {
				t.Errorf("local APIC NMI entry % x, want all processors, LINT1", e)
			}
		default:
			t.Errorf("unexpected MADT entry type %d", e[0])
		}
		off += len(e)
	}
	if len(lapics) != cpus || ioapics != 1 || nmis != 1 {
		t.Errorf("MADT has %d local APICs, %d I/O APICs, %d NMI entries; want %d, 1, 1", len(lapics), ioapics, nmis, cpus)
	}
	// KVM's default routing puts ISA IRQ 0 (the PIT) on GSI 0: no
	// override for it. The SCI (IRQ 9) is level-triggered, active high.
	if len(overrides) != 1 || overrides[9] != [2]uint64{9, 0xD} {
		t.Errorf("interrupt source overrides %v, want only IRQ 9 -> GSI 9 level/high", overrides)
	}

	// No two structures overlap, and all are reserved in the E820 map.
	for i, a := range p.spans {
		for _, b := range p.spans[i+1:] {
			if a.overlaps(b) {
				t.Errorf("%s [%#x, %#x) overlaps %s [%#x, %#x)", a.what, a.start, a.end, b.what, b.start, b.end)
			}
		}
		reserved := false
		for _, r := range mem.E820() {
			if r.Type == guestmem.E820Reserved && r.Addr <= a.start && a.end <= r.Addr+r.Size {
				reserved = true
			}
		}
		if !reserved {
			t.Errorf("%s [%#x, %#x) is not in an E820 reserved range", a.what, a.start, a.end)
		}
	}
	return p
}

// mpSpans returns where the MP floating pointer and configuration table
// are.
func mpSpans(t *testing.T, mem *guestmem.Memory) []span {
	le := binary.LittleEndian
	mpf := read(t, mem, MPTableAddr, 16)
	mpcAddr := uint64(le.Uint32(mpf[4:]))
	n := uint64(le.Uint16(read(t, mem, mpcAddr+4, 2)))
	return []span{{MPTableAddr, MPTableAddr + 16, "MP floating pointer"}, {mpcAddr, mpcAddr + n, "MP configuration table"}}
}

func TestACPI(t *testing.T) {
	for _, cpus := range []int{1, 2, 8, MPMaxEBDACPUs, MPMaxEBDACPUs + 1, 64, 128, MPMaxCPUs} {
		t.Run(fmt.Sprint(cpus), func(t *testing.T) {
			mem := newMem(t, 64<<20)
			// Fill the BIOS area with junk so nothing passes by accident.
			bios := read(t, mem, guestmem.EBDAStart, guestmem.HighMemory-guestmem.EBDAStart)
			copy(bios, bytes.Repeat([]byte{0x5A}, len(bios)))
			for _, img := range [][]byte{simpleELF(64), buildBz(defaultBz())} {
				e, err := Load(mem, Options{Kernel: img, CPUs: cpus})
				if err != nil {
					t.Fatal(err)
				}
				if e.RSDPAddr != ACPIAddr {
					t.Errorf("Entry.RSDPAddr = %#x", e.RSDPAddr)
				}
				// Both tables are intact after both were written.
				checkMPTable(t, mem, cpus)
				p := checkACPI(t, mem, cpus)
				for _, a := range p.spans {
					for _, b := range mpSpans(t, mem) {
						if a.overlaps(b) {
							t.Errorf("%s [%#x, %#x) overlaps %s [%#x, %#x)", a.what, a.start, a.end, b.what, b.start, b.end)
						}
					}
				}
			}
		})
	}
	for _, cpus := range []int{-1, 0, MPMaxCPUs + 1} {
		if _, _, err := buildACPI(cpus, PCIConfig{}); err == nil {
			t.Errorf("ACPI tables for %d CPUs accepted", cpus)
		}
	}
}

// The documented layout holds: RSDP at 0xE0000, FACS at 0xE0040, and the
// largest set of tables ends where boot.go says.
func TestACPILayout(t *testing.T) {
	if l := acpiLayoutFor(MPMaxCPUs, testPCI); ACPIAddr+l.size > ACPIEnd || l.mcfg%16 != 0 {
		t.Errorf("tables for %d CPUs and a PCI bus end at %#x, MCFG at +%#x", MPMaxCPUs, ACPIAddr+l.size, l.mcfg)
	}
	l := acpiLayoutFor(MPMaxCPUs, PCIConfig{})
	if l.rsdp != 0 || l.facs != 0x40 {
		t.Errorf("RSDP at +%#x, FACS at +%#x", l.rsdp, l.facs)
	}
	if end := ACPIAddr + l.size; end != 0xE0A58 || end > ACPIEnd {
		t.Errorf("tables for %d CPUs end at %#x", MPMaxCPUs, end)
	}
	for _, off := range []int{l.dsdt, l.fadt, l.xsdt, l.madt} {
		if off%16 != 0 {
			t.Errorf("table at +%#x is not 16-byte aligned", off)
		}
	}
	if ACPIEnd > MPHighAddr || ACPIAddr%16 != 0 || ACPIAddr < 0xE0000 {
		t.Errorf("ACPI window [%#x, %#x)", ACPIAddr, ACPIEnd)
	}
}

// TestACPIIasl checks the tables with ACPICA's iasl (Debian: acpica-tools)
// and skips without it. Every table but the RSDP is disassembled (iasl
// reports wrong checksums, bad lengths and unknown subtables) and the
// disassembly compiled again: the result must be our table byte for byte,
// except for the compiler ID and revision that iasl puts in the header and
// the checksum that covers them. iasl 20200925 cannot disassemble an RSDP
// on its own, so the RSDP's fields are compiled from source instead and
// the output (where iasl computes both checksums) compared.
func TestACPIIasl(t *testing.T) {
	iasl, err := exec.LookPath("iasl")
	if err != nil {
		t.Skip("iasl not found (Debian: apt-get install acpica-tools); skipping the ACPICA cross-check")
	}
	run := func(t *testing.T, args ...string) string {
		t.Helper()
		out, err := exec.Command(iasl, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("iasl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	for _, cpus := range []int{1, 8, MPMaxCPUs} {
		for _, pci := range []PCIConfig{{}, testPCI} {
			t.Run(fmt.Sprintf("%d-pci=%v", cpus, pci.Enabled()), func(t *testing.T) { checkIasl(t, run, cpus, pci) })
		}
	}
}

// testPCI is the PCI bus layout ferry's VMM uses (internal/pci).
var testPCI = PCIConfig{ECAMBase: 0xE000_0000, MemBase: 0xC000_0000, MemEnd: 0xE000_0000, IOBase: 0xC000, IOEnd: 0x1_0000}

// acpiTables names each table of a blob, for the ACPICA tools.
func acpiTables(blob []byte, l acpiLayout, cpus int, pci PCIConfig) []struct {
	name string
	b    []byte
} {
	tbs := []struct {
		name string
		b    []byte
	}{
		{"facs", blob[l.facs : l.facs+facsSize]},
		{"dsdt", blob[l.dsdt : l.dsdt+l.dsdtLen]},
		{"facp", blob[l.fadt : l.fadt+fadtSize]},
		{"xsdt", blob[l.xsdt : l.xsdt+l.xsdtLen]},
		{"apic", blob[l.madt : l.madt+madtSize(cpus)]},
	}
	if pci.Enabled() {
		tbs = append(tbs, struct {
			name string
			b    []byte
		}{"mcfg", blob[l.mcfg : l.mcfg+mcfgSize]})
	}
	return tbs
}

func checkIasl(t *testing.T, run func(t *testing.T, args ...string) string, cpus int, pci PCIConfig) {
	{
		{
			blob, l, err := buildACPI(cpus, pci)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			for _, tb := range acpiTables(blob, l, cpus, pci) {
				base := filepath.Join(dir, tb.name)
				if err := os.WriteFile(base+".dat", tb.b, 0o644); err != nil {
					t.Fatal(err)
				}
				out := run(t, "-d", base+".dat")
				dsl, err := os.ReadFile(base + ".dsl")
				if err != nil {
					t.Fatalf("iasl -d %s wrote no disassembly: %v\n%s", tb.name, err, out)
				}
				for _, bad := range []string{"Error", "Warning", "Invalid", "Incorrect", "Unknown", "****"} {
					if strings.Contains(out, bad) || strings.Contains(string(dsl), bad) {
						t.Errorf("iasl -d %s reports %q:\n%s\n%s", tb.name, bad, out, dsl)
						break
					}
				}
				if testing.Verbose() && cpus == 1 {
					t.Logf("%s:\n%s", tb.name, dsl)
				}
				run(t, "-p", base+"2", base+".dsl")
				again, err := os.ReadFile(base + "2.aml")
				if err != nil {
					t.Fatal(err)
				}
				want := tb.b
				if len(again) != len(want) {
					t.Errorf("%s: recompiled to %d bytes, ours has %d", tb.name, len(again), len(want))
					continue
				}
				for i := range want {
					header := tb.name != "facs" && (i == 9 || (i >= 28 && i < 36))
					if !header && again[i] != want[i] {
						t.Errorf("%s: recompiled byte %#x is %#x, ours %#x", tb.name, i, again[i], want[i])
					}
				}
			}

			rsdp := blob[l.rsdp : l.rsdp+rsdpSize]
			src := fmt.Sprintf(`[0008]                          Signature : "RSD PTR "
[0001]                           Checksum : 00
[0006]                             Oem ID : "FERRY "
[0001]                           Revision : 02
[0004]                       RSDT Address : 00000000
[0004]                             Length : 00000024
[0008]                       XSDT Address : %016X
[0001]                  Extended Checksum : 00
[0003]                           Reserved : 000000
`, ACPIAddr+uint64(l.xsdt))
			base := filepath.Join(dir, "rsdp")
			if err := os.WriteFile(base+".asl", []byte(src), 0o644); err != nil {
				t.Fatal(err)
			}
			run(t, "-p", base, base+".asl")
			ref, err := os.ReadFile(base + ".aml")
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ref, rsdp) {
				t.Errorf("RSDP\n% x\niasl compiles the same fields to\n% x", rsdp, ref)
			}
		}
	}
}

// TestACPIExec loads the tables into ACPICA's acpiexec (Debian:
// acpica-tools; skipped without it) and evaluates \_S5. acpiexec runs the
// same table checks and subsystem start-up as Linux's ACPICA, including
// disabling the fixed events through PM1_EN, and its port I/O reads all
// ones and drops writes, as ferry's bus does for ports no device claims.
// The start-up must succeed without firmware errors. (With the PM1 blocks
// left out it fails: "Required FADT field Pm1aEventBlock has zero address"
// and "Could not EnableSubsystem, AE_BAD_ADDRESS".)
func TestACPIExec(t *testing.T) {
	acpiexec, err := exec.LookPath("acpiexec")
	if err != nil {
		t.Skip("acpiexec not found (Debian: apt-get install acpica-tools); skipping the ACPICA start-up check")
	}
	blob, l, err := buildACPI(2, testPCI)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var files []string
	for _, tb := range acpiTables(blob, l, 2, testPCI) {
		if tb.name == "xsdt" {
			continue // acpiexec takes the tables themselves
		}
		f := filepath.Join(dir, tb.name+".dat")
		if err := os.WriteFile(f, tb.b, 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, f)
	}
	cmd := exec.Command(acpiexec, append([]string{"-b", `evaluate \_S5; evaluate \_SB.PCI0._CRS; evaluate \_SB.PCI0._HID`}, files...)...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("acpiexec: %v\n%s", err, out)
	}
	for _, bad := range []string{"Firmware Error", "Firmware Warning", "Could not", "Unable to", "ACPI Error", "ACPI Exception"} {
		if bytes.Contains(out, []byte(bad)) {
			t.Errorf("acpiexec reports %q:\n%s", bad, out)
			break
		}
	}
	want := "[Package] Contains 4 Elements:\n    [Integer] = 0000000000000005\n    [Integer] = 0000000000000005\n    [Integer] = 0000000000000000\n    [Integer] = 0000000000000000\n"
	if !bytes.Contains(out, []byte(want)) {
		t.Errorf("acpiexec did not evaluate \\_S5 to {5, 5, 0, 0}:\n%s", out)
	}
}
