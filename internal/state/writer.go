package state

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/klauspost/compress/zstd"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// WriterOptions configures a Writer.
type WriterOptions struct {
	// Compress zstd-compresses memory chunks (each chunk on its own; a
	// chunk that does not shrink is stored raw).
	Compress bool
	// Level is the zstd level (1-22, as the zstd tool counts) when
	// Compress is set; 0 means the fastest level.
	Level int
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
	enc     *zstd.Encoder
	err     error
	closed  bool
	machine bool

	sections uint64 // sections written so far
	pages    uint64 // page records written so far
	crcs     uint32 // CRC32C over the CRCs of the sections written so far

	chunk  []byte // section being assembled: header room, record count, records
	chunkN int    // page records in chunk
	zbuf   []byte // compressed chunk
	stats  MemoryStats
	total  MemoryStats
}

// NewWriter validates h, writes the file header and returns a Writer. The
// header's FormatVersion is set to FormatVersion (a different non-zero
// value is an error), an empty Arch means "x86_64", and opts.Compress sets
// FlagMemoryCompressed.
func NewWriter(w io.Writer, h Header, opts WriterOptions) (*Writer, error) {
	if h.FormatVersion != 0 && h.FormatVersion != FormatVersion {
		return nil, fmt.Errorf("state: cannot write format version %d (this ferry writes %d)", h.FormatVersion, FormatVersion)
	}
	h.FormatVersion = FormatVersion
	if h.Arch == "" {
		h.Arch = ArchX86_64
	}
	if opts.Compress {
		h.Flags |= FlagMemoryCompressed
	}
	h.Regions = append([]guestmem.Region(nil), h.Regions...)
	if err := validateHeader(&h); err != nil {
		return nil, fmt.Errorf("state: invalid header: %v", err)
	}
	sw := &Writer{w: w, h: h}
	if opts.Compress {
		level := zstd.SpeedFastest
		if opts.Level != 0 {
			if opts.Level < 1 || opts.Level > 22 {
				return nil, fmt.Errorf("state: zstd level %d out of range 1-22", opts.Level)
			}
			level = zstd.EncoderLevelFromZstd(opts.Level)
		}
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("state: zstd encoder: %v", err)
		}
		sw.enc = enc
	}
	body := encodeHeader(&h)
	b := make([]byte, 0, prefixSize+len(body)+crcSize)
	b = append(b, Magic...)
	b = le.AppendUint32(b, FormatVersion)
	b = le.AppendUint32(b, uint32(len(body)))
	b = append(b, body...)
	b = le.AppendUint32(b, crc32.Checksum(b, castagnoli))
	if _, err := w.Write(b); err != nil {
		sw.closeEncoder()
		return nil, fmt.Errorf("state: writing header: %w", err)
	}
	return sw, nil
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

// emit completes the section in sec (header room followed by the payload),
// appends its CRC and writes it. It returns the bytes written.
func (w *Writer) emit(typ, flags uint16, sec []byte) (int, error) {
	if err := w.usable(); err != nil {
		return 0, err
	}
	n := uint64(len(sec) - sectionHeaderSize)
	limit := uint64(MaxSectionLength)
	if typ == SectionMemory {
		limit = MaxChunkLength
	}
	if n > limit {
		return 0, fmt.Errorf("state: %s section of %d bytes exceeds the limit of %d", sectionTypeName(typ), n, limit)
	}
	le.PutUint16(sec[0:], typ)
	le.PutUint16(sec[2:], flags)
	le.PutUint64(sec[4:], n)
	crc := crc32.Checksum(sec, castagnoli)
	sec = le.AppendUint32(sec, crc)
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
// of m.VCPUs), the irqchip, the PIT, the clock and the devices. m.Header is
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
	if uint64(len(m.VCPUs)) != uint64(w.h.CPUs) {
		return fmt.Errorf("state: %d vCPUs, the header says %d", len(m.VCPUs), w.h.CPUs)
	}
	seen := make([]bool, w.h.CPUs)
	for i := range m.VCPUs {
		v := &m.VCPUs[i]
		if v.ID >= w.h.CPUs || seen[v.ID] {
			return fmt.Errorf("state: vCPU id %d is out of range or repeated (the header has %d vCPUs)", v.ID, w.h.CPUs)
		}
		seen[v.ID] = true
		if v.ID == 0 && CPUIDFingerprint(v.CPUID) != w.h.CPUIDFingerprint {
			return errors.New("state: vCPU 0's CPUID table does not match the header's CPUID fingerprint")
		}
	}
	w.machine = true
	for i := range m.VCPUs {
		sec, err := encodeVCPU(newSection(16<<10), &m.VCPUs[i])
		if err != nil {
			return fmt.Errorf("state: %v", err)
		}
		if _, err := w.emit(SectionVCPU, SectionRequired, sec); err != nil {
			return err
		}
	}
	if _, err := w.emit(SectionIRQChip, SectionRequired, encodeIRQChip(newSection(512), m)); err != nil {
		return err
	}
	if _, err := w.emit(SectionPIT, SectionRequired, encodePIT(newSection(128), m)); err != nil {
		return err
	}
	if _, err := w.emit(SectionClock, SectionRequired, encodeClock(newSection(64), m)); err != nil {
		return err
	}
	sec, err := encodeDevices(newSection(1024), &m.Devices)
	if err != nil {
		return fmt.Errorf("state: %v", err)
	}
	_, err = w.emit(SectionDevices, SectionRequired, sec)
	return err
}

// addPage appends one page record to the current chunk, flushing the
// chunk when it is full.
func (w *Writer) addPage(pfn uint64, data []byte) error {
	if w.chunk == nil {
		w.chunk = make([]byte, sectionHeaderSize+4, sectionHeaderSize+MaxChunkLength+crcSize)
	}
	w.chunk = le.AppendUint64(w.chunk, pfn)
	if data == nil {
		w.chunk = append(w.chunk, PageZero)
		w.stats.ZeroPages++
	} else {
		w.chunk = append(w.chunk, PageRaw)
		w.chunk = append(w.chunk, data...)
		w.stats.DataBytes += PageSize
	}
	w.chunkN++
	w.stats.Pages++
	if w.chunkN == ChunkPages {
		return w.flushChunk()
	}
	return nil
}

// flushChunk writes the current chunk, compressed if that makes it
// smaller.
func (w *Writer) flushChunk() error {
	if w.chunkN == 0 {
		return nil
	}
	le.PutUint32(w.chunk[sectionHeaderSize:], uint32(w.chunkN))
	sec, flags := w.chunk, SectionRequired
	if w.enc != nil {
		if w.zbuf == nil {
			w.zbuf = make([]byte, 0, sectionHeaderSize+MaxChunkLength+crcSize)
		}
		payload := w.chunk[sectionHeaderSize:]
		z := w.enc.EncodeAll(payload, w.zbuf[:sectionHeaderSize])
		if len(z)-sectionHeaderSize < len(payload) {
			sec, flags, w.zbuf = z, SectionRequired|SectionZstd, z
		}
	}
	n, err := w.emit(SectionMemory, flags, sec)
	if err != nil {
		return err
	}
	w.pages += uint64(w.chunkN)
	w.stats.Chunks++
	w.stats.StoredBytes += uint64(n)
	w.chunk, w.chunkN = w.chunk[:sectionHeaderSize+4], 0
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
