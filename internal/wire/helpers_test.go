package wire

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/devices"
	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/state"
)

// The machine builders follow internal/state's test helpers.

// fill sets every exported field of the fixed-size struct *v to random
// values.
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

// testLayout is 1 MiB at 0 and 1 MiB at 4 GiB.
func testLayout() []guestmem.Region {
	return []guestmem.Region{
		{GPA: 0, Size: 1 << 20, Offset: 0},
		{GPA: 1 << 32, Size: 1 << 20, Offset: 1 << 20},
	}
}

func randomVCPU(rng *rand.Rand, id uint32, xsaveLen int) state.VCPU {
	v := state.VCPU{ID: id, TSCKHz: rng.Uint32()}
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

// randomMachine is a machine with every field populated at random and a
// header as a decoder returns it (format version set).
func randomMachine(rng *rand.Rand, cpus int, xsaveLen int) *state.Machine {
	m := &state.Machine{}
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
		IER: uint8(rng.Uint32()), LCR: uint8(rng.Uint32()), THREPending: rng.IntN(2) == 0,
		RXFIFO: randBytes(rng, rng.IntN(17)), Backlog: randBytes(rng, rng.IntN(100)),
		Dropped: rng.Uint64(), WriteErrors: rng.Uint64(),
	}
	d.CMOS = devices.CMOSState{Index: uint8(rng.Uint32()), NMIDisabled: rng.IntN(2) == 0,
		ClockOffset: time.Duration(rng.Int64())}
	copy(d.CMOS.RAM[:], randBytes(rng, 128))
	d.I8042 = devices.I8042State{CTR: uint8(rng.Uint32()), Resets: rng.Uint64()}
	for range rng.IntN(5) {
		d.I8042.Output = append(d.I8042.Output, devices.I8042Byte{Value: uint8(rng.Uint32()), Aux: rng.IntN(2) == 0})
	}
	d.Post = devices.PostState{Last: uint8(rng.Uint32()), Writes: rng.Uint64()}
	m.Header = state.Header{
		FormatVersion: state.FormatVersion, Arch: state.ArchX86_64, CPUs: uint32(cpus),
		MemSize: 2 << 20, Regions: testLayout(),
		CPUIDFingerprint: state.CPUIDFingerprint(m.VCPUs[0].CPUID), CreatedUnixNano: rng.Int64(),
		Producer: "ferry test",
	}
	return m
}

// testHello is a valid Hello for machine m.
func testHello(m *state.Machine) *Hello {
	return &Hello{
		ProtocolVersion: ProtocolVersion, MinVersion: MinProtocolVersion,
		MigrationID:  [16]byte{0xfe, 0x77, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14},
		FerryVersion: "0.4.0-test", VMName: "guest-1", Mode: "precopy",
		Options: Options{Codec: "zstd", PageSize: 4096, Streams: 1},
		Header:  m.Header, CPUID: m.VCPUs[0].CPUID,
	}
}

// allMessages returns one valid message of every type.
func allMessages(t testing.TB) []Msg {
	t.Helper()
	rng := rand.New(rand.NewPCG(5, 6))
	m := randomMachine(rng, 2, 512)
	page := bytes.Repeat([]byte("wire"), state.PageSize/4)
	pages, err := NewPages(3, PhasePreCopy, []uint64{1, 0x100001, 2}, [][]byte{page, make([]byte, state.PageSize), randBytes(rng, state.PageSize)}, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	ms, err := NewMachineState(m)
	if err != nil {
		t.Fatal(err)
	}
	return []Msg{
		testHello(m),
		&Welcome{ProtocolVersion: 1, MinVersion: 1, MaxVersion: 3, FerryVersion: "0.5.0"},
		&Refuse{Code: RefuseCPU, MinVersion: 1, MaxVersion: 1, FerryVersion: "0.4.0", Reason: "the destination's CPU lacks AVX-512F (CPUID 7.0:EBX bit 16)"},
		pages,
		&IterationDone{Iteration: 3, PagesSent: 1 << 20, BytesSent: 4 << 30, DirtyPages: 12345},
		&IterationAck{Iteration: 3, PagesReceived: 1 << 20},
		ms,
		&Complete{Iterations: 5, Chunks: 4100, Pages: 1 << 20, Bytes: 4<<30 + 17},
		&Resumed{UnixNano: 1767225600123456789, RestoreTime: 37 * time.Millisecond},
		&Error{Code: ErrorRestore, Message: "KVM_SET_XSAVE: invalid argument\nvCPU 1"},
		&Cancel{Reason: "cancelled by the operator"},
		&PageRequest{GPAs: []uint64{0x1000, 0x100000000, 0x7000}},
		&Ping{Nonce: 0xdeadbeef, UnixNano: 1767225600000000000},
		&Pong{Nonce: 0xdeadbeef, PingUnixNano: 1767225600000000000, UnixNano: 1767225600000400000},
		&Attach{MigrationID: [16]byte{1, 2, 3}, Channel: ChannelRequests, Attempt: 3},
		&Attach{MigrationID: [16]byte{1, 2, 3}, Channel: ChannelStream, Stream: 5},
		&Attached{Channel: ChannelMain, PostcopyStarted: true, Missing: []PageRange{{0, 16}, {0x100, 1}, {1 << 20, 4096}}},
		&Postcopy{Need: []PageRange{{1, 255}, {0x100000, 262144}}},
		&PostcopyDone{End: EndResident, PagesPushed: 1 << 18, PagesDemand: 412, Faults: 399, FaultP50: 180 * time.Microsecond,
			FaultP99: 2 * time.Millisecond, FaultMax: 9 * time.Millisecond, FaultTotal: 250 * time.Millisecond, ZeroFaults: 7,
			Residency: 3 * time.Second, LinkBreaks: 1, LinkDownFor: 4 * time.Second},
		&Notice{Code: NoticeTSC, Text: "the guest's TSC runs at 2095985 kHz, this host's at 2031000 kHz"},
	}
}

// rw joins a reader and a writer.
type rw struct {
	io.Reader
	io.Writer
}

// stream encodes messages into a byte stream with a Conn.
func stream(t testing.TB, cfg Config, msgs ...Msg) []byte {
	t.Helper()
	var buf bytes.Buffer
	c := NewConnConfig(rw{bytes.NewReader(nil), &buf}, cfg)
	for _, m := range msgs {
		if err := c.WriteMsg(m); err != nil {
			t.Fatal(err)
		}
	}
	return buf.Bytes()
}

// readConn returns a Conn reading data.
func readConn(data []byte, cfg Config) *Conn {
	return NewConnConfig(rw{bytes.NewReader(data), io.Discard}, cfg)
}

// frameSpan is where one frame lies in a stream.
type frameSpan struct {
	start, end int
	typ        Type
	flags      uint16
}

// framesOf walks a stream's frames by their length fields, stopping at the
// first that does not fit.
func framesOf(data []byte) []frameSpan {
	var out []frameSpan
	for off := 0; len(data)-off >= FrameHeaderSize; {
		n := int(le.Uint32(data[off+8:]))
		end := off + FrameHeaderSize + n + FrameCRCSize
		if end > len(data) {
			break
		}
		out = append(out, frameSpan{off, end, Type(data[off+3]), le.Uint16(data[off+4:])})
		off = end
	}
	return out
}

// fixFrames rewrites the sequence numbers and CRCs of every frame that
// fits, so that mutated headers and payloads get past the checksum.
func fixFrames(data []byte) {
	for i, f := range framesOf(data) {
		le.PutUint32(data[f.start+12:], uint32(i))
		le.PutUint32(data[f.end-4:], crc32.Checksum(data[f.start:f.end-4], castagnoli))
	}
}
