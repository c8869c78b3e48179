// Package devices owns ferry's emulated devices and the buses that route
// guest port I/O and MMIO exits to them: the 16550 UART, the i8042 reset
// line, the CMOS/RTC stub, the POST port, and the ferry control port.
//
// Devices know nothing about KVM: they see reads and writes of bytes at an
// address and raise interrupts through an IRQLine that the VMM supplies.
// They must not import the vmm or kvm packages.
//
// Where the VMM places them on the port I/O bus:
//
//	device                      port(s)           size  IRQ
//	NewSerial (COM1)            COM1Base 0x3f8    8     COM1IRQ 4
//	NewI8042 .DataPort()        0x60              1     none
//	NewI8042 .CommandPort()     0x64              1     none
//	NewCMOS                     CMOSBase 0x70     2     none (IRQ 8 unused)
//	NewPost                     PostPort 0x80     1     none
//	NewControl                  ControlPort 0xf4  4     none
//
// Each device also has State and SetState methods (except the stateless
// control port) for save/restore.
package devices

import (
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
)

// Device handles accesses to the address range it was registered for.
// offset is relative to the start of that range; len(data) is the access
// width (1, 2, 4 or 8). Read fills data.
type Device interface {
	Read(offset uint64, data []byte)
	Write(offset uint64, data []byte)
}

// IRQLine is an interrupt input of the platform's interrupt controllers
// (PIC and IOAPIC pin), driven by a device.
type IRQLine interface {
	// SetLevel raises (true) or lowers (false) the line.
	SetLevel(high bool)
}

// IRQFunc adapts a function to IRQLine.
type IRQFunc func(high bool)

// SetLevel calls f.
func (f IRQFunc) SetLevel(high bool) { f(high) }

type mapping struct {
	base, size uint64
	dev        Device
	name       string
}

// Bus routes accesses in an address space (port I/O or MMIO) to devices.
// Accesses that hit no device read as all ones and writes are dropped, as on
// real hardware; they are counted so that a misbehaving guest is visible.
type Bus struct {
	mu   sync.RWMutex
	maps []mapping // sorted by base, non-overlapping
	// Unclaimed counts accesses that hit no device. It is updated
	// atomically while vCPUs run: read it with UnclaimedAccesses.
	Unclaimed uint64
}

// UnclaimedAccesses returns the number of accesses that hit no device. It is
// safe to call while other goroutines access the bus.
func (b *Bus) UnclaimedAccesses() uint64 { return atomic.LoadUint64(&b.Unclaimed) }

// Register places dev at [base, base+size).
func (b *Bus) Register(name string, base, size uint64, dev Device) error {
	if size == 0 {
		return fmt.Errorf("device %s: empty range at %#x", name, base)
	}
	if dev == nil {
		return fmt.Errorf("device %s: nil Device", name)
	}
	if base+size < base {
		return fmt.Errorf("device %s: range at %#x size %#x wraps around the address space", name, base, size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range b.maps {
		if base < m.base+m.size && m.base < base+size {
			return fmt.Errorf("device %s at [%#x,%#x) overlaps %s at [%#x,%#x)",
				name, base, base+size, m.name, m.base, m.base+m.size)
		}
	}
	b.maps = append(b.maps, mapping{base: base, size: size, dev: dev, name: name})
	sort.Slice(b.maps, func(i, j int) bool { return b.maps[i].base < b.maps[j].base })
	return nil
}

func (b *Bus) find(addr uint64) (mapping, bool) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	i := sort.Search(len(b.maps), func(i int) bool { return b.maps[i].base+b.maps[i].size > addr })
	if i < len(b.maps) && b.maps[i].base <= addr {
		return b.maps[i], true
	}
	return mapping{}, false
}

// Read dispatches a read of len(data) bytes at addr.
func (b *Bus) Read(addr uint64, data []byte) {
	if m, ok := b.find(addr); ok {
		m.dev.Read(addr-m.base, data)
		return
	}
	atomic.AddUint64(&b.Unclaimed, 1)
	for i := range data {
		data[i] = 0xff
	}
}

// Write dispatches a write of data at addr.
func (b *Bus) Write(addr uint64, data []byte) {
	if m, ok := b.find(addr); ok {
		m.dev.Write(addr-m.base, data)
		return
	}
	atomic.AddUint64(&b.Unclaimed, 1)
}

// Unregister removes the device registered at exactly base (the base it was
// given to Register). Accesses already dispatched to it may still complete
// after Unregister returns; later ones no longer reach it.
func (b *Bus) Unregister(base uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	i := sort.Search(len(b.maps), func(i int) bool { return b.maps[i].base >= base })
	if i == len(b.maps) || b.maps[i].base != base {
		return fmt.Errorf("no device registered at %#x", base)
	}
	b.maps = append(b.maps[:i], b.maps[i+1:]...)
	return nil
}
