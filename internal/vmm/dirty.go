package vmm

import (
	"fmt"
	"math/bits"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/kvm"
)

// Dirty-page tracking for pre-copy. Bitmaps handed out here are indexed by
// page number within the memfd (offset / 4096), the same index
// guestmem.Memory.Bytes() uses, so slots need no translation.

// DirtyBitmapWords is the length of a bitmap covering all guest RAM.
func (v *VM) DirtyBitmapWords() int {
	return int((v.mem.Size()/guestmem.PageSize + 63) / 64)
}

// StartDirtyLog makes KVM record guest writes to every RAM slot. Pages the
// guest wrote before this call are not reported: the first pre-copy pass
// sends everything anyway.
func (v *VM) StartDirtyLog() error { return v.setDirtyLog(true) }

// StopDirtyLog turns tracking off (after a migration, or one that failed).
func (v *VM) StopDirtyLog() error { return v.setDirtyLog(false) }

func (v *VM) setDirtyLog(on bool) error {
	var flags uint32
	if on {
		flags = kvm.MemLogDirtyPages
	}
	if err := v.registerRAM(flags); err != nil {
		return fmt.Errorf("dirty logging: %w", err)
	}
	v.devMem.logging.Store(on)
	return nil
}

// FetchDirty ORs the pages written since the last fetch (or since
// StartDirtyLog), by vCPUs or by the VMM's devices, into bitmap, which
// must have DirtyBitmapWords words, and resets KVM's log. It returns how
// many pages were dirty.
func (v *VM) FetchDirty(bitmap []uint64) (int, error) {
	if len(bitmap) < v.DirtyBitmapWords() {
		return 0, fmt.Errorf("dirty bitmap of %d words, need %d", len(bitmap), v.DirtyBitmapWords())
	}
	count := 0
	for i, r := range v.mem.Regions() {
		first := r.Offset / guestmem.PageSize / 64 // slots start on 2 MiB boundaries
		words := (r.Size/guestmem.PageSize + 63) / 64
		slot := make([]uint64, words)
		if err := v.kvm.GetDirtyLog(uint32(i), slot); err != nil {
			return count, err
		}
		dst := bitmap[first : first+words]
		for w, bitsSet := range slot {
			dst[w] |= bitsSet
			count += bits.OnesCount64(bitsSet)
		}
	}
	// What the VMM's devices wrote (devmem.go), beyond what KVM saw.
	count += v.devMem.fetch(bitmap)
	return count, nil
}
