package state

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"

	"github.com/klauspost/compress/zstd"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// WriterOptions configures a Writer.
type WriterOptions struct {
	// Compress compresses memory chunks (each chunk on its own; a chunk
	// that does not shrink is stored raw), with zstd unless Codec says
	// otherwise.
	Compress bool
	// Level is the codec's level when Compress is set: the zstd level
	// (1-22, as the zstd tool counts; 0 means the fastest) or the lz4 level
	// (see ParseCodec).
	Level int
	// Codec is the codec when Compress is set: CodecLZ4 for lz4; CodecZstd
	// and the zero value CodecNone mean zstd. (Readers that predate the
	// lz4 flag refuse lz4-compressed chunks.)
	Codec Codec
}

// MemoryStats reports what WriteMemory or WritePages wrote.
type MemoryStats struct {
	Pages       uint64 // page records written
	ZeroPages   uint64 // zero pages elided (WriteMemory) or sent as zero records (WritePages)
	Chunks      uint64 // memory chunk sections written
	DataBytes   uint64 // page data before compression (raw records × 4096)
	StoredBytes uint64 // bytes of memory chunk sections, framing included
}

func (s *MemoryStats) add(o MemoryStats) {
	s.Pages += o.Pages
	s.ZeroPages += o.ZeroPages
	s.Chunks += o.Chunks
	s.DataBytes += o.DataBytes
	s.StoredBytes += o.StoredBytes
}

// Writer encodes a machine state onto a stream: the header when created,
// then the machine sections (WriteMachine) and memory (WriteMemory,
// WritePages) in any order, then the end section (Close). Every section is
// handed to the underlying writer in one Write call, so a network stream
// sees whole sections; the Writer buffers at most one memory chunk.
//
// A Writer is not safe for concurrent use. After an error every method
// returns that error.
type Writer struct {
	w       io.Writer
	h       Header
	enc     *ChunkEncoder
	err     error
	closed  bool
	machine bool

	sections uint64 // sections written so far
	pages    uint64 // page records written so far
	crcs     uint32 // CRC32C over the CRCs of the sections written so far

	stats MemoryStats
	total MemoryStats
}

// NewWriter validates h, writes the file header and returns a Writer. The
// header's FormatVersion is set to FormatVersion (a different non-zero
// value is an error), an empty Arch means "x86_64", and opts.Compress sets
// FlagMemoryCompressed.
func NewWriter(w io.Writer, h Header, opts WriterOptions) (*Writer, error) {
	h, err := prepareHeader(h)
	if err != nil {
		return nil, err
	}
	if opts.Compress {
		h.Flags |= FlagMemoryCompressed
	}
	codec, level := CodecNone, 0
	if opts.Compress {
		codec, level = CodecZstd, opts.Level
		if opts.Codec == CodecLZ4 {
			codec = CodecLZ4
		}
	}
	enc, err := NewChunkEncoder(codec, level)
	if err != nil {
		return nil, err
	}
	sw := &Writer{w: w, h: h, enc: enc}
	if _, err := w.Write(appendStreamHeader(nil, &h)); err != nil {
		sw.closeEncoder()
		return nil, fmt.Errorf("state: writing header: %w", err)
	}
	return sw, nil
}

// prepareHeader normalizes a header for writing (format version, default
// architecture, a private copy of the regions) and validates it.
func prepareHeader(h Header) (Header, error) {
	if h.FormatVersion != 0 && h.FormatVersion != FormatVersion {
		return h, fmt.Errorf("state: cannot write format version %d (this ferry writes %d)", h.FormatVersion, FormatVersion)
	}
	h.FormatVersion = FormatVersion
	if h.Arch == "" {
		h.Arch = ArchX86_64
	}
	h.Regions = append([]guestmem.Region(nil), h.Regions...)
	if err := validateHeader(&h); err != nil {
		return h, fmt.Errorf("state: invalid header: %v", err)
	}
	return h, nil
}

// appendStreamHeader appends the stream header: prefix, header body and
// header CRC. The header's FormatVersion is not consulted: the prefix
// always carries FormatVersion.
func appendStreamHeader(b []byte, h *Header) []byte {
	body := encodeHeader(h)
	start := len(b)
	b = slices.Grow(b, prefixSize+len(body)+crcSize)
	b = append(b, Magic...)
	b = le.AppendUint32(b, FormatVersion)
	b = le.AppendUint32(b, uint32(len(body)))
	b = append(b, body...)
	return le.AppendUint32(b, crc32.Checksum(b[start:], castagnoli))
}

// zstdLevel maps a zstd level as the zstd tool counts (1-22; 0 for the
// fastest) to the encoder's level.
func zstdLevel(level int) (zstd.EncoderLevel, error) {
	if level == 0 {
		return zstd.SpeedFastest, nil
	}
	if level < 1 || level > 22 {
		return 0, fmt.Errorf("state: zstd level %d out of range 1-22", level)
	}
	return zstd.EncoderLevelFromZstd(level), nil
}

// newChunkEncoder returns an encoder for memory chunks. Every chunk
// encoder has the same options, so a chunk compresses to the same bytes
// whichever encoder does it.
func newChunkEncoder(level zstd.EncoderLevel) (*zstd.Encoder, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, fmt.Errorf("state: zstd encoder: %v", err)
	}
	return enc, nil
}

// Header returns the header as written.
func (w *Writer) Header() Header {
	h := w.h
	h.Regions = append([]guestmem.Region(nil), h.Regions...)
	return h
}

func (w *Writer) usable() error {
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return errors.New("state: writer is closed")
	}
	return nil
}

// newSection returns a buffer with room for the section header.
func newSection(sizeHint int) []byte {
	return make([]byte, sectionHeaderSize, sectionHeaderSize+sizeHint+crcSize)
}

// sealSection completes the section in sec (header room followed by the
// payload): it fills in the section header and appends the CRC, which it
// also returns.
func sealSection(typ, flags uint16, sec []byte) ([]byte, uint32, error) {
	n := uint64(len(sec) - sectionHeaderSize)
	limit := uint64(MaxSectionLength)
	if typ == SectionMemory {
		limit = MaxChunkLength
	}
	if n > limit {
		return nil, 0, fmt.Errorf("state: %s section of %d bytes exceeds the limit of %d", sectionTypeName(typ), n, limit)
	}
	le.PutUint16(sec[0:], typ)
	le.PutUint16(sec[2:], flags)
	le.PutUint64(sec[4:], n)
	crc := crc32.Checksum(sec, castagnoli)
	return le.AppendUint32(sec, crc), crc, nil
}

// emit completes the section in sec (header room followed by the payload),
// appends its CRC and writes it. It returns the bytes written.
func (w *Writer) emit(typ, flags uint16, sec []byte) (int, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	sec, crc, err := sealSection(typ, flags, sec)
	if err != nil {
		return 0, err
	}
	if _, err := w.w.Write(sec); err != nil {
		w.err = fmt.Errorf("state: writing %s section: %w", sectionTypeName(typ), err)
		return 0, w.err
	}
	if typ != SectionEnd {
		var c [4]byte
		le.PutUint32(c[:], crc)
		w.crcs = crc32.Update(w.crcs, castagnoli, c[:])
		w.sections++
	}
	return len(sec), nil
}

// WriteMachine writes every non-memory section: one per vCPU (in the order
// of m.VCPUs), the irqchip, the PIT, the clock, the devices and, when
// m.PCI is not nil, the PCI bus and its virtio functions. m.Header is
// not written (the header given to NewWriter was); m must match it: one
// vCPU per header CPU with ids 0..CPUs-1, and vCPU 0's CPUID table must
// have the header's fingerprint. It may be called once.
func (w *Writer) WriteMachine(m *Machine) error {
	if err := w.usable(); err != nil {
		return err
	}
	if w.machine {
		return errors.New("state: machine state already written")
	}
	if err := checkMachine(&w.h, m); err != nil {
		return err
	}
	w.machine = true
	return machineSections(m, func(typ uint16, sec []byte) error {
		_, err := w.emit(typ, SectionRequired, sec)
		return err
	})
}

// checkMachine checks that m matches the header h: one vCPU per header CPU
// with ids 0..CPUs-1, and vCPU 0's CPUID table has the header's
// fingerprint.
func checkMachine(h *Header, m *Machine) error {
	if uint64(len(m.VCPUs)) != uint64(h.CPUs) {
		return fmt.Errorf("state: %d vCPUs, the header says %d", len(m.VCPUs), h.CPUs)
	}
	seen := make([]bool, h.CPUs)
	for i := range m.VCPUs {
		v := &m.VCPUs[i]
		if v.ID >= h.CPUs || seen[v.ID] {
			return fmt.Errorf("state: vCPU id %d is out of range or repeated (the header has %d vCPUs)", v.ID, h.CPUs)
		}
		seen[v.ID] = true
		if v.ID == 0 && CPUIDFingerprint(v.CPUID) != h.CPUIDFingerprint {
			return errors.New("state: vCPU 0's CPUID table does not match the header's CPUID fingerprint")
		}
	}
	return nil
}

// machineSections encodes every non-memory section of m, in the order a
// save file has them (the vCPUs in the order of m.VCPUs, the irqchip, the
// PIT, the clock, the devices, and the PCI bus when m has one), and hands
// each to emit as a buffer with room for the section header followed by
// the payload (see sealSection).
func machineSections(m *Machine, emit func(typ uint16, sec []byte) error) error {
	for i := range m.VCPUs {
		sec, err := encodeVCPU(newSection(16<<10), &m.VCPUs[i])
		if err != nil {
			return fmt.Errorf("state: %v", err)
		}
		if err := emit(SectionVCPU, sec); err != nil {
			return err
		}
	}
	if err := emit(SectionIRQChip, encodeIRQChip(newSection(512), m)); err != nil {
		return err
	}
	if err := emit(SectionPIT, encodePIT(newSection(128), m)); err != nil {
		return err
	}
	if err := emit(SectionClock, encodeClock(newSection(64), m)); err != nil {
		return err
	}
	sec, err := encodeDevices(newSection(1024), &m.Devices)
	if err != nil {
		return fmt.Errorf("state: %v", err)
	}
	if err := emit(SectionDevices, sec); err != nil {
		return err
	}
	if m.PCI == nil {
		return nil
	}
	if sec, err = encodePCI(newSection(8<<10), m.PCI); err != nil {
		return fmt.Errorf("state: %v", err)
	}
	return emit(SectionPCI, sec)
}

// addPage adds one page record to the current chunk, flushing the chunk
// when it is full: a zero record when data is nil, a raw one otherwise.
func (w *Writer) addPage(pfn uint64, data []byte) error {
	if err := w.usable(); err != nil {
		return err
	}
	if data == nil {
		w.enc.Zero(pfn)
		w.stats.ZeroPages++
	} else {
		w.enc.raw(pfn, data)
		w.stats.DataBytes += PageSize
	}
	w.stats.Pages++
	if w.enc.Full() {
		return w.flushChunk()
	}
	return nil
}

// flushChunk writes the current chunk, compressed if that makes it
// smaller.
func (w *Writer) flushChunk() error {
	if w.enc == nil || w.enc.Len() == 0 {
		return nil
	}
	records := w.enc.Len()
	if err := w.enc.Err(); err != nil {
		return err
	}
	sec, flags, err := w.enc.finishPayload()
	if err != nil {
		return err
	}
	n, err := w.emit(SectionMemory, flags, sec)
	w.enc.Reset()
	if err != nil {
		return err
	}
	w.pages += uint64(records)
	w.stats.Chunks++
	w.stats.StoredBytes += uint64(n)
	return nil
}

// finishMemory flushes the last chunk and returns the statistics of the
// call that is ending.
func (w *Writer) finishMemory() (MemoryStats, error) {
	err := w.flushChunk()
	st := w.stats
	w.stats = MemoryStats{}
	w.total.add(st)
	return st, err
}

// WriteMemory writes the non-zero pages of a memory image: mem is indexed
// by memfd offset (as guestmem.Memory.Bytes) and regions map it to
// guest-physical addresses; every region must lie within the header's
// layout. Pages are written in ascending guest-physical order and zero
// pages are skipped (a destination starts from zeroed memory). The pages
// are read from mem while they are written; mem is never copied whole.
func (w *Writer) WriteMemory(mem []byte, regions []guestmem.Region) (MemoryStats, error) {
	if err := w.usable(); err != nil {
		return MemoryStats{}, err
	}
	if err := checkMemRegions(mem, regions); err != nil {
		return MemoryStats{}, fmt.Errorf("state: %v", err)
	}
	for i, r := range regions {
		j := regionOf(w.h.Regions, r.GPA)
		if j < 0 || r.Size > w.h.Regions[j].Size-(r.GPA-w.h.Regions[j].GPA) {
			return MemoryStats{}, fmt.Errorf("state: memory region %d (gpa %#x size %#x) is outside the header's memory layout", i, r.GPA, r.Size)
		}
	}
	var zero uint64
	for _, r := range sortedRegions(regions) {
		for off := uint64(0); off < r.Size; off += PageSize {
			page := mem[r.Offset+off : r.Offset+off+PageSize]
			if isZeroPage(page) {
				zero++
				continue
			}
			if err := w.addPage((r.GPA+off)/PageSize, page); err != nil {
				return MemoryStats{}, err
			}
		}
	}
	st, err := w.finishMemory()
	st.ZeroPages = zero
	return st, err
}

// WritePages writes the given pages (for the migration wire): data[i] is
// the 4096 bytes of guest-physical page frame pfns[i], which must lie in
// the header's layout. All-zero pages are sent as zero records (a
// destination that already holds an older copy of the page must clear
// it). Pages may come in any order and may repeat earlier ones; a reader
// hands them over in stream order.
func (w *Writer) WritePages(pfns []uint64, data [][]byte) error {
	_, err := w.writePages(pfns, data)
	return err
}

func (w *Writer) writePages(pfns []uint64, data [][]byte) (MemoryStats, error) {
	if err := w.usable(); err != nil {
		return MemoryStats{}, err
	}
	if len(pfns) != len(data) {
		return MemoryStats{}, fmt.Errorf("state: %d page frame numbers for %d pages", len(pfns), len(data))
	}
	for i, pfn := range pfns {
		if len(data[i]) != PageSize {
			return MemoryStats{}, fmt.Errorf("state: page %#x has %d bytes, not %d", pfn, len(data[i]), PageSize)
		}
		if pfn > ^uint64(0)/PageSize || regionOf(w.h.Regions, pfn*PageSize) < 0 {
			return MemoryStats{}, fmt.Errorf("state: page frame %#x is outside the header's memory layout", pfn)
		}
	}
	for i, pfn := range pfns {
		d := data[i]
		if isZeroPage(d) {
			d = nil
		}
		if err := w.addPage(pfn, d); err != nil {
			return MemoryStats{}, err
		}
	}
	return w.finishMemory()
}

// MemoryStats returns the totals over every WriteMemory and WritePages
// call so far.
func (w *Writer) MemoryStats() MemoryStats { return w.total }

// writeSection writes a raw section (tests use it to produce unknown and
// malformed sections).
func (w *Writer) writeSection(typ, flags uint16, payload []byte) error {
	sec := append(newSection(len(payload)), payload...)
	_, err := w.emit(typ, flags, sec)
	return err
}

// Close writes the end section. It does not close the underlying writer.
// A stream without its end section is refused by readers as truncated.
func (w *Writer) Close() error {
	if w.closed {
		return w.err
	}
	defer w.closeEncoder()
	if err := w.usable(); err != nil {
		w.closed = true
		return err
	}
	sec := newSection(endPayloadSize)
	sec = le.AppendUint64(sec, w.sections)
	sec = le.AppendUint64(sec, w.pages)
	sec = le.AppendUint32(sec, w.crcs)
	_, err := w.emit(SectionEnd, SectionRequired, sec)
	w.closed = true
	return err
}

func (w *Writer) closeEncoder() {
	if w.enc != nil {
		w.enc.Close()
		w.enc = nil
	}
}
