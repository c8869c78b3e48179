package kvm

import (
	"errors"
	"fmt"

	"unsafe"

	"golang.org/x/sys/unix"
)

// APIVersion is the only KVM API version there has ever been.
const APIVersion = 12

// Capabilities ferry checks (KVM_CHECK_EXTENSION).
const (
	CapIRQChip                = 0
	CapSetTSSAddr             = 4
	CapExtCPUID               = 7
	CapNrVCPUs                = 9
	CapNrMemslots             = 10
	CapPIT2                   = 33
	CapAdjustClock            = 39
	CapVCPUEvents             = 41
	CapDebugRegs              = 50
	CapXSave                  = 55
	CapXCRs                   = 56
	CapTSCControl             = 60
	CapGetTSCKHz              = 61
	CapMaxVCPUs               = 66
	CapKVMClockCtrl           = 76
	CapX86SMM                 = 117
	CapImmediateExit          = 136
	CapGetMSRFeatures         = 153
	CapManualDirtyLogProtect2 = 168
	CapDirtyLogRing           = 192
	CapSregs2                 = 200
	CapXSave2                 = 208
)

// DevicePath is where the KVM device lives.
const DevicePath = "/dev/kvm"

// ErrUnavailable wraps failures to open /dev/kvm, so that tests can skip.
var ErrUnavailable = errors.New("KVM is not available")

// System is an open /dev/kvm.
type System struct {
	fd       int
	mmapSize int
}

// Open opens /dev/kvm and checks the API version.
func Open() (*System, error) {
	fd, err := unix.Open(DevicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: open %s: %v", ErrUnavailable, DevicePath, err)
	}
	s := &System{fd: fd}
	v, err := ioctl(fd, ioGetAPIVersion, 0)
	if err != nil {
		s.Close()
		return nil, wrap("KVM_GET_API_VERSION", err)
	}
	if v != APIVersion {
		s.Close()
		return nil, fmt.Errorf("KVM API version %d, ferry needs %d", v, APIVersion)
	}
	n, err := ioctl(fd, ioGetVCPUMmapSize, 0)
	if err != nil {
		s.Close()
		return nil, wrap("KVM_GET_VCPU_MMAP_SIZE", err)
	}
	s.mmapSize = int(n)
	return s, nil
}

// Available reports whether /dev/kvm can be opened, and why not.
func Available() error {
	s, err := Open()
	if err != nil {
		return err
	}
	return s.Close()
}

// Close closes /dev/kvm.
func (s *System) Close() error { return unix.Close(s.fd) }

// CheckExtension returns KVM_CHECK_EXTENSION for cap on /dev/kvm (0 means
// unsupported).
func (s *System) CheckExtension(cap int) int {
	r, err := ioctl(s.fd, ioCheckExtension, uintptr(cap))
	if err != nil {
		return 0
	}
	return int(r)
}

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID: every leaf KVM can give a
// guest on this host.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	return getCPUIDList(s.fd, ioGetSupportedCPUID, "KVM_GET_SUPPORTED_CPUID")
}

// EmulatedCPUID returns KVM_GET_EMULATED_CPUID.
func (s *System) EmulatedCPUID() ([]CPUIDEntry, error) {
	return getCPUIDList(s.fd, ioGetEmulatedCPUID, "KVM_GET_EMULATED_CPUID")
}

func getCPUIDList(fd int, req uintptr, name string) ([]CPUIDEntry, error) {
	for n := 64; n <= 4096; n *= 2 {
		buf := make([]byte, int(unsafe.Sizeof(cpuidHeader{}))+n*int(unsafe.Sizeof(CPUIDEntry{})))
		hdr := (*cpuidHeader)(unsafe.Pointer(&buf[0]))
		hdr.NEnt = uint32(n)
		err := ioctlPtr(fd, req, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, wrap(name, err)
		}
		entries := unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[unsafe.Sizeof(cpuidHeader{})])), hdr.NEnt)
		return append([]CPUIDEntry(nil), entries...), nil
	}
	return nil, fmt.Errorf("%s: more than 4096 entries", name)
}

// MSRIndexList returns KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and
// restores for a guest (plus the emulated ones it reports there).
func (s *System) MSRIndexList() ([]uint32, error) {
	return getMSRList(s.fd, ioGetMSRIndexList, "KVM_GET_MSR_INDEX_LIST")
}

// MSRFeatureIndexList returns KVM_GET_MSR_FEATURE_INDEX_LIST.
func (s *System) MSRFeatureIndexList() ([]uint32, error) {
	return getMSRList(s.fd, ioGetMSRFeatureIndexList, "KVM_GET_MSR_FEATURE_INDEX_LIST")
}

func getMSRList(fd int, req uintptr, name string) ([]uint32, error) {
	var probe [1]uint32 // nmsrs = 0: the kernel answers E2BIG with the count
	err := ioctlPtr(fd, req, unsafe.Pointer(&probe[0]))
	if err != nil && !errors.Is(err, unix.E2BIG) {
		return nil, wrap(name, err)
	}
	n := probe[0]
	// The second call was seen to fail with E2BIG (once, under load, on
	// PVM): the kernel then says the count it wants; ask again.
	for range 5 {
		if n > 1<<16 {
			return nil, fmt.Errorf("%s: implausible count %d", name, n)
		}
		buf := make([]uint32, 1+n)
		buf[0] = n
		err := ioctlPtr(fd, req, unsafe.Pointer(&buf[0]))
		if err == nil {
			return append([]uint32(nil), buf[1:1+buf[0]]...), nil
		}
		if !errors.Is(err, unix.E2BIG) {
			return nil, wrap(name, err)
		}
		n = max(buf[0], n) // the count the kernel wants now
	}
	return nil, fmt.Errorf("%s: the count keeps changing", name)
}

// CreateVM creates a VM.
func (s *System) CreateVM() (*VM, error) {
	var fd uintptr
	var err error
	for i := 0; i < 100; i++ {
		fd, err = ioctl(s.fd, ioCreateVM, 0)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return nil, wrap("KVM_CREATE_VM", err)
	}
	return &VM{sys: s, fd: int(fd)}, nil
}

// VM is a KVM virtual machine file descriptor.
type VM struct {
	sys *System
	fd  int
}

// Fd exposes the VM file descriptor (for dirty-ring mmaps and the like).
func (vm *VM) Fd() int { return vm.fd }

// Close closes the VM fd. The kernel frees the VM once every vCPU fd is
// closed as well.
func (vm *VM) Close() error { return unix.Close(vm.fd) }

// CheckExtension is KVM_CHECK_EXTENSION on the VM fd (per-VM answers).
func (vm *VM) CheckExtension(cap int) int {
	r, err := ioctl(vm.fd, ioCheckExtension, uintptr(cap))
	if err != nil {
		return 0
	}
	return int(r)
}

// SetUserMemoryRegion installs, changes or (with size 0) deletes a slot.
func (vm *VM) SetUserMemoryRegion(r UserspaceMemoryRegion) error {
	return wrap(fmt.Sprintf("KVM_SET_USER_MEMORY_REGION slot %d", r.Slot),
		ioctlPtr(vm.fd, ioSetUserMemoryRegion, unsafe.Pointer(&r)))
}

// GetDirtyLog fills bitmap (one bit per page of the slot, in 64-bit words)
// with the pages written since the last call, and resets the log.
func (vm *VM) GetDirtyLog(slot uint32, bitmap []uint64) error {
	if len(bitmap) == 0 {
		return fmt.Errorf("KVM_GET_DIRTY_LOG slot %d: empty bitmap", slot)
	}
	d := dirtyLog{Slot: slot, Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	return wrap(fmt.Sprintf("KVM_GET_DIRTY_LOG slot %d", slot),
		ioctlPtr(vm.fd, ioGetDirtyLog, unsafe.Pointer(&d)))
}

// ClearDirtyLog re-protects the pages set in bitmap, starting at firstPage
// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 mode).
func (vm *VM) ClearDirtyLog(slot uint32, firstPage uint64, numPages uint32, bitmap []uint64) error {
	d := clearDirtyLog{Slot: slot, NumPages: numPages, FirstPage: firstPage,
		Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	return wrap("KVM_CLEAR_DIRTY_LOG", ioctlPtr(vm.fd, ioClearDirtyLog, unsafe.Pointer(&d)))
}

// SetTSSAddr sets the three-page region KVM needs for real-mode emulation
// on Intel hosts.
func (vm *VM) SetTSSAddr(addr uint64) error {
	_, err := ioctl(vm.fd, ioSetTSSAddr, uintptr(addr))
	return wrap("KVM_SET_TSS_ADDR", err)
}

// SetIdentityMapAddr sets the page KVM uses for the EPT identity map.
func (vm *VM) SetIdentityMapAddr(addr uint64) error {
	return wrap("KVM_SET_IDENTITY_MAP_ADDR", ioctlPtr(vm.fd, ioSetIdentityMapAddr, unsafe.Pointer(&addr)))
}

// CreateIRQChip creates the in-kernel PIC pair, IOAPIC and local APICs.
func (vm *VM) CreateIRQChip() error {
	_, err := ioctl(vm.fd, ioCreateIRQChip, 0)
	return wrap("KVM_CREATE_IRQCHIP", err)
}

// CreatePIT2 creates the in-kernel i8254 PIT.
func (vm *VM) CreatePIT2() error {
	c := pitConfig{}
	return wrap("KVM_CREATE_PIT2", ioctlPtr(vm.fd, ioCreatePIT2, unsafe.Pointer(&c)))
}

// IRQLine sets the level of a GSI of the in-kernel irqchip.
func (vm *VM) IRQLine(gsi uint32, high bool) error {
	l := irqLevel{IRQ: gsi}
	if high {
		l.Level = 1
	}
	return wrap(fmt.Sprintf("KVM_IRQ_LINE gsi %d", gsi), ioctlPtr(vm.fd, ioIRQLine, unsafe.Pointer(&l)))
}

// SignalMSI injects one message-signalled interrupt (KVM_SIGNAL_MSI):
// data written to addr, as a PCI function's MSI-X table entry holds them.
// It may be called from any thread. KVM returns 0 when the interrupt was
// not delivered (masked at the LAPIC, for one), which is not an error.
func (vm *VM) SignalMSI(addr uint64, data uint32) error {
	m := msi{AddressLo: uint32(addr), AddressHi: uint32(addr >> 32), Data: data}
	return wrap("KVM_SIGNAL_MSI", ioctlPtr(vm.fd, ioSignalMSI, unsafe.Pointer(&m)))
}

// GetIRQChip reads one interrupt controller (IRQChipPICMaster, ...).
func (vm *VM) GetIRQChip(id uint32) (IRQChip, error) {
	c := IRQChip{ChipID: id}
	err := ioctlPtr(vm.fd, ioGetIRQChip, unsafe.Pointer(&c))
	return c, wrap(fmt.Sprintf("KVM_GET_IRQCHIP %d", id), err)
}

// SetIRQChip writes one interrupt controller.
func (vm *VM) SetIRQChip(c IRQChip) error {
	return wrap(fmt.Sprintf("KVM_SET_IRQCHIP %d", c.ChipID), ioctlPtr(vm.fd, ioSetIRQChip, unsafe.Pointer(&c)))
}

// PIC interprets the chip union as an 8259A.
func (c *IRQChip) PIC() *PICState { return (*PICState)(unsafe.Pointer(&c.Chip[0])) }

// IOAPIC interprets the chip union as the IOAPIC.
func (c *IRQChip) IOAPIC() *IOAPICState { return (*IOAPICState)(unsafe.Pointer(&c.Chip[0])) }

// GetPIT2 reads the PIT.
func (vm *VM) GetPIT2() (PITState2, error) {
	var p PITState2
	return p, wrap("KVM_GET_PIT2", ioctlPtr(vm.fd, ioGetPIT2, unsafe.Pointer(&p)))
}

// SetPIT2 writes the PIT.
func (vm *VM) SetPIT2(p PITState2) error {
	return wrap("KVM_SET_PIT2", ioctlPtr(vm.fd, ioSetPIT2, unsafe.Pointer(&p)))
}

// GetClock reads the VM's kvmclock.
func (vm *VM) GetClock() (ClockData, error) {
	var c ClockData
	return c, wrap("KVM_GET_CLOCK", ioctlPtr(vm.fd, ioGetClock, unsafe.Pointer(&c)))
}

// SetClock sets the VM's kvmclock.
func (vm *VM) SetClock(c ClockData) error {
	return wrap("KVM_SET_CLOCK", ioctlPtr(vm.fd, ioSetClock, unsafe.Pointer(&c)))
}

// EnableCap enables a VM capability.
func (vm *VM) EnableCap(c EnableCap) error {
	return wrap(fmt.Sprintf("KVM_ENABLE_CAP %d", c.Cap), ioctlPtr(vm.fd, ioEnableCap, unsafe.Pointer(&c)))
}

// CreateVCPU creates vCPU id and maps its kvm_run page.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctl(vm.fd, ioCreateVCPU, uintptr(id))
	if err != nil {
		return nil, wrap(fmt.Sprintf("KVM_CREATE_VCPU %d", id), err)
	}
	page, err := unix.Mmap(int(fd), 0, vm.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("mapping kvm_run of vCPU %d: %w", id, err)
	}
	return &VCPU{ID: id, fd: int(fd), run: Run{page: page}, vm: vm}, nil
}

// XSaveSize is the size of the XSAVE buffer KVM_GET_XSAVE2 needs (at least
// 4096), from KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM.
func (vm *VM) XSaveSize() int {
	n := vm.CheckExtension(CapXSave2)
	if n < 4096 {
		return 4096
	}
	return n
}
