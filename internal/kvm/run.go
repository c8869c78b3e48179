package kvm

import (
	"encoding/binary"
	"unsafe"
)

// Exit reasons (kvm_run.exit_reason).
const (
	ExitUnknown       = 0
	ExitException     = 1
	ExitIO            = 2
	ExitHypercall     = 3
	ExitDebug         = 4
	ExitHLT           = 5
	ExitMMIO          = 6
	ExitIRQWindowOpen = 7
	ExitShutdown      = 8
	ExitFailEntry     = 9
	ExitIntr          = 10
	ExitSetTPR        = 11
	ExitTPRAccess     = 12
	ExitNMI           = 16
	ExitInternalError = 17
	ExitSystemEvent   = 24
)

var exitNames = map[uint32]string{
	ExitUnknown: "UNKNOWN", ExitException: "EXCEPTION", ExitIO: "IO", ExitHypercall: "HYPERCALL",
	ExitDebug: "DEBUG", ExitHLT: "HLT", ExitMMIO: "MMIO", ExitIRQWindowOpen: "IRQ_WINDOW_OPEN",
	ExitShutdown: "SHUTDOWN", ExitFailEntry: "FAIL_ENTRY", ExitIntr: "INTR", ExitSetTPR: "SET_TPR",
	ExitTPRAccess: "TPR_ACCESS", ExitNMI: "NMI", ExitInternalError: "INTERNAL_ERROR",
	ExitSystemEvent: "SYSTEM_EVENT",
}

// ExitName names an exit reason for diagnostics.
func ExitName(reason uint32) string {
	if n, ok := exitNames[reason]; ok {
		return n
	}
	return "exit#" + itoa(uint64(reason))
}

func itoa(v uint64) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			return string(b[i:])
		}
	}
}

// System event types (kvm_run.system_event.type).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
)

// I/O directions.
const (
	IOIn  = 0
	IOOut = 1
)

// runHead mirrors the fixed head of struct kvm_run up to the exit union,
// which starts at offset 32 and is 256 bytes long.
type runHead struct {
	RequestInterruptWindow     uint8
	ImmediateExit              uint8
	_                          [6]uint8
	ExitReason                 uint32
	ReadyForInterruptInjection uint8
	IfFlag                     uint8
	Flags                      uint16
	CR8                        uint64
	APICBase                   uint64
}

const runUnionOffset = 32

// RunIO is kvm_run.io: a port I/O exit. The data lives in the kvm_run page
// at DataOffset; Count repetitions of Size bytes (string I/O).
type RunIO struct {
	Direction  uint8
	Size       uint8
	Port       uint16
	Count      uint32
	DataOffset uint64
}

// RunMMIO is kvm_run.mmio.
type RunMMIO struct {
	PhysAddr uint64
	Data     [8]uint8
	Len      uint32
	IsWrite  uint8
}

// RunInternal is kvm_run.internal.
type RunInternal struct {
	Suberror uint32
	NData    uint32
	Data     [16]uint64
}

// RunFailEntry is kvm_run.fail_entry.
type RunFailEntry struct {
	HardwareEntryFailureReason uint64
	CPU                        uint32
}

// RunSystemEvent is kvm_run.system_event.
type RunSystemEvent struct {
	Type  uint32
	NData uint32
	Data  [16]uint64
}

// Run is the vCPU's shared kvm_run page, mapped from the vCPU fd.
type Run struct {
	page []byte
}

func (r *Run) head() *runHead { return (*runHead)(unsafe.Pointer(&r.page[0])) }

// ExitReason is why the last KVM_RUN returned.
func (r *Run) ExitReason() uint32 { return r.head().ExitReason }

// SetImmediateExit makes the next (or a racing) KVM_RUN return at once with
// EINTR, without entering the guest; used to kick a vCPU out reliably.
func (r *Run) SetImmediateExit(on bool) {
	var v uint8
	if on {
		v = 1
	}
	// A plain store: the kernel reads this byte on entry to KVM_RUN.
	*(*uint8)(unsafe.Pointer(&r.page[1])) = v
}

// SetRequestInterruptWindow asks KVM to exit when the guest can take an
// interrupt (only meaningful without an in-kernel irqchip).
func (r *Run) SetRequestInterruptWindow(on bool) {
	var v uint8
	if on {
		v = 1
	}
	r.head().RequestInterruptWindow = v
}

// ReadyForInterruptInjection reports kvm_run.ready_for_interrupt_injection.
func (r *Run) ReadyForInterruptInjection() bool { return r.head().ReadyForInterruptInjection != 0 }

// IfFlag reports the guest's RFLAGS.IF as of the exit.
func (r *Run) IfFlag() bool { return r.head().IfFlag != 0 }

// IO is the exit union as a port I/O exit.
func (r *Run) IO() *RunIO { return (*RunIO)(unsafe.Pointer(&r.page[runUnionOffset])) }

// IOData is the data buffer of a port I/O exit: Count*Size bytes.
func (r *Run) IOData() []byte {
	io := r.IO()
	n := uint64(io.Size) * uint64(io.Count)
	if io.DataOffset+n > uint64(len(r.page)) {
		return nil
	}
	return r.page[io.DataOffset : io.DataOffset+n]
}

// MMIO is the exit union as an MMIO exit.
func (r *Run) MMIO() *RunMMIO { return (*RunMMIO)(unsafe.Pointer(&r.page[runUnionOffset])) }

// Internal is the exit union as an internal-error exit.
func (r *Run) Internal() *RunInternal {
	return (*RunInternal)(unsafe.Pointer(&r.page[runUnionOffset]))
}

// FailEntry is the exit union as a failed-entry exit.
func (r *Run) FailEntry() *RunFailEntry {
	return (*RunFailEntry)(unsafe.Pointer(&r.page[runUnionOffset]))
}

// SystemEvent is the exit union as a system-event exit.
func (r *Run) SystemEvent() *RunSystemEvent {
	return (*RunSystemEvent)(unsafe.Pointer(&r.page[runUnionOffset]))
}

// ExceptionInfo returns kvm_run.ex (exception number, error code).
func (r *Run) ExceptionInfo() (uint32, uint32) {
	b := r.page[runUnionOffset:]
	return binary.LittleEndian.Uint32(b), binary.LittleEndian.Uint32(b[4:])
}
