package uffd

import (
	"testing"
	"unsafe"

	"github.com/ferry-vmm/ferry/internal/cabi"
	"golang.org/x/sys/unix"
)

// abiFact is one number that must agree between Go and the kernel headers.
type abiFact struct {
	cExpr string
	goVal uintptr
}

func abiFacts() []abiFact {
	var api uffdioAPI
	var reg uffdioRegister
	var rng uffdioRange
	var cp uffdioCopy
	var zp uffdioZeroPage
	var msg uffdMsg
	return []abiFact{
		{"sizeof(struct uffdio_api)", unsafe.Sizeof(api)},
		{"offsetof(struct uffdio_api, api)", unsafe.Offsetof(api.API)},
		{"offsetof(struct uffdio_api, features)", unsafe.Offsetof(api.Features)},
		{"offsetof(struct uffdio_api, ioctls)", unsafe.Offsetof(api.Ioctls)},
		{"sizeof(struct uffdio_range)", unsafe.Sizeof(rng)},
		{"offsetof(struct uffdio_range, start)", unsafe.Offsetof(rng.Start)},
		{"offsetof(struct uffdio_range, len)", unsafe.Offsetof(rng.Len)},
		{"sizeof(struct uffdio_register)", unsafe.Sizeof(reg)},
		{"offsetof(struct uffdio_register, range)", unsafe.Offsetof(reg.Range)},
		{"offsetof(struct uffdio_register, mode)", unsafe.Offsetof(reg.Mode)},
		{"offsetof(struct uffdio_register, ioctls)", unsafe.Offsetof(reg.Ioctls)},
		{"sizeof(struct uffdio_copy)", unsafe.Sizeof(cp)},
		{"offsetof(struct uffdio_copy, dst)", unsafe.Offsetof(cp.Dst)},
		{"offsetof(struct uffdio_copy, src)", unsafe.Offsetof(cp.Src)},
		{"sizeof(((struct uffdio_copy *)0)->src)", unsafe.Sizeof(cp.Src)},
		{"offsetof(struct uffdio_copy, len)", unsafe.Offsetof(cp.Len)},
		{"offsetof(struct uffdio_copy, mode)", unsafe.Offsetof(cp.Mode)},
		{"offsetof(struct uffdio_copy, copy)", unsafe.Offsetof(cp.Copy)},
		{"sizeof(struct uffdio_zeropage)", unsafe.Sizeof(zp)},
		{"offsetof(struct uffdio_zeropage, range)", unsafe.Offsetof(zp.Range)},
		{"offsetof(struct uffdio_zeropage, mode)", unsafe.Offsetof(zp.Mode)},
		{"offsetof(struct uffdio_zeropage, zeropage)", unsafe.Offsetof(zp.ZeroPage)},
		{"sizeof(struct uffd_msg)", unsafe.Sizeof(msg)},
		{"offsetof(struct uffd_msg, event)", unsafe.Offsetof(msg.Event)},
		{"offsetof(struct uffd_msg, reserved1)", unsafe.Offsetof(msg.Reserved1)},
		{"offsetof(struct uffd_msg, reserved2)", unsafe.Offsetof(msg.Reserved2)},
		{"offsetof(struct uffd_msg, reserved3)", unsafe.Offsetof(msg.Reserved3)},
		{"offsetof(struct uffd_msg, arg.pagefault.flags)", unsafe.Offsetof(msg.Flags)},
		{"offsetof(struct uffd_msg, arg.pagefault.address)", unsafe.Offsetof(msg.Address)},
		{"offsetof(struct uffd_msg, arg.pagefault.feat.ptid)", unsafe.Offsetof(msg.PTID)},
		// Constants.
		{"UFFD_API", uffdAPI},
		{"UFFD_FEATURE_THREAD_ID", featureThreadID},
		{"_UFFDIO_ZEROPAGE", ioctlBitZeroPage},
		{"UFFDIO_REGISTER_MODE_MISSING", registerModeMissing},
		{"UFFDIO_COPY_MODE_DONTWAKE", copyModeDontWake},
		{"UFFDIO_ZEROPAGE_MODE_DONTWAKE", zeroPageModeDontWake},
		{"UFFD_EVENT_PAGEFAULT", eventPagefault},
		{"UFFD_PAGEFAULT_FLAG_WRITE", pagefaultFlagWrite},
		{"__NR_userfaultfd", unix.SYS_USERFAULTFD},
		// ioctl request codes.
		{"USERFAULTFD_IOC_NEW", ioNew},
		{"UFFDIO_API", ioAPI},
		{"UFFDIO_REGISTER", ioRegister},
		{"UFFDIO_UNREGISTER", ioUnregister},
		{"UFFDIO_WAKE", ioWake},
		{"UFFDIO_COPY", ioCopy},
		{"UFFDIO_ZEROPAGE", ioZeroPage},
	}
}

// TestABIMatchesKernelHeaders compiles a C program against
// <linux/userfaultfd.h> that prints every size, offset and constant listed
// in abiFacts, and compares with the Go definitions.
func TestABIMatchesKernelHeaders(t *testing.T) {
	cabi.Check(t, []string{"linux/userfaultfd.h", "sys/syscall.h", "linux/ioctl.h"}, checks(abiFacts()))
}

func checks(facts []abiFact) []cabi.Fact {
	out := make([]cabi.Fact, len(facts))
	for i, f := range facts {
		out[i] = cabi.Fact{C: f.cExpr, Go: f.goVal}
	}
	return out
}
