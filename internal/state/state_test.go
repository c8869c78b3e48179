package state

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"unsafe"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/kvm"
)

// The encoding stores KVM structures in the kernel's layout: their encoded
// size must be their in-memory size (no implicit padding).
func TestStructSizes(t *testing.T) {
	for _, c := range []struct {
		name      string
		enc, size int
		want      int
	}{
		{"kvm_regs", sizeRegs, int(unsafe.Sizeof(kvm.Regs{})), 144},
		{"kvm_sregs", sizeSregs, int(unsafe.Sizeof(kvm.Sregs{})), 312},
		{"kvm_sregs2", sizeSregs2, int(unsafe.Sizeof(kvm.Sregs2{})), 320},
		{"kvm_fpu", sizeFPU, int(unsafe.Sizeof(kvm.FPU{})), 416},
		{"kvm_xcrs", sizeXCRs, int(unsafe.Sizeof(kvm.XCRs{})), 392},
		{"kvm_lapic_state", sizeLAPIC, int(unsafe.Sizeof(kvm.LAPICState{})), 1024},
		{"kvm_vcpu_events", sizeEvents, int(unsafe.Sizeof(kvm.VCPUEvents{})), 64},
		{"kvm_debugregs", sizeDebugRegs, int(unsafe.Sizeof(kvm.DebugRegs{})), 128},
		{"kvm_mp_state", sizeMPState, int(unsafe.Sizeof(kvm.MPState{})), 4},
		{"kvm_pic_state", sizePIC, int(unsafe.Sizeof(kvm.PICState{})), 16},
		{"kvm_ioapic_state", sizeIOAPIC, int(unsafe.Sizeof(kvm.IOAPICState{})), 216},
		{"kvm_pit_state2", sizePIT, int(unsafe.Sizeof(kvm.PITState2{})), 112},
		{"kvm_clock_data", sizeClock, int(unsafe.Sizeof(kvm.ClockData{})), 48},
	} {
		if c.enc != c.size || c.enc != c.want {
			t.Errorf("%s: encoded %d bytes, sizeof %d, documented %d", c.name, c.enc, c.size, c.want)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	for _, compress := range []bool{false, true} {
		t.Run(fmt.Sprintf("compress=%v", compress), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, 2))
			m := randomMachine(rng, 3, 4096+64)
			mem, _ := testMemory(rng)
			data := encode(t, m, mem, WriterOptions{Compress: compress})
			got, err := decode(data, ReaderOptions{RequireEOF: true})
			if err != nil {
				t.Fatal(err)
			}
			if len(got.warnings) != 0 {
				t.Errorf("warnings: %q", got.warnings)
			}
			want := *m
			want.Header.FormatVersion = FormatVersion
			if compress {
				want.Header.Flags |= FlagMemoryCompressed
			}
			if !reflect.DeepEqual(got.m, want) {
				for _, d := range Diff(&got.m, &want, true) {
					t.Errorf("%s: got %s, want %s", d.Path, d.A, d.B)
				}
				t.Fatal("decoded machine differs")
			}
			if !bytes.Equal(got.image(), mem) {
				t.Fatal("decoded memory differs")
			}
		})
	}
}

// Nil and empty optional parts round-trip as absent.
func TestRoundTripMinimal(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	m := randomMachine(rng, 1, 0)
	v := &m.VCPUs[0]
	v.Sregs2, v.XSave, v.MSRs, v.CPUID = nil, nil, nil, nil
	m.Header.CPUIDFingerprint = CPUIDFingerprint(nil)
	m.Devices.Serial.RXFIFO, m.Devices.Serial.Backlog, m.Devices.I8042.Output = nil, nil, nil
	got, err := decode(encode(t, m, nil, WriterOptions{}), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m.Header.FormatVersion = FormatVersion
	if !reflect.DeepEqual(got.m, *m) {
		t.Fatalf("got %+v\nwant %+v", got.m.VCPUs[0], m.VCPUs[0])
	}
	if got.summary.NonZeroPages != 0 || !got.ordered {
		t.Errorf("summary of no memory: %+v ordered %v", got.summary, got.ordered)
	}
}

func TestMemory(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	m := randomMachine(rng, 1, 4096)
	mem, nonZero := testMemory(rng)
	regions := testLayout()
	want, err := SummarizeMemory(mem, regions)
	if err != nil {
		t.Fatal(err)
	}
	if want.NonZeroPages != uint64(nonZero) || want.Size != 2<<20 {
		t.Fatalf("SummarizeMemory: %+v, want %d non-zero pages", want, nonZero)
	}
	totalPages := uint64(len(mem) / PageSize)
	var sizes [2]int
	for i, compress := range []bool{false, true} {
		var buf bytes.Buffer
		w, err := NewWriter(&buf, m.Header, WriterOptions{Compress: compress, Level: 3 * i})
		if err != nil {
			t.Fatal(err)
		}
		st, err := w.WriteMemory(mem, regions)
		if err != nil {
			t.Fatal(err)
		}
		if st.Pages != uint64(nonZero) || st.ZeroPages != totalPages-uint64(nonZero) {
			t.Errorf("compress %v: stats %+v, want %d pages and %d zero pages", compress, st, nonZero, totalPages-uint64(nonZero))
		}
		if wantChunks := (uint64(nonZero) + ChunkPages - 1) / ChunkPages; st.Chunks != wantChunks {
			t.Errorf("compress %v: %d chunks, want %d", compress, st.Chunks, wantChunks)
		}
		if st.DataBytes != uint64(nonZero)*PageSize {
			t.Errorf("compress %v: %d data bytes", compress, st.DataBytes)
		}
		if err := w.WriteMachine(m); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		sizes[i] = buf.Len()
		if compress && st.StoredBytes >= st.DataBytes {
			t.Errorf("compression did not shrink memory: %d stored for %d", st.StoredBytes, st.DataBytes)
		}
		got, err := decode(buf.Bytes(), ReaderOptions{RequireEOF: true})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got.image(), mem) {
			t.Fatalf("compress %v: memory differs", compress)
		}
		if !got.ordered || got.summary != want {
			t.Errorf("compress %v: summary %x (ordered %v), want %x", compress, got.summary, got.ordered, want)
		}
	}
	t.Logf("stream sizes: raw %d, zstd %d", sizes[0], sizes[1])

	// The same pages sent with WritePages in other batches (and with zero
	// pages sent explicitly) give the same summary.
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, m.Header, WriterOptions{})
	var pfns []uint64
	var pages [][]byte
	flush := func() {
		if err := w.WritePages(pfns, pages); err != nil {
			t.Fatal(err)
		}
		pfns, pages = nil, nil
	}
	for _, r := range regions {
		for off := uint64(0); off < r.Size; off += PageSize {
			pfns = append(pfns, (r.GPA+off)/PageSize)
			pages = append(pages, mem[r.Offset+off:r.Offset+off+PageSize])
			if len(pfns) == 37 {
				flush()
			}
		}
	}
	flush()
	if st := w.MemoryStats(); st.Pages != totalPages || st.ZeroPages != totalPages-uint64(nonZero) {
		t.Errorf("WritePages stats %+v", st)
	}
	if err := w.WriteMachine(m); err != nil {
		t.Fatal(err)
	}
	w.Close()
	got, err := decode(buf.Bytes(), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.image(), mem) || !got.ordered || got.summary != want {
		t.Errorf("WritePages: memory equal %v, summary %x ordered %v, want %x", bytes.Equal(got.image(), mem), got.summary, got.ordered, want)
	}

	// Pages out of order (a migration stream resending a page) give no
	// stream summary; the later copy wins.
	buf.Reset()
	w, _ = NewWriter(&buf, m.Header, WriterOptions{})
	p1 := bytes.Repeat([]byte{1}, PageSize)
	p2 := bytes.Repeat([]byte{2}, PageSize)
	if err := w.WritePages([]uint64{5, 3}, [][]byte{p1, p1}); err != nil {
		t.Fatal(err)
	}
	if err := w.WritePages([]uint64{5}, [][]byte{p2}); err != nil {
		t.Fatal(err)
	}
	w.WriteMachine(m)
	w.Close()
	got, err = decode(buf.Bytes(), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.ordered {
		t.Error("unordered stream reported a summary")
	}
	if img := got.image(); img[5*PageSize] != 2 || img[3*PageSize] != 1 {
		t.Error("resent page did not replace the first copy")
	}

	// Pages outside the layout are refused by the writer.
	if err := w.WritePages([]uint64{0x100000}, [][]byte{p1}); err == nil {
		t.Error("WritePages after Close succeeded")
	}
	w, _ = NewWriter(&buf, m.Header, WriterOptions{})
	if err := w.WritePages([]uint64{0x100}, [][]byte{p1}); err == nil || !strings.Contains(err.Error(), "outside") {
		t.Errorf("page in the hole: %v", err)
	}
	if _, err := w.WriteMemory(mem, []guestmem.Region{{GPA: 0x200000, Size: 0x1000, Offset: 0}}); err == nil {
		t.Error("WriteMemory with a region outside the layout succeeded")
	}
	if _, err := w.WriteMemory(mem[:4096], regions); err == nil {
		t.Error("WriteMemory with regions beyond the image succeeded")
	}
}

func TestWriterValidation(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	m := randomMachine(rng, 2, 4096)
	bad := []struct {
		name string
		mod  func(h *Header)
	}{
		{"arch", func(h *Header) { h.Arch = "arm64" }},
		{"version", func(h *Header) { h.FormatVersion = 2 }},
		{"no cpus", func(h *Header) { h.CPUs = 0 }},
		{"size", func(h *Header) { h.MemSize = 3 << 20 }},
		{"overlap", func(h *Header) { h.Regions[1].GPA = 4096 }},
		{"unaligned", func(h *Header) { h.Regions[0].Size = 1000 }},
		{"no regions", func(h *Header) { h.Regions = nil }},
		{"incompatible flag", func(h *Header) { h.Flags = 1 << 40 }},
		{"producer", func(h *Header) { h.Producer = strings.Repeat("x", 300) }},
	}
	for _, c := range bad {
		h := m.Header
		h.Regions = testLayout()
		c.mod(&h)
		if _, err := NewWriter(&bytes.Buffer{}, h, WriterOptions{}); err == nil {
			t.Errorf("%s: NewWriter accepted a bad header", c.name)
		}
	}
	if _, err := NewWriter(&bytes.Buffer{}, m.Header, WriterOptions{Compress: true, Level: 23}); err == nil {
		t.Error("zstd level 23 accepted")
	}

	try := func(name string, mod func(m *Machine)) {
		c := *m
		c.VCPUs = append([]VCPU(nil), m.VCPUs...)
		mod(&c)
		w, err := NewWriter(&bytes.Buffer{}, m.Header, WriterOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.WriteMachine(&c); err == nil {
			t.Errorf("%s: WriteMachine accepted it", name)
		}
	}
	try("too few vcpus", func(c *Machine) { c.VCPUs = c.VCPUs[:1] })
	try("repeated id", func(c *Machine) { c.VCPUs[1].ID = 0 })
	try("id out of range", func(c *Machine) { c.VCPUs[1].ID = 7 })
	try("fingerprint", func(c *Machine) { c.VCPUs[0].CPUID = c.VCPUs[0].CPUID[1:] })
	try("duplicate msr", func(c *Machine) {
		c.VCPUs[1].MSRs = append([]kvm.MSREntry{c.VCPUs[1].MSRs[0]}, c.VCPUs[1].MSRs...)
	})

	// MSRs given out of order are stored sorted.
	c := *m
	c.VCPUs = append([]VCPU(nil), m.VCPUs...)
	msrs := append([]kvm.MSREntry(nil), c.VCPUs[1].MSRs...)
	msrs[0], msrs[len(msrs)-1] = msrs[len(msrs)-1], msrs[0]
	c.VCPUs[1].MSRs = msrs
	got, err := decode(encode(t, &c, nil, WriterOptions{}), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.m.VCPUs[1].MSRs, m.VCPUs[1].MSRs) {
		t.Error("MSRs not sorted")
	}

	w, _ := NewWriter(&bytes.Buffer{}, m.Header, WriterOptions{})
	if err := w.WriteMachine(m); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteMachine(m); err == nil {
		t.Error("second WriteMachine accepted")
	}
}

// failWriter fails after n bytes.
type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if len(p) > f.n {
		return 0, errors.New("disk full")
	}
	f.n -= len(p)
	return len(p), nil
}

func TestWriterErrorSticks(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	m := randomMachine(rng, 1, 4096)
	w, err := NewWriter(&failWriter{n: 1000}, m.Header, WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteMachine(m); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("WriteMachine: %v", err)
	}
	if err := w.Close(); err == nil {
		t.Error("Close after a failed write succeeded")
	}
}

// withSection writes m, then an extra raw section, then the end.
func withSection(t *testing.T, m *Machine, typ, flags uint16, payload []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, m.Header, WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteMachine(m); err != nil {
		t.Fatal(err)
	}
	if err := w.writeSection(typ, flags, payload); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestUnknownSections(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	m := randomMachine(rng, 1, 4096)

	got, err := decode(withSection(t, m, sectionTestBase+1, 0, []byte("future data")), ReaderOptions{})
	if err != nil {
		t.Fatalf("unknown optional section: %v", err)
	}
	if len(got.warnings) != 1 || !strings.Contains(got.warnings[0], "skipped unknown optional section type 0x7001") {
		t.Errorf("warnings %q", got.warnings)
	}

	_, err = decode(withSection(t, m, 0x0042, SectionRequired, []byte("future data")), ReaderOptions{})
	if err == nil || !strings.Contains(err.Error(), "required section type 0x0042 unknown") {
		t.Errorf("unknown required section: %v", err)
	}
	var fe *FormatError
	if !errors.As(err, &fe) || fe.Section != 5 {
		t.Errorf("error %#v does not name section 5", err)
	}

	// Unknown record tags inside a known section: optional skipped,
	// critical refused.
	vcpuWith := func(tag uint16) []byte {
		c := *m
		c.VCPUs = nil
		var buf bytes.Buffer
		w, _ := NewWriter(&buf, m.Header, WriterOptions{})
		p, err := encodeVCPU(nil, &m.VCPUs[0])
		if err != nil {
			t.Fatal(err)
		}
		p = appendRecord(p, tag, func(b []byte) []byte { return append(b, 1, 2, 3) })
		if err := w.writeSection(SectionVCPU, SectionRequired, p); err != nil {
			t.Fatal(err)
		}
		for _, s := range []struct {
			typ uint16
			p   []byte
		}{
			{SectionIRQChip, encodeIRQChip(nil, m)}, {SectionPIT, encodePIT(nil, m)}, {SectionClock, encodeClock(nil, m)},
		} {
			w.writeSection(s.typ, SectionRequired, s.p)
		}
		p, _ = encodeDevices(nil, &m.Devices)
		w.writeSection(SectionDevices, SectionRequired, p)
		w.Close()
		return buf.Bytes()
	}
	got, err = decode(vcpuWith(0x0077), ReaderOptions{})
	if err != nil {
		t.Fatalf("unknown optional tag: %v", err)
	}
	if len(got.warnings) != 1 || !strings.Contains(got.warnings[0], "section 0 (vcpu 0): skipped unknown record tag 0x0077") {
		t.Errorf("warnings %q", got.warnings)
	}
	want := *m
	want.Header.FormatVersion = FormatVersion
	if !reflect.DeepEqual(got.m, want) {
		t.Error("machine with an extra optional record decoded differently")
	}
	_, err = decode(vcpuWith(0x8077), ReaderOptions{})
	if err == nil || !strings.Contains(err.Error(), "section 0 (vcpu 0): critical record tag 0x8077 unknown") {
		t.Errorf("unknown critical tag: %v", err)
	}
}

// Many unknown optional sections: the warnings stay bounded.
func TestWarningsBounded(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	m := randomMachine(rng, 1, 0)
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, m.Header, WriterOptions{})
	for range 1000 {
		w.writeSection(sectionTestBase, 0, nil)
	}
	w.WriteMachine(m)
	w.Close()
	got, err := decode(buf.Bytes(), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.warnings) != maxWarnings+1 || got.warnings[maxWarnings] != "936 more warnings not shown" {
		t.Errorf("%d warnings, last %q", len(got.warnings), got.warnings[len(got.warnings)-1])
	}
}

func TestStructuralErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(15, 16))
	m := randomMachine(rng, 2, 4096)
	sections := func(skip uint16, dup uint16) []byte {
		var buf bytes.Buffer
		w, _ := NewWriter(&buf, m.Header, WriterOptions{})
		for i := range m.VCPUs {
			p, _ := encodeVCPU(nil, &m.VCPUs[i])
			if !(skip == SectionVCPU && i == 1) {
				w.writeSection(SectionVCPU, SectionRequired, p)
			}
			if dup == SectionVCPU {
				w.writeSection(SectionVCPU, SectionRequired, p)
			}
		}
		dp, _ := encodeDevices(nil, &m.Devices)
		for _, s := range []struct {
			typ uint16
			p   []byte
		}{
			{SectionIRQChip, encodeIRQChip(nil, m)}, {SectionPIT, encodePIT(nil, m)},
			{SectionClock, encodeClock(nil, m)}, {SectionDevices, dp},
		} {
			if s.typ != skip {
				w.writeSection(s.typ, SectionRequired, s.p)
			}
			if s.typ == dup {
				w.writeSection(s.typ, SectionRequired, s.p)
			}
		}
		w.Close()
		return buf.Bytes()
	}
	if _, err := decode(sections(0, 0), ReaderOptions{}); err != nil {
		t.Fatalf("complete stream: %v", err)
	}
	for _, c := range []struct {
		skip, dup uint16
		want      string
	}{
		{SectionVCPU, 0, "section 5 (end): required section vcpu 1 missing"},
		{SectionPIT, 0, "required section pit missing"},
		{SectionDevices, 0, "required section devices missing"},
		{0, SectionVCPU, "section 1 (vcpu 0): appears twice"},
		{0, SectionClock, "section 5 (clock): appears twice"},
	} {
		_, err := decode(sections(c.skip, c.dup), ReaderOptions{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("skip %#x dup %#x: %v, want %q", c.skip, c.dup, err, c.want)
		}
	}

	// A whole section cut out of the middle: the end section notices.
	rng2 := rand.New(rand.NewPCG(17, 18))
	mem, _ := testMemory(rng2)
	data := encode(t, m, mem, WriterOptions{})
	_, spans := layoutOf(t, data)
	var cut []byte
	for _, s := range spans {
		if s.typ == SectionMemory {
			cut = append(append([]byte(nil), data[:s.start]...), data[s.end:]...)
			break
		}
	}
	_, err := decode(cut, ReaderOptions{})
	if err == nil || !strings.Contains(err.Error(), "(end)") || !strings.Contains(err.Error(), "sections before the end section") {
		t.Errorf("section removed: %v", err)
	}

	// Data after the end section.
	extra := append(append([]byte(nil), data...), 0)
	if _, err := decode(extra, ReaderOptions{}); err != nil {
		t.Errorf("trailing byte without RequireEOF: %v", err)
	}
	if _, err := decode(extra, ReaderOptions{RequireEOF: true}); err == nil || !strings.Contains(err.Error(), "after the end section") {
		t.Errorf("trailing byte with RequireEOF: %v", err)
	}

	// A compressed flag on a section that is never compressed, and unknown
	// flags on a known section.
	for _, c := range []struct {
		flags uint16
		want  string
	}{
		{SectionRequired | SectionZstd, "cannot be compressed"},
		{SectionRequired | 0x100, "unknown section flags 0x0100"},
	} {
		m1 := randomMachine(rng, 1, 0)
		var buf bytes.Buffer
		w, _ := NewWriter(&buf, m1.Header, WriterOptions{})
		w.writeSection(SectionPIT, c.flags, encodePIT(nil, m1))
		w.Close()
		_, err := decode(buf.Bytes(), ReaderOptions{})
		if err == nil || !strings.Contains(err.Error(), "section 0 (pit): ") || !strings.Contains(err.Error(), c.want) {
			t.Errorf("flags %#x: %v", c.flags, err)
		}
	}
}

// rewriteHeader replaces the header's version and recomputes its CRC.
func setVersion(data []byte, v uint32) []byte {
	out := append([]byte(nil), data...)
	binary.LittleEndian.PutUint32(out[8:], v)
	hlen := int(binary.LittleEndian.Uint32(out[12:]))
	binary.LittleEndian.PutUint32(out[prefixSize+hlen:], crc32.Checksum(out[:prefixSize+hlen], castagnoli))
	return out
}

func TestVersionMismatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(19, 20))
	data := encode(t, randomMachine(rng, 1, 0), nil, WriterOptions{})
	_, err := decode(setVersion(data, 3), ReaderOptions{})
	if err == nil || err.Error() != "state file: format version 3 not supported (this ferry reads 1)" {
		t.Errorf("version 3: %v", err)
	}
	_, err = decode(append([]byte("NOTFERRY"), data[8:]...), ReaderOptions{})
	if err == nil || !strings.Contains(err.Error(), "not a ferry state file") {
		t.Errorf("bad magic: %v", err)
	}
	_, err = decode(nil, ReaderOptions{})
	if err == nil || err.Error() != "state file: truncated in the header at byte 0" {
		t.Errorf("empty input: %v", err)
	}
}

// Every truncation of a small stream is refused, naming the part that was
// cut, and none panics.
func TestTruncation(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	m := randomMachine(rng, 2, 4096+64)
	mem := make([]byte, 2<<20)
	for _, p := range []int{0, 1, 2, 300, 511} {
		copy(mem[p*PageSize:], randBytes(rng, PageSize/2)) // compressible
	}
	for _, compress := range []bool{false, true} {
		data := encode(t, m, mem, WriterOptions{Compress: compress})
		headerEnd, spans := layoutOf(t, data)
		for n := 0; n < len(data); n++ {
			_, err := decode(data[:n], ReaderOptions{})
			if err == nil {
				t.Fatalf("compress %v: truncated at %d of %d: no error", compress, n, len(data))
			}
			var fe *FormatError
			if !errors.As(err, &fe) || !fe.Truncated {
				t.Fatalf("truncated at %d: %v is not a truncation error", n, err)
			}
			if fe.Offset != int64(n) {
				t.Fatalf("truncated at %d: error says byte %d: %v", n, fe.Offset, err)
			}
			want := -1
			if n >= headerEnd {
				for i, s := range spans {
					if n >= s.start && n < s.end {
						want = i
					}
				}
			}
			if fe.Section != want {
				t.Fatalf("truncated at %d: error names section %d, want %d: %v", n, fe.Section, want, err)
			}
		}
		t.Logf("compress %v: %d truncations refused; e.g. %v", compress, len(data), func() error {
			_, err := decode(data[:spans[len(spans)-2].start+100], ReaderOptions{})
			return err
		}())
	}
}

// A single flipped bit anywhere is refused, naming the section it is in.
func TestBitFlips(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	m := randomMachine(rng, 2, 4096)
	mem := make([]byte, 2<<20)
	for _, p := range []int{0, 7, 300} {
		copy(mem[p*PageSize:], randBytes(rng, PageSize/2)) // compressible
	}
	for _, compress := range []bool{false, true} {
		data := encode(t, m, mem, WriterOptions{Compress: compress})
		headerEnd, spans := layoutOf(t, data)
		step := 1
		if testing.Short() {
			step = 7
		}
		flipped := make([]byte, len(data))
		var example error
		framing := func(off int) bool {
			for _, s := range spans {
				if off >= s.start && off < s.start+sectionHeaderSize || off >= s.end-crcSize && off < s.end {
					return true
				}
			}
			return off < headerEnd
		}
		for off := 0; off < len(data); off += step {
			for bit := 0; bit < 8; bit++ {
				if bit != off%8 && !framing(off) {
					continue // every bit of the framing, one bit per payload byte
				}
				copy(flipped, data)
				flipped[off] ^= 1 << bit
				_, err := decode(flipped, ReaderOptions{})
				if err == nil {
					t.Fatalf("compress %v: bit %d of byte %d flipped: no error", compress, bit, off)
				}
				var fe *FormatError
				if !errors.As(err, &fe) {
					t.Fatalf("bit %d of byte %d: %v is not a FormatError", bit, off, err)
				}
				if off < headerEnd {
					if fe.Section != -1 {
						t.Fatalf("bit %d of byte %d (header): error names section %d: %v", bit, off, fe.Section, err)
					}
					continue
				}
				want := -1
				for i, s := range spans {
					if off >= s.start && off < s.end {
						want = i
					}
				}
				if fe.Section != want {
					t.Fatalf("bit %d of byte %d (section %d): error names section %d: %v", bit, off, want, fe.Section, err)
				}
				if example == nil && want == 1 {
					example = err
				}
			}
		}
		t.Logf("compress %v: %d bytes, e.g. %v", compress, len(data), example)
	}
}

// A page callback's error ends the read and comes back wrapped.
func TestPageCallbackError(t *testing.T) {
	rng := rand.New(rand.NewPCG(25, 26))
	m := randomMachine(rng, 1, 0)
	mem, _ := testMemory(rng)
	data := encode(t, m, mem, WriterOptions{})
	r, err := NewReader(bytes.NewReader(data), ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stop := errors.New("stop")
	var got Machine
	_, err = r.ReadAll(&got, func(uint64, []byte) error { return stop })
	if !errors.Is(err, stop) {
		t.Errorf("ReadAll: %v", err)
	}
	if _, ok := r.MemorySummary(); ok {
		t.Error("summary after a failed read")
	}
	if _, err := r.ReadAll(&got, nil); err == nil {
		t.Error("second ReadAll accepted")
	}
}

// An I/O error is reported as such, not as corruption.
type errReader struct {
	r   *bytes.Reader
	at  int
	err error
}

func (e *errReader) Read(p []byte) (int, error) {
	pos := int(e.r.Size()) - e.r.Len()
	if pos >= e.at {
		return 0, e.err
	}
	if len(p) > e.at-pos {
		p = p[:e.at-pos]
	}
	return e.r.Read(p)
}

func TestReadError(t *testing.T) {
	rng := rand.New(rand.NewPCG(27, 28))
	data := encode(t, randomMachine(rng, 1, 0), nil, WriterOptions{})
	ioErr := errors.New("connection reset")
	r, err := NewReader(&errReader{r: bytes.NewReader(data), at: 500, err: ioErr}, ReaderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.ReadAll(&Machine{}, nil)
	var fe *FormatError
	if !errors.Is(err, ioErr) || errors.As(err, &fe) {
		t.Errorf("ReadAll: %v", err)
	}
}

func TestCPUIDFingerprint(t *testing.T) {
	a := []kvm.CPUIDEntry{{Function: 0, EAX: 0xd}, {Function: 1, EBX: 0x800}, {Function: 7, Index: 1, Flags: 1}}
	b := []kvm.CPUIDEntry{a[2], a[0], a[1]}
	if CPUIDFingerprint(a) != CPUIDFingerprint(b) {
		t.Error("order changes the fingerprint")
	}
	b[0].EDX = 1
	if CPUIDFingerprint(a) == CPUIDFingerprint(b) {
		t.Error("a changed value keeps the fingerprint")
	}
	if CPUIDFingerprint(nil) != CPUIDFingerprint([]kvm.CPUIDEntry{}) {
		t.Error("nil and empty differ")
	}
}

// benchMemory is 64 MiB with every other page filled with text-like,
// compressible data.
func benchMemory() ([]byte, []guestmem.Region) {
	mem := make([]byte, 64<<20)
	line := []byte("ferry benchmark page: the quick brown fox jumps over the lazy dog 0123456789\n")
	for p := 0; p < len(mem)/PageSize; p += 2 {
		page := mem[p*PageSize : (p+1)*PageSize]
		for i := 0; i < len(page); i += len(line) {
			copy(page[i:], line)
		}
		binary.LittleEndian.PutUint64(page, uint64(p))
	}
	return mem, []guestmem.Region{{GPA: 0, Size: uint64(len(mem))}}
}

func BenchmarkWriteMemory(b *testing.B) {
	mem, regions := benchMemory()
	h := Header{CPUs: 1, MemSize: uint64(len(mem)), Regions: regions}
	for _, compress := range []bool{false, true} {
		b.Run(fmt.Sprintf("compress=%v", compress), func(b *testing.B) {
			b.SetBytes(int64(len(mem)))
			for range b.N {
				w, err := NewWriter(io.Discard, h, WriterOptions{Compress: compress})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := w.WriteMemory(mem, regions); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkReadMemory(b *testing.B) {
	mem, regions := benchMemory()
	h := Header{CPUs: 1, MemSize: uint64(len(mem)), Regions: regions}
	rng := rand.New(rand.NewPCG(51, 52))
	m := randomMachine(rng, 1, 4096)
	m.Header = h
	m.Header.CPUIDFingerprint = CPUIDFingerprint(m.VCPUs[0].CPUID)
	for _, compress := range []bool{false, true} {
		b.Run(fmt.Sprintf("compress=%v", compress), func(b *testing.B) {
			data := encode(b, m, mem, WriterOptions{Compress: compress})
			dst := make([]byte, len(mem))
			b.SetBytes(int64(len(mem)))
			b.ResetTimer()
			for range b.N {
				r, err := NewReader(bytes.NewReader(data), ReaderOptions{})
				if err != nil {
					b.Fatal(err)
				}
				var got Machine
				if _, err := r.ReadAll(&got, func(gpa uint64, p []byte) error {
					copy(dst[gpa:], p)
					return nil
				}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
