package kvm

import (
	"testing"
	"unsafe"

	"github.com/ferry-vmm/ferry/internal/cabi"
)

// abiFact is one number that must agree between Go and the kernel headers.
type abiFact struct {
	cExpr string
	goVal uintptr
}

func abiFacts() []abiFact {
	var run runHead
	var ev VCPUEvents
	var ioapic IOAPICState
	var fpu FPU
	var pit PITState2
	var sr Sregs
	return []abiFact{
		{"sizeof(struct kvm_regs)", unsafe.Sizeof(Regs{})},
		{"sizeof(struct kvm_segment)", unsafe.Sizeof(Segment{})},
		{"sizeof(struct kvm_dtable)", unsafe.Sizeof(DTable{})},
		{"sizeof(struct kvm_sregs)", unsafe.Sizeof(Sregs{})},
		{"offsetof(struct kvm_sregs, efer)", unsafe.Offsetof(sr.EFER)},
		{"offsetof(struct kvm_sregs, interrupt_bitmap)", unsafe.Offsetof(sr.InterruptBitmap)},
		{"sizeof(struct kvm_sregs2)", unsafe.Sizeof(Sregs2{})},
		{"sizeof(struct kvm_fpu)", unsafe.Sizeof(FPU{})},
		{"offsetof(struct kvm_fpu, xmm)", unsafe.Offsetof(fpu.XMM)},
		{"offsetof(struct kvm_fpu, mxcsr)", unsafe.Offsetof(fpu.MXCSR)},
		{"sizeof(struct kvm_xsave)", unsafe.Sizeof(XSave{})},
		{"sizeof(struct kvm_xcrs)", unsafe.Sizeof(XCRs{})},
		{"sizeof(struct kvm_xcr)", unsafe.Sizeof(XCR{})},
		{"sizeof(struct kvm_msr_entry)", unsafe.Sizeof(MSREntry{})},
		{"sizeof(struct kvm_msrs)", unsafe.Sizeof(msrsHeader{})},
		{"sizeof(struct kvm_lapic_state)", unsafe.Sizeof(LAPICState{})},
		{"sizeof(struct kvm_vcpu_events)", unsafe.Sizeof(VCPUEvents{})},
		{"offsetof(struct kvm_vcpu_events, sipi_vector)", unsafe.Offsetof(ev.SIPIVector)},
		{"offsetof(struct kvm_vcpu_events, smi)", unsafe.Offsetof(ev.SMI)},
		{"offsetof(struct kvm_vcpu_events, triple_fault)", unsafe.Offsetof(ev.TripleFaultPending)},
		{"offsetof(struct kvm_vcpu_events, exception_has_payload)", unsafe.Offsetof(ev.ExceptionHasPayload)},
		{"offsetof(struct kvm_vcpu_events, exception_payload)", unsafe.Offsetof(ev.ExceptionPayload)},
		{"sizeof(struct kvm_debugregs)", unsafe.Sizeof(DebugRegs{})},
		{"sizeof(struct kvm_mp_state)", unsafe.Sizeof(MPState{})},
		{"sizeof(struct kvm_cpuid_entry2)", unsafe.Sizeof(CPUIDEntry{})},
		{"sizeof(struct kvm_cpuid2)", unsafe.Sizeof(cpuidHeader{})},
		{"sizeof(struct kvm_pic_state)", unsafe.Sizeof(PICState{})},
		{"sizeof(struct kvm_ioapic_state)", unsafe.Sizeof(IOAPICState{})},
		{"offsetof(struct kvm_ioapic_state, redirtbl)", unsafe.Offsetof(ioapic.RedirTbl)},
		{"sizeof(struct kvm_irqchip)", unsafe.Sizeof(IRQChip{})},
		{"sizeof(struct kvm_pit_channel_state)", unsafe.Sizeof(PITChannelState{})},
		{"sizeof(struct kvm_pit_state2)", unsafe.Sizeof(PITState2{})},
		{"offsetof(struct kvm_pit_state2, flags)", unsafe.Offsetof(pit.Flags)},
		{"sizeof(struct kvm_pit_config)", unsafe.Sizeof(pitConfig{})},
		{"sizeof(struct kvm_clock_data)", unsafe.Sizeof(ClockData{})},
		{"sizeof(struct kvm_userspace_memory_region)", unsafe.Sizeof(UserspaceMemoryRegion{})},
		{"sizeof(struct kvm_dirty_log)", unsafe.Sizeof(dirtyLog{})},
		{"sizeof(struct kvm_clear_dirty_log)", unsafe.Sizeof(clearDirtyLog{})},
		{"sizeof(struct kvm_irq_level)", unsafe.Sizeof(irqLevel{})},
		{"sizeof(struct kvm_msi)", unsafe.Sizeof(msi{})},
		{"sizeof(struct kvm_enable_cap)", unsafe.Sizeof(EnableCap{})},
		{"offsetof(struct kvm_run, exit_reason)", unsafe.Offsetof(run.ExitReason)},
		{"offsetof(struct kvm_run, ready_for_interrupt_injection)", unsafe.Offsetof(run.ReadyForInterruptInjection)},
		{"offsetof(struct kvm_run, apic_base)", unsafe.Offsetof(run.APICBase)},
		{"offsetof(struct kvm_run, io)", runUnionOffset},
		{"sizeof(((struct kvm_run *)0)->io)", unsafe.Sizeof(RunIO{})},
		{"offsetof(struct kvm_run, io.data_offset)", runUnionOffset + unsafe.Offsetof(RunIO{}.DataOffset)},
		{"offsetof(struct kvm_run, mmio.len)", runUnionOffset + unsafe.Offsetof(RunMMIO{}.Len)},
		{"offsetof(struct kvm_run, mmio.is_write)", runUnionOffset + unsafe.Offsetof(RunMMIO{}.IsWrite)},
		{"offsetof(struct kvm_run, internal.data)", runUnionOffset + unsafe.Offsetof(RunInternal{}.Data)},
		{"offsetof(struct kvm_run, fail_entry.cpu)", runUnionOffset + unsafe.Offsetof(RunFailEntry{}.CPU)},
		{"offsetof(struct kvm_run, system_event.data)", runUnionOffset + unsafe.Offsetof(RunSystemEvent{}.Data)},
		// ioctl request codes.
		{"KVM_GET_API_VERSION", ioGetAPIVersion}, {"KVM_CREATE_VM", ioCreateVM},
		{"KVM_GET_MSR_INDEX_LIST", ioGetMSRIndexList}, {"KVM_CHECK_EXTENSION", ioCheckExtension},
		{"KVM_GET_VCPU_MMAP_SIZE", ioGetVCPUMmapSize}, {"KVM_GET_SUPPORTED_CPUID", ioGetSupportedCPUID},
		{"KVM_GET_EMULATED_CPUID", ioGetEmulatedCPUID}, {"KVM_GET_MSR_FEATURE_INDEX_LIST", ioGetMSRFeatureIndexList},
		{"KVM_CREATE_VCPU", ioCreateVCPU}, {"KVM_GET_DIRTY_LOG", ioGetDirtyLog},
		{"KVM_SET_USER_MEMORY_REGION", ioSetUserMemoryRegion}, {"KVM_SET_TSS_ADDR", ioSetTSSAddr},
		{"KVM_SET_IDENTITY_MAP_ADDR", ioSetIdentityMapAddr}, {"KVM_CREATE_IRQCHIP", ioCreateIRQChip},
		{"KVM_IRQ_LINE", ioIRQLine}, {"KVM_SIGNAL_MSI", ioSignalMSI}, {"KVM_GET_IRQCHIP", ioGetIRQChip}, {"KVM_SET_IRQCHIP", ioSetIRQChip},
		{"KVM_CREATE_PIT2", ioCreatePIT2}, {"KVM_SET_CLOCK", ioSetClock}, {"KVM_GET_CLOCK", ioGetClock},
		{"KVM_GET_PIT2", ioGetPIT2}, {"KVM_SET_PIT2", ioSetPIT2}, {"KVM_ENABLE_CAP", ioEnableCap},
		{"KVM_CLEAR_DIRTY_LOG", ioClearDirtyLog}, {"KVM_RUN", ioRun},
		{"KVM_GET_REGS", ioGetRegs}, {"KVM_SET_REGS", ioSetRegs}, {"KVM_GET_SREGS", ioGetSregs},
		{"KVM_SET_SREGS", ioSetSregs}, {"KVM_INTERRUPT", ioInterrupt}, {"KVM_GET_MSRS", ioGetMSRs},
		{"KVM_SET_MSRS", ioSetMSRs}, {"KVM_GET_FPU", ioGetFPU}, {"KVM_SET_FPU", ioSetFPU},
		{"KVM_GET_LAPIC", ioGetLAPIC}, {"KVM_SET_LAPIC", ioSetLAPIC}, {"KVM_SET_CPUID2", ioSetCPUID2},
		{"KVM_GET_CPUID2", ioGetCPUID2}, {"KVM_GET_MP_STATE", ioGetMPState}, {"KVM_SET_MP_STATE", ioSetMPState},
		{"KVM_NMI", ioNMI}, {"KVM_GET_VCPU_EVENTS", ioGetVCPUEvents}, {"KVM_SET_VCPU_EVENTS", ioSetVCPUEvents},
		{"KVM_GET_DEBUGREGS", ioGetDebugRegs}, {"KVM_SET_DEBUGREGS", ioSetDebugRegs},
		{"KVM_GET_XSAVE", ioGetXSave}, {"KVM_SET_XSAVE", ioSetXSave}, {"KVM_GET_XCRS", ioGetXCRs},
		{"KVM_SET_XCRS", ioSetXCRs}, {"KVM_SET_TSC_KHZ", ioSetTSCKHz}, {"KVM_GET_TSC_KHZ", ioGetTSCKHz},
		{"KVM_KVMCLOCK_CTRL", ioKVMClockCtrl}, {"KVM_GET_SREGS2", ioGetSregs2}, {"KVM_SET_SREGS2", ioSetSregs2},
		{"KVM_GET_XSAVE2", ioGetXSave2},
		// Capability and exit numbers.
		{"KVM_CAP_SREGS2", CapSregs2}, {"KVM_CAP_XSAVE2", CapXSave2}, {"KVM_CAP_DIRTY_LOG_RING", CapDirtyLogRing},
		{"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", CapManualDirtyLogProtect2}, {"KVM_CAP_IMMEDIATE_EXIT", CapImmediateExit},
		{"KVM_CAP_PIT2", CapPIT2}, {"KVM_CAP_VCPU_EVENTS", CapVCPUEvents}, {"KVM_CAP_XCRS", CapXCRs},
		{"KVM_CAP_TSC_CONTROL", CapTSCControl}, {"KVM_CAP_GET_TSC_KHZ", CapGetTSCKHz},
		{"KVM_CAP_ADJUST_CLOCK", CapAdjustClock}, {"KVM_CAP_DEBUGREGS", CapDebugRegs},
		{"KVM_EXIT_IO", ExitIO}, {"KVM_EXIT_MMIO", ExitMMIO}, {"KVM_EXIT_SHUTDOWN", ExitShutdown},
		{"KVM_EXIT_FAIL_ENTRY", ExitFailEntry}, {"KVM_EXIT_INTERNAL_ERROR", ExitInternalError},
		{"KVM_EXIT_SYSTEM_EVENT", ExitSystemEvent}, {"KVM_EXIT_HLT", ExitHLT}, {"KVM_EXIT_INTR", ExitIntr},
		{"KVM_MP_STATE_UNINITIALIZED", MPStateUninitialized}, {"KVM_MP_STATE_SIPI_RECEIVED", MPStateSIPIReceived},
		{"KVM_VCPUEVENT_VALID_SMM", VCPUEventValidSMM}, {"KVM_VCPUEVENT_VALID_PAYLOAD", VCPUEventValidPayload},
		{"KVM_IOAPIC_NUM_PINS", IOAPICPins},
	}
}

// TestABIMatchesKernelHeaders compiles a C program against <linux/kvm.h>
// that prints every size, offset and constant listed in abiFacts, and
// compares with the Go definitions.
func TestABIMatchesKernelHeaders(t *testing.T) {
	cabi.Check(t, []string{"linux/kvm.h"}, checks(abiFacts()))
}

func checks(facts []abiFact) []cabi.Fact {
	out := make([]cabi.Fact, len(facts))
	for i, f := range facts {
		out[i] = cabi.Fact{C: f.cExpr, Go: f.goVal}
	}
	return out
}
