package vmm

import (
	"fmt"
	"math/bits"

	"github.com/ferry-vmm/ferry/internal/boot"
	"github.com/ferry-vmm/ferry/internal/kvm"
)

// CPUID leaves ferry edits for the guest.
const (
	leafFeatures      = 0x1
	leafCacheTopology = 0x4
	leafExtTopology   = 0xb
	leafV2Topology    = 0x1f
	leafHypervisor    = 0x40000000
	leafTiming        = 0x40000010 // TSC and APIC bus frequency in kHz

	// KVM's local APIC timer counts at 1 GHz (APIC_BUS_CYCLE_NS = 1).
	apicBusKHz = 1_000_000
)

// guestCPUID derives the CPUID table vCPU id sees from the host's supported
// leaves: APIC ID and topology for ncpus single-threaded cores in one
// package, the hypervisor bit, and a timing leaf with the TSC frequency so
// guests need not calibrate.
func guestCPUID(supported []kvm.CPUIDEntry, id, ncpus int, tscKHz uint32) []kvm.CPUIDEntry {
	out := make([]kvm.CPUIDEntry, 0, len(supported)+1)
	coreBits := uint32(bits.Len(uint(ncpus - 1)))
	haveTiming := false
	for _, e := range supported {
		switch e.Function {
		case leafFeatures:
			e.EBX = e.EBX&0x0000ffff | uint32(id)<<24 | uint32(ncpus)<<16
			e.ECX |= 1 << 31 // running under a hypervisor
			if ncpus > 1 {
				e.EDX |= 1 << 28 // HTT: the logical count in EBX is valid
			}
		case leafCacheTopology:
			e.EAX = e.EAX&^(0x3f<<26) | uint32(ncpus-1)<<26
		case leafExtTopology, leafV2Topology:
			switch e.Index {
			case 0: // SMT level: one thread per core
				e.EAX, e.EBX, e.ECX = 0, 1, 1<<8|e.Index
			case 1: // core level
				e.EAX, e.EBX, e.ECX = coreBits, uint32(ncpus), 2<<8|e.Index
			default:
				e.EAX, e.EBX, e.ECX = 0, 0, e.Index
			}
			e.EDX = uint32(id)
		case leafHypervisor:
			if e.EAX < leafTiming {
				e.EAX = leafTiming
			}
		case leafTiming:
			haveTiming = true
			e.EAX, e.EBX = tscKHz, apicBusKHz
		}
		out = append(out, e)
	}
	if !haveTiming && tscKHz != 0 {
		out = append(out, kvm.CPUIDEntry{Function: leafTiming, EAX: tscKHz, EBX: apicBusKHz})
	}
	return out
}

// Segment descriptors for the entry states.
func flatSegment(sel uint16, code, long bool) kvm.Segment {
	s := kvm.Segment{Base: 0, Limit: 0xffffffff, Selector: sel, Present: 1, S: 1, G: 1, Type: 0x3}
	if code {
		s.Type = 0xb
	}
	if long {
		s.L = 1
	} else {
		s.DB = 1
	}
	return s
}

// entryState turns the loader's description of the boot CPU into KVM
// register values.
func entryState(e *boot.Entry, sregs kvm.Sregs) (kvm.Regs, kvm.Sregs, error) {
	regs := kvm.Regs{RIP: e.RIP, RSP: e.RSP, RBX: e.RBX, RSI: e.RSI, RFLAGS: 2}
	sregs.GDT = kvm.DTable{Base: e.GDTBase, Limit: e.GDTLimit}
	sregs.IDT = kvm.DTable{}
	sregs.TR = kvm.Segment{Limit: 0xffff, Type: 0xb, Present: 1}
	sregs.LDT = kvm.Segment{Limit: 0xffff, Type: 0x2, Present: 1}
	switch e.Mode {
	case boot.ModePVH32:
		code := flatSegment(e.CodeSelector, true, false)
		data := flatSegment(e.DataSelector, false, false)
		sregs.CS, sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS = code, data, data, data, data, data
	case boot.ModeLinux64:
		code := flatSegment(e.CodeSelector, true, true)
		data := flatSegment(e.DataSelector, false, false)
		sregs.CS, sregs.DS, sregs.ES, sregs.FS, sregs.GS, sregs.SS = code, data, data, data, data, data
		sregs.CR3 = e.CR3
	default:
		return regs, sregs, fmt.Errorf("unknown boot mode %d", e.Mode)
	}
	sregs.CR0, sregs.CR4, sregs.EFER = e.CR0, e.CR4, e.EFER
	return regs, sregs, nil
}

// LAPIC register offsets used at set-up.
const (
	lapicLVTLINT0  = 0x350
	lapicLVTLINT1  = 0x360
	apicModeExtINT = 0x7 << 8
	apicModeNMI    = 0x4 << 8
)

// setupLAPIC wires LINT0 as ExtINT (the PIC's output, virtual wire mode)
// and LINT1 as NMI, as firmware does on a PC.
func setupLAPIC(c *kvm.VCPU) error {
	l, err := c.GetLAPIC()
	if err != nil {
		return err
	}
	put := func(off int, v uint32) {
		l.Regs[off] = byte(v)
		l.Regs[off+1] = byte(v >> 8)
		l.Regs[off+2] = byte(v >> 16)
		l.Regs[off+3] = byte(v >> 24)
	}
	get := func(off int) uint32 {
		return uint32(l.Regs[off]) | uint32(l.Regs[off+1])<<8 | uint32(l.Regs[off+2])<<16 | uint32(l.Regs[off+3])<<24
	}
	put(lapicLVTLINT0, get(lapicLVTLINT0)&^0x700|apicModeExtINT)
	put(lapicLVTLINT1, get(lapicLVTLINT1)&^0x700|apicModeNMI)
	return c.SetLAPIC(l)
}

// registerDump formats a vCPU's registers for an error message about a
// guest that broke.
func registerDump(c *kvm.VCPU) string {
	r, err := c.GetRegs()
	if err != nil {
		return "registers unavailable: " + err.Error()
	}
	s, err := c.GetSregs()
	if err != nil {
		return "special registers unavailable: " + err.Error()
	}
	return formatRegisters(r, s)
}

func formatRegisters(r kvm.Regs, s kvm.Sregs) string {
	dump := fmt.Sprintf("rip=%#x rsp=%#x rflags=%#x rax=%#x rbx=%#x rcx=%#x rdx=%#x rsi=%#x rdi=%#x rbp=%#x "+
		"cs=%#x(base %#x l=%d db=%d dpl=%d) ss=%#x cr0=%#x cr2=%#x cr3=%#x cr4=%#x efer=%#x gdt=%#x/%#x idt=%#x/%#x",
		r.RIP, r.RSP, r.RFLAGS, r.RAX, r.RBX, r.RCX, r.RDX, r.RSI, r.RDI, r.RBP,
		s.CS.Selector, s.CS.Base, s.CS.L, s.CS.DB, s.CS.DPL, s.SS.Selector,
		s.CR0, s.CR2, s.CR3, s.CR4, s.EFER, s.GDT.Base, s.GDT.Limit, s.IDT.Base, s.IDT.Limit)
	if atINITState(r, s) {
		dump += " (the state INIT leaves: on AMD SVM hosts KVM INITs a vCPU that triple-faulted before it reports KVM_EXIT_SHUTDOWN, so these are not the registers it faulted with)"
	}
	return dump
}

// atINITState reports registers that are exactly what INIT leaves in a
// vCPU: CS 0xf000 based at 0xffff0000, RIP 0xfff0, CR0 ET (CD and NW as
// they were). SVM leaves the VMCB undefined after a shutdown intercept,
// so KVM on AMD resets the vCPU (kvm_vcpu_reset(vcpu, true) in svm.c's
// shutdown_interception) before KVM_RUN returns KVM_EXIT_SHUTDOWN: a
// triple fault there reads back as this state, which is not where the
// guest was. (On Intel the registers are the faulting ones.)
func atINITState(r kvm.Regs, s kvm.Sregs) bool {
	const cdNW = 0x60000000 // INIT keeps CR0.CD and CR0.NW as they were
	return r.RIP == 0xfff0 && s.CS.Selector == 0xf000 && s.CS.Base == 0xffff0000 && s.CR0&^cdNW == 0x10
}
