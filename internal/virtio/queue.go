package virtio

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
)

// Split-virtqueue layout (virtio 1.2 §2.7).
const (
	// MaxQueueSize is the largest split virtqueue.
	MaxQueueSize = 32768

	descSize     = 16 // struct virtq_desc
	usedElemSize = 8  // struct virtq_used_elem
	ringHeader   = 4  // flags and idx, before the ring of each of avail and used

	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4

	availFNoInterrupt = 1
)

// MaxChainBytes bounds the total length of one chain's buffers. It is the
// protocol's own limit (drivers must not build chains of 2^32 bytes or
// more, and a used element's length is 32 bits). The walker allocates
// nothing in proportion to it, only one Buffer per descriptor (at most the
// queue size); devices bound what they actually copy (virtio-rng: 64 KiB).
const MaxChainBytes = 1<<32 - 1

// RingAddrs are the guest-physical addresses of a split virtqueue's parts.
type RingAddrs struct {
	Desc   uint64 // descriptor table: 16-byte aligned, 16 × size bytes
	Driver uint64 // available ring: 2-byte aligned, 6 + 2 × size bytes
	Device uint64 // used ring: 4-byte aligned, 6 + 8 × size bytes
}

// Queue is the device side of one split virtqueue.
//
// A Queue is used by one goroutine at a time: the transport's worker,
// inside Device.Process (the transport configures, starts and stops it
// only while the worker is idle). Ring memory is mapped on every access,
// never cached, so that a GuestMemory that gates accesses (post-copy
// migration) sees each one.
//
// Memory ordering with the driver, which runs concurrently on a vCPU: the
// available index is read with an atomic 32-bit load of the aligned word
// that holds it, before the ring entry and the descriptors it publishes;
// the used element is written before the used index, which is stored with
// an atomic 32-bit store of used.flags and used.idx (both the device's);
// the 16-bit fields either side touches while the other runs (avail_event,
// used_event, avail.flags) are each one 16-bit load or store, never torn;
// a full fence separates the device's writes (avail_event, used.idx) from
// its reads of the driver's suppression state (avail.idx, used_event,
// avail.flags), as virtio's event suppression requires.
type Queue struct {
	index   int
	maxSize uint16
	g       guest
	halt    *atomic.Int32 // > 0: Pop hands out nothing (pause or reset under way)
	ownHalt atomic.Int32
	barrier atomic.Uint32

	ready    bool
	size     uint16
	addrs    RingAddrs
	eventIdx bool
	indirect bool

	nextAvail      uint16 // next available-ring slot to pop
	nextUsed       uint16 // next used-ring slot to fill (= used.idx)
	signalledUsed  uint16 // nextUsed at the last NeedsInterrupt
	signalledValid bool   // signalledUsed means something
}

// NewQueue returns a stopped queue of at most maxSize entries (a power of
// two, at most MaxQueueSize) on mem, reporting its writes to dirty. index
// names the queue in errors. The transport creates its queues itself;
// NewQueue is exported for device tests that drive a Queue directly.
func NewQueue(index int, maxSize uint16, mem GuestMemory, dirty DirtyFunc) (*Queue, error) {
	if !validSize(maxSize, MaxQueueSize) {
		return nil, fmt.Errorf("virtqueue %d: maximum size %d: %w", index, maxSize, ErrQueueSize)
	}
	if mem == nil || dirty == nil {
		return nil, fmt.Errorf("virtqueue %d: nil guest memory or dirty hook", index)
	}
	q := &Queue{index: index, maxSize: maxSize, g: guest{mem: mem, dirty: dirty}}
	q.halt = &q.ownHalt
	return q, nil
}

func validSize(size uint16, limit uint32) bool {
	return size != 0 && size&(size-1) == 0 && uint32(size) <= limit
}

// Index is the queue's number within its device.
func (q *Queue) Index() int { return q.index }

// MaxSize is the largest size the device supports for this queue.
func (q *Queue) MaxSize() uint16 { return q.maxSize }

// Size is the size the driver chose (valid once started).
func (q *Queue) Size() uint16 { return q.size }

// Ready reports whether the queue is started: the driver enabled it and
// its rings passed validation.
func (q *Queue) Ready() bool { return q.ready }

// Start validates a driver's configuration and starts the queue at
// indices 0, as after queue_enable. features are the negotiated feature
// bits (VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC matter here).
func (q *Queue) Start(size uint16, addrs RingAddrs, features uint64) error {
	if err := q.check(size, addrs); err != nil {
		return err
	}
	q.size, q.addrs = size, addrs
	q.eventIdx = features&FeatureEventIdx != 0
	q.indirect = features&FeatureIndirectDesc != 0
	q.nextAvail, q.nextUsed = 0, 0
	// Nothing is used yet, so nothing is owed: a NeedsInterrupt before the
	// first Push says no (it used to say yes, a spurious interrupt at
	// every DRIVER_OK).
	q.signalledUsed, q.signalledValid = 0, true
	q.ready = true
	return nil
}

// stop forgets the configuration, as a device reset does.
func (q *Queue) stop() {
	q.ready, q.size, q.addrs = false, 0, RingAddrs{}
	q.eventIdx, q.indirect = false, false
	q.nextAvail, q.nextUsed = 0, 0
	q.signalledUsed, q.signalledValid = 0, false
}

// check validates size and the rings' alignment and placement in RAM.
func (q *Queue) check(size uint16, a RingAddrs) error {
	if !validSize(size, uint32(q.maxSize)) {
		return q.errorf("size %d (maximum %d): %w", size, q.maxSize, ErrQueueSize)
	}
	rings := []struct {
		what      string
		gpa, n    uint64
		alignment uint64
	}{
		{"descriptor table", a.Desc, descSize * uint64(size), 16},
		{"available ring", a.Driver, 6 + 2*uint64(size), 2},
		{"used ring", a.Device, 6 + usedElemSize*uint64(size), 4},
	}
	for _, r := range rings {
		if r.gpa%r.alignment != 0 {
			return q.errorf("%s at %#x: %w (needs %d bytes)", r.what, r.gpa, ErrRingAlign, r.alignment)
		}
		if _, err := q.g.slice(r.gpa, r.n); err != nil {
			return q.errorf("%s [%#x, +%#x): %w: %w", r.what, r.gpa, r.n, ErrRingNotRAM, err)
		}
	}
	// The atomic accesses need the host mapping aligned like the GPA.
	if _, err := q.g.word(a.Device); err != nil {
		return q.errorf("used ring: %w", err)
	}
	if _, err := q.g.word(availIdxWord(a.Driver)); err != nil {
		return q.errorf("available ring: %w", err)
	}
	return nil
}

func (q *Queue) errorf(format string, args ...any) error {
	return fmt.Errorf("virtqueue %d: "+format, append([]any{q.index}, args...)...)
}

// Pop returns the next chain the driver made available, or nil if there
// is none (or the transport is pausing or resetting). An error means the
// driver broke the protocol; the queue must not be used until reset.
func (q *Queue) Pop() (*Chain, error) {
	if !q.ready || q.halt.Load() > 0 {
		return nil, nil
	}
	n, err := q.pending()
	if err != nil || n == 0 {
		return nil, err
	}
	head, err := q.availEntry(q.nextAvail)
	if err != nil {
		return nil, err
	}
	if head >= q.size {
		return nil, q.errorf("available slot %d: head %d: %w (size %d)", q.nextAvail, head, ErrDescIndex, q.size)
	}
	c, err := q.walk(head)
	if err != nil {
		return nil, q.errorf("chain at head %d: %w", head, err)
	}
	q.nextAvail++
	return c, nil
}

// pending returns how many chains are available past nextAvail. With
// EVENT_IDX, finding none, it asks for a notification at nextAvail
// (avail_event) and looks again after a fence, so that a chain the driver
// published meanwhile (having read the old avail_event) is not missed.
// avail_event is written only when the queue runs dry, so that the driver
// does not notify while the device is still busy with earlier chains.
func (q *Queue) pending() (uint16, error) {
	n, err := q.availCount()
	if err != nil || n > 0 || !q.eventIdx {
		return n, err
	}
	if err := q.setAvailEvent(q.nextAvail); err != nil {
		return 0, err
	}
	q.fence()
	return q.availCount()
}

func (q *Queue) availCount() (uint16, error) {
	idx, err := q.availIdx()
	if err != nil {
		return 0, err
	}
	n := idx - q.nextAvail
	if n > q.size {
		return 0, q.errorf("%w: avail.idx %d, device at %d, size %d", ErrAvailIndex, idx, q.nextAvail, q.size)
	}
	return n, nil
}

// availIdxWord is the aligned 32-bit word holding avail.idx (at driver+2):
// flags and idx, or idx and ring[0]; both lie inside the available ring.
func availIdxWord(driver uint64) uint64 { return (driver + 2) &^ 3 }

// availIdx loads avail.idx atomically.
func (q *Queue) availIdx() (uint16, error) {
	word := availIdxWord(q.addrs.Driver)
	p, err := q.g.word(word)
	if err != nil {
		return 0, q.errorf("reading avail.idx: %w", err)
	}
	v := loadLE32(p)
	if q.addrs.Driver+2 != word {
		v >>= 16
	}
	return uint16(v), nil
}

// availEntry reads available-ring slot i (modulo the size).
func (q *Queue) availEntry(i uint16) (uint16, error) {
	return q.read16(q.addrs.Driver+ringHeader+2*uint64(i&(q.size-1)), "avail.ring")
}

func (q *Queue) read16(gpa uint64, what string) (uint16, error) {
	v, err := q.g.load16(gpa)
	if err != nil {
		return 0, q.errorf("reading %s: %w", what, err)
	}
	return v, nil
}

// usedEvent reads used_event, after the available ring.
func (q *Queue) usedEvent() (uint16, error) {
	return q.read16(q.addrs.Driver+ringHeader+2*uint64(q.size), "used_event")
}

// setAvailEvent writes avail_event, after the used ring, in one store:
// the driver reads it at any time.
func (q *Queue) setAvailEvent(v uint16) error {
	if err := q.g.store16(q.addrs.Device+ringHeader+usedElemSize*uint64(q.size), v); err != nil {
		return q.errorf("writing avail_event: %w", err)
	}
	return nil
}

// fence is a full memory barrier (a locked read-modify-write on amd64).
func (q *Queue) fence() { q.barrier.Add(1) }

// Push returns chain head to the driver with written bytes placed in its
// writable part: the used element, then used.idx. Whether to interrupt is
// NeedsInterrupt's business.
func (q *Queue) Push(head uint16, written uint32) error {
	if !q.ready {
		return q.errorf("push of head %d: %w", head, ErrQueueNotReady)
	}
	if head >= q.size {
		return q.errorf("push of head %d: %w (size %d)", head, ErrDescIndex, q.size)
	}
	idx, err := q.g.word(q.addrs.Device)
	if err != nil {
		return q.errorf("mapping used.idx: %w", err)
	}
	var elem [usedElemSize]byte
	binary.LittleEndian.PutUint32(elem[0:], uint32(head))
	binary.LittleEndian.PutUint32(elem[4:], written)
	slot := uint64(q.nextUsed & (q.size - 1))
	if err := q.g.write(q.addrs.Device+ringHeader+usedElemSize*slot, elem[:]); err != nil {
		return q.errorf("writing used element %d: %w", slot, err)
	}
	q.nextUsed++
	storeLE32(idx, uint32(q.nextUsed)<<16) // used.flags = 0: always notify
	q.g.dirty(q.addrs.Device, 4)
	return nil
}

// NeedsInterrupt reports whether the driver wants a used-buffer
// notification for what was pushed since the last call: with
// VIRTIO_F_EVENT_IDX, whether used.idx passed used_event; without it,
// unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT. If the driver's state
// cannot be read it says yes (a spurious interrupt is harmless).
func (q *Queue) NeedsInterrupt() bool {
	if !q.ready {
		return false
	}
	old, valid := q.signalledUsed, q.signalledValid
	q.signalledUsed, q.signalledValid = q.nextUsed, true
	if valid && old == q.nextUsed {
		return false
	}
	q.fence() // used.idx visible before the driver's state is read
	if !q.eventIdx {
		flags, err := q.read16(q.addrs.Driver, "avail.flags")
		return err != nil || flags&availFNoInterrupt == 0
	}
	event, err := q.usedEvent()
	if err != nil || !valid {
		return true
	}
	return needEvent(event, q.nextUsed, old)
}

// needEvent is vring_need_event: whether event lies in [old, new).
func needEvent(event, newIdx, old uint16) bool {
	return newIdx-event-1 < newIdx-old
}
