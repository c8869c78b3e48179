package state

import (
	"bytes"
	"fmt"
	"runtime"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// This file exports the pieces of the encoding that the migration wire
// carries separately: the header, the machine sections and single memory
// chunks. They are the very bytes a Writer writes (the same code produces
// them) and they are decoded by the Reader's code, with its validation,
// limits and error messages; only the framing around them differs (the
// wire has its own, so there is no end section).

// EncodeHeader returns the header as a stream starts with it: prefix
// (magic, format version, body length), header body and header CRC,
// exactly as NewWriter writes it. The prefix always carries FormatVersion
// (h.FormatVersion is not consulted) and an empty Arch is written as
// ArchX86_64. EncodeHeader does not validate h: DecodeHeader does, so a
// header it cannot decode was not valid.
func EncodeHeader(h Header) []byte {
	if h.Arch == "" {
		h.Arch = ArchX86_64
	}
	return appendStreamHeader(nil, &h)
}

// DecodeHeader decodes and validates a header encoded by EncodeHeader (or
// the first bytes of a state stream, which must be exactly the header).
// Errors are *FormatError, as the Reader reports them.
func DecodeHeader(b []byte) (Header, error) {
	br := bytes.NewReader(b)
	r, err := NewReader(br, ReaderOptions{})
	if err != nil {
		return Header{}, err
	}
	if br.Len() != 0 {
		return Header{}, &FormatError{Section: -1, Name: "header", Offset: r.off,
			Msg: fmt.Sprintf("%d unexpected bytes after the header", br.Len())}
	}
	return r.h, nil
}

// EncodeMachine returns the non-memory sections of m, concatenated, exactly
// as Writer.WriteMachine writes them: one vCPU section per vCPU (in the
// order of m.VCPUs), the irqchip, the PIT, the clock, the devices and, when
// m.PCI is not nil, the PCI section.
// m.Header is not encoded (send it with EncodeHeader), but it must be a
// valid header and m must match it as WriteMachine requires: one vCPU per
// header CPU with ids 0..CPUs-1, and vCPU 0's CPUID table has the header's
// fingerprint.
func EncodeMachine(m *Machine) ([]byte, error) {
	h, err := prepareHeader(m.Header)
	if err != nil {
		return nil, err
	}
	if err := checkMachine(&h, m); err != nil {
		return nil, err
	}
	var out []byte
	err = machineSections(m, func(typ uint16, sec []byte) error {
		sec, _, err := sealSection(typ, SectionRequired, sec)
		if err != nil {
			return err
		}
		out = append(out, sec...)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// DecodeMachine decodes the machine sections produced by EncodeMachine for
// a stream with header h (as DecodeHeader returned it; a zero FormatVersion
// means FormatVersion). The sections may come in any order and the input
// must hold nothing else: a memory chunk or an end section is an error, as
// is a missing or repeated required section. Validation, allocation bounds
// and error messages are the Reader's (errors are *FormatError; sections
// are numbered from 0 at the start of b). Unknown optional sections and
// record tags are skipped and described in the warnings. The returned
// machine's Header is h and its vCPUs are sorted by id.
func DecodeMachine(b []byte, h Header) (*Machine, []string, error) {
	return decodeMachine(b, h, false)
}

func decodeMachine(b []byte, h Header, skipChecksums bool) (*Machine, []string, error) {
	h, err := checkDecodeHeader(h)
	if err != nil {
		return nil, nil, err
	}
	r := &Reader{r: bytes.NewReader(b), opts: ReaderOptions{skipChecksums: skipChecksums}, h: h, mode: modeMachine}
	defer r.closeDecoder()
	m := &Machine{Header: r.Header()}
	warnings, err := r.readSections(m, nil)
	if err != nil {
		return nil, warnings, err
	}
	return m, warnings, nil
}

// checkDecodeHeader validates the header that DecodeMachine or
// DecodePageChunk were given.
func checkDecodeHeader(h Header) (Header, error) {
	if h.FormatVersion == 0 {
		h.FormatVersion = FormatVersion
	}
	if h.FormatVersion != FormatVersion {
		return h, &FormatError{Section: -1, Msg: fmt.Sprintf("format version %d not supported (this ferry reads %d)", h.FormatVersion, FormatVersion)}
	}
	if err := validateHeader(&h); err != nil {
		return h, &FormatError{Section: -1, Name: "header", Msg: err.Error()}
	}
	return h, nil
}

// EncodePageChunk returns one memory chunk section holding the given
// pages in the given order, as Writer.WritePages writes them: data[i] is
// the 4096 bytes of guest-physical page frame pfns[i]; all-zero pages
// become zero records. There must be 1 to ChunkPages pages. With compress,
// the chunk is zstd-compressed at level (1-22 as the zstd tool counts, 0
// for the fastest) when that makes it smaller. There is no header to check
// the page frames against: DecodePageChunk does. EncodePageChunk is safe
// for concurrent use. (It is ChunkEncoder's Raw records with a pool of
// encoders; a migration engine that wants delta and dup records, lz4, or
// no copy of the result uses a ChunkEncoder per worker.)
func EncodePageChunk(pfns []uint64, data [][]byte, compress bool, level int) ([]byte, error) {
	if len(pfns) != len(data) {
		return nil, fmt.Errorf("state: %d page frame numbers for %d pages", len(pfns), len(data))
	}
	if len(pfns) == 0 || len(pfns) > ChunkPages {
		return nil, fmt.Errorf("state: %d pages, a memory chunk holds 1 to %d", len(pfns), ChunkPages)
	}
	for i, pfn := range pfns {
		if len(data[i]) != PageSize {
			return nil, fmt.Errorf("state: page %#x has %d bytes, not %d", pfn, len(data[i]), PageSize)
		}
		if pfn > ^uint64(0)/PageSize {
			return nil, fmt.Errorf("state: page frame %#x out of range", pfn)
		}
	}
	pool := &chunkEncoders[0]
	if compress {
		lvl, err := zstdLevel(level)
		if err != nil {
			return nil, err
		}
		pool = &chunkEncoders[lvl]
	}
	e, ok := pool.Get().(*ChunkEncoder)
	if !ok {
		var err error
		if !compress {
			e, err = NewChunkEncoder(CodecNone, 0)
		} else {
			e, err = NewChunkEncoder(CodecZstd, level)
		}
		if err != nil {
			return nil, err
		}
	}
	defer pool.Put(e)
	e.Reset()
	for i, pfn := range pfns {
		e.Raw(pfn, data[i])
	}
	out, err := e.Finish()
	if err != nil {
		return nil, err
	}
	return bytes.Clone(out), nil
}

// DecodePageChunk decodes one memory chunk section produced by
// EncodePageChunk (or cut from a stream) for a stream with header h, and
// hands each page record to page in order, with its guest-physical address
// and 4096 bytes of data (a zero record's data is zeros); delta and dup
// records are refused, as they need the receiver's memory (see
// ApplyPageChunk). The data is valid only during the call and must not be
// modified. b must hold exactly one memory chunk. Validation, bounds and
// error messages are the Reader's (the chunk is section 0); a page outside
// h's memory layout is refused before page sees it, and page's error ends
// the decoding and is returned wrapped. page may be nil. It returns the
// number of page records; pages already handed over when an error occurs
// must be discarded. DecodePageChunk is safe for concurrent use.
func DecodePageChunk(b []byte, h Header, page func(gpa uint64, data []byte) error) (n int, err error) {
	return decodePageChunk(b, h, page, false)
}

func decodePageChunk(b []byte, h Header, page func(gpa uint64, data []byte) error, skipChecksums bool) (int, error) {
	h, err := checkDecodeHeader(h)
	if err != nil {
		return 0, err
	}
	dec, err := sharedChunkDecoder()
	if err != nil {
		return 0, fmt.Errorf("state: zstd decoder: %v", err)
	}
	scratch := chunkScratchPool.Get().(*chunkScratch)
	defer chunkScratchPool.Put(scratch)
	br := bytes.NewReader(b)
	r := &Reader{r: br, opts: ReaderOptions{skipChecksums: skipChecksums}, h: h, mode: modeChunk,
		buf: scratch.buf[:0], dbuf: scratch.dbuf[:0], dec: dec}
	var m Machine
	_, err = r.section(&m, page, &presence{}, func(...string) {})
	scratch.keep(r.buf, r.dbuf)
	if err != nil {
		return 0, err
	}
	if br.Len() != 0 {
		return 0, &FormatError{Section: 0, Name: sectionTypeName(SectionMemory), Offset: r.off,
			Msg: fmt.Sprintf("%d unexpected bytes after the section", br.Len())}
	}
	return int(r.pages), nil
}

// chunkScratch holds the buffers DecodePageChunk reads and decompresses a
// chunk into, so that decoding chunk after chunk does not allocate.
type chunkScratch struct{ buf, dbuf []byte }

func (s *chunkScratch) keep(buf, dbuf []byte) {
	if cap(buf) > cap(s.buf) && cap(buf) <= 2*(sectionHeaderSize+MaxChunkLength) {
		s.buf = buf[:0]
	}
	if cap(dbuf) > cap(s.dbuf) && cap(dbuf) <= 2*MaxChunkLength {
		s.dbuf = dbuf[:0]
	}
}

var chunkScratchPool = sync.Pool{New: func() any { return new(chunkScratch) }}

// sharedChunkDecoder is the zstd decoder of DecodePageChunk: DecodeAll may
// be called concurrently, up to its concurrency at a time.
var sharedChunkDecoder = sync.OnceValues(func() (*zstd.Decoder, error) {
	return newChunkDecoder(min(runtime.GOMAXPROCS(0), 16))
})

// chunkEncoders pools EncodePageChunk's chunk encoders: uncompressed at 0,
// zstd by encoder level (levels that map to the same encoder level
// compress identically). An encoder at the stronger zstd levels holds tens
// of MiB of tables, so they are made only as concurrent use requires and
// the pool lets idle ones go.
var chunkEncoders [zstd.SpeedBestCompression + 1]sync.Pool
