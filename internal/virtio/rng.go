package virtio

import (
	"crypto/rand"
	"fmt"
	"io"
)

// RNG is the virtio entropy device (virtio 1.2 §5.4): one queue whose
// device-writable buffers it fills from crypto/rand. Nothing is rate
// limited beyond a bound on each chain's fill.
type RNG struct {
	source io.Reader
	act    Activation
}

// Entropy device parameters.
const (
	// RNGQueueSize is the request queue's maximum size.
	RNGQueueSize = 256
	// RNGMaxFill bounds the bytes given to one chain: a driver asking for
	// more gets this much (the used length says so).
	RNGMaxFill = 64 << 10
	// rngClass is "unclassified device, other" (00h/FFh), as QEMU's
	// virtio-rng-pci presents.
	rngClass = 0x00ff00
)

// NewRNG returns a virtio-rng device; put it on a transport with
// NewTransport.
func NewRNG() *RNG { return &RNG{source: rand.Reader} }

// Type implements Device.
func (r *RNG) Type() DeviceType { return TypeEntropy }

// Class implements Device.
func (r *RNG) Class() uint32 { return rngClass }

// Features implements Device: virtio-rng defines none.
func (r *RNG) Features() uint64 { return 0 }

// QueueSizes implements Device: one request queue.
func (r *RNG) QueueSizes() []uint16 { return []uint16{RNGQueueSize} }

// ConfigSize implements Device: virtio-rng has no configuration.
func (r *RNG) ConfigSize() int { return 0 }

// ReadConfig implements Device (never called: no configuration).
func (r *RNG) ReadConfig(off int, data []byte) { clear(data) }

// WriteConfig implements Device (never called: no configuration).
func (r *RNG) WriteConfig(int, []byte) {}

// Activate implements Device.
func (r *RNG) Activate(a Activation) error {
	if len(a.Queues) != 1 {
		return fmt.Errorf("virtio-rng: %d queues, want 1", len(a.Queues))
	}
	r.act = a
	return nil
}

// Process implements Device: fill every available chain, then interrupt
// once if the driver wants it.
func (r *RNG) Process(queue int) error {
	if queue != 0 || r.act.Queues == nil {
		return nil
	}
	q := r.act.Queues[0]
	for {
		c, err := q.Pop()
		if err != nil {
			return err
		}
		if c == nil {
			break
		}
		n, err := c.Fill(r.source, RNGMaxFill)
		if err != nil {
			return fmt.Errorf("virtio-rng: %w", err)
		}
		if err := q.Push(c.Head, n); err != nil {
			return err
		}
	}
	if q.NeedsInterrupt() {
		r.act.Interrupt(0)
	}
	return nil
}

// Reset implements Device.
func (r *RNG) Reset() { r.act = Activation{} }

// SaveState implements Device: virtio-rng keeps no state of its own.
func (r *RNG) SaveState() ([]byte, error) { return nil, nil }

// RestoreState implements Device: only an empty state is valid.
func (r *RNG) RestoreState(b []byte) error {
	if len(b) != 0 {
		return fmt.Errorf("virtio-rng: %d bytes of device state, want none", len(b))
	}
	return nil
}
