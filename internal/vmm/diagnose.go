package vmm

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// Local APIC register offsets read by Diagnose.
const (
	lapicTPR        = 0x80
	lapicISR        = 0x100
	lapicIRR        = 0x200
	lapicLVTTimer   = 0x320
	lapicTimerInit  = 0x380
	lapicTimerCount = 0x390
	lapicTimerDiv   = 0x3e0
)

// Diagnose describes every vCPU for a report about a guest that stopped
// making progress: registers, run state, pending events and the local
// APIC's timer and interrupt registers. A running VM is paused for the
// reading and resumed afterwards; a VM that ended is read as it is.
func (v *VM) Diagnose() string {
	if v.Pause() == nil {
		defer v.Resume()
	}
	var b strings.Builder
	for i, c := range v.cpus {
		fmt.Fprintf(&b, "vcpu %d: %s\n", i, registerDump(c.kvm))
		if mp, err := c.kvm.GetMPState(); err == nil {
			fmt.Fprintf(&b, "vcpu %d: mp_state=%s", i, mpStateName(mp.State))
		}
		if e, err := c.kvm.GetVCPUEvents(); err == nil {
			fmt.Fprintf(&b, " exception(injected=%d pending=%d nr=%d) interrupt(injected=%d nr=%d shadow=%d) nmi(injected=%d pending=%d masked=%d) triple_fault_pending=%d",
				e.Exception.Injected, e.Exception.Pending, e.Exception.Nr, e.Interrupt.Injected, e.Interrupt.Nr,
				e.Interrupt.Shadow, e.NMI.Injected, e.NMI.Pending, e.NMI.Masked, e.TripleFaultPending)
		}
		b.WriteString("\n")
		if l, err := c.kvm.GetLAPIC(); err == nil {
			reg := func(off int) uint32 { return binary.LittleEndian.Uint32(l.Regs[off:]) }
			fmt.Fprintf(&b, "vcpu %d: lapic tpr=%#x lvt_timer=%#x timer_init=%d timer_count=%d timer_div=%#x isr=%s irr=%s\n",
				i, reg(lapicTPR), reg(lapicLVTTimer), reg(lapicTimerInit), reg(lapicTimerCount), reg(lapicTimerDiv),
				vectorList(l.Regs[:], lapicISR), vectorList(l.Regs[:], lapicIRR))
		}
	}
	return b.String()
}

// vectorList names the set bits of a 256-bit APIC register array (ISR,
// IRR), stored as eight 32-bit words 16 bytes apart.
func vectorList(regs []byte, base int) string {
	var vs []string
	for w := 0; w < 8; w++ {
		word := binary.LittleEndian.Uint32(regs[base+16*w:])
		for bit := 0; bit < 32; bit++ {
			if word&(1<<bit) != 0 {
				vs = append(vs, fmt.Sprint(32*w+bit))
			}
		}
	}
	return "[" + strings.Join(vs, " ") + "]"
}

func mpStateName(s uint32) string {
	switch s {
	case kvm.MPStateRunnable:
		return "runnable"
	case kvm.MPStateUninitialized:
		return "uninitialized"
	case kvm.MPStateInitReceived:
		return "init-received"
	case kvm.MPStateHalted:
		return "halted"
	case kvm.MPStateSIPIReceived:
		return "sipi-received"
	}
	return fmt.Sprint(s)
}
