// Package pci owns ferry's PCI bus 0: the configuration space of each
// function (header, BARs, capability list, MSI-X table and pending bits),
// the two ways a guest reaches configuration space (mechanism #1 through
// ports 0xCF8/0xCFC, and ECAM through an MMIO window described by the ACPI
// MCFG table), BAR placement in the 32-bit MMIO hole and the mapping of
// BARs onto the VMM's MMIO and port-I/O buses as the guest moves or
// enables them.
//
// It knows nothing of virtio, KVM or guest memory: functions (the virtio
// transport, for one) implement Function; interrupts leave through an
// MSISender the VMM supplies. It must not import vmm, kvm or virtio.
//
// Contracts shared with the rest of ferry (owned here):
//
//	Function      a device on the bus: its ConfigSpace and its BAR accesses
//	MSISender     delivers one MSI message (address, data) to the guest
//	ConfigSpace   what the guest can read and write in a function's header
//	MSIX          the MSI-X capability's table, PBA and masking rules
//	Bus           bus 0: slots, conf1/ECAM, BAR placement and mapping
//
// Outside this package it touches only the devices.Bus it is given (it
// registers conf1, ECAM and each enabled BAR there, and unregisters BARs
// the guest moves or disables). Guest memory, KVM and ACPI are not its
// business: the VMM reads Layout to describe the bus in MCFG and _CRS.
//
// A function's configuration space (ConfigSpace, 4096 bytes):
//
//	0x000 +--------------------------------+
//	      | type-0 header                  |  vendor/device, command, status,
//	      |  0x10..0x27 BAR0..BAR5         |  class, subsystem: read-only but
//	      |  0x34 capability pointer       |  for command, status W1C, BARs,
//	      |                                |  cache line size, interrupt line
//	0x040 +--------------------------------+
//	      | capabilities, 4-byte aligned:  |  AddCapability, chained in order;
//	      | id | next | body ...           |  e.g. virtio's vendor caps, MSI-X
//	0x100 +--------------------------------+  <- mechanism #1 sees up to here
//	      | extended space, reads 0        |  ECAM only
//	0x1000+--------------------------------+
//
// A BAR is defined by the device (DefineBAR: size, kind), placed by
// Bus.Add in Layout's windows and then owned by the guest, which may size
// it (write all ones, read back ^(size-1) | flags) and move it. While the
// command register's memory (I/O) decode bit is set and the BAR holds a
// real address, the bus maps it on the MMIO (port) devices.Bus and routes
// accesses to Function.BARRead/BARWrite; a mapping that would overlap
// another is refused and logged. MSI-X lives in one memory BAR:
//
//	MSI-X capability                    memory BAR n
//	+0  0x11 | next                     tableOffset: N entries of 16 bytes
//	+2  message control                   +0 address (64) +8 data (32)
//	      15 enable, 14 function mask     +12 vector control, bit 0 mask
//	      10:0 N-1 (read-only)          pbaOffset: one pending bit per
//	+4  tableOffset | BIR n               vector, whole qwords, read-only
//	+8  pbaOffset   | BIR n
//
// An MSI-X message is a memory write, so it is sent only while the
// command register's Bus Master Enable bit is set; otherwise it is left
// pending, as for a masked vector, until the guest sets the bit.
//
// Locking: Bus serializes configuration accesses and mapping changes
// (Bus.mu, then ConfigSpace.mu); MSIX.mu is taken before ConfigSpace.mu.
// Interceptors, BAR handlers and MSISender run with neither ConfigSpace
// nor MSIX.mu locked, but interceptors run inside a bus configuration
// access and must not call the Bus, and MSISender runs while a clear of
// Bus Master Enable waits for it, so it must not write configuration
// space.
package pci

// Function is one PCI function on bus 0.
type Function interface {
	// Config returns the function's configuration space. The bus
	// serializes every configuration access to it.
	Config() *ConfigSpace
	// BARRead and BARWrite handle a guest access to BAR bar at offset
	// (relative to the BAR's base); len(data) is 1, 2, 4 or 8. They may
	// be called concurrently from several vCPU threads.
	BARRead(bar int, offset uint64, data []byte)
	BARWrite(bar int, offset uint64, data []byte)
}

// MSISender delivers one message-signalled interrupt: the 32-bit data
// written to the 64-bit address, as the MSI-X table entry holds them.
type MSISender interface {
	SignalMSI(addr uint64, data uint32) error
}
