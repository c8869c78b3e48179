package kvm

// Go mirrors of the x86-64 KVM ABI structures (arch/x86/include/uapi/asm/kvm.h
// and include/uapi/linux/kvm.h). Field order, sizes and padding match the
// kernel exactly; abi_test.go compiles the kernel headers and compares.

// Regs is struct kvm_regs: the general-purpose registers, RIP and RFLAGS.
type Regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// Segment is struct kvm_segment: a segment register's hidden descriptor
// cache as well as its selector.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable is struct kvm_dtable: a descriptor table register (GDTR, IDTR).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs: segment, descriptor-table and control
// registers, EFER, the APIC base and the pending-interrupt bitmap.
type Sregs struct {
	CS, DS, ES, FS, GS, SS  Segment
	TR, LDT                 Segment
	GDT, IDT                DTable
	CR0, CR2, CR3, CR4, CR8 uint64
	EFER                    uint64
	APICBase                uint64
	InterruptBitmap         [4]uint64
}

// Sregs2 is struct kvm_sregs2 (KVM_CAP_SREGS2): like Sregs but with the PAE
// page-directory pointers instead of the interrupt bitmap.
type Sregs2 struct {
	CS, DS, ES, FS, GS, SS  Segment
	TR, LDT                 Segment
	GDT, IDT                DTable
	CR0, CR2, CR3, CR4, CR8 uint64
	EFER                    uint64
	APICBase                uint64
	Flags                   uint64
	PDPTRs                  [4]uint64
}

// Sregs2PDPTRsValid is the Sregs2.Flags bit saying PDPTRs hold data.
const Sregs2PDPTRsValid = 1

// FPU is struct kvm_fpu: the legacy x87 and SSE state.
type FPU struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

// XSave is the fixed 4 KiB part of struct kvm_xsave. With KVM_CAP_XSAVE2
// the kernel may need more (see VM.XSaveSize); XSaveArea carries that.
type XSave struct {
	Region [1024]uint32
}

// XCR is one extended control register value.
type XCR struct {
	XCR   uint32
	_     uint32
	Value uint64
}

// XCRs is struct kvm_xcrs.
type XCRs struct {
	NrXCRs uint32
	Flags  uint32
	XCRs   [16]XCR
	_      [16]uint64
}

// MSREntry is struct kvm_msr_entry.
type MSREntry struct {
	Index uint32
	_     uint32
	Data  uint64
}

// msrsHeader is the fixed head of struct kvm_msrs.
type msrsHeader struct {
	NMSRs uint32
	_     uint32
}

// LAPICState is struct kvm_lapic_state: the local APIC register page.
type LAPICState struct {
	Regs [1024]byte
}

// VCPUEvents is struct kvm_vcpu_events: pending and injected exceptions,
// interrupts, NMIs and SMIs, the SIPI vector and a latched INIT.
type VCPUEvents struct {
	Exception struct {
		Injected     uint8
		Nr           uint8
		HasErrorCode uint8
		Pending      uint8
		ErrorCode    uint32
	}
	Interrupt struct {
		Injected uint8
		Nr       uint8
		Soft     uint8
		Shadow   uint8
	}
	NMI struct {
		Injected uint8
		Pending  uint8
		Masked   uint8
		_        uint8
	}
	SIPIVector uint32
	Flags      uint32
	SMI        struct {
		SMM          uint8
		Pending      uint8
		SMMInsideNMI uint8
		LatchedInit  uint8
	}
	TripleFaultPending  uint8
	_                   [26]uint8
	ExceptionHasPayload uint8
	ExceptionPayload    uint64
}

// VCPUEvents.Flags bits.
const (
	VCPUEventValidNMIPending  = 0x1
	VCPUEventValidSIPIVector  = 0x2
	VCPUEventValidShadow      = 0x4
	VCPUEventValidSMM         = 0x8
	VCPUEventValidPayload     = 0x10
	VCPUEventValidTripleFault = 0x20
)

// DebugRegs is struct kvm_debugregs.
type DebugRegs struct {
	DB    [4]uint64
	DR6   uint64
	DR7   uint64
	Flags uint64
	_     [9]uint64
}

// MPState is struct kvm_mp_state.
type MPState struct {
	State uint32
}

// MP states.
const (
	MPStateRunnable      = 0
	MPStateUninitialized = 1
	MPStateInitReceived  = 2
	MPStateHalted        = 3
	MPStateSIPIReceived  = 4
)

// CPUIDEntry is struct kvm_cpuid_entry2.
type CPUIDEntry struct {
	Function uint32
	Index    uint32
	Flags    uint32
	EAX      uint32
	EBX      uint32
	ECX      uint32
	EDX      uint32
	_        [3]uint32
}

// CPUIDFlagSignificantIndex marks a leaf whose sub-leaf (Index) matters.
const CPUIDFlagSignificantIndex = 1

type cpuidHeader struct {
	NEnt uint32
	_    uint32
}

// PICState is struct kvm_pic_state: one 8259A.
type PICState struct {
	LastIRR                uint8
	IRR                    uint8
	IMR                    uint8
	ISR                    uint8
	PriorityAdd            uint8
	IRQBase                uint8
	ReadRegSelect          uint8
	Poll                   uint8
	SpecialMask            uint8
	InitState              uint8
	AutoEOI                uint8
	RotateOnAutoEOI        uint8
	SpecialFullyNestedMode uint8
	Init4                  uint8
	ELCR                   uint8
	ELCRMask               uint8
}

// IOAPICPins is KVM_IOAPIC_NUM_PINS.
const IOAPICPins = 24

// IOAPICState is struct kvm_ioapic_state. Each redirection entry is kept as
// its raw 64-bit value.
type IOAPICState struct {
	BaseAddress uint64
	ID          uint32
	IRR         uint32
	_           uint32
	_           uint32 // alignment of redirtbl
	RedirTbl    [IOAPICPins]uint64
}

// IRQ chip identifiers for IRQChip.ChipID.
const (
	IRQChipPICMaster = 0
	IRQChipPICSlave  = 1
	IRQChipIOAPIC    = 2
)

// IRQChip is struct kvm_irqchip; Chip holds a PICState or IOAPICState
// depending on ChipID (use the accessors).
type IRQChip struct {
	ChipID uint32
	_      uint32
	Chip   [512]byte
}

// PITChannelState is struct kvm_pit_channel_state.
type PITChannelState struct {
	Count         uint32
	LatchedCount  uint16
	CountLatched  uint8
	StatusLatched uint8
	Status        uint8
	ReadState     uint8
	WriteState    uint8
	WriteLatch    uint8
	RWMode        uint8
	Mode          uint8
	BCD           uint8
	Gate          uint8
	CountLoadTime int64
}

// PITState2 is struct kvm_pit_state2.
type PITState2 struct {
	Channels [3]PITChannelState
	Flags    uint32
	_        [9]uint32
}

// PITFlagHPETLegacy is PITState2.Flags' KVM_PIT_FLAGS_HPET_LEGACY.
const PITFlagHPETLegacy = 0x1

type pitConfig struct {
	Flags uint32
	_     [15]uint32
}

// ClockData is struct kvm_clock_data: the VM-wide kvmclock.
type ClockData struct {
	Clock    uint64
	Flags    uint32
	_        uint32
	Realtime uint64
	HostTSC  uint64
	_        [4]uint32
}

// ClockData.Flags bits.
const (
	ClockTSCStable = 2
	ClockRealtime  = 1 << 2
	ClockHostTSC   = 1 << 3
)

// UserspaceMemoryRegion is struct kvm_userspace_memory_region.
type UserspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

// Memory region flags.
const (
	MemLogDirtyPages = 1 << 0
	MemReadonly      = 1 << 1
)

type dirtyLog struct {
	Slot   uint32
	_      uint32
	Bitmap uint64
}

type clearDirtyLog struct {
	Slot      uint32
	NumPages  uint32
	FirstPage uint64
	Bitmap    uint64
}

type irqLevel struct {
	IRQ   uint32
	Level uint32
}

// msi is struct kvm_msi.
type msi struct {
	AddressLo, AddressHi, Data, Flags, DevID uint32
	_                                        [12]byte
}

// EnableCap is struct kvm_enable_cap.
type EnableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]uint8
}
