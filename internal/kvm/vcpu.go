package kvm

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VCPU is a KVM vCPU file descriptor and its kvm_run page. Apart from Kick
// paths that only touch kvm_run, its methods must be called from the OS
// thread that runs it (KVM requires vCPU ioctls from one thread at a time,
// and KVM_RUN is fastest when the thread does not change).
type VCPU struct {
	ID  int
	fd  int
	run Run
	vm  *VM
}

// Run returns the shared kvm_run page.
func (c *VCPU) RunData() *Run { return &c.run }

// Close unmaps kvm_run and closes the vCPU fd.
func (c *VCPU) Close() error {
	return errors.Join(unix.Munmap(c.run.page), unix.Close(c.fd))
}

// Run enters the guest until the next exit. It returns unix.EINTR (wrapped)
// when a signal or immediate_exit interrupted it.
func (c *VCPU) Run() error {
	_, err := ioctl(c.fd, ioRun, 0)
	return err
}

func (c *VCPU) get(req uintptr, p unsafe.Pointer, name string) error {
	return wrap(fmt.Sprintf("vCPU %d %s", c.ID, name), ioctlPtr(c.fd, req, p))
}

// GetRegs reads the general registers.
func (c *VCPU) GetRegs() (Regs, error) {
	var r Regs
	return r, c.get(ioGetRegs, unsafe.Pointer(&r), "KVM_GET_REGS")
}

// SetRegs writes the general registers.
func (c *VCPU) SetRegs(r Regs) error { return c.get(ioSetRegs, unsafe.Pointer(&r), "KVM_SET_REGS") }

// GetSregs reads the special registers.
func (c *VCPU) GetSregs() (Sregs, error) {
	var s Sregs
	return s, c.get(ioGetSregs, unsafe.Pointer(&s), "KVM_GET_SREGS")
}

// SetSregs writes the special registers.
func (c *VCPU) SetSregs(s Sregs) error { return c.get(ioSetSregs, unsafe.Pointer(&s), "KVM_SET_SREGS") }

// GetSregs2 reads the special registers with PDPTRs (KVM_CAP_SREGS2).
func (c *VCPU) GetSregs2() (Sregs2, error) {
	var s Sregs2
	return s, c.get(ioGetSregs2, unsafe.Pointer(&s), "KVM_GET_SREGS2")
}

// SetSregs2 writes the special registers with PDPTRs (KVM_CAP_SREGS2).
func (c *VCPU) SetSregs2(s Sregs2) error {
	return c.get(ioSetSregs2, unsafe.Pointer(&s), "KVM_SET_SREGS2")
}

// GetFPU reads the x87/SSE state.
func (c *VCPU) GetFPU() (FPU, error) {
	var f FPU
	return f, c.get(ioGetFPU, unsafe.Pointer(&f), "KVM_GET_FPU")
}

// SetFPU writes the x87/SSE state.
func (c *VCPU) SetFPU(f FPU) error { return c.get(ioSetFPU, unsafe.Pointer(&f), "KVM_SET_FPU") }

// GetXSave reads the XSAVE area. size is VM.XSaveSize(); above 4096 bytes
// KVM_GET_XSAVE2 is used so that dynamically enabled components (AMX) are
// included.
func (c *VCPU) GetXSave(size int) ([]byte, error) {
	if size < 4096 {
		size = 4096
	}
	buf := make([]byte, size)
	req, name := ioGetXSave, "KVM_GET_XSAVE"
	if size > 4096 || c.vm.CheckExtension(CapXSave2) != 0 {
		req, name = ioGetXSave2, "KVM_GET_XSAVE2"
	}
	return buf, c.get(req, unsafe.Pointer(&buf[0]), name)
}

// SetXSave writes an XSAVE area previously read with GetXSave.
func (c *VCPU) SetXSave(area []byte) error {
	if len(area) < 4096 {
		return fmt.Errorf("vCPU %d KVM_SET_XSAVE: area of %d bytes, need at least 4096", c.ID, len(area))
	}
	if want := c.vm.XSaveSize(); len(area) < want {
		// The kernel reads XSaveSize bytes; never let it read past our buffer.
		area = append(append([]byte(nil), area...), make([]byte, want-len(area))...)
	}
	return c.get(ioSetXSave, unsafe.Pointer(&area[0]), "KVM_SET_XSAVE")
}

// GetXCRs reads the extended control registers (XCR0).
func (c *VCPU) GetXCRs() (XCRs, error) {
	var x XCRs
	return x, c.get(ioGetXCRs, unsafe.Pointer(&x), "KVM_GET_XCRS")
}

// SetXCRs writes the extended control registers.
func (c *VCPU) SetXCRs(x XCRs) error { return c.get(ioSetXCRs, unsafe.Pointer(&x), "KVM_SET_XCRS") }

// GetMSRs reads the MSRs whose indices are given; it returns how many were
// read (KVM stops at the first it cannot read).
func (c *VCPU) GetMSRs(entries []MSREntry) (int, error) {
	return c.msrs(ioGetMSRs, entries, "KVM_GET_MSRS")
}

// SetMSRs writes MSRs; it returns how many were written.
func (c *VCPU) SetMSRs(entries []MSREntry) (int, error) {
	return c.msrs(ioSetMSRs, entries, "KVM_SET_MSRS")
}

func (c *VCPU) msrs(req uintptr, entries []MSREntry, name string) (int, error) {
	if len(entries) == 0 {
		return 0, nil
	}
	hdr := int(unsafe.Sizeof(msrsHeader{}))
	es := int(unsafe.Sizeof(MSREntry{}))
	buf := make([]byte, hdr+len(entries)*es)
	(*msrsHeader)(unsafe.Pointer(&buf[0])).NMSRs = uint32(len(entries))
	dst := unsafe.Slice((*MSREntry)(unsafe.Pointer(&buf[hdr])), len(entries))
	copy(dst, entries)
	n, err := ioctl(c.fd, req, uintptr(unsafe.Pointer(&buf[0])))
	if err != nil {
		return 0, wrap(fmt.Sprintf("vCPU %d %s", c.ID, name), err)
	}
	copy(entries, dst)
	return int(n), nil
}

// GetLAPIC reads the local APIC register page.
func (c *VCPU) GetLAPIC() (LAPICState, error) {
	var l LAPICState
	return l, c.get(ioGetLAPIC, unsafe.Pointer(&l), "KVM_GET_LAPIC")
}

// SetLAPIC writes the local APIC register page.
func (c *VCPU) SetLAPIC(l LAPICState) error {
	return c.get(ioSetLAPIC, unsafe.Pointer(&l), "KVM_SET_LAPIC")
}

// GetVCPUEvents reads pending/injected events.
func (c *VCPU) GetVCPUEvents() (VCPUEvents, error) {
	var e VCPUEvents
	return e, c.get(ioGetVCPUEvents, unsafe.Pointer(&e), "KVM_GET_VCPU_EVENTS")
}

// SetVCPUEvents writes pending/injected events.
func (c *VCPU) SetVCPUEvents(e VCPUEvents) error {
	return c.get(ioSetVCPUEvents, unsafe.Pointer(&e), "KVM_SET_VCPU_EVENTS")
}

// GetDebugRegs reads DR0-3, DR6, DR7.
func (c *VCPU) GetDebugRegs() (DebugRegs, error) {
	var d DebugRegs
	return d, c.get(ioGetDebugRegs, unsafe.Pointer(&d), "KVM_GET_DEBUGREGS")
}

// SetDebugRegs writes the debug registers.
func (c *VCPU) SetDebugRegs(d DebugRegs) error {
	return c.get(ioSetDebugRegs, unsafe.Pointer(&d), "KVM_SET_DEBUGREGS")
}

// GetMPState reads the multiprocessing state.
func (c *VCPU) GetMPState() (MPState, error) {
	var m MPState
	return m, c.get(ioGetMPState, unsafe.Pointer(&m), "KVM_GET_MP_STATE")
}

// SetMPState writes the multiprocessing state.
func (c *VCPU) SetMPState(m MPState) error {
	return c.get(ioSetMPState, unsafe.Pointer(&m), "KVM_SET_MP_STATE")
}

// SetCPUID2 sets the CPUID leaves the guest sees.
func (c *VCPU) SetCPUID2(entries []CPUIDEntry) error {
	hdr := int(unsafe.Sizeof(cpuidHeader{}))
	es := int(unsafe.Sizeof(CPUIDEntry{}))
	buf := make([]byte, hdr+max(len(entries), 1)*es)
	(*cpuidHeader)(unsafe.Pointer(&buf[0])).NEnt = uint32(len(entries))
	copy(unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[hdr])), len(entries)), entries)
	return c.get(ioSetCPUID2, unsafe.Pointer(&buf[0]), "KVM_SET_CPUID2")
}

// GetCPUID2 returns the CPUID leaves the vCPU was given.
func (c *VCPU) GetCPUID2() ([]CPUIDEntry, error) {
	return getCPUIDList(c.fd, ioGetCPUID2, fmt.Sprintf("vCPU %d KVM_GET_CPUID2", c.ID))
}

// Interrupt injects an external interrupt (only without in-kernel irqchip).
func (c *VCPU) Interrupt(vector uint32) error {
	return c.get(ioInterrupt, unsafe.Pointer(&vector), "KVM_INTERRUPT")
}

// NMI injects an NMI.
func (c *VCPU) NMI() error {
	_, err := ioctl(c.fd, ioNMI, 0)
	return wrap(fmt.Sprintf("vCPU %d KVM_NMI", c.ID), err)
}

// GetTSCKHz returns the guest TSC frequency.
func (c *VCPU) GetTSCKHz() (uint32, error) {
	r, err := ioctl(c.fd, ioGetTSCKHz, 0)
	return uint32(r), wrap(fmt.Sprintf("vCPU %d KVM_GET_TSC_KHZ", c.ID), err)
}

// SetTSCKHz sets the guest TSC frequency (scaling, where the host can).
func (c *VCPU) SetTSCKHz(khz uint32) error {
	_, err := ioctl(c.fd, ioSetTSCKHz, uintptr(khz))
	return wrap(fmt.Sprintf("vCPU %d KVM_SET_TSC_KHZ", c.ID), err)
}

// KVMClockCtrl tells KVM the guest was paused so kvmclock guests do not
// report soft lockups.
func (c *VCPU) KVMClockCtrl() error {
	_, err := ioctl(c.fd, ioKVMClockCtrl, 0)
	return wrap(fmt.Sprintf("vCPU %d KVM_KVMCLOCK_CTRL", c.ID), err)
}
