package state

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// clone deep-copies a machine through the encoding.
func clone(t *testing.T, m *Machine) *Machine {
	t.Helper()
	got, err := decode(encode(t, m, nil, WriterOptions{}), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return &got.m
}

func TestDiffIdentical(t *testing.T) {
	rng := rand.New(rand.NewPCG(31, 32))
	a := randomMachine(rng, 2, 4096)
	b := clone(t, a)
	a.Header.FormatVersion = FormatVersion
	if d := Diff(a, b, true); len(d) != 0 {
		t.Errorf("identical machines differ: %v", d)
	}
}

func TestDiffOneField(t *testing.T) {
	rng := rand.New(rand.NewPCG(33, 34))
	base := randomMachine(rng, 2, 4096)
	base.Header.FormatVersion = FormatVersion
	// Make the CMOS clock run so its clock bytes count as volatile.
	base.Devices.CMOS.RAM[0x0b] &^= 0x80
	for _, c := range []struct {
		path     string
		volatile bool
		mod      func(m *Machine)
	}{
		{"vcpu[1].regs.rip", false, func(m *Machine) { m.VCPUs[1].Regs.RIP++ }},
		{"vcpu[0].sregs.cs.selector", false, func(m *Machine) { m.VCPUs[0].Sregs.CS.Selector ^= 8 }},
		{"vcpu[0].sregs.apic_base", false, func(m *Machine) { m.VCPUs[0].Sregs.APICBase ^= 1 << 11 }},
		{"vcpu[0].sregs.interrupt_bitmap[2]", false, func(m *Machine) { m.VCPUs[0].Sregs.InterruptBitmap[2]++ }},
		{"vcpu[1].xcrs.nr_xcrs", false, func(m *Machine) { m.VCPUs[1].XCRs.NrXCRs++ }},
		{"vcpu[0].fpu.xmm[5]", false, func(m *Machine) { m.VCPUs[0].FPU.XMM[5][3]++ }},
		{"vcpu[0].xsave[0x240:0x250]", false, func(m *Machine) { m.VCPUs[0].XSave[0x245]++ }},
		{"vcpu[0].msr[LSTAR]", false, func(m *Machine) { setMSR(m, 0, 0xc0000082, 0x1234) }},
		{"vcpu[0].msr[TSC]", true, func(m *Machine) { setMSR(m, 0, 0x10, 999) }},
		{"vcpu[1].lapic[0x390]", true, func(m *Machine) { m.VCPUs[1].LAPIC.Regs[0x390]++ }},
		{"vcpu[1].lapic[0xa0]", true, func(m *Machine) { m.VCPUs[1].LAPIC.Regs[0xa0] ^= 0x30 }},  // PPR: derived
		{"vcpu[1].lapic[0x80]", false, func(m *Machine) { m.VCPUs[1].LAPIC.Regs[0x80] ^= 0x30 }}, // TPR: state
		{"vcpu[1].lapic[0x380]", false, func(m *Machine) { m.VCPUs[1].LAPIC.Regs[0x381]++ }},
		{"vcpu[0].events.exception.nr", false, func(m *Machine) { m.VCPUs[0].Events.Exception.Nr++ }},
		{"vcpu[0].mp_state.state", false, func(m *Machine) { m.VCPUs[0].MPState.State++ }},
		{"vcpu[1].tsc_khz", false, func(m *Machine) { m.VCPUs[1].TSCKHz++ }},
		{"vcpu[1].sregs2", false, func(m *Machine) {
			if m.VCPUs[1].Sregs2 == nil {
				m.VCPUs[1].Sregs2 = &kvm.Sregs2{}
			} else {
				m.VCPUs[1].Sregs2 = nil
			}
		}},
		{"ioapic.redir[4]", false, func(m *Machine) { m.IOAPIC.RedirTbl[4] ^= 1 << 16 }},
		{"pic[1].imr", false, func(m *Machine) { m.PIC[1].IMR++ }},
		{"pit.channels[2].count_load_time", true, func(m *Machine) { m.PIT.Channels[2].CountLoadTime++ }},
		{"pit.channels[0].count", false, func(m *Machine) { m.PIT.Channels[0].Count++ }},
		{"clock.clock", true, func(m *Machine) { m.Clock.Clock++ }},
		{"clock.flags", false, func(m *Machine) { m.Clock.Flags++ }},
		{"header.created_unix_nano", true, func(m *Machine) { m.Header.CreatedUnixNano++ }},
		{"header.regions[1].offset", false, func(m *Machine) { m.Header.Regions[1].Offset += 4096 }},
		{"devices.serial.lcr", false, func(m *Machine) { m.Devices.Serial.LCR++ }},
		{"devices.serial.rx_fifo", false, func(m *Machine) { m.Devices.Serial.RXFIFO = append(m.Devices.Serial.RXFIFO, 'x') }},
		{"devices.cmos.ram[0x00]", true, func(m *Machine) { m.Devices.CMOS.RAM[0]++ }},
		{"devices.cmos.ram[0x10]", false, func(m *Machine) { m.Devices.CMOS.RAM[0x10]++ }},
		{"devices.cmos.clock_offset", false, func(m *Machine) { m.Devices.CMOS.ClockOffset++ }},
		{"devices.i8042.output.len", false, func(m *Machine) { m.Devices.I8042.Output = append(m.Devices.I8042.Output, m.Devices.I8042.Output...) }},
		{"devices.post.writes", false, func(m *Machine) { m.Devices.Post.Writes++ }},
	} {
		b := clone(t, base)
		c.mod(b)
		all := Diff(base, b, true)
		if len(all) == 0 || all[0].Path != c.path {
			t.Errorf("%s: differences %v", c.path, all)
			continue
		}
		if c.path != "devices.i8042.output.len" && len(all) != 1 {
			t.Errorf("%s: %d differences: %v", c.path, len(all), all)
		}
		stable := Diff(base, b, false)
		if c.volatile && len(stable) != 0 {
			t.Errorf("%s: volatile field reported without volatile: %v", c.path, stable)
		}
		if !c.volatile && !reflect.DeepEqual(stable, all) {
			t.Errorf("%s: without volatile %v, with %v", c.path, stable, all)
		}
	}

	// While the guest is setting the CMOS clock, its bytes are state.
	a := clone(t, base)
	a.Devices.CMOS.RAM[0x0b] |= 0x80
	b := clone(t, a)
	b.Devices.CMOS.RAM[0]++
	if d := Diff(a, b, false); len(d) != 1 || d[0].Path != "devices.cmos.ram[0x00]" {
		t.Errorf("frozen CMOS clock: %v", d)
	}
}

func setMSR(m *Machine, cpu int, idx uint32, v uint64) {
	msrs := m.VCPUs[cpu].MSRs
	i, found := slices.BinarySearchFunc(msrs, idx, func(e kvm.MSREntry, idx uint32) int {
		return cmpU32(e.Index, idx)
	})
	if found {
		msrs[i].Data = v
		return
	}
	m.VCPUs[cpu].MSRs = slices.Insert(msrs, i, kvm.MSREntry{Index: idx, Data: v})
}

func TestDiffShapes(t *testing.T) {
	rng := rand.New(rand.NewPCG(35, 36))
	a := randomMachine(rng, 2, 4096)
	a.Header.FormatVersion = FormatVersion
	b := clone(t, a)
	b.VCPUs = b.VCPUs[:1]
	b.VCPUs[0].XSave = append(b.VCPUs[0].XSave, make([]byte, 64)...)
	b.VCPUs[0].MSRs = b.VCPUs[0].MSRs[1:]
	b.VCPUs[0].CPUID = append(b.VCPUs[0].CPUID, kvm.CPUIDEntry{Function: 0x40000000})
	got := Diff(a, b, true)
	paths := make([]string, len(got))
	for i, d := range got {
		paths[i] = d.Path
	}
	want := []string{
		"vcpu[0].xsave.len", "vcpu[0].xsave[0x1000:0x1040]",
		"vcpu[0].msr[" + MSRName(a.VCPUs[0].MSRs[0].Index) + "]",
		"vcpu[0].cpuid[0x40000000/0x0]",
		"vcpu[1]",
	}
	if !reflect.DeepEqual(paths, want) {
		t.Errorf("paths %q, want %q", paths, want)
	}
	if got[1].A != absent || got[4].B != absent {
		t.Errorf("absent values: %v", got)
	}
}

func TestSnakeCase(t *testing.T) {
	for in, want := range map[string]string{
		"InterruptBitmap": "interrupt_bitmap", "APICBase": "apic_base", "NrXCRs": "nr_xcrs",
		"CR0": "cr0", "PDPTRs": "pdptrs", "THREPending": "thre_pending", "LastIP": "last_ip",
		"CountLoadTime": "count_load_time", "SMMInsideNMI": "smm_inside_nmi", "RWMode": "rw_mode",
		"IRQBase": "irq_base", "Init4": "init4", "RIP": "rip", "ID": "id", "CPUs": "cpus",
		"CPUIDFingerprint": "cpuid_fingerprint", "TSCKHz": "tsc_khz", "RedirTbl": "redir",
	} {
		if got := snakeCase(in); got != want {
			t.Errorf("snakeCase(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestMSRName(t *testing.T) {
	for idx, want := range map[uint32]string{
		0xc0000080: "EFER", 0xc0000082: "LSTAR", 0x10: "TSC", 0x6e0: "TSC_DEADLINE",
		0x4b564d01: "KVM_SYSTEM_TIME_NEW", 0x4b564d05: "KVM_POLL_CONTROL", 0x205: "MTRRphysMask2",
		0x268: "MTRRfix4K_C0000", 0x2ff: "MTRRdefType", 0x405: "MC1_STATUS", 0x808: "X2APIC_080",
		0xc0011029: "0xc0011029", 0x6a2: "S_CET", 0xda0: "XSS",
	} {
		if got := MSRName(idx); got != want {
			t.Errorf("MSRName(%#x) = %q, want %q", idx, got, want)
		}
	}
}

func TestDescribe(t *testing.T) {
	rng := rand.New(rand.NewPCG(37, 38))
	m := randomMachine(rng, 2, 4096)
	v := &m.VCPUs[0]
	v.Regs.RIP = 0xffffffff81000000
	v.Regs.RFLAGS = 0x246
	v.Sregs.CR0 = 0x80050033
	v.Sregs.EFER = 0xd01
	v.Sregs.CS.L = 1
	v.Sregs.APICBase = 0xfee00900
	v.MSRs = []kvm.MSREntry{{Index: 0x10, Data: 12345}, {Index: 0xc0000082, Data: 0xffffffff81a00080}}
	v.MPState.State = kvm.MPStateHalted
	v.Events = kvm.VCPUEvents{}
	v.Events.Exception.Injected, v.Events.Exception.Nr, v.Events.Exception.HasErrorCode, v.Events.Exception.ErrorCode = 1, 14, 1, 2
	v.CPUID = []kvm.CPUIDEntry{{Function: 0, EAX: 0x1f, EBX: 0x756e6547, EDX: 0x49656e69, ECX: 0x6c65746e}}
	v.LAPIC = kvm.LAPICState{}
	v.LAPIC.Regs[0x23] = 0                           // id 0
	v.LAPIC.Regs[0xf0], v.LAPIC.Regs[0xf1] = 0xff, 1 // SVR enabled
	v.LAPIC.Regs[0x210] = 1                          // IRR: bit 0 of the second register is vector 32
	v.LAPIC.Regs[0x390] = 0x10
	x := make([]byte, 4096)
	x[512] = 7 // XSTATE_BV x87|sse|avx
	x[576+16*3] = 1
	v.XSave = x
	m.IOAPIC.RedirTbl[4] = 0x0100_0000_0000_a030 // vector 0x30, level, low... dest 1
	m.Header.CPUIDFingerprint = CPUIDFingerprint(v.CPUID)
	rep := Describe(m)
	rep.AddMemory(MemorySummary{Size: 2 << 20, NonZeroPages: 3})

	vr := rep.VCPUs[0]
	if vr.Mode != "64-bit long mode" || vr.MPState != "halted" {
		t.Errorf("mode %q state %q", vr.Mode, vr.MPState)
	}
	if vr.MSRs[1].Name != "LSTAR" || vr.CPUID.Vendor != "GenuineIntel" {
		t.Errorf("msrs %v vendor %q", vr.MSRs, vr.CPUID.Vendor)
	}
	if !vr.LAPIC.Enabled || !slices.Equal(vr.LAPIC.IRR, []int{32}) || vr.LAPIC.TimerCurrentCount != 0x10 {
		t.Errorf("lapic %+v", vr.LAPIC)
	}
	if vr.XSave == nil || !slices.Equal(vr.XSave.Components, []string{"x87", "sse", "avx"}) || vr.XSave.NonZeroYMMHigh != 1 {
		t.Errorf("xsave %+v", vr.XSave)
	}
	if len(vr.Events.Summary) == 0 || vr.Events.Summary[0] != "exception 14 injected (error code 0x2)" {
		t.Errorf("events %q", vr.Events.Summary)
	}
	if r := rep.IOAPIC.Redir[4]; r.Vector != 0x30 || r.Trigger != "level" || r.Polarity != "low" || r.Masked || r.Dest != 1 {
		t.Errorf("redir %+v", r)
	}
	if !slices.Equal(vr.Regs.RFLAGSBits, []string{"PF", "ZF", "IF"}) || !slices.Equal(vr.Control.EFERBits, []string{"SCE", "LME", "LMA", "NXE"}) {
		t.Errorf("rflags %v efer %v", vr.Regs.RFLAGSBits, vr.Control.EFERBits)
	}

	js, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"rip":"0xffffffff81000000"`, `"name":"LSTAR"`, `"non_zero_pages":3`, `"delivery_mode":"fixed"`} {
		if !strings.Contains(string(js), want) {
			t.Errorf("JSON lacks %s", want)
		}
	}
	var back Report
	if err := json.Unmarshal(js, &back); err != nil || !reflect.DeepEqual(&back, rep) {
		t.Errorf("JSON does not round-trip: %v", err)
	}

	var buf bytes.Buffer
	if err := rep.WriteText(&buf); err != nil {
		t.Fatal(err)
	}
	text := buf.String()
	for _, want := range []string{
		"vcpu 0: halted, 64-bit long mode", "rip 0xffffffff81000000  rflags 0x246 [PF ZF IF]",
		"LSTAR", "0xffffffff81a00080", "efer 0xd01 [SCE LME LMA NXE]", "exception 14 injected",
		"pin  4:", "vector 0x30 fixed", "memory: 2 MiB, 3 non-zero pages", "xstate_bv 0x7 [x87 sse avx]",
		"vendor \"GenuineIntel\"",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("text lacks %q", want)
		}
	}
	if testing.Verbose() {
		t.Log("\n" + text)
	}
}
