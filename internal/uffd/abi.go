package uffd

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// Kernel ABI of include/uapi/linux/userfaultfd.h. TestABIMatchesKernelHeaders
// compiles that header and checks every number below.

const uffdAPI = 0xAA // UFFD_API

const featureThreadID = 1 << 8 // UFFD_FEATURE_THREAD_ID (struct uffdio_api.features)

// Bit number of UFFDIO_ZEROPAGE in struct uffdio_register.ioctls.
const ioctlBitZeroPage = 0x04 // _UFFDIO_ZEROPAGE

const (
	registerModeMissing  = 1 << 0 // UFFDIO_REGISTER_MODE_MISSING
	copyModeDontWake     = 1 << 0 // UFFDIO_COPY_MODE_DONTWAKE
	zeroPageModeDontWake = 1 << 0 // UFFDIO_ZEROPAGE_MODE_DONTWAKE
)

const (
	eventPagefault     = 0x12   // UFFD_EVENT_PAGEFAULT
	pagefaultFlagWrite = 1 << 0 // UFFD_PAGEFAULT_FLAG_WRITE
)

const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
	uffdio   = 0xAA // UFFDIO and USERFAULTFD_IOC
)

func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | uffdio<<8 | nr }

// ioctl request codes. UFFDIO_UNREGISTER and UFFDIO_WAKE are _IOR although
// the kernel only reads their argument: a historical mistake kept for ABI
// compatibility.
var (
	ioNew        = ioc(iocNone, 0x00, 0) // USERFAULTFD_IOC_NEW, on /dev/userfaultfd
	ioAPI        = ioc(iocRead|iocWrite, 0x3F, unsafe.Sizeof(uffdioAPI{}))
	ioRegister   = ioc(iocRead|iocWrite, 0x00, unsafe.Sizeof(uffdioRegister{}))
	ioUnregister = ioc(iocRead, 0x01, unsafe.Sizeof(uffdioRange{}))
	ioWake       = ioc(iocRead, 0x02, unsafe.Sizeof(uffdioRange{}))
	ioCopy       = ioc(iocRead|iocWrite, 0x03, unsafe.Sizeof(uffdioCopy{}))
	ioZeroPage   = ioc(iocRead|iocWrite, 0x04, unsafe.Sizeof(uffdioZeroPage{}))
)

// struct uffdio_api
type uffdioAPI struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

// struct uffdio_range
type uffdioRange struct {
	Start uint64
	Len   uint64
}

// struct uffdio_register
type uffdioRegister struct {
	Range  uffdioRange
	Mode   uint64
	Ioctls uint64
}

// struct uffdio_copy. Src is a __u64 in C; it is a pointer here so that the
// garbage collector keeps the source buffer alive and in place for the
// duration of the ioctl.
type uffdioCopy struct {
	Dst  uint64
	Src  unsafe.Pointer
	Len  uint64
	Mode uint64
	Copy int64
}

// struct uffdio_zeropage
type uffdioZeroPage struct {
	Range    uffdioRange
	Mode     uint64
	ZeroPage int64
}

// struct uffd_msg, with the pagefault member of its union spelled out (the
// other members are never read).
type uffdMsg struct {
	Event     uint8
	Reserved1 uint8
	Reserved2 uint16
	Reserved3 uint32
	Flags     uint64 // arg.pagefault.flags
	Address   uint64 // arg.pagefault.address
	PTID      uint32 // arg.pagefault.feat.ptid
	_         uint32
}

const msgSize = int(unsafe.Sizeof(uffdMsg{}))

// ioctl issues one ioctl whose argument is a pointer to a struct. The
// conversion to uintptr happens in the call to the assembly syscall stub,
// which keeps *arg alive and unmoved until the call returns.
func ioctl[T any](fd int, req uintptr, arg *T) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(unsafe.Pointer(arg)))
	if e != 0 {
		return e
	}
	return nil
}
