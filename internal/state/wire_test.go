package state

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// machineBytes is the part of an encoded stream between the header and
// the first memory chunk or the end section: the machine sections.
func machineBytes(t testing.TB, data []byte) []byte {
	t.Helper()
	headerEnd, spans := layoutOf(t, data)
	end := headerEnd
	for _, s := range spans {
		if s.typ == SectionMemory || s.typ == SectionEnd {
			break
		}
		end = s.end
	}
	return data[headerEnd:end]
}

// machineSpans splits EncodeMachine's output into its sections.
func machineSpans(t testing.TB, b []byte) [][]byte {
	t.Helper()
	var out [][]byte
	for off := 0; off < len(b); {
		n := int(le.Uint64(b[off+4:]))
		end := off + sectionHeaderSize + n + crcSize
		out = append(out, b[off:end])
		off = end
	}
	return out
}

func testMachines() map[string]*Machine {
	rng := rand.New(rand.NewPCG(61, 62))
	minimal := randomMachine(rng, 1, 0)
	v := &minimal.VCPUs[0]
	v.Sregs2, v.XSave, v.MSRs, v.CPUID = nil, nil, nil, nil
	minimal.Header.CPUIDFingerprint = CPUIDFingerprint(nil)
	minimal.Devices.Serial.RXFIFO, minimal.Devices.Serial.Backlog, minimal.Devices.I8042.Output = nil, nil, nil
	return map[string]*Machine{
		"1 vCPU":           randomMachine(rng, 1, 4096),
		"3 vCPUs xsave2":   randomMachine(rng, 3, 4096+2560),
		"8 vCPUs no xsave": randomMachine(rng, 8, 0),
		"minimal":          minimal,
	}
}

func TestEncodeHeader(t *testing.T) {
	rng := rand.New(rand.NewPCG(63, 64))
	m := randomMachine(rng, 2, 0)
	data := encode(t, m, nil, WriterOptions{})
	hb := EncodeHeader(m.Header)
	headerEnd, _ := layoutOf(t, data)
	if !bytes.Equal(hb, data[:headerEnd]) {
		t.Fatal("EncodeHeader differs from the header a Writer writes")
	}
	h, err := DecodeHeader(hb)
	if err != nil {
		t.Fatal(err)
	}
	want := m.Header
	want.FormatVersion = FormatVersion
	if !reflect.DeepEqual(h, want) {
		t.Fatalf("got %+v, want %+v", h, want)
	}
	// An empty Arch is written as x86_64, the version always as 1.
	h2 := m.Header
	h2.Arch, h2.FormatVersion = "", 7
	if !bytes.Equal(EncodeHeader(h2), hb) {
		t.Error("Arch and FormatVersion are not normalized")
	}

	for _, c := range []struct {
		name string
		b    []byte
		want string
	}{
		{"trailing byte", append(bytes.Clone(hb), 0), "state file: header: 1 unexpected bytes after the header"},
		{"truncated", hb[:len(hb)-1], fmt.Sprintf("state file: truncated in the header at byte %d", len(hb)-1)},
		{"empty", nil, "state file: truncated in the header at byte 0"},
		{"bit flip", func() []byte { b := bytes.Clone(hb); b[20] ^= 4; return b }(), "state file: header: checksum mismatch"},
		{"version", setVersion(bytes.Clone(hb), 2), "state file: format version 2 not supported (this ferry reads 1)"},
		{"no vCPUs", func() []byte { h := m.Header; h.CPUs = 0; return EncodeHeader(h) }(), "state file: header: 0 vCPUs, 1 to 4096 allowed"},
		{"layout", func() []byte { h := m.Header; h.MemSize++; return EncodeHeader(h) }(), "memory regions total 0x200000 bytes, memory size is 0x200001"},
	} {
		_, err := DecodeHeader(c.b)
		var fe *FormatError
		if err == nil || !strings.Contains(err.Error(), c.want) || !errors.As(err, &fe) {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
	}
}

// EncodeMachine produces exactly the sections WriteMachine writes, and
// DecodeMachine decodes them back.
func TestEncodeDecodeMachine(t *testing.T) {
	for name, m := range testMachines() {
		t.Run(name, func(t *testing.T) {
			b, err := EncodeMachine(m)
			if err != nil {
				t.Fatal(err)
			}
			if want := machineBytes(t, encode(t, m, nil, WriterOptions{})); !bytes.Equal(b, want) {
				t.Fatalf("EncodeMachine: %d bytes differ from WriteMachine's %d", len(b), len(want))
			}
			h, err := DecodeHeader(EncodeHeader(m.Header))
			if err != nil {
				t.Fatal(err)
			}
			got, warnings, err := DecodeMachine(b, h)
			if err != nil || len(warnings) != 0 {
				t.Fatalf("DecodeMachine: %v, warnings %q", err, warnings)
			}
			want := *m
			want.Header.FormatVersion = FormatVersion
			if !reflect.DeepEqual(*got, want) {
				for _, d := range Diff(got, &want, true) {
					t.Errorf("%s: got %s, want %s", d.Path, d.A, d.B)
				}
				t.Fatal("decoded machine differs")
			}
			// Sections in any order; a zero FormatVersion is the current one.
			spans := machineSpans(t, b)
			rng := rand.New(rand.NewPCG(1, uint64(len(b))))
			rng.Shuffle(len(spans), func(i, j int) { spans[i], spans[j] = spans[j], spans[i] })
			h.FormatVersion = 0
			got, _, err = DecodeMachine(bytes.Join(spans, nil), h)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(*got, want) {
				t.Fatal("shuffled sections decode differently")
			}
		})
	}
}

func TestEncodeMachineErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(65, 66))
	for _, c := range []struct {
		name   string
		modify func(m *Machine)
		want   string
	}{
		{"cpu count", func(m *Machine) { m.Header.CPUs = 3 }, "state: 2 vCPUs, the header says 3"},
		{"repeated id", func(m *Machine) { m.VCPUs[1].ID = 0 }, "state: vCPU id 0 is out of range or repeated"},
		{"fingerprint", func(m *Machine) { m.VCPUs[0].CPUID[0].EAX++ }, "does not match the header's CPUID fingerprint"},
		{"no regions", func(m *Machine) { m.Header.Regions = nil }, "state: invalid header: 0 memory regions"},
		{"version", func(m *Machine) { m.Header.FormatVersion = 2 }, "state: cannot write format version 2"},
		{"duplicate MSR", func(m *Machine) { m.VCPUs[1].MSRs[1].Index = m.VCPUs[1].MSRs[0].Index }, "state: vcpu 1: MSR"},
	} {
		m := randomMachine(rng, 2, 0)
		c.modify(m)
		if _, err := EncodeMachine(m); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
	}
}

func TestDecodeMachineErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(67, 68))
	m := randomMachine(rng, 2, 64)
	b, err := EncodeMachine(m)
	if err != nil {
		t.Fatal(err)
	}
	spans := machineSpans(t, b) // vcpu 0, vcpu 1, irqchip, pit, clock, devices
	if len(spans) != 6 {
		t.Fatalf("%d sections", len(spans))
	}
	without := func(i int) []byte {
		return bytes.Join(append(append([][]byte(nil), spans[:i]...), spans[i+1:]...), nil)
	}
	raw := func(typ, flags uint16, payload []byte) []byte {
		s, _, err := sealSection(typ, flags, append(newSection(len(payload)), payload...))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	page := bytes.Repeat([]byte{7}, PageSize)
	chunk, err := EncodePageChunk([]uint64{1}, [][]byte{page}, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	otherCPUID := m.Header
	otherCPUID.CPUIDFingerprint[0] ^= 1
	oneCPU := m.Header
	oneCPU.CPUs = 1
	badHeader := m.Header
	badHeader.Arch = "arm64"
	newer := m.Header
	newer.FormatVersion = 2

	for _, c := range []struct {
		name string
		b    []byte
		h    Header
		want string
	}{
		{"empty", nil, m.Header, "state file: machine state: required section vcpu 0 missing (0 of 2 vCPUs present)"},
		{"no vcpu 1", without(1), m.Header, "state file: machine state: required section vcpu 1 missing (1 of 2 vCPUs present)"},
		{"no pit", without(3), m.Header, "state file: machine state: required section pit missing"},
		{"no devices", without(5), m.Header, "state file: machine state: required section devices missing"},
		{"clock twice", append(bytes.Clone(b), spans[4]...), m.Header, "state file: section 6 (clock): appears twice"},
		{"memory chunk", append(bytes.Clone(b), chunk...), m.Header, "state file: section 6 (memory chunk): memory chunk sections are not part of the machine state"},
		{"end section", append(bytes.Clone(b), raw(SectionEnd, SectionRequired, make([]byte, endPayloadSize))...), m.Header, "state file: section 6 (end): end sections are not part of the machine state"},
		{"unknown required", append(raw(sectionTestBase, SectionRequired, []byte{1}), b...), m.Header, "state file: section 0 (type 0x7000): required section type 0x7000 unknown (written by a newer ferry?)"},
		{"checksum", func() []byte { x := bytes.Clone(b); x[len(spans[0])+100] ^= 0x10; return x }(), m.Header, "state file: section 1 (vcpu 1): checksum mismatch"},
		{"truncated", b[:len(b)-3], m.Header, fmt.Sprintf("state file: truncated in section 5 (devices) at byte %d", len(b)-3)},
		{"garbage", []byte{1, 2, 3}, m.Header, "state file: truncated in section 0 (section header) at byte 3"},
		{"fingerprint", b, otherCPUID, "state file: section 0 (vcpu 0): CPUID table does not match the header's CPUID fingerprint"},
		{"vcpu out of range", b, oneCPU, "state file: section 1 (vcpu 1): vCPU id 1 out of range (the header has 1 vCPUs)"},
		{"bad header", b, badHeader, `state file: header: architecture "arm64" not supported`},
		{"newer header", b, newer, "state file: format version 2 not supported (this ferry reads 1)"},
	} {
		got, _, err := DecodeMachine(c.b, c.h)
		var fe *FormatError
		if err == nil || !strings.HasPrefix(err.Error(), c.want) || !errors.As(err, &fe) || got != nil {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
	}

	// An unknown optional section is skipped with a warning.
	got, warnings, err := DecodeMachine(append(bytes.Clone(b), raw(sectionTestBase+1, 0, []byte{1, 2})...), m.Header)
	if err != nil || got == nil || len(warnings) != 1 || warnings[0] != "section 6: skipped unknown optional section type 0x7001 (2 bytes)" {
		t.Errorf("optional section: %v, warnings %q", err, warnings)
	}
}

// Every single-bit flip and every truncation of the machine sections is
// refused, naming the section it is in.
func TestDecodeMachineCorruption(t *testing.T) {
	rng := rand.New(rand.NewPCG(69, 70))
	m := randomMachine(rng, 2, 512)
	b, err := EncodeMachine(m)
	if err != nil {
		t.Fatal(err)
	}
	var starts []int
	off := 0
	for _, s := range machineSpans(t, b) {
		starts = append(starts, off)
		off += len(s)
	}
	sectionOf := func(off int) int {
		i := len(starts) - 1
		for starts[i] > off {
			i--
		}
		return i
	}
	flipped := make([]byte, len(b))
	for off := range b {
		copy(flipped, b)
		flipped[off] ^= 1 << (off % 8)
		_, _, err := DecodeMachine(flipped, m.Header)
		var fe *FormatError
		if !errors.As(err, &fe) {
			t.Fatalf("bit flip at %d: %v", off, err)
		}
		if fe.Section != sectionOf(off) {
			t.Fatalf("bit flip at %d (section %d): %v", off, sectionOf(off), err)
		}
	}
	for n := range len(b) {
		_, _, err := DecodeMachine(b[:n], m.Header)
		var fe *FormatError
		if !errors.As(err, &fe) {
			t.Fatalf("truncated at %d: %v", n, err)
		}
		if fe.Truncated {
			if fe.Offset != int64(n) || fe.Section != sectionOf(n) {
				t.Fatalf("truncated at %d: %v", n, err)
			}
		} else if fe.Name != "machine state" || !strings.Contains(fe.Msg, "missing") {
			t.Fatalf("truncated at %d (a section boundary): %v", n, err)
		}
	}
}

// testPages returns n pages of mixed content with their page frames:
// random, compressible, zero, and a repeated frame.
func testPages(rng *rand.Rand, n int) ([]uint64, [][]byte) {
	var pfns []uint64
	var data [][]byte
	for i := range n {
		pfn := uint64(rng.IntN(256))
		if i%2 == 1 {
			pfn = 1<<20 + uint64(rng.IntN(256)) // the region at 4 GiB
		}
		var d []byte
		switch i % 4 {
		case 0:
			d = randBytes(rng, PageSize)
		case 1:
			d = bytes.Repeat([]byte(fmt.Sprintf("page %d ", i)), PageSize)[:PageSize]
		case 2:
			d = make([]byte, PageSize)
		case 3:
			d = make([]byte, PageSize)
			d[PageSize-1] = byte(i) | 1
		}
		pfns, data = append(pfns, pfn), append(data, d)
	}
	if n > 2 {
		pfns[n-1] = pfns[0]
	}
	return pfns, data
}

// EncodePageChunk produces exactly the chunk WritePages writes.
func TestEncodePageChunkMatchesWriter(t *testing.T) {
	rng := rand.New(rand.NewPCG(71, 72))
	m := randomMachine(rng, 1, 0)
	for _, n := range []int{1, 5, ChunkPages} {
		pfns, data := testPages(rng, n)
		for _, c := range []struct {
			compress bool
			level    int
		}{{false, 0}, {true, 0}, {true, 3}, {true, 19}} {
			var buf bytes.Buffer
			w, err := NewWriter(&buf, m.Header, WriterOptions{Compress: c.compress, Level: c.level})
			if err != nil {
				t.Fatal(err)
			}
			if err := w.WritePages(pfns, data); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			_, spans := layoutOf(t, buf.Bytes())
			want := buf.Bytes()[spans[0].start:spans[0].end]
			got, err := EncodePageChunk(pfns, data, c.compress, c.level)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%d pages, %+v: EncodePageChunk (%d bytes) differs from WritePages (%d bytes)", n, c, len(got), len(want))
			}
		}
	}
}

func TestPageChunkRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(73, 74))
	h := randomMachine(rng, 1, 0).Header
	for _, n := range []int{1, 3, 100, ChunkPages} {
		for _, compress := range []bool{false, true} {
			pfns, data := testPages(rng, n)
			b, err := EncodePageChunk(pfns, data, compress, 0)
			if err != nil {
				t.Fatal(err)
			}
			if compressed := le.Uint16(b[2:])&SectionZstd != 0; compressed != (compress && n > 1) {
				t.Errorf("%d pages, compress %v: zstd flag %v", n, compress, compressed)
			}
			i := 0
			got, err := DecodePageChunk(b, h, func(gpa uint64, d []byte) error {
				if gpa != pfns[i]*PageSize || !bytes.Equal(d, data[i]) {
					t.Fatalf("page %d: gpa %#x, want %#x; data equal %v", i, gpa, pfns[i]*PageSize, bytes.Equal(d, data[i]))
				}
				i++
				return nil
			})
			if err != nil || got != n || i != n {
				t.Fatalf("%d pages, compress %v: n %d, %d callbacks, %v", n, compress, got, i, err)
			}
			if got, err := DecodePageChunk(b, h, nil); err != nil || got != n {
				t.Fatalf("nil callback: %d, %v", got, err)
			}
		}
	}
}

func TestPageChunkErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(75, 76))
	m := randomMachine(rng, 1, 0)
	h := m.Header
	page := make([]byte, PageSize)
	page[9] = 9
	for _, c := range []struct {
		name  string
		pfns  []uint64
		data  [][]byte
		level int
		want  string
	}{
		{"none", nil, nil, 0, "state: 0 pages, a memory chunk holds 1 to 256"},
		{"too many", make([]uint64, ChunkPages+1), make([][]byte, ChunkPages+1), 0, "state: 257 pages, a memory chunk holds 1 to 256"},
		{"count mismatch", []uint64{1, 2}, [][]byte{page}, 0, "state: 2 page frame numbers for 1 pages"},
		{"short page", []uint64{1}, [][]byte{page[:100]}, 0, "state: page 0x1 has 100 bytes, not 4096"},
		{"pfn overflow", []uint64{1 << 60}, [][]byte{page}, 0, "state: page frame 0x1000000000000000 out of range"},
		{"level", []uint64{1}, [][]byte{page}, 23, "state: zstd level 23 out of range 1-22"},
	} {
		if _, err := EncodePageChunk(c.pfns, c.data, true, c.level); err == nil || err.Error() != c.want {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
	}

	good, err := EncodePageChunk([]uint64{3, 4}, [][]byte{page, page}, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	outside, err := EncodePageChunk([]uint64{3, 0x200}, [][]byte{page, page}, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	machine, err := EncodeMachine(m)
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(good)
	flipped[40] ^= 2
	noCPUs := h
	noCPUs.CPUs = 0
	for _, c := range []struct {
		name string
		b    []byte
		h    Header
		want string
	}{
		{"outside", outside, h, "state file: section 0 (memory chunk): page record 1: guest-physical address 0x200000 is outside the memory layout"},
		{"checksum", flipped, h, "state file: section 0 (memory chunk): checksum mismatch"},
		{"truncated", good[:100], h, "state file: truncated in section 0 (memory chunk) at byte 100"},
		{"empty", nil, h, "state file: truncated in section 0 (memory chunk) at byte 0"},
		{"trailing", append(bytes.Clone(good), 0), h, "state file: section 0 (memory chunk): 1 unexpected bytes after the section"},
		{"two chunks", append(bytes.Clone(good), good...), h, fmt.Sprintf("state file: section 0 (memory chunk): %d unexpected bytes after the section", len(good))},
		{"not a chunk", machine, h, "state file: section 0 (vcpu 0): a memory chunk section was expected"},
		{"bad header", good, noCPUs, "state file: header: 0 vCPUs"},
	} {
		n, err := DecodePageChunk(c.b, c.h, nil)
		var fe *FormatError
		if err == nil || !strings.HasPrefix(err.Error(), c.want) || !errors.As(err, &fe) || n != 0 {
			t.Errorf("%s: got %d, %v, want %q", c.name, n, err, c.want)
		}
	}

	// The callback's error ends decoding and comes back wrapped.
	stop := errors.New("stop")
	calls := 0
	_, err = DecodePageChunk(good, h, func(uint64, []byte) error { calls++; return stop })
	if !errors.Is(err, stop) || calls != 1 {
		t.Errorf("callback error: %v after %d calls", err, calls)
	}

	// Every bit flip and truncation of a compressed chunk is refused.
	pfns, data := testPages(rng, 40)
	for _, compress := range []bool{false, true} {
		b, err := EncodePageChunk(pfns, data, compress, 0)
		if err != nil {
			t.Fatal(err)
		}
		step := max(1, len(b)/3000)
		for off := 0; off < len(b); off += step {
			x := bytes.Clone(b)
			x[off] ^= 1 << (off % 8)
			if _, err := DecodePageChunk(x, h, nil); err == nil {
				t.Fatalf("compress %v: bit flip at %d accepted", compress, off)
			}
			if _, err := DecodePageChunk(b[:off], h, nil); err == nil {
				t.Fatalf("compress %v: truncation at %d accepted", compress, off)
			}
		}
	}
}

// EncodePageChunk and DecodePageChunk share encoders, a decoder and
// buffers between goroutines.
func TestPageChunkConcurrent(t *testing.T) {
	h := randomMachine(rand.New(rand.NewPCG(77, 78)), 1, 0).Header
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(79, uint64(g)))
			for i := range 20 {
				pfns, data := testPages(rng, 1+rng.IntN(ChunkPages))
				b, err := EncodePageChunk(pfns, data, i%2 == 0, 0)
				if err != nil {
					errs <- err
					return
				}
				j := 0
				_, err = DecodePageChunk(b, h, func(gpa uint64, d []byte) error {
					if gpa != pfns[j]*PageSize || !bytes.Equal(d, data[j]) {
						return fmt.Errorf("goroutine %d: page %d differs", g, j)
					}
					j++
					return nil
				})
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Lying lengths cost the decoders no more than the input holds.
func TestWireAllocationBounded(t *testing.T) {
	h := randomMachine(rand.New(rand.NewPCG(80, 81)), 1, 0).Header
	section := func(typ uint16, length uint64, payload []byte) []byte {
		s := le.AppendUint16(nil, typ)
		s = le.AppendUint16(s, SectionRequired)
		s = le.AppendUint64(s, length)
		return append(s, payload...)
	}
	// Warm the shared decoder and the scratch buffers up.
	if _, err := DecodePageChunk(section(SectionMemory, 10, nil), h, nil); err == nil {
		t.Fatal("accepted")
	}
	for _, c := range []struct {
		name string
		run  func() error
	}{
		{"machine section claiming 16 MiB", func() error {
			_, _, err := DecodeMachine(section(SectionVCPU, MaxSectionLength, []byte{1, 2, 3}), h)
			return err
		}},
		{"machine section claiming 2^63", func() error {
			_, _, err := DecodeMachine(section(SectionDevices, 1<<63, nil), h)
			return err
		}},
		{"chunk claiming the maximum", func() error {
			_, err := DecodePageChunk(section(SectionMemory, MaxChunkLength, []byte{1}), h, nil)
			return err
		}},
	} {
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		err := c.run()
		runtime.ReadMemStats(&after)
		if err == nil {
			t.Errorf("%s: accepted", c.name)
		}
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 256<<10 {
			t.Errorf("%s: allocated %d bytes", c.name, alloc)
		}
	}
}
