package state

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/devices"
	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/kvm"
)

// fill sets every exported field of the fixed-size struct *v to random
// values (padding stays zero, as the encoding stores it).
func fill(rng *rand.Rand, v any) {
	b := make([]byte, binary.Size(v))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	if _, err := binary.Decode(b, binary.LittleEndian, v); err != nil {
		panic(err)
	}
}

func randBytes(rng *rand.Rand, n int) []byte {
	if n == 0 {
		return nil
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// testLayout is a small two-region layout with a hole, like guestmem's
// but scaled down: 1 MiB at 0 and 1 MiB at 4 GiB.
func testLayout() []guestmem.Region {
	return []guestmem.Region{
		{GPA: 0, Size: 1 << 20, Offset: 0},
		{GPA: 1 << 32, Size: 1 << 20, Offset: 1 << 20},
	}
}

func randomVCPU(rng *rand.Rand, id uint32, xsaveLen int) VCPU {
	v := VCPU{ID: id, TSCKHz: rng.Uint32()}
	fill(rng, &v.Regs)
	fill(rng, &v.Sregs)
	if rng.IntN(2) == 0 {
		v.Sregs2 = new(kvm.Sregs2)
		fill(rng, v.Sregs2)
	}
	fill(rng, &v.FPU)
	v.XSave = randBytes(rng, xsaveLen)
	fill(rng, &v.XCRs)
	fill(rng, &v.LAPIC)
	fill(rng, &v.Events)
	fill(rng, &v.DebugRegs)
	fill(rng, &v.MPState)
	idx := uint32(0)
	for range 12 + rng.IntN(8) {
		idx += 1 + rng.Uint32N(1<<20)
		v.MSRs = append(v.MSRs, kvm.MSREntry{Index: idx, Data: rng.Uint64()})
	}
	for range 5 + rng.IntN(10) {
		var e kvm.CPUIDEntry
		fill(rng, &e)
		v.CPUID = append(v.CPUID, e)
	}
	return v
}

// randomMachine is a machine with every field populated at random.
func randomMachine(rng *rand.Rand, cpus int, xsaveLen int) *Machine {
	m := &Machine{}
	for i := range cpus {
		m.VCPUs = append(m.VCPUs, randomVCPU(rng, uint32(i), xsaveLen))
	}
	fill(rng, &m.PIC[0])
	fill(rng, &m.PIC[1])
	fill(rng, &m.IOAPIC)
	fill(rng, &m.PIT)
	fill(rng, &m.Clock)
	d := &m.Devices
	d.Serial = devices.SerialState{
		IER: uint8(rng.Uint32()), FCR: uint8(rng.Uint32()), LCR: uint8(rng.Uint32()), MCR: uint8(rng.Uint32()),
		LSR: uint8(rng.Uint32()), MSR: uint8(rng.Uint32()), SCR: uint8(rng.Uint32()), DLL: uint8(rng.Uint32()),
		DLM: uint8(rng.Uint32()), THREPending: rng.IntN(2) == 0, RXFIFO: randBytes(rng, rng.IntN(17)),
		Backlog: randBytes(rng, rng.IntN(100)), Dropped: rng.Uint64(), WriteErrors: rng.Uint64(),
	}
	d.CMOS = devices.CMOSState{Index: uint8(rng.Uint32()), NMIDisabled: rng.IntN(2) == 0,
		ClockOffset: time.Duration(rng.Int64())}
	copy(d.CMOS.RAM[:], randBytes(rng, 128))
	d.I8042 = devices.I8042State{CTR: uint8(rng.Uint32()), OutputPort: uint8(rng.Uint32()),
		LastWasCommand: rng.IntN(2) == 0, PendingCommand: uint8(rng.Uint32()), LastData: uint8(rng.Uint32()),
		Resets: rng.Uint64(), Dropped: rng.Uint64()}
	for range rng.IntN(5) {
		d.I8042.Output = append(d.I8042.Output, devices.I8042Byte{Value: uint8(rng.Uint32()), Aux: rng.IntN(2) == 0})
	}
	d.Post = devices.PostState{Last: uint8(rng.Uint32()), Writes: rng.Uint64()}
	m.Header = Header{
		Arch: ArchX86_64, CPUs: uint32(cpus), MemSize: 2 << 20, Regions: testLayout(),
		CPUIDFingerprint: CPUIDFingerprint(m.VCPUs[0].CPUID), CreatedUnixNano: rng.Int64(),
		Producer: "ferry test",
	}
	return m
}

// testMemory is a 2 MiB image for testLayout: mostly zero pages, some
// random pages, some with a single non-zero byte at either end.
func testMemory(rng *rand.Rand) (mem []byte, nonZero int) {
	mem = make([]byte, 2<<20)
	for p := 0; p < len(mem)/PageSize; p++ {
		page := mem[p*PageSize : (p+1)*PageSize]
		switch {
		case p%3 == 0 && p%2 == 0:
			copy(page, randBytes(rng, PageSize))
		case p%3 == 0:
			copy(page, bytes.Repeat([]byte(fmt.Sprintf("page %d ", p)), PageSize/8))
		case p%7 == 1:
			page[PageSize-1] = 1
		case p%11 == 2:
			page[0] = 0x80
		default:
			continue
		}
		nonZero++
	}
	return mem, nonZero
}

// encode writes m (and optionally memory) to a byte slice.
func encode(t testing.TB, m *Machine, mem []byte, opts WriterOptions) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, m.Header, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteMachine(m); err != nil {
		t.Fatal(err)
	}
	if mem != nil {
		if _, err := w.WriteMemory(mem, m.Header.Regions); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// decoded is what decode returns.
type decoded struct {
	m        Machine
	pages    map[uint64][]byte // gpa -> data of the last record for that page
	warnings []string
	summary  MemorySummary
	ordered  bool
}

// image lays the decoded pages out as a memory image.
func (d *decoded) image() []byte {
	mem := make([]byte, d.m.Header.MemSize)
	for gpa, data := range d.pages {
		for _, rg := range d.m.Header.Regions {
			if gpa >= rg.GPA && gpa-rg.GPA < rg.Size {
				copy(mem[rg.Offset+gpa-rg.GPA:], data)
			}
		}
	}
	return mem
}

// decode reads a stream, keeping the pages it hands over.
func decode(data []byte, opts ReaderOptions) (*decoded, error) {
	r, err := NewReader(bytes.NewReader(data), opts)
	if err != nil {
		return nil, err
	}
	h := r.Header()
	out := &decoded{pages: map[uint64][]byte{}}
	out.warnings, err = r.ReadAll(&out.m, func(gpa uint64, data []byte) error {
		if len(data) != PageSize || gpa%PageSize != 0 {
			panic("page callback got a bad page")
		}
		if regionOf(h.Regions, gpa) < 0 {
			panic("page outside the layout reached the callback")
		}
		out.pages[gpa] = bytes.Clone(data)
		return nil
	})
	if err != nil {
		return out, err
	}
	out.summary, out.ordered = r.MemorySummary()
	return out, nil
}

// sectionSpan is where one section lies in an encoded stream.
type sectionSpan struct {
	start, end int
	typ        uint16
}

// layoutOf walks a valid stream's framing: the header's end and the
// sections' spans.
func layoutOf(t testing.TB, data []byte) (headerEnd int, spans []sectionSpan) {
	t.Helper()
	hlen := int(binary.LittleEndian.Uint32(data[12:]))
	off := prefixSize + hlen + crcSize
	headerEnd = off
	for off < len(data) {
		typ := binary.LittleEndian.Uint16(data[off:])
		n := int(binary.LittleEndian.Uint64(data[off+4:]))
		end := off + sectionHeaderSize + n + crcSize
		spans = append(spans, sectionSpan{off, end, typ})
		off = end
	}
	if off != len(data) {
		t.Fatalf("layout walk ended at %d of %d", off, len(data))
	}
	return headerEnd, spans
}
