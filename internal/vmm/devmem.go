package vmm

import (
	"math/bits"
	"sync"
	"sync/atomic"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// Guest memory as the VMM's own devices (virtio) see it.
//
// Two things differ from a vCPU's access. KVM's dirty log records only
// what vCPUs write, so every byte a device writes is recorded here, while
// dirty logging is on, and FetchDirty reports it with KVM's pages. And
// devices run on goroutines: at a post-copy destination a page may still
// be at the source, and a goroutine that faults on it would hold one of
// the Go scheduler's few slots while userfaultfd's handler waits for one.
// A migration therefore installs a gate (SetMemoryGate) that makes the
// page resident, waiting on a channel, before the device touches it.
//
//	device goroutine ──Slice(gpa, n)──▶ gate (post-copy only) ──▶ guest RAM
//	                  ──Dirty(gpa, n)──▶ devDirty bitmap ──▶ FetchDirty
type devMemory struct {
	mem *guestmem.Memory

	gateMu sync.RWMutex
	gate   func(gpa, n uint64) error

	logging atomic.Bool
	dirty   []uint64 // memfd page index bits, set atomically
}

func newDevMemory(mem *guestmem.Memory) *devMemory {
	return &devMemory{mem: mem, dirty: make([]uint64, (mem.Size()/guestmem.PageSize+63)/64)}
}

// Slice is guest RAM [gpa, gpa+n), resident.
func (d *devMemory) Slice(gpa, n uint64) ([]byte, error) {
	d.gateMu.RLock()
	gate := d.gate
	d.gateMu.RUnlock()
	if gate != nil {
		if err := gate(gpa, n); err != nil {
			return nil, err
		}
	}
	return d.mem.Slice(gpa, n)
}

// Dirty records a device's write of [gpa, gpa+n) while logging is on.
func (d *devMemory) Dirty(gpa, n uint64) {
	if n == 0 || !d.logging.Load() {
		return
	}
	for pfn := gpa / guestmem.PageSize; pfn <= (gpa+n-1)/guestmem.PageSize; pfn++ {
		off, ok := d.mem.Offset(pfn * guestmem.PageSize)
		if !ok {
			continue // Slice refused it: nothing was written there
		}
		idx := off / guestmem.PageSize
		atomic.OrUint64(&d.dirty[idx/64], 1<<(idx%64))
	}
}

// fetch moves the recorded pages into bitmap and counts the new ones.
func (d *devMemory) fetch(bitmap []uint64) int {
	n := 0
	for i := range d.dirty {
		if w := atomic.SwapUint64(&d.dirty[i], 0); w != 0 {
			n += bits.OnesCount64(w &^ bitmap[i])
			bitmap[i] |= w
		}
	}
	return n
}

// SetMemoryGate makes every device access to guest RAM call gate first
// (nil removes it); an error from gate fails the access, and the device
// reports it as a device error. The post-copy destination installs one
// that waits for the pages the source still holds.
func (v *VM) SetMemoryGate(gate func(gpa, n uint64) error) {
	v.devMem.gateMu.Lock()
	v.devMem.gate = gate
	v.devMem.gateMu.Unlock()
}
