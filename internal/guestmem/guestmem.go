// Package guestmem owns a guest's RAM: one memfd mapped MAP_SHARED into the
// VMM, and the x86 physical layout that places it in guest-physical address
// space (low RAM below the 32-bit MMIO hole, the rest above 4 GiB).
//
// Because the backing store is a memfd, another component (a migration
// sender, a userfaultfd handler, a second process) can map the same memory.
// This package knows nothing of KVM, devices or boot protocols; it only
// translates guest-physical addresses to host memory.
package guestmem

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Layout constants of the x86 guest-physical address space.
const (
	PageSize = 4096

	// MMIOHoleStart is where RAM below 4 GiB ends; [MMIOHoleStart, 4 GiB)
	// holds the IOAPIC, LAPIC and device MMIO windows.
	MMIOHoleStart = 0xC000_0000
	// HighRAMStart is where RAM that did not fit below the hole continues.
	HighRAMStart = 0x1_0000_0000

	// LowRAMEnd is the end of conventional memory (640 KiB less the EBDA).
	EBDAStart  = 0x9_FC00
	LowRAMEnd  = 0xA_0000
	HighMemory = 0x10_0000 // 1 MiB: start of extended memory

	// MinSize is the smallest guest ferry builds (room for boot structures,
	// page tables and a kernel).
	MinSize = 16 << 20
)

// E820 memory types (ACPI address range types), shared by the Linux zero
// page and the PVH memory map.
const (
	E820RAM      = 1
	E820Reserved = 2
)

// Region is one contiguous guest-physical RAM range backed by the memfd at
// Offset. Each region becomes one KVM memory slot.
type Region struct {
	GPA    uint64
	Size   uint64
	Offset uint64 // offset into the memfd and into Memory.Bytes()
}

// E820Entry is one entry of the firmware memory map given to the guest.
type E820Entry struct {
	Addr uint64
	Size uint64
	Type uint32
}

// Memory is a guest's RAM.
type Memory struct {
	fd      int
	data    []byte
	regions []Region
}

// New creates size bytes of zeroed guest RAM (size must be a multiple of
// 2 MiB and at least MinSize) and lays it out around the MMIO hole.
func New(size uint64) (*Memory, error) {
	if size < MinSize {
		return nil, fmt.Errorf("guest memory %d bytes is below the minimum of %d MiB", size, MinSize>>20)
	}
	if size%(2<<20) != 0 {
		return nil, fmt.Errorf("guest memory %d bytes is not a multiple of 2 MiB", size)
	}
	fd, err := unix.MemfdCreate("ferry-guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sizing guest memory memfd to %d bytes: %w", size, err)
	}
	data, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mapping guest memory: %w", err)
	}
	return &Memory{fd: fd, data: data, regions: Layout(size)}, nil
}

// Layout returns the guest-physical regions for size bytes of RAM.
func Layout(size uint64) []Region {
	if size <= MMIOHoleStart {
		return []Region{{GPA: 0, Size: size, Offset: 0}}
	}
	return []Region{
		{GPA: 0, Size: MMIOHoleStart, Offset: 0},
		{GPA: HighRAMStart, Size: size - MMIOHoleStart, Offset: MMIOHoleStart},
	}
}

// Size is the total amount of guest RAM in bytes.
func (m *Memory) Size() uint64 { return uint64(len(m.data)) }

// Fd is the memfd backing the RAM; it stays owned by Memory.
func (m *Memory) Fd() int { return m.fd }

// Bytes is the whole RAM as mapped in this process, indexed by memfd offset
// (not by guest-physical address).
func (m *Memory) Bytes() []byte { return m.data }

// Regions lists the guest-physical RAM ranges.
func (m *Memory) Regions() []Region { return append([]Region(nil), m.regions...) }

// ErrOutOfRange reports an access outside guest RAM.
var ErrOutOfRange = errors.New("guest-physical range is not RAM")

// Slice returns the host view of [gpa, gpa+n). The range must lie within one
// region.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	for _, r := range m.regions {
		if gpa >= r.GPA && gpa-r.GPA <= r.Size && n <= r.Size-(gpa-r.GPA) {
			off := r.Offset + (gpa - r.GPA)
			return m.data[off : off+n : off+n], nil
		}
	}
	return nil, fmt.Errorf("%w: [%#x, %#x)", ErrOutOfRange, gpa, gpa+n)
}

// Offset is the memfd offset of guest-physical address gpa (the index
// into Bytes), or false if gpa is not RAM.
func (m *Memory) Offset(gpa uint64) (uint64, bool) {
	for _, r := range m.regions {
		if gpa >= r.GPA && gpa-r.GPA < r.Size {
			return r.Offset + (gpa - r.GPA), true
		}
	}
	return 0, false
}

// Write copies b into guest memory at gpa.
func (m *Memory) Write(gpa uint64, b []byte) error {
	dst, err := m.Slice(gpa, uint64(len(b)))
	if err != nil {
		return err
	}
	copy(dst, b)
	return nil
}

// E820 returns the memory map firmware would report: conventional memory
// below the EBDA, extended memory up to the MMIO hole, and RAM above 4 GiB.
// The legacy VGA/BIOS window and the EBDA are reported reserved so that
// guests leave the boot structures ferry places there alone.
func (m *Memory) E820() []E820Entry {
	var map_ []E820Entry
	map_ = append(map_,
		E820Entry{Addr: 0, Size: EBDAStart, Type: E820RAM},
		E820Entry{Addr: EBDAStart, Size: HighMemory - EBDAStart, Type: E820Reserved},
	)
	for _, r := range m.regions {
		start, end := r.GPA, r.GPA+r.Size
		if start < HighMemory {
			start = HighMemory
		}
		if end > start {
			map_ = append(map_, E820Entry{Addr: start, Size: end - start, Type: E820RAM})
		}
	}
	return map_
}

// Close unmaps the RAM and closes the memfd.
func (m *Memory) Close() error {
	var errs []error
	if m.data != nil {
		errs = append(errs, unix.Munmap(m.data))
		m.data = nil
	}
	if m.fd >= 0 {
		errs = append(errs, unix.Close(m.fd))
		m.fd = -1
	}
	return errors.Join(errs...)
}

// PunchHole drops the pages of [off, off+n) (memfd offsets, page-aligned)
// from the backing file: they read as zeros again and, under
// userfaultfd's missing mode, fault again. Post-copy uses it for pages
// received before the switch and dirtied on the source since.
func (m *Memory) PunchHole(off, n uint64) error {
	if err := unix.Fallocate(m.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n)); err != nil {
		return fmt.Errorf("dropping guest pages [%#x, %#x): %w", off, off+n, err)
	}
	return nil
}

// MarkData sets, in bitmap (one bit per page, indexed by memfd page), the
// pages that may hold data: holes of the memfd (pages never written, or
// dropped) are zero and stay clear. It asks the file system
// (SEEK_DATA/SEEK_HOLE) instead of reading the pages, so that scanning
// for zero pages does not allocate memory the guest never touched.
func (m *Memory) MarkData(bitmap []uint64) error {
	size := int64(len(m.data))
	for off := int64(0); off < size; {
		data, err := unix.Seek(m.fd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			return nil // no data after off
		}
		if err != nil {
			return fmt.Errorf("finding guest pages with data: %w", err)
		}
		hole, err := unix.Seek(m.fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("finding guest pages with data: %w", err)
		}
		for p := data / PageSize; p < (hole+PageSize-1)/PageSize && p*PageSize < size; p++ {
			bitmap[p/64] |= 1 << (p % 64)
		}
		off = hole
	}
	return nil
}
