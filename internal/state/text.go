package state

import (
	"bufio"
	"fmt"
	"io"
	"strings"
)

// WriteText renders the report for people: one block per vCPU, then the
// interrupt controllers, timers, devices, the PCI bus and memory.
func (r *Report) WriteText(w io.Writer) error {
	b := bufio.NewWriter(w)
	p := func(format string, args ...any) { fmt.Fprintf(b, format, args...) }

	h := &r.Header
	p("ferry state: format %d, %s, %d vCPUs, %s of memory\n", h.FormatVersion, h.Arch, h.CPUs, sizeString(h.MemSize))
	p("  producer %q, created %s, flags %s%s\n", h.Producer, h.Created, h.Flags, bracket(h.FlagNames))
	p("  cpuid fingerprint %s\n", h.CPUIDFingerprint)
	for i, rg := range h.Regions {
		p("  region %d: gpa [%s, %s) %s at memfd offset %s\n", i, rg.GPA, Hex(uint64(rg.GPA)+uint64(rg.Size)), sizeString(uint64(rg.Size)), rg.Offset)
	}

	for i := range r.VCPUs {
		writeVCPU(p, &r.VCPUs[i])
	}

	for i, name := range []string{"master", "slave"} {
		c := &r.PIC[i]
		p("\npic %s: irr %s imr %s isr %s base %s elcr %s (mask %s) init_state %d auto_eoi %d last_irr %s\n",
			name, c.IRR, c.IMR, c.ISR, c.IRQBase, c.ELCR, c.ELCRMask, c.InitState, c.AutoEOI, c.LastIRR)
		p("  priority_add %d read_reg_select %d poll %d special_mask %d rotate_on_auto_eoi %d sfnm %d init4 %d\n",
			c.PriorityAdd, c.ReadRegSelect, c.Poll, c.SpecialMask, c.RotateOnAutoEOI, c.SpecialFullyNestedMode, c.Init4)
	}
	a := &r.IOAPIC
	p("\nioapic: id %d base %s irr %s\n", a.ID, a.BaseAddress, a.IRR)
	for _, e := range a.Redir {
		mask := ""
		if e.Masked {
			mask = " masked"
		}
		extra := ""
		if e.RemoteIRR {
			extra += " remote-irr"
		}
		if e.Pending {
			extra += " pending"
		}
		p("  pin %2d: 0x%016x vector 0x%02x %-6s %-8s %-5s %-4s dest 0x%02x%s%s\n",
			e.Pin, uint64(e.Raw), e.Vector, e.DeliveryMode, e.DestMode, e.Trigger, e.Polarity, e.Dest, mask, extra)
	}
	t := &r.PIT
	p("\npit: flags %s (hpet legacy %v)\n", t.Flags, t.HPETLegacy)
	for i, c := range t.Channels {
		p("  channel %d: count %d mode %d gate %d rw_mode %d bcd %d status %s latched %d/%d (count %d) read/write state %d/%d write_latch %d load_time %d\n",
			i, c.Count, c.Mode, c.Gate, c.RWMode, c.BCD, c.Status, c.CountLatched, c.StatusLatched, c.LatchedCount,
			c.ReadState, c.WriteState, c.WriteLatch, c.CountLoadTime)
	}
	c := &r.Clock
	p("\nkvmclock: %d ns, flags %s%s, realtime %d ns, host tsc %d\n", c.ClockNs, c.Flags, bracket(c.FlagNames), c.Realtime, c.HostTSC)

	d := &r.Devices
	s := &d.Serial
	p("\nserial: ier %s fcr %s lcr %s mcr %s lsr %s msr %s scr %s divisor %d thre_pending %v\n",
		s.IER, s.IIRFCR, s.LCR, s.MCR, s.LSR, s.MSR, s.SCR, s.Divisor, s.THREPending)
	p("  rx fifo %d bytes, backlog %d bytes, dropped %d, write errors %d\n", s.RXFIFO, s.Backlog, s.Dropped, s.WriteErrors)
	m := &d.CMOS
	p("cmos: index %s nmi_disabled %v status A %s B %s C %s D %s clock offset %s\n",
		m.Index, m.NMIDisabled, m.StatusA, m.StatusB, m.StatusC, m.StatusD, m.ClockOffset)
	for i := 0; i+32 <= len(m.RAM); i += 32 {
		p("  ram %02x: %s\n", i/2, m.RAM[i:i+32])
	}
	k := &d.I8042
	p("i8042: ctr %s output_port %s last_was_command %v pending_command %s last_data %s resets %d dropped %d\n",
		k.CTR, k.OutputPort, k.LastWasCommand, k.PendingCommand, k.LastData, k.Resets, k.Dropped)
	if len(k.Output) > 0 {
		p("  output queue: %s\n", strings.Join(k.Output, ", "))
	}
	p("post: last %s, %d writes\n", d.Post.Last, d.Post.Writes)

	if r.PCI != nil {
		writePCI(p, r.PCI)
	}

	if r.Memory != nil {
		p("\nmemory: %s, %d non-zero pages, sha256 %s\n", sizeString(r.Memory.Size), r.Memory.NonZeroPages, r.Memory.SHA256)
	}
	return b.Flush()
}

func writeVCPU(p func(string, ...any), v *VCPUReport) {
	p("\nvcpu %d: %s, %s, tsc %d kHz\n", v.ID, v.MPState, v.Mode, v.TSCKHz)
	g := &v.Regs
	regs := []struct {
		n string
		v Hex
	}{
		{"rax", g.RAX}, {"rbx", g.RBX}, {"rcx", g.RCX}, {"rdx", g.RDX},
		{"rsi", g.RSI}, {"rdi", g.RDI}, {"rsp", g.RSP}, {"rbp", g.RBP},
		{"r8", g.R8}, {"r9", g.R9}, {"r10", g.R10}, {"r11", g.R11},
		{"r12", g.R12}, {"r13", g.R13}, {"r14", g.R14}, {"r15", g.R15},
	}
	for i := 0; i < len(regs); i += 4 {
		p("  ")
		for _, r := range regs[i : i+4] {
			p("%-3s 0x%016x  ", r.n, uint64(r.v))
		}
		p("\n")
	}
	p("  rip 0x%016x  rflags %#x%s\n", uint64(g.RIP), uint64(g.RFLAGS), bracket(g.RFLAGSBits))
	for _, s := range v.Segs {
		attrs := []string{fmt.Sprintf("type %#x", s.Type), fmt.Sprintf("dpl %d", s.DPL)}
		for _, f := range []struct {
			on bool
			n  string
		}{{s.Present, "P"}, {s.S, "S"}, {s.L, "L"}, {s.DB, "DB"}, {s.G, "G"}, {s.AVL, "AVL"}, {s.Unusable, "unusable"}} {
			if f.on {
				attrs = append(attrs, f.n)
			}
		}
		p("  %-3s sel 0x%04x base 0x%016x limit 0x%08x %s\n", s.Name, uint64(s.Selector), uint64(s.Base), uint64(s.Limit), strings.Join(attrs, " "))
	}
	p("  gdt base 0x%016x limit 0x%04x   idt base 0x%016x limit 0x%04x\n", uint64(v.GDT.Base), uint64(v.GDT.Limit), uint64(v.IDT.Base), uint64(v.IDT.Limit))
	ct := &v.Control
	p("  cr0 %s%s cr2 %s cr3 %s\n", ct.CR0, bracket(ct.CR0Bits), ct.CR2, ct.CR3)
	p("  cr4 %s%s cr8 %s\n", ct.CR4, bracket(ct.CR4Bits), ct.CR8)
	p("  efer %s%s apic_base %s%s\n", ct.EFER, bracket(ct.EFERBits), ct.APICBase, bracket(ct.APICBaseBits))
	if len(ct.PDPTRs) > 0 {
		p("  pdptrs %s\n", hexList(ct.PDPTRs))
	}
	if len(v.PendingInterrupts) > 0 {
		p("  pending interrupt bitmap: %s\n", vectorList(v.PendingInterrupts))
	}
	p("  msrs (%d):\n", len(v.MSRs))
	for _, m := range v.MSRs {
		p("    %-22s %-12s %#x\n", m.Name, m.Index, uint64(m.Value))
	}
	f := &v.FPU
	p("  fpu: fcw %s fsw %s ftw %s mxcsr %s last op %s ip %s dp %s; %d of 8 st, %d of 16 xmm non-zero\n",
		f.FCW, f.FSW, f.FTW, f.MXCSR, f.LastOpcode, f.LastIP, f.LastDP, f.NonZeroST, f.NonZeroXMM)
	if x := v.XSave; x != nil {
		ymm := "n/a"
		if x.NonZeroYMMHigh >= 0 {
			ymm = fmt.Sprintf("%d of 16", x.NonZeroYMMHigh)
		}
		form := "standard"
		if x.Compacted {
			form = "compacted"
		}
		p("  xsave: %d bytes (%s), xstate_bv %s%s xcomp_bv %s, non-zero ymm upper halves %s\n",
			x.Size, form, x.XStateBV, bracket(x.Components), x.XCompBV, ymm)
	} else {
		p("  xsave: none\n")
	}
	for _, x := range v.XCRs {
		p("  xcr%d %s\n", x.Index, x.Value)
	}
	l := &v.LAPIC
	en := "disabled"
	if l.Enabled {
		en = "enabled"
	}
	mode := "xapic"
	if l.X2APIC {
		mode = "x2apic"
	}
	p("  lapic: id %d (%s) version %s %s, tpr %s ppr %s ldr %s dfr %s svr %s esr %s icr %s\n",
		l.ID, mode, l.Version, en, l.TPR, l.PPR, l.LDR, l.DFR, l.SVR, l.ESR, l.ICR)
	p("    lvt timer %s (%s) initial %d current %d divide %s\n", l.LVTTimer, l.TimerMode, l.TimerInitialCount, l.TimerCurrentCount, l.TimerDivide)
	p("    lvt thermal %s perf %s lint0 %s lint1 %s error %s\n", l.LVTThermal, l.LVTPerf, l.LVTLINT0, l.LVTLINT1, l.LVTError)
	p("    isr %s  irr %s  tmr %s\n", vectorList(l.ISR), vectorList(l.IRR), vectorList(l.TMR))
	ev := "none pending"
	if len(v.Events.Summary) > 0 {
		ev = strings.Join(v.Events.Summary, ", ")
	}
	p("  events: %s\n", ev)
	db := &v.Debug
	p("  debug: dr0 %s dr1 %s dr2 %s dr3 %s dr6 %s dr7 %s\n", db.DR[0], db.DR[1], db.DR[2], db.DR[3], db.DR6, db.DR7)
	p("  cpuid: %d entries, vendor %q, max leaf %s, fingerprint %s\n", v.CPUID.Entries, v.CPUID.Vendor, v.CPUID.MaxLeaf, v.CPUID.Fingerprint)
}

func bracket(names []string) string {
	if len(names) == 0 {
		return ""
	}
	return " [" + strings.Join(names, " ") + "]"
}

func hexList(v []Hex) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = x.String()
	}
	return strings.Join(s, " ")
}

func vectorList(v []int) string {
	if len(v) == 0 {
		return "none"
	}
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf("0x%02x", x)
	}
	return strings.Join(s, " ")
}

// sizeString renders a byte count the way people write memory sizes.
func sizeString(n uint64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}

func writePCI(p func(string, ...any), r *PCIReport) {
	p("\npci: conf1 address %s, %d slots, %d virtio functions\n", r.Conf1Address, len(r.Slots), len(r.Virtio))
	for _, s := range r.Slots {
		p("  slot %d %q: %04x:%04x class %06x command %s%s status %s\n", s.Slot, s.Name,
			uint64(s.VendorID), uint64(s.DeviceID), uint64(s.Class), s.Command, bracket(s.CommandBits), s.Status)
		for _, b := range s.BARs {
			pf := ""
			if b.Prefetchable {
				pf = " prefetchable"
			}
			p("    bar %d: %s at %s%s\n", b.Index, b.Kind, b.Address, pf)
		}
	}
	for _, v := range r.Virtio {
		p("  virtio at slot %d: %s, status %s%s\n", v.Slot, v.TypeName, v.Status, bracket(v.StatusBits))
		p("    features offered %s%s\n", v.OfferedFeatures, bracket(v.OfferedNames))
		p("    features accepted %s%s\n", v.DriverFeatures, bracket(v.DriverNames))
		p("    feature select device %d driver %d, queue select %d, config generation %d (changed %v), isr %s\n",
			v.DeviceFeatureSelect, v.DriverFeatureSelect, v.QueueSelect, v.ConfigGeneration, v.ConfigChanged, v.ISR)
		p("    msi-x: %d vectors, config vector %s, masked %s, pending %s; device state %d bytes\n",
			v.MSIXVectors, vectorName(v.MSIXConfig), intList(v.MSIXMasked), intList(v.MSIXPending), v.DeviceStateBytes)
		for _, q := range v.Queues {
			en := "disabled"
			if q.Enabled {
				en = "enabled"
			}
			sig := ""
			if q.SignalledValid {
				sig = fmt.Sprintf(" signalled %d", q.SignalledUsed)
			}
			p("    queue %d: size %d %s vector %s desc %s driver %s device %s next avail %d used %d%s\n",
				q.Index, q.Size, en, vectorName(q.Vector), q.Desc, q.Driver, q.Device, q.NextAvail, q.NextUsed, sig)
		}
	}
}

// vectorName renders an MSI-X vector number, 0xffff as "none".
func vectorName(v Hex) string {
	if v == 0xffff {
		return "none"
	}
	return fmt.Sprint(uint64(v))
}

func intList(v []int) string {
	if len(v) == 0 {
		return "none"
	}
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprint(x)
	}
	return strings.Join(s, " ")
}
