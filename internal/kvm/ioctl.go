// Package kvm is ferry's typed wrapper over the Linux KVM API for x86-64:
// the system, VM and vCPU file descriptors, the ioctls on them, and Go
// structs that match the kernel ABI byte for byte (checked by tests that
// compile the kernel's own headers).
//
// It owns nothing but file descriptors and the mmap'ed kvm_run page. It
// must not know about guests, devices, boot protocols or migration: those
// live above it (internal/vmm and up).
package kvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

const kvmio = 0xAE

const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
)

func ioc(dir, nr, size uintptr) uintptr {
	return dir<<30 | size<<16 | kvmio<<8 | nr
}
func io_(nr uintptr) uintptr        { return ioc(iocNone, nr, 0) }
func ior(nr, size uintptr) uintptr  { return ioc(iocRead, nr, size) }
func iow(nr, size uintptr) uintptr  { return ioc(iocWrite, nr, size) }
func iowr(nr, size uintptr) uintptr { return ioc(iocRead|iocWrite, nr, size) }

// ioctl numbers (include/uapi/linux/kvm.h).
var (
	ioGetAPIVersion          = io_(0x00)
	ioCreateVM               = io_(0x01)
	ioGetMSRIndexList        = iowr(0x02, 4)
	ioCheckExtension         = io_(0x03)
	ioGetVCPUMmapSize        = io_(0x04)
	ioGetSupportedCPUID      = iowr(0x05, 8)
	ioGetEmulatedCPUID       = iowr(0x09, 8)
	ioGetMSRFeatureIndexList = iowr(0x0a, 4)
	ioCreateVCPU             = io_(0x41)
	ioGetDirtyLog            = iow(0x42, unsafe.Sizeof(dirtyLog{}))
	ioSetUserMemoryRegion    = iow(0x46, unsafe.Sizeof(UserspaceMemoryRegion{}))
	ioSetTSSAddr             = io_(0x47)
	ioSetIdentityMapAddr     = iow(0x48, 8)
	ioCreateIRQChip          = io_(0x60)
	ioIRQLine                = iow(0x61, unsafe.Sizeof(irqLevel{}))
	ioSignalMSI              = iow(0xa5, unsafe.Sizeof(msi{}))
	ioGetIRQChip             = iowr(0x62, unsafe.Sizeof(IRQChip{}))
	ioSetIRQChip             = ior(0x63, unsafe.Sizeof(IRQChip{}))
	ioCreatePIT2             = iow(0x77, unsafe.Sizeof(pitConfig{}))
	ioSetClock               = iow(0x7b, unsafe.Sizeof(ClockData{}))
	ioGetClock               = ior(0x7c, unsafe.Sizeof(ClockData{}))
	ioGetPIT2                = ior(0x9f, unsafe.Sizeof(PITState2{}))
	ioSetPIT2                = iow(0xa0, unsafe.Sizeof(PITState2{}))
	ioEnableCap              = iow(0xa3, unsafe.Sizeof(EnableCap{}))
	ioClearDirtyLog          = iowr(0xc0, unsafe.Sizeof(clearDirtyLog{}))
	ioRun                    = io_(0x80)
	ioGetRegs                = ior(0x81, unsafe.Sizeof(Regs{}))
	ioSetRegs                = iow(0x82, unsafe.Sizeof(Regs{}))
	ioGetSregs               = ior(0x83, unsafe.Sizeof(Sregs{}))
	ioSetSregs               = iow(0x84, unsafe.Sizeof(Sregs{}))
	ioInterrupt              = iow(0x86, 4)
	ioGetMSRs                = iowr(0x88, 8)
	ioSetMSRs                = iow(0x89, 8)
	ioGetFPU                 = ior(0x8c, unsafe.Sizeof(FPU{}))
	ioSetFPU                 = iow(0x8d, unsafe.Sizeof(FPU{}))
	ioGetLAPIC               = ior(0x8e, unsafe.Sizeof(LAPICState{}))
	ioSetLAPIC               = iow(0x8f, unsafe.Sizeof(LAPICState{}))
	ioSetCPUID2              = iow(0x90, 8)
	ioGetCPUID2              = iowr(0x91, 8)
	ioGetMPState             = ior(0x98, unsafe.Sizeof(MPState{}))
	ioSetMPState             = iow(0x99, unsafe.Sizeof(MPState{}))
	ioNMI                    = io_(0x9a)
	ioGetVCPUEvents          = ior(0x9f, unsafe.Sizeof(VCPUEvents{}))
	ioSetVCPUEvents          = iow(0xa0, unsafe.Sizeof(VCPUEvents{}))
	ioGetDebugRegs           = ior(0xa1, unsafe.Sizeof(DebugRegs{}))
	ioSetDebugRegs           = iow(0xa2, unsafe.Sizeof(DebugRegs{}))
	ioGetXSave               = ior(0xa4, 4096)
	ioSetXSave               = iow(0xa5, 4096)
	ioGetXCRs                = ior(0xa6, unsafe.Sizeof(XCRs{}))
	ioSetXCRs                = iow(0xa7, unsafe.Sizeof(XCRs{}))
	ioSetTSCKHz              = io_(0xa2)
	ioGetTSCKHz              = io_(0xa3)
	ioKVMClockCtrl           = io_(0xad)
	ioGetSregs2              = ior(0xcc, unsafe.Sizeof(Sregs2{}))
	ioSetSregs2              = iow(0xcd, unsafe.Sizeof(Sregs2{}))
	ioGetXSave2              = ior(0xcf, 4096)
)

// Errno is returned (wrapped) by every failing ioctl so callers can test it
// with errors.Is(err, unix.EINTR) and similar.
func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if e != 0 {
		return r, e
	}
	return r, nil
}

func ioctlPtr(fd int, req uintptr, p unsafe.Pointer) error {
	_, err := ioctl(fd, req, uintptr(p))
	return err
}

func wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", op, err)
}
