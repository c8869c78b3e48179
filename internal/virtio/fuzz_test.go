package virtio

import (
	"encoding/binary"
	"errors"
	"log/slog"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/pci"
)

// Fuzzing layout for FuzzDescriptorChain: 64 KiB of RAM at fuzzRAM. The
// fuzzer's bytes are copied from the start of RAM, where the descriptor
// table is, followed by the available ring; what follows them (indirect
// tables, buffers) is the fuzzer's too. The used ring is the device's, at
// fuzzUsed, out of the fuzzer's reach.
const (
	fuzzRAM     = 0x1000
	fuzzRAMSize = 0x10000
	fuzzUsed    = fuzzRAM + 0x9000
	fuzzMaxIn   = 0x8000 // bytes of input copied into RAM
)

// walkerErrors are the reasons Pop may give.
var walkerErrors = []error{
	ErrAvailIndex, ErrDescIndex, ErrChainLoop, ErrIndirectNotNegotiated, ErrIndirectLen,
	ErrIndirectNested, ErrIndirectNext, ErrBufferNotRAM, ErrBufferWraps, ErrChainTooBig, ErrWriteOrder,
}

// chainSeed builds FuzzDescriptorChain input: a descriptor table of size
// entries, an available ring publishing heads from start on, then extra
// at the offset after the ring (rounded up to 16).
type chainSeed struct {
	size  uint16
	descs map[uint16]desc
	heads []uint16
	start uint16
	extra []desc // an indirect table, right after the available ring
}

// extraAt is the guest address of chainSeed.extra.
func (s chainSeed) extraAt() uint64 {
	return fuzzRAM + (descSize*uint64(s.size)+6+2*uint64(s.size)+15)&^15
}

func (s chainSeed) bytes() []byte {
	avail := descSize * int(s.size)
	end := int(s.extraAt()-fuzzRAM) + descSize*len(s.extra)
	b := make([]byte, end)
	put := func(at int, d desc) {
		binary.LittleEndian.PutUint64(b[at:], d.addr)
		binary.LittleEndian.PutUint32(b[at+8:], d.len)
		binary.LittleEndian.PutUint16(b[at+12:], d.flags)
		binary.LittleEndian.PutUint16(b[at+14:], d.next)
	}
	for i, d := range s.descs {
		put(descSize*int(i), d)
	}
	for k, h := range s.heads {
		binary.LittleEndian.PutUint16(b[avail+4+2*int((s.start+uint16(k))%s.size):], h)
	}
	binary.LittleEndian.PutUint16(b[avail+2:], s.start+uint16(len(s.heads)))
	for i, d := range s.extra {
		put(int(s.extraAt()-fuzzRAM)+descSize*i, d)
	}
	return b
}

func sizeLog(size uint16) uint8 {
	for l := uint8(0); ; l++ {
		if 1<<l == size {
			return l
		}
	}
}

// FuzzDescriptorChain: whatever the descriptor table and the available
// ring hold, Pop either returns a chain whose buffers are all in RAM,
// non-empty, at most the queue size of them and within MaxChainBytes, or
// one of the walker's errors; it never panics. Writing every chain's
// writable part and pushing it changes nothing but those buffers and the
// used ring, all reported dirty.
// chainSeeds are FuzzDescriptorChain's seeds: logSize, features, start,
// input, and the error each gives (nil: chains).
func chainSeeds() (out []struct {
	logSize, features uint8
	start             uint16
	in                []byte
	want              error
}) {
	buf := func(k uint64) uint64 { return fuzzRAM + 0x4000 + 0x100*k }
	for _, s := range []struct {
		seed     chainSeed
		features uint8
		want     error
	}{
		{chainSeed{size: 8, descs: map[uint16]desc{0: {buf(0), 64, descFWrite, 0}}, heads: []uint16{0}}, 0, nil},
		{chainSeed{size: 4, heads: []uint16{2, 0}, descs: map[uint16]desc{
			2: {buf(1), 16, descFNext, 3}, 3: {buf(2), 32, descFNext | descFWrite, 1}, 1: {buf(3), 8, descFWrite, 0},
			0: {buf(4), 100, descFWrite, 0},
		}}, 1, nil},
		{chainSeed{size: 16, heads: []uint16{5}, descs: map[uint16]desc{5: {0, 3 * descSize, descFIndirect, 0}},
			extra: []desc{{buf(5), 8, descFNext, 2}, {buf(6), 8, descFWrite, 0}, {buf(7), 8, descFNext | descFWrite, 1}}}, 3, nil},
		{chainSeed{size: 8, start: 0xfffe, heads: []uint16{1, 2, 3}, descs: map[uint16]desc{
			1: {buf(8), 1, descFWrite, 0}, 2: {buf(9), 2, 0, 0}, 3: {buf(10), 3, descFWrite | descFNext, 1},
		}}, 2, nil},
		{chainSeed{size: 2, heads: []uint16{0}, descs: map[uint16]desc{0: {buf(0), 8, descFNext, 1}, 1: {buf(1), 8, descFNext, 0}}}, 0, ErrChainLoop},
		{chainSeed{size: 64, heads: []uint16{63, 62}, descs: map[uint16]desc{
			63: {fuzzRAM, 0x40, descFWrite, 0}, // writes over the descriptor table
			62: {buf(2), 0xffff_ffff, descFWrite, 0},
		}}, 1, ErrBufferNotRAM},
	} {
		seed := s.seed
		if seed.extra != nil { // the indirect descriptor points at extra
			for i, d := range seed.descs {
				if d.flags&descFIndirect != 0 {
					d.addr = seed.extraAt()
					seed.descs[i] = d
				}
			}
		}
		out = append(out, struct {
			logSize, features uint8
			start             uint16
			in                []byte
			want              error
		}{sizeLog(seed.size), s.features, seed.start, seed.bytes(), s.want})
	}
	return out
}

func FuzzDescriptorChain(f *testing.F) {
	for _, s := range chainSeeds() {
		f.Add(s.logSize, s.features, s.start, s.in)
	}
	f.Fuzz(func(t *testing.T, logSize, features uint8, start uint16, in []byte) {
		size := uint16(1) << (logSize % 7) // 1..64
		var feat uint64
		if features&1 != 0 {
			feat |= FeatureIndirectDesc
		}
		if features&2 != 0 {
			feat |= FeatureEventIdx
		}
		m := newFakeMem(fuzzRAM, fuzzRAMSize)
		m.write(fuzzRAM, in[:min(len(in), fuzzMaxIn)])
		addrs := RingAddrs{Desc: fuzzRAM, Driver: fuzzRAM + descSize*uint64(size), Device: fuzzUsed}
		q, err := NewQueue(0, 64, m, m.Dirty)
		if err != nil {
			t.Fatal(err)
		}
		if err := q.Start(size, addrs, feat); err != nil {
			t.Fatal(err)
		}
		q.nextAvail, q.nextUsed = start, start
		allowed := []Buffer{{GPA: fuzzUsed, Len: 6 + usedElemSize*uint32(size)}}
		pattern := make([]byte, 1<<16)
		for i := range pattern {
			pattern[i] = byte(i*7 + 1)
		}
		for range int(size) + 2 {
			c, err := q.Pop()
			if err != nil {
				known := false
				for _, e := range walkerErrors {
					known = known || errors.Is(err, e)
				}
				if !known {
					t.Fatalf("Pop: unexpected error %v", err)
				}
				break
			}
			if c == nil {
				break
			}
			n := len(c.Readable) + len(c.Writable)
			if n > int(size) || cap(c.Readable)+cap(c.Writable) > 2*int(size)+8 {
				t.Fatalf("chain of %d buffers (capacity %d+%d) in a queue of %d", n, cap(c.Readable), cap(c.Writable), size)
			}
			if c.ReadableLen()+c.WritableLen() > MaxChainBytes {
				t.Fatalf("chain of %d bytes", c.ReadableLen()+c.WritableLen())
			}
			for _, b := range append(append([]Buffer(nil), c.Readable...), c.Writable...) {
				if b.Len == 0 || b.GPA < fuzzRAM || b.GPA+uint64(b.Len) > fuzzRAM+fuzzRAMSize || b.GPA+uint64(b.Len) < b.GPA {
					t.Fatalf("buffer [%#x, +%#x) outside RAM [%#x, +%#x)", b.GPA, b.Len, fuzzRAM, fuzzRAMSize)
				}
			}
			allowed = append(allowed, c.Writable...)
			w := min(c.WritableLen(), uint64(len(pattern)))
			written, err := c.WriteAt(pattern[:w], 0)
			if err != nil || uint64(written) != w {
				t.Fatalf("WriteAt = %d, %v; want %d", written, err, w)
			}
			if err := q.Push(c.Head, uint32(written)); err != nil {
				t.Fatal(err)
			}
			q.NeedsInterrupt()
		}
		// Byte maps rather than checkDirtyCovers' scans: chains may write
		// all of RAM.
		ok, dirty := make([]bool, fuzzRAMSize), make([]bool, fuzzRAMSize)
		mark := func(into []bool, gpa, n uint64) {
			for a := gpa; a < gpa+n; a++ {
				if a >= fuzzRAM && a-fuzzRAM < fuzzRAMSize {
					into[a-fuzzRAM] = true
				}
			}
		}
		for _, a := range allowed {
			mark(ok, a.GPA, uint64(a.Len))
		}
		for _, d := range m.dirty {
			mark(dirty, d.gpa, d.n)
		}
		for _, gpa := range m.deviceWrites() {
			if !ok[gpa-fuzzRAM] {
				t.Fatalf("byte %#x written outside the used ring and the popped chains' writable buffers", gpa)
			}
			if !dirty[gpa-fuzzRAM] {
				t.Fatalf("byte %#x written but not reported dirty", gpa)
			}
		}
	})
}

// Transport fuzzing: RAM [0, 64 KiB), and operations of 11 bytes: kind,
// a 16-bit offset and a 64-bit value.
const (
	opCfgRead = iota
	opCfgWrite
	opBARRead
	opBARWrite
	opCommonWrite // a BAR write aimed at the common configuration
	opNotify      // a doorbell
	opMemWrite    // the guest writes 8 bytes of RAM
	opPause       // Pause, State, and Resume (or SetState back, if value is odd)
	numOps

	opLen        = 11
	fuzzTRAMSize = 0x10000
)

// op encodes one transport operation: kind in the low 3 bits, access
// size 1<<(bits 3-4), bit 7: the BAR index comes from the offset.
func op(kind, size int, off uint16, v uint64) []byte {
	b := []byte{byte(kind) | byte(sizeLog(uint16(size)))<<3}
	b = binary.LittleEndian.AppendUint16(b, off)
	return binary.LittleEndian.AppendUint64(b, v)
}

// linuxOps is a driver bringing virtio-rng up with a queue of 4 and
// posting a buffer, as FuzzTransportAccess operations; msixCap is where
// the MSI-X capability is.
func linuxOps(msixCap int) []byte {
	var p []byte
	cw := func(off uint16, size int, v uint64) { p = append(p, op(opCommonWrite, size, off, v)...) }
	const desc, avail, used, buf = 0x1000, 0x2000, 0x3000, 0x4000
	p = append(p, op(opCfgWrite, 2, pci.RegCommand, pci.CommandMemory|pci.CommandBusMaster)...)
	p = append(p, op(opCfgWrite, 2, uint16(msixCap+2), pci.MSIXControlEnable)...)
	p = append(p, op(opBARWrite, 4, msixTableOffset+12, 0)...)
	p = append(p, op(opBARWrite, 4, msixTableOffset+28, 0)...)
	p = append(p, op(opBARWrite, 4, msixTableOffset+16, 0xfee01000)...)
	cw(commonStatus, 1, 0)
	cw(commonStatus, 1, StatusAcknowledge|StatusDriver)
	cw(commonGFSelect, 4, 1)
	cw(commonGF, 4, 1)
	cw(commonGFSelect, 4, 0)
	cw(commonGF, 4, FeatureEventIdx|FeatureIndirectDesc)
	cw(commonStatus, 1, StatusAcknowledge|StatusDriver|StatusFeaturesOK)
	cw(commonMSIX, 2, 0)
	cw(commonQSelect, 2, 0)
	cw(commonQSize, 2, 4)
	cw(commonQDescLo, 8, desc)
	cw(commonQAvailLo, 8, avail)
	cw(commonQUsedLo, 8, used)
	cw(commonQVector, 2, 1)
	cw(commonQEnable, 2, 1)
	cw(commonStatus, 1, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK)
	p = append(p, op(opMemWrite, 8, desc, buf)...)
	p = append(p, op(opMemWrite, 8, desc+8, 64|uint64(descFWrite)<<32)...)
	p = append(p, op(opMemWrite, 8, avail, 1<<16)...) // flags 0, idx 1, ring[0] = 0
	p = append(p, op(opNotify, 2, 0, 0)...)
	p = append(p, op(opPause, 1, 0, 1)...)
	return p
}

// FuzzTransportAccess: any sequence of configuration-space and BAR 4
// accesses of 1, 2, 4 or 8 bytes (and doorbells, guest RAM writes, pause
// and state round trips) leaves the transport without a panic or a
// deadlock, every device write reported dirty, and Close returning.
func FuzzTransportAccess(f *testing.F) {
	probe, err := NewTransport(NewRNG(), TransportConfig{Memory: newFakeMem(0, 4096), Dirty: func(uint64, uint64) {}, MSI: &msiRecorder{}})
	if err != nil {
		f.Fatal(err)
	}
	msixCap, pciCfg := probe.MSIX().CapOffset(), probe.pciCfgCap
	probe.Close()
	f.Add(linuxOps(msixCap))
	f.Add(append(linuxOps(msixCap), op(opCommonWrite, 1, commonStatus, 0)...))
	f.Add(append(linuxOps(msixCap), op(opMemWrite, 8, 0x1000+14, 7)...)) // NEXT to nowhere
	f.Add(op(opBARRead, 8, isrOffset, 0))
	// pci_clear_master, a doorbell and a configuration-space round trip
	// while it is clear, then pci_set_master.
	f.Add(slices.Concat(linuxOps(msixCap),
		op(opCfgWrite, 2, pci.RegCommand, pci.CommandMemory),
		op(opMemWrite, 8, 0x2000, 2<<16), op(opNotify, 2, 0, 0), op(opPause, 1, 0, 1),
		op(opCfgWrite, 2, pci.RegCommand, pci.CommandMemory|pci.CommandBusMaster)))
	// The PCI_CFG window onto the status byte, then a write through it.
	f.Add(append(append(append(op(opCfgWrite, 1, uint16(pciCfg+capBar), BAR),
		op(opCfgWrite, 4, uint16(pciCfg+capOffset), commonStatus)...),
		op(opCfgWrite, 4, uint16(pciCfg+capLength), 1)...),
		op(opCfgWrite, 1, uint16(pciCfg+capData), StatusAcknowledge)...))
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 256*opLen {
			ops = ops[:256*opLen]
		}
		m := newMappedMem(t, 0, fuzzTRAMSize)
		tr, err := NewTransport(NewRNG(), TransportConfig{
			Memory: m, Dirty: m.Dirty, MSI: &msiRecorder{}, Logger: slog.New(slog.DiscardHandler),
		})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			runOps(tr, m, ops)
			tr.Close()
		}()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			stacks := make([]byte, 1<<20)
			t.Fatalf("deadlock:\n%s", stacks[:runtime.Stack(stacks, true)])
		}
		m.checkDirtyCovers(t)
	})
}

func runOps(tr *Transport, m *fakeMem, ops []byte) {
	var saved *State
	for ; len(ops) >= opLen; ops = ops[opLen:] {
		kind, size := int(ops[0]&7), 1<<(ops[0]>>3&3)
		off := binary.LittleEndian.Uint16(ops[1:])
		v := binary.LittleEndian.Uint64(ops[3:])
		data := binary.LittleEndian.AppendUint64(nil, v)[:size]
		bar := BAR
		if ops[0]&0x80 != 0 {
			bar = int(off % 7)
		}
		switch kind {
		case opCfgRead:
			tr.Config().Read(int(off%0x1001), data)
		case opCfgWrite:
			tr.Config().Write(int(off%0x1001), data)
		case opBARRead:
			tr.BARRead(bar, uint64(off)%(BARSize+0x1000), data)
		case opBARWrite:
			tr.BARWrite(bar, uint64(off)%(BARSize+0x1000), data)
		case opCommonWrite:
			tr.BARWrite(BAR, uint64(off)%(commonCfgLen+8), data)
		case opNotify:
			tr.BARWrite(BAR, notifyOffset+uint64(off%8), data)
		case opMemWrite:
			m.write(uint64(off)%(fuzzTRAMSize-8), binary.LittleEndian.AppendUint64(nil, v))
		case opPause:
			tr.Pause()
			s, err := tr.State()
			if err != nil {
				panic(err)
			}
			if saved != nil && v&1 != 0 {
				_ = tr.SetState(*saved) // may be refused (rings no longer in RAM ...): fine
			}
			saved = &s
			tr.Resume()
		}
	}
}

// TestFuzzTransportSeed: the main seed of FuzzTransportAccess does bring
// the device up and gets a buffer used, so that the fuzzer starts deep.
func TestFuzzTransportSeed(t *testing.T) {
	m := newMappedMem(t, 0, fuzzTRAMSize)
	msi := &msiRecorder{}
	tr, err := NewTransport(NewRNG(), TransportConfig{Memory: m, Dirty: m.Dirty, MSI: msi, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	runOps(tr, m, linuxOps(tr.MSIX().CapOffset()))
	eventually(t, "the seed's buffer used", func() bool { return m.load32(0x3000)>>16 == 1 })
	eventually(t, "its interrupt", func() bool { return msi.count(0) == 1 })
	data := make([]byte, 1)
	tr.BARRead(BAR, commonStatus, data)
	if data[0] != StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK {
		t.Fatalf("status %#x", data[0])
	}
}

// TestFuzzChainSeeds: FuzzDescriptorChain's seeds pop what they were
// built for.
func TestFuzzChainSeeds(t *testing.T) {
	for k, s := range chainSeeds() {
		size := uint16(1) << s.logSize
		m := newFakeMem(fuzzRAM, fuzzRAMSize)
		m.write(fuzzRAM, s.in)
		q, _ := NewQueue(0, 64, m, m.Dirty)
		feat := FeatureVersion1 | uint64(s.features&1)*FeatureIndirectDesc | uint64(s.features>>1&1)*FeatureEventIdx
		if err := q.Start(size, RingAddrs{fuzzRAM, fuzzRAM + descSize*uint64(size), fuzzUsed}, feat); err != nil {
			t.Fatal(err)
		}
		q.nextAvail, q.nextUsed = s.start, s.start
		var err error
		chains := 0
		for c := (*Chain)(nil); err == nil; chains++ {
			if c, err = q.Pop(); c == nil {
				break
			}
			if err := q.Push(c.Head, 0); err != nil {
				t.Fatal(err)
			}
		}
		if !errors.Is(err, s.want) || (s.want == nil && chains == 0) {
			t.Errorf("seed %d: %d chains, then %v; want %v", k, chains, err, s.want)
		}
	}
}
