package state

import (
	"cmp"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

// ReaderOptions configures a Reader.
type ReaderOptions struct {
	// RequireEOF makes ReadAll refuse data after the end section (right for
	// files; a stream that carries more after the state leaves it unset).
	RequireEOF bool

	// skipChecksums lets the fuzzer reach the payload decoders.
	skipChecksums bool
}

// maxWarnings bounds the warnings ReadAll collects; the rest are counted.
const maxWarnings = 64

// readStep is how much of a payload is read (and allocated) at a time, so
// that a length field never makes the reader allocate more than the input
// holds.
const readStep = 64 << 10

// Reader decodes a state stream. NewReader reads and checks the header;
// ReadAll reads the sections. It reads exactly up to the end of the end
// section (with RequireEOF, one byte more to check there is none) and does
// no buffering of its own: wrap the source in a bufio.Reader if it is
// slow to read in small pieces.
type Reader struct {
	r    io.Reader
	opts ReaderOptions
	h    Header
	off  int64 // bytes consumed

	index    int           // index of the section being read
	crcs     uint32        // CRC32C over the CRCs of the sections read
	pages    uint64        // page records read
	stored   [crcSize]byte // CRC of the section being read
	buf      []byte        // section being read
	dbuf     []byte        // decompressed payload
	dec      *zstd.Decoder
	mem      *memHasher
	finished bool
	started  bool
	cbErr    error

	// content, when set, takes a memory chunk's content in place of the
	// page callback (ApplyPageChunk) and returns its record count.
	content func(payload []byte) (uint64, error)

	// mode says what the input holds: a whole stream (NewReader), or
	// only the machine sections (DecodeMachine) or one memory chunk
	// (DecodePageChunk) of one.
	mode readMode
}

// readMode is what a Reader's input holds after the header.
type readMode int

const (
	modeStream  readMode = iota // sections up to and including the end section
	modeMachine                 // non-memory sections up to the end of the input
	modeChunk                   // exactly one memory chunk section
)

// NewReader reads and validates the header.
func NewReader(r io.Reader, opts ReaderOptions) (*Reader, error) {
	sr := &Reader{r: r, opts: opts, mem: newMemHasher()}
	var prefix [prefixSize]byte
	if err := sr.read(prefix[:], -1, "header"); err != nil {
		return nil, err
	}
	if string(prefix[:8]) != Magic {
		return nil, &FormatError{Section: -1, Msg: fmt.Sprintf("not a ferry state file (magic %q, want %q)", prefix[:8], Magic)}
	}
	version := le.Uint32(prefix[8:])
	if version != FormatVersion {
		return nil, &FormatError{Section: -1, Msg: fmt.Sprintf("format version %d not supported (this ferry reads %d)", version, FormatVersion)}
	}
	hlen := le.Uint32(prefix[12:])
	if hlen < headerFixedSize || hlen > MaxHeaderLength {
		return nil, &FormatError{Section: -1, Name: "header", Offset: 12, Msg: fmt.Sprintf("length %d out of range %d-%d", hlen, headerFixedSize, MaxHeaderLength)}
	}
	body, err := sr.readPayload(uint64(hlen), -1, "header", 0)
	if err != nil {
		return nil, err
	}
	var stored [crcSize]byte
	if err := sr.read(stored[:], -1, "header"); err != nil {
		return nil, err
	}
	crc := crc32.Update(crc32.Checksum(prefix[:], castagnoli), castagnoli, body)
	if s := le.Uint32(stored[:]); s != crc && !opts.skipChecksums {
		return nil, &FormatError{Section: -1, Name: "header", Offset: sr.off - crcSize,
			Msg: fmt.Sprintf("checksum mismatch (stored %#08x, computed %#08x)", s, crc)}
	}
	h, err := decodeHeader(body)
	if err == nil {
		err = validateHeader(&h)
	}
	if err != nil {
		return nil, &FormatError{Section: -1, Name: "header", Offset: prefixSize, Msg: err.Error()}
	}
	h.FormatVersion = version
	sr.h = h
	return sr, nil
}

// Header returns the stream's header.
func (r *Reader) Header() Header {
	h := r.h
	h.Regions = append([]guestmem.Region(nil), h.Regions...)
	return h
}

// read fills p from the stream; running out of input is a truncation error
// in the named section.
func (r *Reader) read(p []byte, section int, name string) error {
	n, err := io.ReadFull(r.r, p)
	r.off += int64(n)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return &FormatError{Section: section, Name: name, Offset: r.off, Truncated: true}
	case section < 0:
		return fmt.Errorf("state file: reading the header: %w", err)
	}
	return fmt.Errorf("state file: reading section %d (%s): %w", section, name, err)
}

// readPayload reads n bytes into r.buf after its first keep bytes, growing
// the buffer only as data arrives. For messages, the section's name is
// recomputed from what has been read when the input ends early.
func (r *Reader) readPayload(n uint64, section int, name string, keep int) ([]byte, error) {
	r.buf = r.buf[:keep]
	for n > 0 {
		step := int(min(n, readStep))
		if cap(r.buf)-len(r.buf) < step {
			r.buf = slices.Grow(r.buf, max(step, len(r.buf)))
		}
		at := len(r.buf)
		r.buf = r.buf[:at+step]
		if err := r.read(r.buf[at:], section, name); err != nil {
			var fe *FormatError
			if errors.As(err, &fe) && section >= 0 {
				fe.Name = sectionName(le.Uint16(r.buf), r.buf[sectionHeaderSize:at])
			}
			return nil, err
		}
		n -= uint64(step)
	}
	return r.buf[keep:], nil
}

// sectionName names a section for messages, with the vCPU id when the
// payload shows it.
func sectionName(typ uint16, payload []byte) string {
	if typ == SectionVCPU {
		if id, ok := vcpuID(payload); ok {
			return fmt.Sprintf("vcpu %d", id)
		}
	}
	return sectionTypeName(typ)
}

// presence tracks the sections a stream must contain exactly once (and
// the optional ones it may contain at most once).
type presence struct {
	vcpus                        []bool
	nvcpus                       int
	irqchip, pit, clock, devices bool
	pci                          bool // optional: at most once
}

// ReadAll reads every section up to and including the end section. The
// machine state is stored into m (which is overwritten; m.Header is the
// stream's header), and each page record is handed to page (which may be
// nil) with its guest-physical address and 4096 bytes of data; the data is
// valid only during the call and must not be modified. Warnings describe
// skipped optional parts (unknown optional sections and record tags).
//
// Pages are handed over as their sections are read and verified, before
// the end section has been checked: on an error the caller must discard
// what it received. An error returned by page ends the read and is
// returned wrapped.
func (r *Reader) ReadAll(m *Machine, page func(gpa uint64, data []byte) error) (warnings []string, err error) {
	if r.started {
		return nil, errors.New("state file: ReadAll called twice")
	}
	r.started = true
	defer r.closeDecoder()
	*m = Machine{Header: r.Header()}
	if warnings, err = r.readSections(m, page); err != nil {
		return warnings, err
	}
	if r.opts.RequireEOF {
		var b [1]byte
		if n, _ := io.ReadFull(r.r, b[:]); n > 0 {
			return warnings, &FormatError{Section: -1, Offset: r.off, Msg: fmt.Sprintf("unexpected data after the end section at byte %d", r.off)}
		}
	}
	r.finished = true
	return warnings, nil
}

// readSections reads sections until the end section (or, for machine
// sections alone, the end of the input), collecting at most maxWarnings
// warnings, and sorts m's vCPUs by id.
func (r *Reader) readSections(m *Machine, page func(gpa uint64, data []byte) error) (warnings []string, err error) {
	var dropped int
	warn := func(ws ...string) {
		for _, w := range ws {
			if len(warnings) < maxWarnings {
				warnings = append(warnings, w)
			} else {
				dropped++
			}
		}
	}
	defer func() {
		if dropped > 0 {
			warnings = append(warnings, fmt.Sprintf("%d more warnings not shown", dropped))
		}
	}()
	have := presence{vcpus: make([]bool, r.h.CPUs)}
	for ; ; r.index++ {
		done, err := r.section(m, page, &have, warn)
		if err != nil {
			return warnings, err
		}
		if done {
			break
		}
	}
	slices.SortFunc(m.VCPUs, func(a, b VCPU) int { return cmp.Compare(a.ID, b.ID) })
	return warnings, nil
}

// section reads and applies one section; it reports whether it was the
// end section.
func (r *Reader) section(m *Machine, page func(uint64, []byte) error, have *presence, warn func(...string)) (bool, error) {
	idx := r.index
	start := r.off
	r.buf = slices.Grow(r.buf[:0], sectionHeaderSize)[:sectionHeaderSize]
	n, err := io.ReadFull(r.r, r.buf)
	r.off += int64(n)
	switch {
	case n == 0 && (err == io.EOF || err == io.ErrUnexpectedEOF):
		switch r.mode {
		case modeMachine:
			// The machine sections end with the input.
			if msg := have.missing(); msg != "" {
				return true, &FormatError{Section: -1, Name: "machine state", Offset: r.off, Msg: msg}
			}
			return true, nil
		case modeChunk:
			return false, &FormatError{Section: idx, Name: sectionTypeName(SectionMemory), Offset: r.off, Truncated: true}
		}
		return false, &FormatError{Section: idx, Offset: r.off, Truncated: true}
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return false, &FormatError{Section: idx, Name: "section header", Offset: r.off, Truncated: true}
	case err != nil:
		return false, fmt.Errorf("state file: reading section %d: %w", idx, err)
	}
	typ := le.Uint16(r.buf)
	flags := le.Uint16(r.buf[2:])
	length := le.Uint64(r.buf[4:])
	name := sectionTypeName(typ)
	fail := func(format string, args ...any) error {
		return &FormatError{Section: idx, Name: name, Offset: start, Msg: fmt.Sprintf(format, args...)}
	}

	limit := uint64(MaxSectionLength)
	if typ == SectionMemory {
		limit = MaxChunkLength
	}
	if length > limit {
		return false, fail("length %d exceeds the limit of %d", length, limit)
	}
	payload, err := r.readPayload(length, idx, name, sectionHeaderSize)
	if err != nil {
		return false, err
	}
	name = sectionName(typ, payload)
	stored := &r.stored
	if err := r.read(stored[:], idx, name); err != nil {
		return false, err
	}
	crc := crc32.Checksum(r.buf, castagnoli)
	if s := le.Uint32(stored[:]); s != crc && !r.opts.skipChecksums {
		return false, fail("checksum mismatch (stored %#08x, computed %#08x)", s, crc)
	}

	switch {
	case r.mode == modeMachine && (typ == SectionMemory || typ == SectionEnd):
		return false, fail("%s sections are not part of the machine state", name)
	case r.mode == modeChunk && typ != SectionMemory:
		return false, fail("a memory chunk section was expected")
	}

	known := true
	switch typ {
	case SectionVCPU, SectionIRQChip, SectionPIT, SectionClock, SectionDevices, SectionPCI, SectionMemory, SectionEnd:
	default:
		known = false
	}
	if !known {
		if flags&SectionRequired != 0 {
			return false, fail("required section type %#04x unknown (written by a newer ferry?)", typ)
		}
		warn(fmt.Sprintf("section %d: skipped unknown optional section type %#04x (%d bytes)", idx, typ, length))
		r.countSection(stored)
		return false, nil
	}
	if f := flags &^ sectionFlagsKnown; f != 0 {
		return false, fail("unknown section flags %#04x", f)
	}
	if c := flags & (SectionZstd | SectionLZ4); c != 0 {
		switch {
		case typ != SectionMemory:
			return false, fail("compression flag set on a section that cannot be compressed")
		case c == SectionZstd:
			if payload, err = r.decompress(payload); err != nil {
				return false, fail("zstd: %v", err)
			}
		case c == SectionLZ4:
			if payload, err = r.decompressLZ4(payload); err != nil {
				return false, fail("lz4: %v", err)
			}
		default:
			return false, fail("both the zstd and the lz4 flag are set")
		}
	}

	warnTags := func(ws []string) {
		for _, w := range ws {
			warn(fmt.Sprintf("section %d (%s): %s", idx, name, w))
		}
	}
	dup := func(seen *bool) error {
		if *seen {
			return fail("appears twice")
		}
		*seen = true
		return nil
	}
	switch typ {
	case SectionVCPU:
		v, ws, err := decodeVCPU(payload)
		if err != nil {
			return false, fail("%v", err)
		}
		if v.ID >= r.h.CPUs {
			return false, fail("vCPU id %d out of range (the header has %d vCPUs)", v.ID, r.h.CPUs)
		}
		if err := dup(&have.vcpus[v.ID]); err != nil {
			return false, err
		}
		if v.ID == 0 && CPUIDFingerprint(v.CPUID) != r.h.CPUIDFingerprint {
			return false, fail("CPUID table does not match the header's CPUID fingerprint")
		}
		have.nvcpus++
		m.VCPUs = append(m.VCPUs, v)
		warnTags(ws)
	case SectionIRQChip, SectionPIT, SectionClock, SectionDevices:
		var seen *bool
		var decode func([]byte, *Machine) ([]string, error)
		switch typ {
		case SectionIRQChip:
			seen, decode = &have.irqchip, decodeIRQChip
		case SectionPIT:
			seen, decode = &have.pit, decodePIT
		case SectionClock:
			seen, decode = &have.clock, decodeClock
		default:
			seen = &have.devices
			decode = func(p []byte, m *Machine) ([]string, error) { return decodeDevices(p, &m.Devices) }
		}
		if err := dup(seen); err != nil {
			return false, err
		}
		ws, err := decode(payload, m)
		if err != nil {
			return false, fail("%v", err)
		}
		warnTags(ws)
	case SectionPCI:
		if err := dup(&have.pci); err != nil {
			return false, err
		}
		p, ws, err := decodePCI(payload)
		if err != nil {
			return false, fail("%v", err)
		}
		m.PCI = p
		warnTags(ws)
	case SectionMemory:
		if r.content != nil {
			n, err := r.content(payload)
			if err != nil {
				return false, fail("%v", err)
			}
			r.pages += n
			break
		}
		r.cbErr = nil
		n, err := parseChunk(payload, r.h.Regions, false, func(rec pageRecord) error {
			if r.mem != nil {
				r.mem.add(rec.gpa, rec.data)
			}
			if page == nil {
				return nil
			}
			if err := page(rec.gpa, rec.data); err != nil {
				r.cbErr = err
				return err
			}
			return nil
		})
		if r.cbErr != nil {
			return false, fmt.Errorf("state file: section %d (memory chunk): %w", idx, r.cbErr)
		}
		if err != nil {
			return false, fail("%v", err)
		}
		r.pages += n
	case SectionEnd:
		return true, r.end(payload, have, fail)
	}
	r.countSection(stored)
	return false, nil
}

func (r *Reader) countSection(crc *[crcSize]byte) {
	r.crcs = crc32.Update(r.crcs, castagnoli, crc[:])
}

// end checks the end section against what was read.
func (r *Reader) end(p []byte, have *presence, fail func(string, ...any) error) error {
	if len(p) != endPayloadSize {
		return fail("length %d, expected %d", len(p), endPayloadSize)
	}
	sections, pages, crcs := le.Uint64(p), le.Uint64(p[8:]), le.Uint32(p[16:])
	if sections != uint64(r.index) {
		return fail("the stream has %d sections before the end section, the end section counts %d", r.index, sections)
	}
	if pages != r.pages {
		return fail("the stream has %d page records, the end section counts %d", r.pages, pages)
	}
	if crcs != r.crcs && !r.opts.skipChecksums {
		return fail("checksum over section checksums mismatch (stored %#08x, computed %#08x)", crcs, r.crcs)
	}
	if msg := have.missing(); msg != "" {
		return fail("%s", msg)
	}
	return nil
}

// missing describes the first required section that has not been read,
// or returns "" when every one has.
func (have *presence) missing() string {
	if have.nvcpus != len(have.vcpus) {
		for id, ok := range have.vcpus {
			if !ok {
				return fmt.Sprintf("required section vcpu %d missing (%d of %d vCPUs present)", id, have.nvcpus, len(have.vcpus))
			}
		}
	}
	for _, s := range []struct {
		ok   bool
		name string
	}{{have.irqchip, "irqchip"}, {have.pit, "pit"}, {have.clock, "clock"}, {have.devices, "devices"}} {
		if !s.ok {
			return fmt.Sprintf("required section %s missing", s.name)
		}
	}
	return ""
}

// decompress inflates a memory chunk into r.dbuf, never beyond
// MaxChunkLength.
func (r *Reader) decompress(p []byte) ([]byte, error) {
	if r.dec == nil {
		dec, err := newChunkDecoder(1)
		if err != nil {
			return nil, err
		}
		r.dec = dec
	}
	out, err := r.dec.DecodeAll(p, r.dbuf[:0])
	if cap(out) > cap(r.dbuf) && cap(out) <= 2*MaxChunkLength {
		r.dbuf = out[:0]
	}
	if err != nil {
		return nil, err
	}
	if len(out) > MaxChunkLength {
		return nil, fmt.Errorf("decompressed length exceeds %d", MaxChunkLength)
	}
	return out, nil
}

// decompressLZ4 inflates an lz4-compressed memory chunk (the content's
// u32 length, then one LZ4 block) into r.dbuf. The declared length is
// checked against the chunk limit and against what the block can possibly
// hold (an LZ4 block expands its input at most 255 times) before the
// buffer is grown, and the block must decompress to exactly that length.
func (r *Reader) decompressLZ4(p []byte) ([]byte, error) {
	if len(p) < 4 {
		return nil, fmt.Errorf("payload of %d bytes has no content length", len(p))
	}
	n := uint64(le.Uint32(p))
	block := p[4:]
	switch {
	case n == 0:
		// (Never hand the lz4 decoder an empty destination: its amd64
		// code writes through a nil one.)
		return nil, errors.New("content length 0")
	case n > MaxChunkLength:
		return nil, fmt.Errorf("content length %d exceeds the limit of %d", n, MaxChunkLength)
	case n > 255*uint64(len(block)):
		return nil, fmt.Errorf("content length %d is impossible for a block of %d bytes", n, len(block))
	}
	if uint64(cap(r.dbuf)) < n {
		r.dbuf = make([]byte, 0, max(n, MaxChunkLength))
	}
	out := r.dbuf[:n]
	got, err := lz4.UncompressBlock(block, out)
	if err != nil {
		return nil, fmt.Errorf("corrupt block (content length %d): %v", n, err)
	}
	if uint64(got) != n {
		return nil, fmt.Errorf("block decompresses to %d bytes, the content length says %d", got, n)
	}
	return out, nil
}

// newChunkDecoder returns a zstd decoder for memory chunks, bounded to the
// chunk limit, that can decode concurrency chunks at a time.
func newChunkDecoder(concurrency int) (*zstd.Decoder, error) {
	return zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(concurrency),
		zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxMemory(MaxChunkLength),
		zstd.WithDecoderMaxWindow(MaxChunkLength))
}

func (r *Reader) closeDecoder() {
	if r.dec != nil {
		r.dec.Close()
		r.dec = nil
	}
}

// MemorySummary returns the summary of the memory read by ReadAll. ok is
// false until ReadAll has succeeded, and when the stream's pages were not
// in strictly ascending guest-physical order (a migration stream that
// resends pages): compute the summary from the resulting memory with
// SummarizeMemory instead.
func (r *Reader) MemorySummary() (s MemorySummary, ok bool) {
	if !r.finished || !r.mem.ordered {
		return MemorySummary{}, false
	}
	return r.mem.summary(r.h.MemSize), true
}
