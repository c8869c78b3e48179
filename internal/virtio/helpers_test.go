package virtio

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// fakeMem is guest RAM [base, base+size) backed by a page-aligned []byte,
// with a recorder for the device's dirty reports. The test's driver writes
// through put* and write, which also update shadow, so that the bytes
// where data and shadow differ are exactly the device's writes.
type fakeMem struct {
	base   uint64
	data   []byte
	shadow []byte

	mu    sync.Mutex
	dirty []span
}

type span struct{ gpa, n uint64 }

const (
	testBase = 0x10000  // guest-physical start of the fake RAM
	testSize = 1 << 20  // its size
	descGPA  = testBase // ring placement used by most tests
	availGPA = testBase + 0x1000
	usedGPA  = testBase + 0x2000
	bufGPA   = testBase + 0x10000 // buffers start here
)

func newFakeMem(base, size uint64) *fakeMem {
	raw := make([]byte, size+4096)
	skip := (4096 - uintptr(unsafe.Pointer(&raw[0]))%4096) % 4096
	return &fakeMem{base: base, data: raw[skip : uint64(skip)+size : uint64(skip)+size], shadow: make([]byte, size)}
}

func (m *fakeMem) Slice(gpa, n uint64) ([]byte, error) {
	size := uint64(len(m.data))
	if gpa < m.base || gpa-m.base > size || n > size-(gpa-m.base) {
		return nil, fmt.Errorf("fake RAM: [%#x, +%#x) is not RAM", gpa, n)
	}
	off := gpa - m.base
	return m.data[off : off+n : off+n], nil
}

func (m *fakeMem) Dirty(gpa, n uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dirty = append(m.dirty, span{gpa, n})
}

// write is a driver's write: data and shadow both change.
func (m *fakeMem) write(gpa uint64, b []byte) {
	copy(m.at(gpa, uint64(len(b))), b)
	copy(m.shadow[gpa-m.base:], b)
}

// deviceWrites lists the addresses the device changed: where data differs
// from what the driver wrote.
func (m *fakeMem) deviceWrites() []uint64 { return m.changed(m.shadow) }

func (m *fakeMem) isDirty(gpa uint64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.dirty {
		if gpa >= s.gpa && gpa-s.gpa < s.n {
			return true
		}
	}
	return false
}

func (m *fakeMem) clearDirty() {
	m.mu.Lock()
	m.dirty = nil
	m.mu.Unlock()
}

// changed lists the guest addresses whose bytes differ from before.
func (m *fakeMem) changed(before []byte) []uint64 {
	var out []uint64
	for i := range m.data {
		if m.data[i] != before[i] {
			out = append(out, m.base+uint64(i))
		}
	}
	return out
}

// checkDirtyCovers fails t unless every byte the device changed was
// reported dirty.
func (m *fakeMem) checkDirtyCovers(t testing.TB) {
	t.Helper()
	for _, gpa := range m.deviceWrites() {
		if !m.isDirty(gpa) {
			t.Fatalf("byte at %#x changed but was not reported dirty", gpa)
		}
	}
}

func (m *fakeMem) put16(gpa uint64, v uint16) { m.write(gpa, binary.LittleEndian.AppendUint16(nil, v)) }
func (m *fakeMem) put32(gpa uint64, v uint32) { m.write(gpa, binary.LittleEndian.AppendUint32(nil, v)) }
func (m *fakeMem) put64(gpa uint64, v uint64) { m.write(gpa, binary.LittleEndian.AppendUint64(nil, v)) }
func (m *fakeMem) get16(gpa uint64) uint16    { return binary.LittleEndian.Uint16(m.at(gpa, 2)) }
func (m *fakeMem) get32(gpa uint64) uint32    { return binary.LittleEndian.Uint32(m.at(gpa, 4)) }
func (m *fakeMem) get64(gpa uint64) uint64    { return binary.LittleEndian.Uint64(m.at(gpa, 8)) }

func (m *fakeMem) at(gpa, n uint64) []byte {
	b, err := m.Slice(gpa, n)
	if err != nil {
		panic(err)
	}
	return b
}

// ring is the driver's side of a split virtqueue in fakeMem.
type ring struct {
	m                 *fakeMem
	size              uint16
	desc, avail, used uint64
	availIdx          uint16
}

func newRing(m *fakeMem, size uint16) *ring {
	return &ring{m: m, size: size, desc: descGPA, avail: availGPA, used: usedGPA}
}

func (r *ring) addrs() RingAddrs { return RingAddrs{Desc: r.desc, Driver: r.avail, Device: r.used} }

// setDesc writes descriptor i of the table at table.
func (r *ring) setDescAt(table uint64, i uint16, addr uint64, n uint32, flags, next uint16) {
	d := table + descSize*uint64(i)
	r.m.put64(d, addr)
	r.m.put32(d+8, n)
	r.m.put16(d+12, flags)
	r.m.put16(d+14, next)
}

func (r *ring) setDesc(i uint16, addr uint64, n uint32, flags, next uint16) {
	r.setDescAt(r.desc, i, addr, n, flags, next)
}

// publish makes heads available and moves avail.idx.
func (r *ring) publish(heads ...uint16) {
	for _, h := range heads {
		r.m.put16(r.avail+4+2*uint64(r.availIdx%r.size), h)
		r.availIdx++
	}
	r.m.put16(r.avail+2, r.availIdx)
}

func (r *ring) usedIdx() uint16 { return r.m.get16(r.used + 2) }

func (r *ring) usedElem(i uint16) (id, n uint32) {
	e := r.used + 4 + usedElemSize*uint64(i%r.size)
	return r.m.get32(e), r.m.get32(e + 4)
}

func (r *ring) setUsedEvent(v uint16)  { r.m.put16(r.avail+4+2*uint64(r.size), v) }
func (r *ring) availEvent() uint16     { return r.m.get16(r.used + 4 + usedElemSize*uint64(r.size)) }
func (r *ring) setAvailFlags(v uint16) { r.m.put16(r.avail, v) }

// eventually polls cond for up to 5 s.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// msiRecorder is a pci.MSISender that records messages.
type msiRecorder struct {
	mu   sync.Mutex
	msgs []msiMsg
}

type msiMsg struct {
	addr uint64
	data uint32
}

func (r *msiRecorder) SignalMSI(addr uint64, data uint32) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, msiMsg{addr, data})
	return nil
}

func (r *msiRecorder) count(data uint32) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if m.data == data {
			n++
		}
	}
	return n
}

// newMappedMem is a fakeMem whose RAM is an anonymous mapping outside the
// Go heap, as ferry's guest RAM is: the race detector does not watch it,
// so a test's driver and the device may share it as a guest and a VMM do
// (their ordering is the virtio protocol's business, not Go's). The
// mapping is released when t ends, after the cleanups registered later
// (a transport's Close).
func newMappedMem(t testing.TB, base, size uint64) *fakeMem {
	t.Helper()
	data, err := syscall.Mmap(-1, 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE,
		syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS|syscall.MAP_NORESERVE)
	if err != nil {
		t.Fatalf("mapping %#x bytes of fake RAM: %v", size, err)
	}
	t.Cleanup(func() { syscall.Munmap(data) })
	return &fakeMem{base: base, data: data[:size:size], shadow: make([]byte, size)}
}

// all returns the messages recorded so far.
func (r *msiRecorder) all() []msiMsg {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]msiMsg(nil), r.msgs...)
}

// errLog is a slog.Handler that keeps the error values logged under
// "err", so that tests can check why a device failed with errors.Is.
type errLog struct {
	mu   *sync.Mutex
	errs *[]error
}

func newErrLog() errLog { return errLog{mu: new(sync.Mutex), errs: new([]error)} }

func (l errLog) Enabled(context.Context, slog.Level) bool { return true }
func (l errLog) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l errLog) WithGroup(string) slog.Handler            { return l }

func (l errLog) Handle(_ context.Context, r slog.Record) error {
	r.Attrs(func(a slog.Attr) bool {
		if err, ok := a.Value.Any().(error); ok && a.Key == "err" {
			l.mu.Lock()
			*l.errs = append(*l.errs, err)
			l.mu.Unlock()
		}
		return true
	})
	return nil
}

// logged returns the errors logged so far.
func (l errLog) logged() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]error(nil), *l.errs...)
}

// Atomic and single-copy accesses of the driver's shared ring words.

func (m *fakeMem) hostWord(gpa uint64) *uint32 {
	if gpa%4 != 0 {
		panic("misaligned guest word")
	}
	return (*uint32)(unsafe.Pointer(&m.at(gpa, 4)[0]))
}

func (m *fakeMem) store32(gpa uint64, v uint32) {
	storeLE32(m.hostWord(gpa), v)
	binary.LittleEndian.PutUint32(m.shadow[gpa-m.base:], v)
}

func (m *fakeMem) load32(gpa uint64) uint32 { return loadLE32(m.hostWord(gpa)) }

// store16 is a single 16-bit store (virtio_store_mb's WRITE_ONCE).
func (m *fakeMem) store16(gpa uint64, v uint16) {
	b := m.at(gpa, 2)
	*(*uint16)(unsafe.Pointer(&b[0])) = binary.NativeEndian.Uint16(binary.LittleEndian.AppendUint16(nil, v))
	binary.LittleEndian.PutUint16(m.shadow[gpa-m.base:], v)
}

// load16 is a single 16-bit load (READ_ONCE).
func (m *fakeMem) load16(gpa uint64) uint16 {
	b := m.at(gpa, 2)
	v := *(*uint16)(unsafe.Pointer(&b[0]))
	return binary.LittleEndian.Uint16(binary.NativeEndian.AppendUint16(nil, v))
}
