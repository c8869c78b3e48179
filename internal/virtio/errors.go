package virtio

import "errors"

// Reasons a driver's use of a virtqueue is refused. Pop, Push and
// (*Queue).Start wrap them with the queue, the chain's head and the
// descriptor concerned; test with errors.Is. The transport turns any of
// them into DEVICE_NEEDS_RESET.
var (
	// ErrQueueSize: a queue size that is 0, not a power of two or above
	// the device's maximum.
	ErrQueueSize = errors.New("queue size is not a power of two within the device's maximum")
	// ErrRingAlign: a descriptor table not 16-byte aligned, an available
	// ring not 2-byte aligned or a used ring not 4-byte aligned.
	ErrRingAlign = errors.New("ring address misaligned")
	// ErrRingNotRAM: a ring that is not entirely in guest RAM.
	ErrRingNotRAM = errors.New("ring outside guest RAM")
	// ErrAvailIndex: the available index moved more than the queue size
	// ahead of the device.
	ErrAvailIndex = errors.New("available index moved more than the queue size")
	// ErrDescIndex: a head or a NEXT index outside its descriptor table.
	ErrDescIndex = errors.New("descriptor index outside the table")
	// ErrChainLoop: a chain with more descriptors than the queue size (or
	// than its indirect table holds), which is how a loop shows.
	ErrChainLoop = errors.New("descriptor chain loops or is longer than the queue size")
	// ErrIndirectNotNegotiated: an indirect descriptor without
	// VIRTIO_F_INDIRECT_DESC.
	ErrIndirectNotNegotiated = errors.New("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
	// ErrIndirectLen: an indirect table whose length is 0, not a multiple
	// of 16, or more than the queue size's worth of descriptors.
	ErrIndirectLen = errors.New("indirect table length is not a multiple of 16 in [16, 16 × queue size]")
	// ErrIndirectNested: an indirect descriptor inside an indirect table.
	ErrIndirectNested = errors.New("indirect descriptor inside an indirect table")
	// ErrIndirectNext: an indirect descriptor that also has NEXT set.
	ErrIndirectNext = errors.New("indirect descriptor with NEXT set")
	// ErrBufferNotRAM: a buffer (or indirect table) not entirely in guest
	// RAM.
	ErrBufferNotRAM = errors.New("buffer outside guest RAM")
	// ErrBufferWraps: a buffer whose address plus length wraps past 2^64.
	ErrBufferWraps = errors.New("buffer address + length wraps")
	// ErrChainTooBig: a chain whose buffers total more than MaxChainBytes.
	ErrChainTooBig = errors.New("descriptor chain is longer than MaxChainBytes in total")
	// ErrWriteOrder: a device-readable descriptor after a device-writable
	// one.
	ErrWriteOrder = errors.New("device-readable descriptor after a device-writable one")
	// ErrQueueNotReady: Push on a queue that is not started.
	ErrQueueNotReady = errors.New("queue is not started")
)
