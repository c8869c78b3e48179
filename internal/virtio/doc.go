// Package virtio owns ferry's virtio devices as the guest sees them: split
// virtqueues (virtio 1.2 §2.7) with the descriptor walker that keeps a
// hostile driver out, the modern virtio-over-PCI transport (§4.1) and the
// entropy device (§5.4). Device types plug into the transport through the
// Device interface, so that network and block devices add no transport
// code.
//
// It knows nothing of KVM or of the VMM: guest memory arrives as a
// GuestMemory (with a DirtyFunc that must hear of every byte a device
// writes, used rings included, because KVM's dirty log does not), the
// PCI side is internal/pci's Function, ConfigSpace and MSIX, and
// interrupts leave through the pci.MSISender the VMM gives. It must not
// import vmm, kvm or guestmem.
//
// # Files
//
//	memory.go     GuestMemory, DirtyFunc, atomic guest words
//	queue.go      Queue: configuration checks, Pop, Push, event suppression
//	chain.go      Chain and its copy helpers; the descriptor walker
//	errors.go     why a driver's chain or ring is refused
//	device.go     Device, Activation, feature and status bits
//	transport.go  Transport (a pci.Function): BAR 4 dispatch, ISR, doorbells
//	common.go     the common configuration structure
//	caps.go       configuration space: virtio capabilities, PCI_CFG window
//	worker.go     the worker goroutine, pause, reset, activation, failure
//	state.go      State and SetState
//	rng.go        the entropy device
//
// # BAR 4
//
// The transport is non-transitional (device ID 0x1040 + type, revision
// 1) with one 64-bit, non-prefetchable memory BAR; each structure has a
// page, located by a vendor capability (cap ID 0x09) in configuration
// space:
//
//	offset   structure                       capability (cfg_type)
//	0x0000 ┌───────────────────────────────┐
//	       │ common configuration, 0x38 B  │ COMMON_CFG (1)
//	0x1000 ├───────────────────────────────┤
//	       │ ISR status, 1 B, read clears  │ ISR_CFG (3)
//	0x2000 ├───────────────────────────────┤
//	       │ device-specific configuration │ DEVICE_CFG (4), absent if empty
//	0x3000 ├───────────────────────────────┤
//	       │ doorbells: queue i at 4·i     │ NOTIFY_CFG (2), multiplier 4,
//	       │                               │   queue_notify_off = i
//	0x4000 ├───────────────────────────────┤
//	       │ MSI-X table: queues+1 vectors │ MSI-X (0x11), table and PBA
//	0x5000 ├───────────────────────────────┤   in BAR 4
//	       │ MSI-X pending bits            │
//	0x6000 ├───────────────────────────────┤
//	       │ unused: reads 0               │
//	0x8000 └───────────────────────────────┘
//	       PCI_CFG (5) in configuration space: a 1/2/4-byte window onto
//	       BAR 4 for firmware, served through pci.Interceptor.
//
// The transport offers VIRTIO_F_VERSION_1 (required: a driver that does
// not accept it cannot set FEATURES_OK), VIRTIO_F_INDIRECT_DESC and
// VIRTIO_F_EVENT_IDX, plus the device's own bits. It does not offer
// NOTIFICATION_DATA, NOTIF_CONFIG_DATA, RING_RESET, packed rings or
// ACCESS_PLATFORM. It has no INTx: with MSI-X disabled, events only set
// the ISR.
//
// # A queue's life
//
//	         device reset (status 0): size = max, vector = NO_VECTOR
//	               │
//	               ▼
//	configured ── driver writes queue_size, queue_msix_vector,
//	               │           queue_desc/driver/device
//	               │ queue_enable = 1: Start checks size, alignment,
//	               ▼ RAM (failure: NEEDS_RESET)
//	started ───── DRIVER_OK: Device.Activate(queues, interrupt, ...)
//	               │
//	               ▼
//	running ───── doorbell write (vCPU): set the queue's bit, wake worker
//	               │   worker: Device.Process(i): Pop → chain → Push,
//	               │   NeedsInterrupt → MSI-X vector
//	               │
//	  ┌────────────┼─────────────────────────┐
//	  ▼            ▼                         ▼
//	Pause:      walker error:              status 0: wait for the worker
//	Pop → nil,  NEEDS_RESET, config        to let go of its chain,
//	wait for    interrupt, one log line;   Device.Reset, queues and
//	the worker; nothing processed until    registers back to reset
//	Resume      the driver resets          values, status reads 0
//
// A doorbell never does queue work on the vCPU thread. Process runs only on
// the transport's worker goroutine, one chain at a time with respect to
// pausing: Pause returns once the worker has pushed the chain it held, and
// from then on Pop returns nil, so State never sees a half-processed chain
// and SetState continues exactly there.
//
// The PCI command register's Bus Master Enable bit (clear at reset; Linux
// sets it at probe and clears it at shutdown and kexec) gates the device
// the same way: a configuration write clearing it returns once the worker
// has let go of its chain, and until the driver sets it again no queue is
// processed (doorbells are kept) and MSI-X leaves interrupts pending; then
// pending interrupts are sent and every queue is looked at. The bit lives
// in configuration space, so State carries it and SetState follows it.
//
// # The guest is hostile
//
// Everything in guest memory is read once and checked before use. A chain
// is refused, and the device goes DEVICE_NEEDS_RESET, for: a head or NEXT
// index outside its table; more descriptors than the queue size (loops);
// indirect descriptors not negotiated, nested, with NEXT, or whose table
// is not a non-zero multiple of 16 bytes of at most size entries; buffers
// outside RAM or whose address plus length wraps; a total above
// MaxChainBytes (2^32−1, the protocol's limit: the walker allocates only
// one Buffer per descriptor, and devices bound what they copy); a
// device-readable descriptor after a device-writable one; an available
// index more than the queue size ahead. Rings must be aligned (16, 2, 4)
// and in RAM. The device writes only the used ring, avail_event and the
// writable buffers of chains it popped, and reports each write dirty.
package virtio
