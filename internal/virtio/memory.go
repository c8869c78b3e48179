package virtio

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// GuestMemory is guest RAM as a device sees it. ferry's *guestmem.Memory
// (and the VMM's gated view of it) satisfies it.
type GuestMemory interface {
	// Slice returns the host view of [gpa, gpa+n): n contiguous bytes, or
	// an error if any of them is not RAM.
	Slice(gpa, n uint64) ([]byte, error)
}

// DirtyFunc records that a device wrote [gpa, gpa+n) of guest memory. KVM's
// dirty log sees only vCPU writes, so live migration depends on every
// device write being reported here.
type DirtyFunc func(gpa, n uint64)

// guest is guest memory together with its dirty hook. Every access a
// device makes goes through it, so that no write escapes the hook.
type guest struct {
	mem   GuestMemory
	dirty DirtyFunc
}

// slice maps [gpa, gpa+n) and checks what the GuestMemory returned.
func (g guest) slice(gpa, n uint64) ([]byte, error) {
	if gpa+n < gpa {
		return nil, fmt.Errorf("[%#x, +%#x): %w", gpa, n, ErrBufferWraps)
	}
	b, err := g.mem.Slice(gpa, n)
	if err != nil {
		return nil, err
	}
	if uint64(len(b)) != n {
		return nil, fmt.Errorf("guest memory returned %d bytes for [%#x, +%#x)", len(b), gpa, n)
	}
	return b, nil
}

// write copies src to gpa and reports it dirty.
func (g guest) write(gpa uint64, src []byte) error {
	dst, err := g.slice(gpa, uint64(len(src)))
	if err != nil {
		return err
	}
	copy(dst, src)
	g.dirty(gpa, uint64(len(src)))
	return nil
}

// word maps the naturally aligned 32-bit word at gpa (gpa%4 == 0) for
// atomic access, checking that the host mapping is aligned too.
func (g guest) word(gpa uint64) (*uint32, error) {
	b, err := g.slice(gpa, 4)
	if err != nil {
		return nil, err
	}
	p := unsafe.Pointer(&b[0])
	if uintptr(p)%4 != 0 {
		return nil, fmt.Errorf("guest address %#x is mapped at a host address that is not 4-byte aligned", gpa)
	}
	return (*uint32)(p), nil
}

// half maps the naturally aligned 16-bit word at gpa (gpa%2 == 0),
// checking that the host mapping is aligned too.
func (g guest) half(gpa uint64) (*uint16, error) {
	b, err := g.slice(gpa, 2)
	if err != nil {
		return nil, err
	}
	p := unsafe.Pointer(&b[0])
	if uintptr(p)%2 != 0 {
		return nil, fmt.Errorf("guest address %#x is mapped at a host address that is not 2-byte aligned", gpa)
	}
	return (*uint16)(p), nil
}

// load16 reads the little-endian 16-bit guest word at gpa (2-byte
// aligned) with one load, and store16 writes one with one store (and
// reports it dirty): the fields a driver reads or writes while the device
// runs (avail.flags, used_event, avail_event) must never be seen half
// old, half new. Go has no 16-bit atomics, but an aligned uint16 access
// through a pointer is a single instruction on every architecture ferry
// builds for (amd64, arm64), as READ_ONCE/WRITE_ONCE are for the guest;
// copy would call memmove, which moves 2 bytes as two byte stores.
func (g guest) load16(gpa uint64) (uint16, error) {
	p, err := g.half(gpa)
	if err != nil {
		return 0, err
	}
	v := *p
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], v)
	return binary.LittleEndian.Uint16(b[:]), nil
}

func (g guest) store16(gpa uint64, v uint16) error {
	p, err := g.half(gpa)
	if err != nil {
		return err
	}
	var b [2]byte
	binary.LittleEndian.PutUint16(b[:], v)
	*p = binary.NativeEndian.Uint16(b[:])
	g.dirty(gpa, 2)
	return nil
}

// loadLE32 atomically loads a little-endian 32-bit guest word.
func loadLE32(p *uint32) uint32 {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], atomic.LoadUint32(p))
	return binary.LittleEndian.Uint32(b[:])
}

// storeLE32 atomically stores v as a little-endian 32-bit guest word.
func storeLE32(p *uint32, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	atomic.StoreUint32(p, binary.NativeEndian.Uint32(b[:]))
}
