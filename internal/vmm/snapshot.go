package vmm

import (
	"errors"
	"fmt"
	"time"

	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/state"
)

// Capture reads the complete machine state: every vCPU's registers of every
// class, the interrupt controllers, the PIT, the KVM clock and the devices.
// The VM must be paused, so that no vCPU is inside KVM_RUN or halfway
// through an I/O instruction.
func (v *VM) Capture() (*state.Machine, error) {
	if v.isStarted() && !v.Paused() {
		return nil, errors.New("capture: VM is running; pause it first")
	}
	if v.msrList == nil {
		l, err := saveableMSRs(v.sys, v.cpus[0].kvm)
		if err != nil {
			return nil, fmt.Errorf("capture: listing MSRs: %w", err)
		}
		v.msrList = l
	}
	m := &state.Machine{Header: v.stateHeader()}
	for _, c := range v.cpus {
		vs, err := v.captureVCPU(c.kvm)
		if err != nil {
			return nil, fmt.Errorf("capture: %w", err)
		}
		m.VCPUs = append(m.VCPUs, *vs)
	}
	m.Header.CPUIDFingerprint = state.CPUIDFingerprint(m.VCPUs[0].CPUID)
	if err := v.captureVMState(m); err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	v.pinClockToTSC(m)
	m.Devices = state.Devices{
		Serial: v.Serial.State(),
		CMOS:   v.CMOS.State(),
		I8042:  v.I8042.State(),
		Post:   v.POST.State(),
	}
	if err := v.capturePCI(m); err != nil {
		return nil, fmt.Errorf("capture: %w", err)
	}
	return m, nil
}

// GuestCPUID reads vCPU 0's CPUID table as the guest sees it now (KVM
// updates bits such as OSXSAVE as the guest runs) and the state header
// that fingerprints it: what a migration announces before anything stops.
// vCPU ioctls wait for KVM_RUN to return, so a running VM is paused for
// the one ioctl, not for a whole capture.
func (v *VM) GuestCPUID() ([]kvm.CPUIDEntry, state.Header, error) {
	if v.isStarted() && !v.Paused() {
		if err := v.Pause(); err != nil {
			return nil, state.Header{}, err
		}
		defer v.Resume()
	}
	cpuid, err := v.cpus[0].kvm.GetCPUID2()
	if err != nil {
		return nil, state.Header{}, err
	}
	h := v.stateHeader()
	h.CPUIDFingerprint = state.CPUIDFingerprint(cpuid)
	return cpuid, h, nil
}

func (v *VM) stateHeader() state.Header {
	return state.Header{
		FormatVersion:   state.FormatVersion,
		Arch:            "x86_64",
		CPUs:            uint32(len(v.cpus)),
		MemSize:         v.mem.Size(),
		Regions:         v.mem.Regions(),
		CreatedUnixNano: time.Now().UnixNano(),
		Producer:        "ferry",
	}
}

func (v *VM) captureVCPU(c *kvm.VCPU) (*state.VCPU, error) {
	s := &state.VCPU{ID: uint32(c.ID)}
	var err error
	if s.CPUID, err = c.GetCPUID2(); err != nil {
		return nil, err
	}
	if s.Regs, err = c.GetRegs(); err != nil {
		return nil, err
	}
	if s.Sregs, err = c.GetSregs(); err != nil {
		return nil, err
	}
	if v.sys.CheckExtension(kvm.CapSregs2) != 0 {
		s2, err := c.GetSregs2()
		if err != nil {
			return nil, err
		}
		s.Sregs2 = &s2
	}
	if s.FPU, err = c.GetFPU(); err != nil {
		return nil, err
	}
	if s.XSave, err = c.GetXSave(v.kvm.XSaveSize()); err != nil {
		return nil, err
	}
	if s.XCRs, err = c.GetXCRs(); err != nil {
		return nil, err
	}
	s.MSRs = make([]kvm.MSREntry, len(v.msrList))
	for i, idx := range v.msrList {
		s.MSRs[i].Index = idx
	}
	n, err := c.GetMSRs(s.MSRs)
	if err != nil {
		return nil, err
	}
	if n != len(s.MSRs) {
		return nil, fmt.Errorf("vCPU %d: KVM_GET_MSRS read %d of %d MSRs, stopped at %s", c.ID, n, len(s.MSRs), state.MSRName(s.MSRs[n].Index))
	}
	if s.LAPIC, err = c.GetLAPIC(); err != nil {
		return nil, err
	}
	if s.Events, err = c.GetVCPUEvents(); err != nil {
		return nil, err
	}
	if s.DebugRegs, err = c.GetDebugRegs(); err != nil {
		return nil, err
	}
	if s.MPState, err = c.GetMPState(); err != nil {
		return nil, err
	}
	if s.TSCKHz, err = c.GetTSCKHz(); err != nil {
		return nil, err
	}
	return s, nil
}

func (v *VM) captureVMState(m *state.Machine) error {
	for i, id := range []uint32{kvm.IRQChipPICMaster, kvm.IRQChipPICSlave} {
		chip, err := v.kvm.GetIRQChip(id)
		if err != nil {
			return err
		}
		m.PIC[i] = *chip.PIC()
	}
	chip, err := v.kvm.GetIRQChip(kvm.IRQChipIOAPIC)
	if err != nil {
		return err
	}
	m.IOAPIC = *chip.IOAPIC()
	if m.PIT, err = v.kvm.GetPIT2(); err != nil {
		return err
	}
	if m.Clock, err = v.kvm.GetClock(); err != nil {
		return err
	}
	return nil
}

// NewForRestore builds a VM shaped like the saved header (memory size and
// layout, vCPU count) with nothing loaded: fill its memory, then call
// Restore, then Start.
func NewForRestore(h state.Header, console Config) (*VM, error) {
	if h.Arch != "x86_64" {
		return nil, fmt.Errorf("saved state is for %q, this host runs x86_64", h.Arch)
	}
	cfg := console
	cfg.MemSize = h.MemSize
	cfg.CPUs = int(h.CPUs)
	cfg.forRestore = true
	v, err := New(cfg)
	if err != nil {
		return nil, err
	}
	if err := sameLayout(h, v); err != nil {
		v.Close()
		return nil, err
	}
	return v, nil
}

func sameLayout(h state.Header, v *VM) error {
	have := v.mem.Regions()
	if len(have) != len(h.Regions) {
		return fmt.Errorf("saved memory layout has %d regions, this VM %d", len(h.Regions), len(have))
	}
	for i := range have {
		if have[i] != h.Regions[i] {
			return fmt.Errorf("saved memory region %d is %+v, this VM's is %+v", i, h.Regions[i], have[i])
		}
	}
	return nil
}

// restoreStep is one stage of applying saved state. The order is part of
// the ABI contract with KVM and is checked by tests:
//   - CPUID first: KVM validates MSRs (TSC_AUX, ...) and XCR0 against it;
//   - special registers before general ones and before XCRs/XSAVE: CR0,
//     CR4 (OSXSAVE) and EFER decide what the rest may contain;
//   - MSRs after CPUID and special registers (APIC base, EFER agree);
//   - LAPIC before vCPU events: a pending interrupt refers to LAPIC state;
//   - MP state after LAPIC (INIT/SIPI state lives in the LAPIC);
//   - the KVM clock last, once nothing else can move it.
type restoreStep struct {
	name  string
	apply func(c *kvm.VCPU, s *state.VCPU) error
}

var vcpuRestoreOrder = []restoreStep{
	{"cpuid", func(c *kvm.VCPU, s *state.VCPU) error { return c.SetCPUID2(s.CPUID) }},
	{"sregs", restoreSregs},
	{"xcrs", restoreXCRs},
	{"fpu", func(c *kvm.VCPU, s *state.VCPU) error { return c.SetFPU(s.FPU) }},
	{"xsave", func(c *kvm.VCPU, s *state.VCPU) error { return c.SetXSave(s.XSave) }},
	{"regs", func(c *kvm.VCPU, s *state.VCPU) error { return c.SetRegs(s.Regs) }},
	{"msrs", restoreMSRs},
	{"lapic", func(c *kvm.VCPU, s *state.VCPU) error { return c.SetLAPIC(s.LAPIC) }},
	{"mp_state", func(c *kvm.VCPU, s *state.VCPU) error { return c.SetMPState(s.MPState) }},
	{"events", restoreEvents},
	{"debugregs", func(c *kvm.VCPU, s *state.VCPU) error { return c.SetDebugRegs(s.DebugRegs) }},
}

// restoreXCRs sets XCR0. A state saved on a host without XSAVE holds no
// XCRs (KVM_GET_XCRS reports none there), and such a host refuses
// KVM_SET_XCRS: there is nothing to set.
func restoreXCRs(c *kvm.VCPU, s *state.VCPU) error {
	if s.XCRs.NrXCRs == 0 {
		return nil
	}
	return c.SetXCRs(s.XCRs)
}

func restoreSregs(c *kvm.VCPU, s *state.VCPU) error {
	if s.Sregs2 != nil {
		if err := c.SetSregs2(*s.Sregs2); err == nil {
			return nil
		}
		// Host without KVM_CAP_SREGS2: the plain form carries the same
		// registers except the PAE PDPTRs, which KVM reloads from CR3.
	}
	return c.SetSregs(s.Sregs)
}

func restoreMSRs(c *kvm.VCPU, s *state.VCPU) error {
	n, err := c.SetMSRs(s.MSRs)
	if err != nil {
		return err
	}
	if n != len(s.MSRs) {
		e := s.MSRs[n]
		return fmt.Errorf("KVM_SET_MSRS refused %s (%#x) = %#x after %d of %d", state.MSRName(e.Index), e.Index, e.Data, n, len(s.MSRs))
	}
	return nil
}

func restoreEvents(c *kvm.VCPU, s *state.VCPU) error {
	e := s.Events
	// The GET side does not mark these as valid; SET ignores them unless
	// marked, and a pending NMI or SIPI vector would be lost.
	e.Flags |= kvm.VCPUEventValidNMIPending | kvm.VCPUEventValidSIPIVector
	return c.SetVCPUEvents(e)
}

// Restore applies saved machine state to a VM made by NewForRestore whose
// memory has been filled. It refuses state whose CPU features this host
// cannot provide before touching any vCPU.
func (v *VM) Restore(m *state.Machine) error {
	if v.started {
		return errors.New("restore: VM already started")
	}
	if len(m.VCPUs) != len(v.cpus) {
		return fmt.Errorf("restore: saved state has %d vCPUs, VM has %d", len(m.VCPUs), len(v.cpus))
	}
	for _, s := range m.VCPUs {
		if err := CheckCPUID(s.CPUID, v.hostCPUID); err != nil {
			return fmt.Errorf("restore: vCPU %d: %w", s.ID, err)
		}
	}
	if err := v.restoreVMState(m); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	for i, c := range v.cpus {
		s := &m.VCPUs[i]
		if s.ID != uint32(c.id) {
			return fmt.Errorf("restore: vCPU slot %d holds state of vCPU %d", i, s.ID)
		}
		if err := v.restoreTSCFrequency(c.kvm, s); err != nil {
			return fmt.Errorf("restore: vCPU %d: %w", i, err)
		}
		for _, step := range vcpuRestoreOrder {
			if err := step.apply(c.kvm, s); err != nil {
				return fmt.Errorf("restore: vCPU %d %s: %w", i, step.name, err)
			}
		}
		if i == 0 {
			v.checkTSCRestored(c.kvm, s)
		}
	}
	if err := v.restoreDevices(m); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	// The clock goes last: kvmclock continues from the saved value, so the
	// guest does not see the time it spent stopped (docs/machine-state.md),
	// advanced by what the guest's TSC counted since it was written, so
	// that the two clocks keep the distance they had (pinClockToTSC).
	if err := v.setClockPinned(m); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	for _, c := range v.cpus {
		c.markPaused() // the guest was stopped while it moved
	}
	return nil
}

// restoreTSCFrequency gives the vCPU the TSC frequency it had. Where the
// rates differ beyond KVM's tolerance and KVM cannot scale (TSCFit), a
// guest promised an invariant TSC is refused; any other runs on with a
// restore warning: in KVM's catch-up mode when its rate is above this
// host's, at this host's rate when below (KVM refuses that rate), as QEMU
// does.
func (v *VM) restoreTSCFrequency(c *kvm.VCPU, s *state.VCPU) error {
	have, err := c.GetTSCKHz()
	if err != nil || s.TSCKHz == 0 || have == s.TSCKHz {
		return err
	}
	fit := TSCFit{GuestKHz: s.TSCKHz, HostKHz: have, Invariant: InvariantTSC(s.CPUID), Scaling: v.sys.CheckExtension(kvm.CapTSCControl) != 0}
	problem, refuse := fit.Problem()
	if refuse {
		return errors.New(problem)
	}
	if err := c.SetTSCKHz(s.TSCKHz); err != nil && problem == "" {
		return fmt.Errorf("guest TSC runs at %d kHz, this host at %d kHz and KVM cannot scale it: %w", s.TSCKHz, have, err)
	}
	if problem != "" {
		v.warnOnce(problem)
	}
	return nil
}

// warnOnce adds a restore warning unless it is there already (every vCPU
// may find the same).
func (v *VM) warnOnce(w string) {
	for _, have := range v.restoreWarnings {
		if have == w {
			return
		}
	}
	v.restoreWarnings = append(v.restoreWarnings, w)
}

func (v *VM) restoreVMState(m *state.Machine) error {
	for i, id := range []uint32{kvm.IRQChipPICMaster, kvm.IRQChipPICSlave} {
		chip := kvm.IRQChip{ChipID: id}
		*chip.PIC() = m.PIC[i]
		if err := v.kvm.SetIRQChip(chip); err != nil {
			return err
		}
	}
	chip := kvm.IRQChip{ChipID: kvm.IRQChipIOAPIC}
	*chip.IOAPIC() = m.IOAPIC
	if err := v.kvm.SetIRQChip(chip); err != nil {
		return err
	}
	return v.kvm.SetPIT2(m.PIT)
}

func (v *VM) restoreDevices(m *state.Machine) error {
	if err := v.Serial.SetState(m.Devices.Serial); err != nil {
		return fmt.Errorf("serial: %w", err)
	}
	if err := v.CMOS.SetState(m.Devices.CMOS); err != nil {
		return fmt.Errorf("cmos: %w", err)
	}
	if err := v.I8042.SetState(m.Devices.I8042); err != nil {
		return fmt.Errorf("i8042: %w", err)
	}
	if err := v.POST.SetState(m.Devices.Post); err != nil {
		return fmt.Errorf("post: %w", err)
	}
	if err := v.restorePCI(m); err != nil {
		return fmt.Errorf("PCI: %w", err)
	}
	return nil
}

func (v *VM) isStarted() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.started
}

// RestoreWarnings lists what Restore could not reproduce exactly.
func (v *VM) RestoreWarnings() []string { return v.restoreWarnings }

// checkTSCRestored reads the guest TSC back after the MSRs were written. On
// hosts whose KVM cannot offset the TSC (PVM runs guest user code natively,
// so RDTSC there returns the host's TSC) the guest TSC follows the host's
// instead of continuing from the saved value; say so rather than hide it.
func (v *VM) checkTSCRestored(c *kvm.VCPU, s *state.VCPU) {
	saved := savedTSC(s)
	e := []kvm.MSREntry{{Index: msrTSC}}
	if n, err := c.GetMSRs(e); err != nil || n != 1 || saved == 0 {
		return
	}
	tolerance := uint64(s.TSCKHz) * 1000 / 10 // 100 ms of ticks
	if diff := absDiff(e[0].Data, saved); diff > tolerance {
		v.restoreWarnings = append(v.restoreWarnings, fmt.Sprintf(
			"guest TSC did not take the saved value (saved %d, now %d, %+.3f s): this host's KVM ties the guest TSC to the host's (PVM), so the guest sees the time it was stopped",
			saved, e[0].Data, (float64(e[0].Data)-float64(saved))/float64(s.TSCKHz)/1000))
	}
}

const msrTSC = 0x10

// pinClockToTSC makes the saved kvmclock the value it had when vCPU 0's
// TSC was read, not when the clock was (after every vCPU's registers and
// the interrupt controllers: milliseconds later on a slow host). Restore
// writes the TSC first and sets kvmclock last, advanced by what the TSC
// counted in between (setClockPinned); the guest then finds both where
// they were relative to each other. Without it the pair shifts by the
// difference between the two gaps, and a Linux guest's clocksource
// watchdog, which allows a few hundred microseconds between the TSC and
// kvm-clock over half a second, marks the TSC unstable after the switch
// ("skew is too large"; 18 to 32 ms in the emulated lab, see
// docs/machine-state.md). The clock is read between two TSC reads, again
// while they are far apart (the thread was preempted).
func (v *VM) pinClockToTSC(m *state.Machine) {
	saved, khz := savedTSC(&m.VCPUs[0]), m.VCPUs[0].TSCKHz
	best, bestGap := m.Clock, ^uint64(0)
	var at uint64
	for range pinTries {
		t1 := v.readTSC(v.cpus[0].kvm)
		clk, err := v.kvm.GetClock()
		t2 := v.readTSC(v.cpus[0].kvm)
		if err != nil || t1 == 0 || t2 < t1 {
			return
		}
		if t2-t1 < bestGap {
			best, bestGap, at = clk, t2-t1, t1+(t2-t1)/2
		}
		if bestGap <= tightTicks(khz) {
			break
		}
	}
	if ns, ok := tscElapsedNs(saved, at, khz); ok && ns <= best.Clock {
		best.Clock -= ns
		m.Clock = best
	}
}

// setClockPinned sets kvmclock to the saved value advanced by the ticks
// vCPU 0's TSC counted since Restore wrote it, reading the TSC right
// before and after, again while they are far apart.
func (v *VM) setClockPinned(m *state.Machine) error {
	saved, khz := savedTSC(&m.VCPUs[0]), m.VCPUs[0].TSCKHz
	for range pinTries {
		t1 := v.readTSC(v.cpus[0].kvm)
		clock := kvm.ClockData{Clock: m.Clock.Clock}
		ns, ok := tscElapsedNs(saved, t1, khz)
		if ok {
			clock.Clock += ns
		}
		if err := v.kvm.SetClock(clock); err != nil {
			return err
		}
		if t2 := v.readTSC(v.cpus[0].kvm); !ok || t2 < t1 || t2-t1 <= tightTicks(khz) {
			return nil
		}
	}
	return nil
}

// pinTries bounds the attempts at reading the TSC and the clock close
// together; tightTicks is close enough: 50 µs of the guest's TSC.
const pinTries = 8

func tightTicks(khz uint32) uint64 { return uint64(khz) / 20 }

// savedTSC is a saved vCPU's TSC MSR (0 if absent).
func savedTSC(s *state.VCPU) uint64 {
	for _, m := range s.MSRs {
		if m.Index == msrTSC {
			return m.Data
		}
	}
	return 0
}

// readTSC reads a vCPU's TSC MSR now (0 if it cannot).
func (v *VM) readTSC(c *kvm.VCPU) uint64 {
	e := []kvm.MSREntry{{Index: msrTSC}}
	if n, err := c.GetMSRs(e); err != nil || n != 1 {
		return 0
	}
	return e[0].Data
}

// maxPinGap bounds the time between a TSC read and the clock's for
// pinClockToTSC and Restore: a larger or negative distance means the TSC
// did not keep the value written (PVM ties it to the host's) and the clock
// is left as saved.
const maxPinGap = 5 * time.Second

// tscElapsedNs converts the TSC ticks from then to now at khz into
// nanoseconds; false when either is unknown or the distance is negative
// or beyond maxPinGap.
func tscElapsedNs(then, now uint64, khz uint32) (uint64, bool) {
	if then == 0 || now < then || khz == 0 {
		return 0, false
	}
	ticks := now - then
	if ticks > uint64(khz)*uint64(maxPinGap/time.Millisecond) {
		return 0, false
	}
	return ticks * 1_000_000 / uint64(khz), true
}

func absDiff(a, b uint64) uint64 {
	if a > b {
		return a - b
	}
	return b - a
}

// CheckGuestCPUID refuses a guest CPUID table (from a saved state or a
// migration source) that uses features this host cannot provide.
func (v *VM) CheckGuestCPUID(cpuid []kvm.CPUIDEntry) error {
	return CheckCPUID(cpuid, v.hostCPUID)
}
