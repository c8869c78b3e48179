package virtio

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/ferry-vmm/ferry/internal/pci"
)

// PCI identity and BAR layout of the modern (non-transitional) transport.
const (
	// VendorID is Red Hat's, which virtio uses; device IDs are
	// DeviceIDBase + the virtio device type.
	VendorID     = 0x1af4
	DeviceIDBase = 0x1040
	revision     = 1 // non-transitional

	// MaxQueues bounds a device's virtqueues: the MSI-X table (queues + 1
	// vectors) and the doorbells each fit in one page.
	MaxQueues = 255
	// MaxConfigSize bounds the device-specific configuration (one page).
	MaxConfigSize = 4096

	// BAR is the one BAR the transport uses: 64-bit memory, not
	// prefetchable (the ISR and MSI-X regions have side effects).
	BAR     = 4
	BARSize = 0x8000

	regionSize       = 0x1000
	commonOffset     = 0x0000
	isrOffset        = 0x1000
	deviceCfgOffset  = 0x2000
	notifyOffset     = 0x3000
	msixTableOffset  = 0x4000
	msixPBAOffset    = 0x5000
	notifyMultiplier = 4
	commonCfgLen     = 0x38 // through queue_device; no notify_data or queue_reset

	isrQueue  = 1
	isrConfig = 2
)

// TransportConfig is what a Transport needs from the VMM.
type TransportConfig struct {
	// Memory is guest RAM as devices see it.
	Memory GuestMemory
	// Dirty is told of every byte the device and its queues write into
	// guest memory (used rings included).
	Dirty DirtyFunc
	// MSI delivers the function's MSI-X messages.
	MSI pci.MSISender
	// Logger receives the device's errors; nil means slog.Default().
	Logger *slog.Logger
}

// Transport is one virtio device on PCI (virtio 1.2 §4.1, modern
// interface): a pci.Function whose BAR 4 holds the virtio structures and
// MSI-X, a worker goroutine that processes the device's queues, and the
// device-independent state (status, features, queue configuration).
//
// Lock order: mu, then the MSI-X and configuration-space locks (pci).
// vCPU threads take mu for common-configuration accesses; a notification
// only sets a bit and wakes the worker.
type Transport struct {
	dev        Device
	g          guest
	log        *slog.Logger
	cfg        *pci.ConfigSpace
	msix       *pci.MSIX
	pciCfgCap  int // offset of the PCI_CFG capability in configuration space
	offered    uint64
	configSize int
	queues     []*Queue
	qregs      []queueRegs

	mu                  sync.Mutex
	idle                sync.Cond // broadcast when busy becomes false
	status              uint8
	deviceFeatureSelect uint32
	driverFeatureSelect uint32
	driverFeatures      uint64
	queueSelect         uint16
	active              bool // Activate succeeded since the last reset
	paused              bool
	busMaster           bool // follows the command register's Bus Master Enable
	busy                bool // the worker is inside Device.Process
	closed              bool
	failures            int // device errors so far: the first is logged as an error

	halt          atomic.Int32  // > 0: queues hand out no chains (pause, reset, bus master off)
	msixConfig    atomic.Uint32 // config_msix_vector
	isr           atomic.Uint32
	configGen     atomic.Uint32 // config_generation (low 8 bits shown)
	configChanged atomic.Bool   // bump configGen at the next device-config read
	notifyLogged  atomic.Bool
	notified      []atomic.Uint64 // one bit per queue: notified, not processed
	wake          chan struct{}
	quit          chan struct{}
	exited        chan struct{}
}

// queueRegs is one queue's configuration as the driver writes it.
type queueRegs struct {
	size    uint16
	enabled bool
	vector  atomic.Uint32 // read by the worker's interrupts
	addrs   RingAddrs
}

func (r *queueRegs) reset(maxSize uint16) {
	r.size, r.enabled, r.addrs = maxSize, false, RingAddrs{}
	r.vector.Store(pci.NoVector)
}

// NewTransport puts dev on the virtio PCI transport and starts its worker
// goroutine (stop it with Close).
func NewTransport(dev Device, c TransportConfig) (*Transport, error) {
	if err := checkConfig(dev, c); err != nil {
		return nil, fmt.Errorf("virtio %s: %w", typeName(dev.Type()), err)
	}
	t, err := newTransport(dev, c)
	if err != nil {
		return nil, fmt.Errorf("virtio %s: %w", typeName(dev.Type()), err)
	}
	go t.run()
	return t, nil
}

func checkConfig(dev Device, c TransportConfig) error {
	if c.Memory == nil || c.Dirty == nil || c.MSI == nil {
		return errors.New("guest memory, dirty hook and MSI sender are all required")
	}
	sizes := dev.QueueSizes()
	if len(sizes) == 0 || len(sizes) > MaxQueues {
		return fmt.Errorf("%d queues, want 1..%d", len(sizes), MaxQueues)
	}
	for i, s := range sizes {
		if !validSize(s, MaxQueueSize) {
			return fmt.Errorf("queue %d: maximum size %d: %w", i, s, ErrQueueSize)
		}
	}
	if f := dev.Features() & reservedFeatures; f != 0 {
		return fmt.Errorf("device offers reserved feature bits %#x", f)
	}
	if n := dev.ConfigSize(); n < 0 || n > MaxConfigSize {
		return fmt.Errorf("device configuration of %d bytes, want 0..%d", n, MaxConfigSize)
	}
	return nil
}

func newTransport(dev Device, c TransportConfig) (*Transport, error) {
	log := c.Logger
	if log == nil {
		log = slog.Default()
	}
	sizes := dev.QueueSizes()
	t := &Transport{
		dev:        dev,
		g:          guest{mem: c.Memory, dirty: c.Dirty},
		log:        log.With("virtio", typeName(dev.Type())),
		offered:    dev.Features() | transportFeatures,
		configSize: dev.ConfigSize(),
		qregs:      make([]queueRegs, len(sizes)),
		notified:   make([]atomic.Uint64, (len(sizes)+63)/64),
		wake:       make(chan struct{}, 1),
		quit:       make(chan struct{}),
		exited:     make(chan struct{}),
	}
	t.idle.L = &t.mu
	t.halt.Add(1) // Bus Master Enable is clear until the driver sets it
	for i, s := range sizes {
		q, err := NewQueue(i, s, c.Memory, c.Dirty)
		if err != nil {
			return nil, err
		}
		q.halt = &t.halt
		t.queues = append(t.queues, q)
		t.qregs[i].reset(s)
	}
	t.msixConfig.Store(pci.NoVector)
	if err := t.buildPCI(c.MSI); err != nil {
		return nil, err
	}
	return t, nil
}

func typeName(d DeviceType) string {
	switch d {
	case TypeNet:
		return "net"
	case TypeBlock:
		return "blk"
	case TypeEntropy:
		return "rng"
	}
	return fmt.Sprintf("type-%d", d)
}

// Config returns the function's configuration space (pci.Function).
func (t *Transport) Config() *pci.ConfigSpace { return t.cfg }

// MSIX returns the function's MSI-X capability.
func (t *Transport) MSIX() *pci.MSIX { return t.msix }

// Close stops the worker goroutine, after the chain it is processing. The
// transport then processes nothing more.
func (t *Transport) Close() {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	t.closed = true
	t.mu.Unlock()
	close(t.quit)
	<-t.exited
}

// BARRead serves a guest read of BAR 4 (pci.Function); anything else
// reads as zeros.
func (t *Transport) BARRead(bar int, offset uint64, data []byte) {
	region, rel, n := t.locate(bar, offset, len(data))
	clear(data[n:])
	part := data[:n]
	switch region {
	case commonOffset:
		t.readCommon(int(rel), part)
	case isrOffset:
		t.readISR(rel, part)
	case deviceCfgOffset:
		t.readDeviceConfig(int(rel), part)
	case msixTableOffset, msixPBAOffset:
		if !t.msix.Read(offset, part) {
			clear(part)
		}
	default: // the doorbells and the unused pages read as zeros
		clear(part)
	}
}

// BARWrite serves a guest write of BAR 4 (pci.Function); anything else
// is ignored.
func (t *Transport) BARWrite(bar int, offset uint64, data []byte) {
	region, rel, n := t.locate(bar, offset, len(data))
	part := data[:n]
	switch region {
	case commonOffset:
		t.writeCommon(int(rel), part)
	case deviceCfgOffset:
		t.writeDeviceConfig(int(rel), part)
	case notifyOffset:
		if q := rel / notifyMultiplier; n > 0 && q < uint64(len(t.queues)) {
			t.notify(int(q))
		}
	case msixTableOffset, msixPBAOffset:
		t.msix.Write(offset, part)
	}
}

// locate finds the page an access starts in, the offset inside it, and
// how many of its n bytes fall inside that page (0 for other BARs or
// offsets outside the BAR).
func (t *Transport) locate(bar int, offset uint64, n int) (region, rel uint64, inside int) {
	if bar != BAR || offset >= BARSize {
		return BARSize, 0, 0
	}
	region = offset &^ (regionSize - 1)
	rel = offset - region
	return region, rel, int(min(uint64(n), regionSize-rel))
}

// readISR returns the ISR status and clears it (virtio 1.2 §4.1.4.5).
func (t *Transport) readISR(rel uint64, data []byte) {
	clear(data)
	if rel == 0 && len(data) > 0 {
		data[0] = byte(t.isr.Swap(0))
	}
}

func (t *Transport) readDeviceConfig(off int, data []byte) {
	n := max(0, min(len(data), t.configSize-off))
	clear(data[n:])
	if n == 0 {
		return
	}
	if t.configChanged.Swap(false) {
		t.configGen.Add(1)
	}
	t.dev.ReadConfig(off, data[:n])
}

func (t *Transport) writeDeviceConfig(off int, data []byte) {
	if n := max(0, min(len(data), t.configSize-off)); n > 0 {
		t.dev.WriteConfig(off, data[:n])
	}
}

// notify records a driver's notification of queue q and wakes the worker;
// the vCPU does no queue work itself.
func (t *Transport) notify(q int) {
	t.notified[q/64].Or(1 << (q % 64))
	t.kick()
}

func (t *Transport) kick() {
	select {
	case t.wake <- struct{}{}:
	default: // a wake-up is already pending
	}
}

// ConfigChanged tells the driver that the device-specific configuration
// changed: config_generation moves before the driver's next read of it
// (virtio 1.2 §4.1.4.3), and the configuration interrupt is sent.
func (t *Transport) ConfigChanged() {
	t.configChanged.Store(true)
	t.configInterrupt()
}

func (t *Transport) configInterrupt() {
	t.isr.Or(isrConfig)
	t.signal(uint16(t.msixConfig.Load()), "configuration change")
}

func (t *Transport) queueInterrupt(q int) {
	if q < 0 || q >= len(t.queues) {
		return
	}
	t.isr.Or(isrQueue)
	t.signal(uint16(t.qregs[q].vector.Load()), "used buffer")
}

// signal sends MSI-X vector. The transport has no INTx: with MSI-X
// disabled only the ISR records the event. A failure to deliver is the
// host's, not the guest's: it is logged (once) and not made a device error.
func (t *Transport) signal(vector uint16, what string) {
	err := t.msix.Notify(vector)
	if err != nil && !t.notifyLogged.Swap(true) {
		t.log.Warn("virtio: delivering an interrupt failed (further failures not logged)", "event", what, "err", err)
	}
}
