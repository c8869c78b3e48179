package state

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/pci"
	"github.com/ferry-vmm/ferry/internal/virtio"
)

// Hex is a number that renders as 0x-prefixed hexadecimal, in JSON too.
type Hex uint64

func (h Hex) String() string { return "0x" + strconv.FormatUint(uint64(h), 16) }

// MarshalText renders h as "0x...".
func (h Hex) MarshalText() ([]byte, error) { return []byte(h.String()), nil }

// UnmarshalText parses "0x..." (or decimal).
func (h *Hex) UnmarshalText(b []byte) error {
	v, err := strconv.ParseUint(string(b), 0, 64)
	*h = Hex(v)
	return err
}

// Report is a readable description of a Machine, for ferry inspect. It
// marshals to JSON as is; WriteText renders it for people.
type Report struct {
	Header  HeaderReport  `json:"header"`
	VCPUs   []VCPUReport  `json:"vcpus"`
	PIC     [2]PICReport  `json:"pic"`
	IOAPIC  IOAPICReport  `json:"ioapic"`
	PIT     PITReport     `json:"pit"`
	Clock   ClockReport   `json:"clock"`
	Devices DevicesReport `json:"devices"`
	PCI     *PCIReport    `json:"pci,omitempty"` // nil: the machine has no PCI bus
	Memory  *MemoryReport `json:"memory,omitempty"`
}

// HeaderReport describes the header.
type HeaderReport struct {
	FormatVersion    uint32         `json:"format_version"`
	Arch             string         `json:"arch"`
	CPUs             uint32         `json:"cpus"`
	MemSize          uint64         `json:"mem_size"`
	Regions          []RegionReport `json:"regions"`
	CPUIDFingerprint string         `json:"cpuid_fingerprint"`
	Created          string         `json:"created"`
	Producer         string         `json:"producer"`
	Flags            Hex            `json:"flags"`
	FlagNames        []string       `json:"flag_names,omitempty"`
}

// RegionReport is one memory region.
type RegionReport struct {
	GPA    Hex `json:"gpa"`
	Size   Hex `json:"size"`
	Offset Hex `json:"offset"`
}

// MemoryReport is a MemorySummary for people.
type MemoryReport struct {
	Size         uint64 `json:"size"`
	NonZeroPages uint64 `json:"non_zero_pages"`
	SHA256       string `json:"sha256"`
}

// VCPUReport describes one vCPU.
type VCPUReport struct {
	ID      uint32          `json:"id"`
	MPState string          `json:"mp_state"`
	Mode    string          `json:"mode"`
	TSCKHz  uint32          `json:"tsc_khz"`
	Regs    GeneralRegs     `json:"regs"`
	Segs    []SegmentReport `json:"segments"`
	GDT     DTableReport    `json:"gdt"`
	IDT     DTableReport    `json:"idt"`
	Control ControlRegs     `json:"control"`
	// PendingInterrupts lists the vectors in kvm_sregs' interrupt bitmap.
	PendingInterrupts []int        `json:"pending_interrupts,omitempty"`
	MSRs              []MSRReport  `json:"msrs"`
	FPU               FPUReport    `json:"fpu"`
	XSave             *XSaveReport `json:"xsave,omitempty"`
	XCRs              []XCRReport  `json:"xcrs,omitempty"`
	LAPIC             LAPICReport  `json:"lapic"`
	Events            EventsReport `json:"events"`
	Debug             DebugReport  `json:"debug"`
	CPUID             CPUIDReport  `json:"cpuid"`
}

// GeneralRegs are the general-purpose registers, RIP and RFLAGS.
type GeneralRegs struct {
	RAX        Hex      `json:"rax"`
	RBX        Hex      `json:"rbx"`
	RCX        Hex      `json:"rcx"`
	RDX        Hex      `json:"rdx"`
	RSI        Hex      `json:"rsi"`
	RDI        Hex      `json:"rdi"`
	RSP        Hex      `json:"rsp"`
	RBP        Hex      `json:"rbp"`
	R8         Hex      `json:"r8"`
	R9         Hex      `json:"r9"`
	R10        Hex      `json:"r10"`
	R11        Hex      `json:"r11"`
	R12        Hex      `json:"r12"`
	R13        Hex      `json:"r13"`
	R14        Hex      `json:"r14"`
	R15        Hex      `json:"r15"`
	RIP        Hex      `json:"rip"`
	RFLAGS     Hex      `json:"rflags"`
	RFLAGSBits []string `json:"rflags_bits"`
}

// SegmentReport is one segment register.
type SegmentReport struct {
	Name     string `json:"name"`
	Selector Hex    `json:"selector"`
	Base     Hex    `json:"base"`
	Limit    Hex    `json:"limit"`
	Type     uint8  `json:"type"`
	Present  bool   `json:"present"`
	DPL      uint8  `json:"dpl"`
	DB       bool   `json:"db"`
	S        bool   `json:"s"`
	L        bool   `json:"l"`
	G        bool   `json:"g"`
	AVL      bool   `json:"avl"`
	Unusable bool   `json:"unusable"`
}

// DTableReport is GDTR or IDTR.
type DTableReport struct {
	Base  Hex `json:"base"`
	Limit Hex `json:"limit"`
}

// ControlRegs are the control registers, EFER and the APIC base.
type ControlRegs struct {
	CR0          Hex      `json:"cr0"`
	CR0Bits      []string `json:"cr0_bits"`
	CR2          Hex      `json:"cr2"`
	CR3          Hex      `json:"cr3"`
	CR4          Hex      `json:"cr4"`
	CR4Bits      []string `json:"cr4_bits"`
	CR8          Hex      `json:"cr8"`
	EFER         Hex      `json:"efer"`
	EFERBits     []string `json:"efer_bits"`
	APICBase     Hex      `json:"apic_base"`
	APICBaseBits []string `json:"apic_base_bits"`
	// PDPTRs are the PAE page-directory pointers (from sregs2, when valid).
	PDPTRs []Hex `json:"pdptrs,omitempty"`
}

// MSRReport is one MSR.
type MSRReport struct {
	Index Hex    `json:"index"`
	Name  string `json:"name"`
	Value Hex    `json:"value"`
}

// FPUReport summarizes the x87/SSE state.
type FPUReport struct {
	FCW        Hex `json:"fcw"`
	FSW        Hex `json:"fsw"`
	FTW        Hex `json:"ftw"`
	LastOpcode Hex `json:"last_opcode"`
	LastIP     Hex `json:"last_ip"`
	LastDP     Hex `json:"last_dp"`
	MXCSR      Hex `json:"mxcsr"`
	NonZeroST  int `json:"non_zero_st"`
	NonZeroXMM int `json:"non_zero_xmm"`
}

// XSaveReport summarizes the XSAVE area.
type XSaveReport struct {
	Size       int      `json:"size"`
	XStateBV   Hex      `json:"xstate_bv"`
	XCompBV    Hex      `json:"xcomp_bv"`
	Components []string `json:"components"`
	Compacted  bool     `json:"compacted"`
	// NonZeroYMMHigh counts the AVX upper halves (YMM_Hi128) that are not
	// zero; -1 when the area is compacted or has no AVX component.
	NonZeroYMMHigh int `json:"non_zero_ymm_high"`
}

// XCRReport is one extended control register.
type XCRReport struct {
	Index uint32 `json:"index"`
	Value Hex    `json:"value"`
}

// LAPICReport decodes the local APIC's register page.
type LAPICReport struct {
	ID                uint32 `json:"id"`
	X2APIC            bool   `json:"x2apic"`
	Version           Hex    `json:"version"`
	TPR               Hex    `json:"tpr"`
	PPR               Hex    `json:"ppr"`
	LDR               Hex    `json:"ldr"`
	DFR               Hex    `json:"dfr"`
	SVR               Hex    `json:"svr"`
	Enabled           bool   `json:"enabled"`
	ESR               Hex    `json:"esr"`
	ICR               Hex    `json:"icr"`
	LVTTimer          Hex    `json:"lvt_timer"`
	TimerMode         string `json:"timer_mode"`
	LVTThermal        Hex    `json:"lvt_thermal"`
	LVTPerf           Hex    `json:"lvt_perf"`
	LVTLINT0          Hex    `json:"lvt_lint0"`
	LVTLINT1          Hex    `json:"lvt_lint1"`
	LVTError          Hex    `json:"lvt_error"`
	TimerInitialCount uint32 `json:"timer_initial_count"`
	TimerCurrentCount uint32 `json:"timer_current_count"`
	TimerDivide       Hex    `json:"timer_divide"`
	ISR               []int  `json:"isr"`
	TMR               []int  `json:"tmr"`
	IRR               []int  `json:"irr"`
}

// EventsReport describes pending and injected events.
type EventsReport struct {
	Exception   *ExceptionEvent `json:"exception,omitempty"`
	Interrupt   *InterruptEvent `json:"interrupt,omitempty"`
	NMIInjected bool            `json:"nmi_injected"`
	NMIPending  bool            `json:"nmi_pending"`
	NMIMasked   bool            `json:"nmi_masked"`
	SIPIVector  Hex             `json:"sipi_vector"`
	SMM         bool            `json:"smm"`
	SMIPending  bool            `json:"smi_pending"`
	LatchedInit bool            `json:"latched_init"`
	TripleFault bool            `json:"triple_fault_pending"`
	Flags       Hex             `json:"flags"`
	// Summary lists, in words, every event that is pending or injected.
	Summary []string `json:"summary"`
}

// ExceptionEvent is a pending or injected exception.
type ExceptionEvent struct {
	Vector       uint8 `json:"vector"`
	Injected     bool  `json:"injected"`
	Pending      bool  `json:"pending"`
	HasErrorCode bool  `json:"has_error_code"`
	ErrorCode    Hex   `json:"error_code"`
	HasPayload   bool  `json:"has_payload"`
	Payload      Hex   `json:"payload"`
}

// InterruptEvent is an injected interrupt.
type InterruptEvent struct {
	Vector uint8 `json:"vector"`
	Soft   bool  `json:"soft"`
	Shadow uint8 `json:"shadow"`
}

// DebugReport holds the debug registers.
type DebugReport struct {
	DR  [4]Hex `json:"dr"`
	DR6 Hex    `json:"dr6"`
	DR7 Hex    `json:"dr7"`
}

// CPUIDReport summarizes the CPUID table.
type CPUIDReport struct {
	Entries     int    `json:"entries"`
	Vendor      string `json:"vendor,omitempty"`
	MaxLeaf     Hex    `json:"max_leaf"`
	Fingerprint string `json:"fingerprint"`
}

// PICReport describes one 8259A.
type PICReport struct {
	IRR                    Hex   `json:"irr"`
	IMR                    Hex   `json:"imr"`
	ISR                    Hex   `json:"isr"`
	LastIRR                Hex   `json:"last_irr"`
	IRQBase                Hex   `json:"irq_base"`
	PriorityAdd            uint8 `json:"priority_add"`
	ReadRegSelect          uint8 `json:"read_reg_select"`
	Poll                   uint8 `json:"poll"`
	SpecialMask            uint8 `json:"special_mask"`
	InitState              uint8 `json:"init_state"`
	AutoEOI                uint8 `json:"auto_eoi"`
	RotateOnAutoEOI        uint8 `json:"rotate_on_auto_eoi"`
	SpecialFullyNestedMode uint8 `json:"special_fully_nested_mode"`
	Init4                  uint8 `json:"init4"`
	ELCR                   Hex   `json:"elcr"`
	ELCRMask               Hex   `json:"elcr_mask"`
}

// IOAPICReport describes the IOAPIC.
type IOAPICReport struct {
	ID          uint32        `json:"id"`
	BaseAddress Hex           `json:"base_address"`
	IRR         Hex           `json:"irr"`
	Redir       []RedirReport `json:"redir"`
}

// RedirReport is one decoded redirection-table entry.
type RedirReport struct {
	Pin          int    `json:"pin"`
	Raw          Hex    `json:"raw"`
	Vector       uint8  `json:"vector"`
	DeliveryMode string `json:"delivery_mode"`
	DestMode     string `json:"dest_mode"`
	Pending      bool   `json:"pending"`
	Polarity     string `json:"polarity"`
	RemoteIRR    bool   `json:"remote_irr"`
	Trigger      string `json:"trigger"`
	Masked       bool   `json:"masked"`
	Dest         uint8  `json:"dest"`
}

// PITReport describes the 8254 PIT.
type PITReport struct {
	Flags      Hex                 `json:"flags"`
	HPETLegacy bool                `json:"hpet_legacy"`
	Channels   [3]PITChannelReport `json:"channels"`
}

// PITChannelReport is one PIT channel.
type PITChannelReport struct {
	Count         uint32 `json:"count"`
	Mode          uint8  `json:"mode"`
	Gate          uint8  `json:"gate"`
	RWMode        uint8  `json:"rw_mode"`
	BCD           uint8  `json:"bcd"`
	LatchedCount  uint16 `json:"latched_count"`
	CountLatched  uint8  `json:"count_latched"`
	StatusLatched uint8  `json:"status_latched"`
	Status        Hex    `json:"status"`
	ReadState     uint8  `json:"read_state"`
	WriteState    uint8  `json:"write_state"`
	WriteLatch    uint8  `json:"write_latch"`
	CountLoadTime int64  `json:"count_load_time"`
}

// ClockReport describes the kvmclock.
type ClockReport struct {
	ClockNs   uint64   `json:"clock_ns"`
	Flags     Hex      `json:"flags"`
	FlagNames []string `json:"flag_names,omitempty"`
	Realtime  uint64   `json:"realtime_ns"`
	HostTSC   uint64   `json:"host_tsc"`
}

// DevicesReport describes the emulated devices.
type DevicesReport struct {
	Serial SerialReport `json:"serial"`
	CMOS   CMOSReport   `json:"cmos"`
	I8042  I8042Report  `json:"i8042"`
	Post   PostReport   `json:"post"`
}

// SerialReport describes the UART.
type SerialReport struct {
	IER         Hex    `json:"ier"`
	IIRFCR      Hex    `json:"fcr"`
	LCR         Hex    `json:"lcr"`
	MCR         Hex    `json:"mcr"`
	LSR         Hex    `json:"lsr"`
	MSR         Hex    `json:"msr"`
	SCR         Hex    `json:"scr"`
	Divisor     uint16 `json:"divisor"`
	THREPending bool   `json:"thre_pending"`
	RXFIFO      int    `json:"rx_fifo_bytes"`
	Backlog     int    `json:"backlog_bytes"`
	Dropped     uint64 `json:"dropped"`
	WriteErrors uint64 `json:"write_errors"`
}

// CMOSReport describes the CMOS/RTC.
type CMOSReport struct {
	Index       Hex    `json:"index"`
	NMIDisabled bool   `json:"nmi_disabled"`
	StatusA     Hex    `json:"status_a"`
	StatusB     Hex    `json:"status_b"`
	StatusC     Hex    `json:"status_c"`
	StatusD     Hex    `json:"status_d"`
	ClockOffset string `json:"clock_offset"`
	RAM         string `json:"ram"` // 128 bytes in hex
}

// I8042Report describes the keyboard controller.
type I8042Report struct {
	CTR            Hex      `json:"ctr"`
	OutputPort     Hex      `json:"output_port"`
	LastWasCommand bool     `json:"last_was_command"`
	PendingCommand Hex      `json:"pending_command"`
	LastData       Hex      `json:"last_data"`
	Output         []string `json:"output"` // queued bytes, "0xfa" or "0xfa aux"

	Resets  uint64 `json:"resets"`
	Dropped uint64 `json:"dropped"`
}

// PostReport describes the POST port.
type PostReport struct {
	Last   Hex    `json:"last"`
	Writes uint64 `json:"writes"`
}

// bitNames lists the names of the set bits of v, in bit order; names maps
// a bit number to its name.
func bitNames(v uint64, names map[uint]string) []string {
	out := []string{}
	for bit := uint(0); bit < 64; bit++ {
		if v&(1<<bit) != 0 {
			if n, ok := names[bit]; ok {
				out = append(out, n)
			}
		}
	}
	return out
}

var (
	rflagsNames = map[uint]string{0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF",
		11: "OF", 14: "NT", 16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID"}
	cr0Names = map[uint]string{0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP", 18: "AM",
		29: "NW", 30: "CD", 31: "PG"}
	cr4Names = map[uint]string{0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE",
		7: "PGE", 8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE",
		14: "SMXE", 16: "FSGSBASE", 17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP", 21: "SMAP",
		22: "PKE", 23: "CET", 24: "PKS", 25: "UINTR", 28: "LAM_SUP"}
	eferNames = map[uint]string{0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE",
		14: "FFXSR", 15: "TCE", 21: "AUTOIBRS"}
	apicBaseNames = map[uint]string{8: "BSP", 10: "EXTD", 11: "EN"}
	clockNames    = map[uint]string{1: "TSC_STABLE", 2: "REALTIME", 3: "HOST_TSC"}
	xfeatureNames = map[uint]string{0: "x87", 1: "sse", 2: "avx", 3: "bndregs", 4: "bndcsr",
		5: "opmask", 6: "zmm_hi256", 7: "hi16_zmm", 8: "pt", 9: "pkru", 10: "pasid", 11: "cet_u",
		12: "cet_s", 13: "hdc", 14: "uintr", 15: "lbr", 16: "hwp", 17: "xtilecfg", 18: "xtiledata",
		19: "apx"}
	mpStateNames = map[uint32]string{
		kvm.MPStateRunnable: "runnable", kvm.MPStateUninitialized: "uninitialized",
		kvm.MPStateInitReceived: "init_received", kvm.MPStateHalted: "halted",
		kvm.MPStateSIPIReceived: "sipi_received", 5: "stopped", 6: "check_stop",
		7: "operating", 8: "load", 9: "ap_reset_hold", 10: "suspended"}
)

// Describe renders m for people and tools. The memory summary is not part
// of a Machine; add it with AddMemory.
func Describe(m *Machine) *Report {
	r := &Report{
		Header: describeHeader(&m.Header),
		VCPUs:  make([]VCPUReport, 0, len(m.VCPUs)),
		IOAPIC: describeIOAPIC(&m.IOAPIC),
		PIT:    describePIT(&m.PIT),
		Clock: ClockReport{ClockNs: m.Clock.Clock, Flags: Hex(m.Clock.Flags),
			FlagNames: bitNames(uint64(m.Clock.Flags), clockNames), Realtime: m.Clock.Realtime, HostTSC: m.Clock.HostTSC},
		Devices: describeDevices(&m.Devices),
	}
	if m.PCI != nil {
		r.PCI = describePCI(m.PCI)
	}
	for i := range m.PIC {
		r.PIC[i] = describePIC(&m.PIC[i])
	}
	for i := range m.VCPUs {
		r.VCPUs = append(r.VCPUs, describeVCPU(&m.VCPUs[i]))
	}
	return r
}

// AddMemory adds a memory summary to the report.
func (r *Report) AddMemory(s MemorySummary) {
	r.Memory = &MemoryReport{Size: s.Size, NonZeroPages: s.NonZeroPages, SHA256: hex.EncodeToString(s.SHA256[:])}
}

func describeHeader(h *Header) HeaderReport {
	hr := HeaderReport{
		FormatVersion: h.FormatVersion, Arch: h.Arch, CPUs: h.CPUs, MemSize: h.MemSize,
		Regions:          []RegionReport{},
		CPUIDFingerprint: hex.EncodeToString(h.CPUIDFingerprint[:]),
		Created:          time.Unix(0, h.CreatedUnixNano).UTC().Format(time.RFC3339Nano),
		Producer:         h.Producer, Flags: Hex(h.Flags),
	}
	if h.Flags&FlagMemoryCompressed != 0 {
		hr.FlagNames = append(hr.FlagNames, "memory_compressed")
	}
	for _, rg := range h.Regions {
		hr.Regions = append(hr.Regions, RegionReport{GPA: Hex(rg.GPA), Size: Hex(rg.Size), Offset: Hex(rg.Offset)})
	}
	return hr
}

func describeSegment(name string, s kvm.Segment) SegmentReport {
	return SegmentReport{Name: name, Selector: Hex(s.Selector), Base: Hex(s.Base), Limit: Hex(s.Limit),
		Type: s.Type, Present: s.Present != 0, DPL: s.DPL, DB: s.DB != 0, S: s.S != 0, L: s.L != 0,
		G: s.G != 0, AVL: s.AVL != 0, Unusable: s.Unusable != 0}
}

// cpuMode names the execution mode that CR0, EFER and CS imply.
func cpuMode(s *kvm.Sregs, rflags uint64) string {
	switch {
	case s.CR0&1 == 0:
		return "real mode"
	case s.EFER&(1<<10) != 0 && s.CS.L != 0:
		return "64-bit long mode"
	case s.EFER&(1<<10) != 0:
		return "compatibility mode"
	case rflags&(1<<17) != 0:
		return "virtual-8086 mode"
	case s.CS.DB != 0:
		return "32-bit protected mode"
	}
	return "16-bit protected mode"
}

func lapicReg(l *kvm.LAPICState, off int) uint32 {
	return binary.LittleEndian.Uint32(l.Regs[off : off+4])
}

// lapicVectors lists the vectors set in the 256-bit register at off (eight
// 32-bit registers at a 16-byte stride).
func lapicVectors(l *kvm.LAPICState, off int) []int {
	out := []int{}
	for i := 0; i < 8; i++ {
		v := lapicReg(l, off+i*0x10)
		for b := 0; b < 32; b++ {
			if v&(1<<b) != 0 {
				out = append(out, i*32+b)
			}
		}
	}
	return out
}

func describeLAPIC(l *kvm.LAPICState, apicBase uint64) LAPICReport {
	x2 := apicBase&(1<<10) != 0
	id := lapicReg(l, 0x20)
	if !x2 {
		id >>= 24
	}
	timer := lapicReg(l, 0x320)
	mode := [...]string{"one-shot", "periodic", "tsc-deadline", "reserved"}[(timer>>17)&3]
	icr := uint64(lapicReg(l, 0x310))<<32 | uint64(lapicReg(l, 0x300))
	return LAPICReport{
		ID: id, X2APIC: x2, Version: Hex(lapicReg(l, 0x30)), TPR: Hex(lapicReg(l, 0x80)),
		PPR: Hex(lapicReg(l, 0xa0)), LDR: Hex(lapicReg(l, 0xd0)), DFR: Hex(lapicReg(l, 0xe0)),
		SVR: Hex(lapicReg(l, 0xf0)), Enabled: lapicReg(l, 0xf0)&0x100 != 0, ESR: Hex(lapicReg(l, 0x280)),
		ICR: Hex(icr), LVTTimer: Hex(timer), TimerMode: mode, LVTThermal: Hex(lapicReg(l, 0x330)),
		LVTPerf: Hex(lapicReg(l, 0x340)), LVTLINT0: Hex(lapicReg(l, 0x350)), LVTLINT1: Hex(lapicReg(l, 0x360)),
		LVTError: Hex(lapicReg(l, 0x370)), TimerInitialCount: lapicReg(l, 0x380),
		TimerCurrentCount: lapicReg(l, 0x390), TimerDivide: Hex(lapicReg(l, 0x3e0)),
		ISR: lapicVectors(l, 0x100), TMR: lapicVectors(l, 0x180), IRR: lapicVectors(l, 0x200),
	}
}

func countNonZero(regs [][16]uint8) int {
	n := 0
	for _, r := range regs {
		if r != [16]uint8{} {
			n++
		}
	}
	return n
}

// cpuidLeaf finds a CPUID entry.
func cpuidLeaf(entries []kvm.CPUIDEntry, fn, index uint32) (kvm.CPUIDEntry, bool) {
	for _, e := range entries {
		if e.Function == fn && (e.Flags&kvm.CPUIDFlagSignificantIndex == 0 || e.Index == index) {
			return e, true
		}
	}
	return kvm.CPUIDEntry{}, false
}

func describeXSave(v *VCPU) *XSaveReport {
	x := v.XSave
	if len(x) == 0 {
		return nil
	}
	r := &XSaveReport{Size: len(x), Components: []string{}, NonZeroYMMHigh: -1}
	if len(x) < 576 {
		return r
	}
	r.XStateBV = Hex(binary.LittleEndian.Uint64(x[512:]))
	r.XCompBV = Hex(binary.LittleEndian.Uint64(x[520:]))
	r.Compacted = r.XCompBV&(1<<63) != 0
	r.Components = bitNames(uint64(r.XStateBV), xfeatureNames)
	if r.Compacted || r.XStateBV&4 == 0 {
		return r
	}
	off, size := 576, 256 // the standard format's AVX offset and size
	if e, ok := cpuidLeaf(v.CPUID, 0xd, 2); ok && e.EAX == 256 && e.EBX != 0 {
		off = int(e.EBX)
	}
	if off+size > len(x) {
		return r
	}
	r.NonZeroYMMHigh = 0
	for i := 0; i < 16; i++ {
		if [16]byte(x[off+16*i:off+16*i+16]) != [16]byte{} {
			r.NonZeroYMMHigh++
		}
	}
	return r
}

func describeEvents(e *kvm.VCPUEvents) EventsReport {
	r := EventsReport{
		NMIInjected: e.NMI.Injected != 0, NMIPending: e.NMI.Pending != 0, NMIMasked: e.NMI.Masked != 0,
		SIPIVector: Hex(e.SIPIVector), SMM: e.SMI.SMM != 0, SMIPending: e.SMI.Pending != 0,
		LatchedInit: e.SMI.LatchedInit != 0, TripleFault: e.TripleFaultPending != 0, Flags: Hex(e.Flags),
		Summary: []string{},
	}
	x := e.Exception
	if x.Injected != 0 || x.Pending != 0 {
		r.Exception = &ExceptionEvent{Vector: x.Nr, Injected: x.Injected != 0, Pending: x.Pending != 0,
			HasErrorCode: x.HasErrorCode != 0, ErrorCode: Hex(x.ErrorCode),
			HasPayload: e.ExceptionHasPayload != 0, Payload: Hex(e.ExceptionPayload)}
		s := fmt.Sprintf("exception %d", x.Nr)
		if x.Injected != 0 {
			s += " injected"
		} else {
			s += " pending"
		}
		if x.HasErrorCode != 0 {
			s += fmt.Sprintf(" (error code %#x)", x.ErrorCode)
		}
		r.Summary = append(r.Summary, s)
	}
	if e.Interrupt.Injected != 0 {
		r.Interrupt = &InterruptEvent{Vector: e.Interrupt.Nr, Soft: e.Interrupt.Soft != 0, Shadow: e.Interrupt.Shadow}
		s := fmt.Sprintf("interrupt %#x injected", e.Interrupt.Nr)
		if e.Interrupt.Soft != 0 {
			s += " (software)"
		}
		r.Summary = append(r.Summary, s)
	}
	if e.Interrupt.Shadow != 0 {
		r.Summary = append(r.Summary, fmt.Sprintf("interrupt shadow %#x", e.Interrupt.Shadow))
	}
	for _, f := range []struct {
		on   bool
		what string
	}{
		{r.NMIInjected, "NMI injected"}, {r.NMIPending, "NMI pending"}, {r.NMIMasked, "NMIs masked"},
		{r.SMM, "in SMM"}, {r.SMIPending, "SMI pending"}, {r.LatchedInit, "INIT latched"},
		{r.TripleFault, "triple fault pending"},
	} {
		if f.on {
			r.Summary = append(r.Summary, f.what)
		}
	}
	if e.Flags&kvm.VCPUEventValidSIPIVector != 0 && e.SIPIVector != 0 {
		r.Summary = append(r.Summary, fmt.Sprintf("SIPI vector %#x", e.SIPIVector))
	}
	return r
}

func describeVCPU(v *VCPU) VCPUReport {
	g := &v.Regs
	s := &v.Sregs
	r := VCPUReport{
		ID: v.ID, TSCKHz: v.TSCKHz, Mode: cpuMode(s, g.RFLAGS),
		Regs: GeneralRegs{
			RAX: Hex(g.RAX), RBX: Hex(g.RBX), RCX: Hex(g.RCX), RDX: Hex(g.RDX),
			RSI: Hex(g.RSI), RDI: Hex(g.RDI), RSP: Hex(g.RSP), RBP: Hex(g.RBP),
			R8: Hex(g.R8), R9: Hex(g.R9), R10: Hex(g.R10), R11: Hex(g.R11),
			R12: Hex(g.R12), R13: Hex(g.R13), R14: Hex(g.R14), R15: Hex(g.R15),
			RIP: Hex(g.RIP), RFLAGS: Hex(g.RFLAGS), RFLAGSBits: bitNames(g.RFLAGS, rflagsNames),
		},
		GDT: DTableReport{Base: Hex(s.GDT.Base), Limit: Hex(s.GDT.Limit)},
		IDT: DTableReport{Base: Hex(s.IDT.Base), Limit: Hex(s.IDT.Limit)},
		Control: ControlRegs{
			CR0: Hex(s.CR0), CR0Bits: bitNames(s.CR0, cr0Names), CR2: Hex(s.CR2), CR3: Hex(s.CR3),
			CR4: Hex(s.CR4), CR4Bits: bitNames(s.CR4, cr4Names), CR8: Hex(s.CR8),
			EFER: Hex(s.EFER), EFERBits: bitNames(s.EFER, eferNames),
			APICBase: Hex(s.APICBase), APICBaseBits: bitNames(s.APICBase, apicBaseNames),
		},
		MSRs: []MSRReport{},
		FPU: FPUReport{
			FCW: Hex(v.FPU.FCW), FSW: Hex(v.FPU.FSW), FTW: Hex(v.FPU.FTWX), LastOpcode: Hex(v.FPU.LastOpcode),
			LastIP: Hex(v.FPU.LastIP), LastDP: Hex(v.FPU.LastDP), MXCSR: Hex(v.FPU.MXCSR),
			NonZeroST: countNonZero(v.FPU.FPR[:]), NonZeroXMM: countNonZero(v.FPU.XMM[:]),
		},
		XSave:  describeXSave(v),
		LAPIC:  describeLAPIC(&v.LAPIC, s.APICBase),
		Events: describeEvents(&v.Events),
		Debug: DebugReport{DR: [4]Hex{Hex(v.DebugRegs.DB[0]), Hex(v.DebugRegs.DB[1]), Hex(v.DebugRegs.DB[2]),
			Hex(v.DebugRegs.DB[3])}, DR6: Hex(v.DebugRegs.DR6), DR7: Hex(v.DebugRegs.DR7)},
	}
	if n, ok := mpStateNames[v.MPState.State]; ok {
		r.MPState = n
	} else {
		r.MPState = fmt.Sprintf("unknown (%d)", v.MPState.State)
	}
	for _, sg := range []struct {
		name string
		seg  kvm.Segment
	}{{"cs", s.CS}, {"ds", s.DS}, {"es", s.ES}, {"fs", s.FS}, {"gs", s.GS}, {"ss", s.SS}, {"tr", s.TR}, {"ldt", s.LDT}} {
		r.Segs = append(r.Segs, describeSegment(sg.name, sg.seg))
	}
	if v.Sregs2 != nil && v.Sregs2.Flags&kvm.Sregs2PDPTRsValid != 0 {
		for _, p := range v.Sregs2.PDPTRs {
			r.Control.PDPTRs = append(r.Control.PDPTRs, Hex(p))
		}
	}
	for w, bits := range s.InterruptBitmap {
		for b := 0; b < 64; b++ {
			if bits&(1<<b) != 0 {
				r.PendingInterrupts = append(r.PendingInterrupts, w*64+b)
			}
		}
	}
	for _, e := range v.MSRs {
		r.MSRs = append(r.MSRs, MSRReport{Index: Hex(e.Index), Name: MSRName(e.Index), Value: Hex(e.Data)})
	}
	for i := 0; i < int(min(v.XCRs.NrXCRs, uint32(len(v.XCRs.XCRs)))); i++ {
		r.XCRs = append(r.XCRs, XCRReport{Index: v.XCRs.XCRs[i].XCR, Value: Hex(v.XCRs.XCRs[i].Value)})
	}
	fp := CPUIDFingerprint(v.CPUID)
	r.CPUID = CPUIDReport{Entries: len(v.CPUID), Fingerprint: hex.EncodeToString(fp[:])}
	if e, ok := cpuidLeaf(v.CPUID, 0, 0); ok {
		var b [12]byte
		binary.LittleEndian.PutUint32(b[0:], e.EBX)
		binary.LittleEndian.PutUint32(b[4:], e.EDX)
		binary.LittleEndian.PutUint32(b[8:], e.ECX)
		r.CPUID.MaxLeaf = Hex(e.EAX)
		r.CPUID.Vendor = strings.Map(func(c rune) rune {
			if c < 0x20 || c > 0x7e {
				return '.'
			}
			return c
		}, string(b[:]))
	}
	return r
}

func describePIC(p *kvm.PICState) PICReport {
	return PICReport{
		IRR: Hex(p.IRR), IMR: Hex(p.IMR), ISR: Hex(p.ISR), LastIRR: Hex(p.LastIRR), IRQBase: Hex(p.IRQBase),
		PriorityAdd: p.PriorityAdd, ReadRegSelect: p.ReadRegSelect, Poll: p.Poll, SpecialMask: p.SpecialMask,
		InitState: p.InitState, AutoEOI: p.AutoEOI, RotateOnAutoEOI: p.RotateOnAutoEOI,
		SpecialFullyNestedMode: p.SpecialFullyNestedMode, Init4: p.Init4, ELCR: Hex(p.ELCR), ELCRMask: Hex(p.ELCRMask),
	}
}

var deliveryModes = [...]string{"fixed", "lowest", "smi", "reserved3", "nmi", "init", "reserved6", "extint"}

// DecodeRedir decodes an IOAPIC redirection-table entry.
func DecodeRedir(pin int, e uint64) RedirReport {
	r := RedirReport{
		Pin: pin, Raw: Hex(e), Vector: uint8(e), DeliveryMode: deliveryModes[(e>>8)&7],
		DestMode: "physical", Pending: e&(1<<12) != 0, Polarity: "high", RemoteIRR: e&(1<<14) != 0,
		Trigger: "edge", Masked: e&(1<<16) != 0, Dest: uint8(e >> 56),
	}
	if e&(1<<11) != 0 {
		r.DestMode = "logical"
	}
	if e&(1<<13) != 0 {
		r.Polarity = "low"
	}
	if e&(1<<15) != 0 {
		r.Trigger = "level"
	}
	return r
}

func describeIOAPIC(a *kvm.IOAPICState) IOAPICReport {
	r := IOAPICReport{ID: a.ID, BaseAddress: Hex(a.BaseAddress), IRR: Hex(a.IRR)}
	for pin, e := range a.RedirTbl {
		r.Redir = append(r.Redir, DecodeRedir(pin, e))
	}
	return r
}

func describePIT(p *kvm.PITState2) PITReport {
	r := PITReport{Flags: Hex(p.Flags), HPETLegacy: p.Flags&kvm.PITFlagHPETLegacy != 0}
	for i, c := range p.Channels {
		r.Channels[i] = PITChannelReport{
			Count: c.Count, Mode: c.Mode, Gate: c.Gate, RWMode: c.RWMode, BCD: c.BCD,
			LatchedCount: c.LatchedCount, CountLatched: c.CountLatched, StatusLatched: c.StatusLatched,
			Status: Hex(c.Status), ReadState: c.ReadState, WriteState: c.WriteState,
			WriteLatch: c.WriteLatch, CountLoadTime: c.CountLoadTime,
		}
	}
	return r
}

func describeDevices(d *Devices) DevicesReport {
	s := &d.Serial
	r := DevicesReport{
		Serial: SerialReport{IER: Hex(s.IER), IIRFCR: Hex(s.FCR), LCR: Hex(s.LCR), MCR: Hex(s.MCR),
			LSR: Hex(s.LSR), MSR: Hex(s.MSR), SCR: Hex(s.SCR), Divisor: uint16(s.DLM)<<8 | uint16(s.DLL),
			THREPending: s.THREPending, RXFIFO: len(s.RXFIFO), Backlog: len(s.Backlog),
			Dropped: s.Dropped, WriteErrors: s.WriteErrors},
		CMOS: CMOSReport{Index: Hex(d.CMOS.Index), NMIDisabled: d.CMOS.NMIDisabled,
			StatusA: Hex(d.CMOS.RAM[0x0a]), StatusB: Hex(d.CMOS.RAM[0x0b]), StatusC: Hex(d.CMOS.RAM[0x0c]),
			StatusD: Hex(d.CMOS.RAM[0x0d]), ClockOffset: d.CMOS.ClockOffset.String(),
			RAM: hex.EncodeToString(d.CMOS.RAM[:])},
		I8042: I8042Report{CTR: Hex(d.I8042.CTR), OutputPort: Hex(d.I8042.OutputPort),
			LastWasCommand: d.I8042.LastWasCommand, PendingCommand: Hex(d.I8042.PendingCommand),
			LastData: Hex(d.I8042.LastData), Output: []string{}, Resets: d.I8042.Resets, Dropped: d.I8042.Dropped},
		Post: PostReport{Last: Hex(d.Post.Last), Writes: d.Post.Writes},
	}
	for _, b := range d.I8042.Output {
		v := Hex(b.Value).String()
		if b.Aux {
			v += " aux"
		}
		r.I8042.Output = append(r.I8042.Output, v)
	}
	return r
}

// PCIReport describes the PCI bus and its virtio functions.
type PCIReport struct {
	Conf1Address Hex             `json:"conf1_address"`
	Slots        []PCISlotReport `json:"slots"`
	Virtio       []VirtioReport  `json:"virtio"`
}

// PCISlotReport describes one function's configuration space header.
type PCISlotReport struct {
	Slot        int         `json:"slot"`
	Name        string      `json:"name"`
	VendorID    Hex         `json:"vendor_id"`
	DeviceID    Hex         `json:"device_id"`
	Class       Hex         `json:"class"` // base<<16 | subclass<<8 | prog-if
	Command     Hex         `json:"command"`
	CommandBits []string    `json:"command_bits"`
	Status      Hex         `json:"status"`
	BARs        []BARReport `json:"bars"` // the BARs with an address programmed
}

// BARReport is one programmed base address register.
type BARReport struct {
	Index        int    `json:"index"`
	Kind         string `json:"kind"` // "mem32", "mem64", "io"
	Prefetchable bool   `json:"prefetchable,omitempty"`
	Address      Hex    `json:"address"`
}

// VirtioReport describes one virtio function's transport state.
type VirtioReport struct {
	Slot                int                 `json:"slot"`
	Type                uint16              `json:"type"`
	TypeName            string              `json:"type_name"`
	Status              Hex                 `json:"status"`
	StatusBits          []string            `json:"status_bits"`
	OfferedFeatures     Hex                 `json:"offered_features"`
	OfferedNames        []string            `json:"offered_names"`
	DriverFeatures      Hex                 `json:"driver_features"`
	DriverNames         []string            `json:"driver_names"`
	DeviceFeatureSelect uint32              `json:"device_feature_select"`
	DriverFeatureSelect uint32              `json:"driver_feature_select"`
	QueueSelect         uint16              `json:"queue_select"`
	MSIXConfig          Hex                 `json:"msix_config"` // 0xffff: no vector
	ConfigGeneration    uint8               `json:"config_generation"`
	ConfigChanged       bool                `json:"config_changed"`
	ISR                 Hex                 `json:"isr"`
	MSIXVectors         int                 `json:"msix_vectors"`
	MSIXMasked          []int               `json:"msix_masked"`  // vectors whose mask bit is set
	MSIXPending         []int               `json:"msix_pending"` // vectors with their pending bit set
	DeviceStateBytes    int                 `json:"device_state_bytes"`
	Queues              []VirtioQueueReport `json:"queues"`
}

// VirtioQueueReport is one virtqueue.
type VirtioQueueReport struct {
	Index          int    `json:"index"`
	Size           uint16 `json:"size"`
	Enabled        bool   `json:"enabled"`
	Vector         Hex    `json:"vector"` // 0xffff: no vector
	Desc           Hex    `json:"desc"`
	Driver         Hex    `json:"driver"`
	Device         Hex    `json:"device"`
	NextAvail      uint16 `json:"next_avail"`
	NextUsed       uint16 `json:"next_used"`
	SignalledUsed  uint16 `json:"signalled_used"`
	SignalledValid bool   `json:"signalled_valid"`
}

var (
	pciCommandNames   = map[uint]string{0: "io", 1: "memory", 2: "bus_master", 6: "parity", 8: "serr", 10: "intx_disable"}
	virtioStatusNames = map[uint]string{0: "ACKNOWLEDGE", 1: "DRIVER", 2: "DRIVER_OK", 3: "FEATURES_OK",
		6: "DEVICE_NEEDS_RESET", 7: "FAILED"}
	virtioFeatureNames = map[uint]string{28: "INDIRECT_DESC", 29: "EVENT_IDX", 32: "VERSION_1",
		33: "ACCESS_PLATFORM", 34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM", 37: "SR_IOV",
		38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA", 40: "RING_RESET"}
)

// VirtioTypeName names a virtio device type.
func VirtioTypeName(t uint16) string {
	switch virtio.DeviceType(t) {
	case virtio.TypeNet:
		return "net"
	case virtio.TypeBlock:
		return "block"
	case virtio.TypeEntropy:
		return "entropy"
	}
	return fmt.Sprintf("type %d", t)
}

func describePCI(p *PCI) *PCIReport {
	r := &PCIReport{Conf1Address: Hex(p.Bus.Conf1Address), Slots: []PCISlotReport{}, Virtio: []VirtioReport{}}
	for _, s := range p.Bus.Slots {
		r.Slots = append(r.Slots, describePCISlot(s))
	}
	for i := range p.Virtio {
		r.Virtio = append(r.Virtio, describeVirtio(&p.Virtio[i]))
	}
	return r
}

func describePCISlot(s pci.SlotState) PCISlotReport {
	r := PCISlotReport{Slot: s.Slot, Name: s.Name, CommandBits: []string{}, BARs: []BARReport{}}
	c := s.Config.Data
	if len(c) < pci.FirstCapability {
		return r // not a valid state; the encoding refuses it
	}
	u16 := func(off int) uint16 { return binary.LittleEndian.Uint16(c[off:]) }
	u32 := func(off int) uint32 { return binary.LittleEndian.Uint32(c[off:]) }
	r.VendorID, r.DeviceID = Hex(u16(pci.RegVendorID)), Hex(u16(pci.RegDeviceID))
	r.Class = Hex(u32(pci.RegRevision) >> 8)
	r.Command, r.Status = Hex(u16(pci.RegCommand)), Hex(u16(pci.RegStatus))
	r.CommandBits = bitNames(uint64(r.Command), pciCommandNames)
	bars := pci.NumBARs
	if c[pci.RegHeaderType]&0x7f == 1 {
		bars = 2 // a bridge's header has two
	}
	for i := 0; i < bars; i++ {
		raw := u32(pci.RegBAR0 + 4*i)
		b := BARReport{Index: i}
		switch {
		case raw&1 != 0:
			b.Kind, b.Address = "io", Hex(raw&^3)
		case (raw>>1)&3 == 2 && i+1 < bars:
			b.Kind, b.Address = "mem64", Hex(uint64(u32(pci.RegBAR0+4*(i+1)))<<32|uint64(raw&^0xf))
			i++
		default:
			b.Kind, b.Address = "mem32", Hex(raw&^0xf)
		}
		b.Prefetchable = b.Kind != "io" && raw&8 != 0
		if b.Address != 0 {
			r.BARs = append(r.BARs, b)
		}
	}
	return r
}

func describeVirtio(f *VirtioFunction) VirtioReport {
	s := &f.State
	r := VirtioReport{
		Slot: f.Slot, Type: f.Type, TypeName: VirtioTypeName(f.Type),
		Status: Hex(s.Status), StatusBits: bitNames(uint64(s.Status), virtioStatusNames),
		OfferedFeatures: Hex(s.OfferedFeatures), OfferedNames: bitNames(s.OfferedFeatures, virtioFeatureNames),
		DriverFeatures: Hex(s.DriverFeatures), DriverNames: bitNames(s.DriverFeatures, virtioFeatureNames),
		DeviceFeatureSelect: s.DeviceFeatureSelect, DriverFeatureSelect: s.DriverFeatureSelect,
		QueueSelect: s.QueueSelect, MSIXConfig: Hex(s.MSIXConfig), ConfigGeneration: s.ConfigGeneration,
		ConfigChanged: s.ConfigChanged, ISR: Hex(s.ISR), MSIXVectors: len(s.MSIX.Table) / msixEntrySize,
		MSIXMasked: []int{}, MSIXPending: []int{}, DeviceStateBytes: len(s.Device), Queues: []VirtioQueueReport{},
	}
	for v := 0; v < r.MSIXVectors; v++ {
		if s.MSIX.Table[v*msixEntrySize+12]&1 != 0 {
			r.MSIXMasked = append(r.MSIXMasked, v)
		}
	}
	for i, b := range s.MSIX.PBA {
		for bit := 0; bit < 8; bit++ {
			if b&(1<<bit) != 0 {
				r.MSIXPending = append(r.MSIXPending, i*8+bit)
			}
		}
	}
	for i, q := range s.Queues {
		r.Queues = append(r.Queues, VirtioQueueReport{
			Index: i, Size: q.Size, Enabled: q.Enabled, Vector: Hex(q.Vector),
			Desc: Hex(q.Desc), Driver: Hex(q.Driver), Device: Hex(q.Device),
			NextAvail: q.NextAvail, NextUsed: q.NextUsed, SignalledUsed: q.SignalledUsed, SignalledValid: q.SignalledValid,
		})
	}
	return r
}
