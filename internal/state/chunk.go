package state

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/xbzrle"
)

// This file holds the memory chunk encoder and decoder of the migration
// engine: ChunkEncoder builds chunks of every page record encoding with a
// choice of codec, ApplyPageChunk applies them to a memory image.

// Codec is how memory chunks are compressed. Each chunk is compressed on
// its own, and stored uncompressed when compression does not make it
// smaller.
type Codec uint8

const (
	CodecNone Codec = iota // not compressed
	CodecZstd              // zstd frames (section flag SectionZstd)
	CodecLZ4               // one LZ4 block (section flag SectionLZ4)
)

// Codec levels. A zstd level counts as the zstd tool does, 1 (fastest) to
// 22; the encoder has four speeds, so levels map onto them as
// zstd.EncoderLevelFromZstd says: 1-2 fastest, 3-5 default, 6-9 better,
// 10-22 best. The lz4 levels are 0, the fast compressor, and 1 to 9, the
// high-compression one searching deeper with each level. "lz4:hc" is
// level 1: on memory pages the deeper levels gain a percent or two of
// ratio for several times (up to 30 times) less speed, and even level 1
// is slower than zstd:1 for a worse ratio (BenchmarkChunkEncode).
const (
	ZstdFastest = 1
	ZstdDefault = 3
	ZstdBetter  = 7
	ZstdBest    = 11

	LZ4Fast = 0
	LZ4HC   = 1 // "lz4:hc"
	maxLZ4  = 9
)

func (c Codec) String() string {
	switch c {
	case CodecNone:
		return "none"
	case CodecZstd:
		return "zstd"
	case CodecLZ4:
		return "lz4"
	}
	return fmt.Sprintf("codec %d", uint8(c))
}

// ParseCodec parses a codec and level as a command line gives them:
//
//	none                               no compression
//	zstd                               zstd at its fastest level (zstd:1)
//	zstd:N                             zstd level N, 1 to 22
//	zstd:fastest|default|better|best   zstd levels 1, 3, 7, 11: the encoder's four speeds
//	lz4, lz4:fast                      lz4's fast compressor (level 0)
//	lz4:N                              lz4's high-compression compressor, search depth level N, 1 to 9
//	lz4:hc                             lz4:1
//
// Names are case-insensitive. A bare codec name is its fastest level, which
// is what a live migration normally wants.
func ParseCodec(s string) (Codec, int, error) {
	name, lvl, hasLevel := strings.Cut(strings.ToLower(strings.TrimSpace(s)), ":")
	bad := func() (Codec, int, error) {
		return 0, 0, fmt.Errorf("state: codec %q: want none, zstd, zstd:1-22, zstd:fastest|default|better|best, lz4, lz4:fast, lz4:1-9 or lz4:hc", s)
	}
	switch name {
	case "none":
		if hasLevel {
			return bad()
		}
		return CodecNone, 0, nil
	case "zstd":
		switch lvl {
		case "fastest":
			return CodecZstd, ZstdFastest, nil
		case "default":
			return CodecZstd, ZstdDefault, nil
		case "better":
			return CodecZstd, ZstdBetter, nil
		case "best":
			return CodecZstd, ZstdBest, nil
		}
		if !hasLevel {
			return CodecZstd, ZstdFastest, nil
		}
		n, err := strconv.Atoi(lvl)
		if err != nil || n < 1 || n > 22 {
			return bad()
		}
		return CodecZstd, n, nil
	case "lz4":
		switch lvl {
		case "fast":
			return CodecLZ4, LZ4Fast, nil
		case "hc":
			return CodecLZ4, LZ4HC, nil
		}
		if !hasLevel {
			return CodecLZ4, LZ4Fast, nil
		}
		n, err := strconv.Atoi(lvl)
		if err != nil || n < 1 || n > maxLZ4 {
			return bad()
		}
		return CodecLZ4, n, nil
	}
	return bad()
}

// FormatCodec is the inverse of ParseCodec: "none", "zstd:N", "lz4" or
// "lz4:N". (A zstd level of 0, which NewChunkEncoder takes as the fastest,
// is shown as zstd:1.)
func FormatCodec(c Codec, level int) string {
	switch {
	case c == CodecZstd:
		return fmt.Sprintf("zstd:%d", max(level, 1))
	case c == CodecLZ4 && level == LZ4Fast:
		return "lz4"
	case c == CodecLZ4:
		return fmt.Sprintf("lz4:%d", level)
	}
	return c.String()
}

// checkCodec checks a codec and level as NewChunkEncoder takes them.
func checkCodec(c Codec, level int) error {
	switch c {
	case CodecNone:
		if level != 0 {
			return fmt.Errorf("state: no compression has no level %d", level)
		}
	case CodecZstd:
		if _, err := zstdLevel(level); err != nil {
			return err
		}
	case CodecLZ4:
		if level < 0 || level > maxLZ4 {
			return fmt.Errorf("state: lz4 level %d out of range 0-%d", level, maxLZ4)
		}
	default:
		return fmt.Errorf("state: unknown codec %d", c)
	}
	return nil
}

// ChunkStats describes the chunk a ChunkEncoder holds.
type ChunkStats struct {
	Records    int  // page records
	Zero       int  // zero records
	Raw        int  // raw records
	Delta      int  // delta records
	Dup        int  // dup records
	DeltaBytes int  // bytes of delta data in the delta records
	Content    int  // bytes of the chunk's content (the record count and the records), uncompressed
	Stored     int  // bytes of the finished section, framing included (0 before Finish)
	Compressed bool // the finished section is compressed
}

// ChunkEncoder builds memory chunk sections for the migration wire: page
// records of every encoding (zero, raw, delta, dup), compressed with a
// codec. It keeps its buffers and compressor state from chunk to chunk,
// so a migration engine gives each of its worker goroutines one encoder:
// add up to ChunkPages records, Finish, send the bytes, Reset, and so on.
//
// The records are not checked against a memory layout (ApplyPageChunk
// does that on the receiving side). A record that cannot be encoded (a
// page that is not PageSize bytes, a page frame number that overflows, a
// malformed or oversized delta, a record beyond ChunkPages or after
// Finish) is not added; the first such error is returned by Finish and
// Err until Reset.
//
// A ChunkEncoder is not safe for concurrent use.
type ChunkEncoder struct {
	codec Codec
	level int
	zstd  *zstd.Encoder
	lz4   *lz4.Compressor
	lz4hc *lz4.CompressorHC

	sec   []byte // section header room, record count, records
	out   []byte // compressed section
	done  []byte // the finished section, while finished
	stats ChunkStats
	err   error
}

// NewChunkEncoder returns an encoder compressing with codec at level
// (see ParseCodec; a zstd level of 0 is the fastest, as 1). An encoder
// holds a chunk buffer (1 MiB, made on first use) and the compressor's
// state: about 128 KiB for lz4, under 1 MiB for its high-compression
// levels, up to tens of MiB for zstd at its stronger levels. Close
// releases the zstd encoder.
func NewChunkEncoder(codec Codec, level int) (*ChunkEncoder, error) {
	if err := checkCodec(codec, level); err != nil {
		return nil, err
	}
	e := &ChunkEncoder{codec: codec, level: level}
	switch {
	case codec == CodecZstd:
		lvl, _ := zstdLevel(level)
		enc, err := newChunkEncoder(lvl)
		if err != nil {
			return nil, err
		}
		e.zstd = enc
	case codec == CodecLZ4 && level == LZ4Fast:
		e.lz4 = new(lz4.Compressor)
	case codec == CodecLZ4:
		e.lz4hc = &lz4.CompressorHC{Level: lz4.CompressionLevel(1 << (8 + level))}
	}
	e.Reset()
	return e, nil
}

// Codec returns the encoder's codec and level.
func (e *ChunkEncoder) Codec() (Codec, int) { return e.codec, e.level }

// Reset empties the encoder for a new chunk, and forgets an error. The
// bytes Finish returned are overwritten from now on.
func (e *ChunkEncoder) Reset() {
	e.sec = e.sec[:0]
	e.done, e.err = nil, nil
	e.stats = ChunkStats{}
}

// Len returns the number of records in the chunk, at most ChunkPages.
func (e *ChunkEncoder) Len() int { return e.stats.Records }

// Full reports whether the chunk holds ChunkPages records.
func (e *ChunkEncoder) Full() bool { return e.stats.Records == ChunkPages }

// Stats describes the chunk so far (and, after Finish, how it was stored).
func (e *ChunkEncoder) Stats() ChunkStats { return e.stats }

// Err returns the first error of the records added since Reset.
func (e *ChunkEncoder) Err() error { return e.err }

// record starts a record for pfn with encoding enc, or returns false (and
// keeps the error) when it cannot be added.
func (e *ChunkEncoder) record(pfn uint64, enc uint8) bool {
	switch {
	case e.err != nil:
		return false
	case e.done != nil:
		e.err = errors.New("state: page record added to a finished chunk (Reset first)")
		return false
	case e.stats.Records == ChunkPages:
		e.err = fmt.Errorf("state: more than %d page records in a chunk", ChunkPages)
		return false
	case pfn > ^uint64(0)/PageSize:
		e.err = fmt.Errorf("state: page frame %#x out of range", pfn)
		return false
	}
	if len(e.sec) == 0 {
		// Room for the section header and the record count; the buffer
		// is made on first use and holds the largest chunk.
		if e.sec == nil {
			e.sec = make([]byte, 0, sectionHeaderSize+MaxChunkLength+crcSize)
		}
		e.sec = e.sec[:sectionHeaderSize+4]
	}
	e.sec = le.AppendUint64(e.sec, pfn)
	e.sec = append(e.sec, enc)
	e.stats.Records++
	return true
}

// Zero adds a zero record: the page is all zeros.
func (e *ChunkEncoder) Zero(pfn uint64) {
	if e.record(pfn, PageZero) {
		e.stats.Zero++
	}
}

// Raw adds a page with its PageSize bytes of data: a zero record when the
// data is all zeros, a raw record otherwise.
func (e *ChunkEncoder) Raw(pfn uint64, data []byte) {
	if len(data) != PageSize {
		if e.err == nil {
			e.err = fmt.Errorf("state: page %#x has %d bytes, not %d", pfn, len(data), PageSize)
		}
		return
	}
	if isZeroPage(data) {
		e.Zero(pfn)
		return
	}
	e.raw(pfn, data)
}

// raw adds a raw record for a page known not to be zero.
func (e *ChunkEncoder) raw(pfn uint64, data []byte) {
	if e.record(pfn, PageRaw) {
		e.sec = append(e.sec, data...)
		e.stats.Raw++
	}
}

// Delta adds a delta record: delta (an xbzrle delta of at most
// MaxDeltaLength bytes) turns the receiver's current content of the page
// into the new one. Send it only when the receiver holds exactly the
// version the delta was encoded against.
func (e *ChunkEncoder) Delta(pfn uint64, delta []byte) {
	if e.err != nil {
		return
	}
	if len(delta) > MaxDeltaLength {
		e.err = fmt.Errorf("state: delta of %d bytes for page %#x, at most %d allowed", len(delta), pfn, MaxDeltaLength)
		return
	}
	if err := xbzrle.Check(delta, PageSize); err != nil {
		e.err = fmt.Errorf("state: delta for page %#x: %v", pfn, err)
		return
	}
	if e.record(pfn, PageDelta) {
		e.sec = le.AppendUint16(e.sec, uint16(len(delta)))
		e.sec = append(e.sec, delta...)
		e.stats.Delta++
		e.stats.DeltaBytes += len(delta)
	}
}

// Dup adds a dup record: the page becomes a copy of the receiver's current
// content of page fromPFN (its content when the record is applied, after
// the records before it). Send it only when the receiver holds exactly
// what the page should become at fromPFN.
func (e *ChunkEncoder) Dup(pfn, fromPFN uint64) {
	if e.err == nil && fromPFN > ^uint64(0)/PageSize {
		e.err = fmt.Errorf("state: dup source page frame %#x out of range", fromPFN)
	}
	if e.record(pfn, PageDup) {
		e.sec = le.AppendUint64(e.sec, fromPFN)
		e.stats.Dup++
	}
}

// Page adds the new content data of a page whose receiver holds old (nil
// when the sender does not know what the receiver holds) in the cheapest
// of three encodings: a zero record when data is all zeros, a delta
// record when old is given and the delta is at most xbzrle.MaxDelta bytes,
// a raw record otherwise. It returns the encoding it chose.
func (e *ChunkEncoder) Page(pfn uint64, old, data []byte) uint8 {
	switch {
	case len(data) != PageSize || (old != nil && len(old) != PageSize):
		if e.err == nil {
			e.err = fmt.Errorf("state: page %#x has %d bytes (old version %d), not %d", pfn, len(data), len(old), PageSize)
		}
		return PageRaw
	case isZeroPage(data):
		e.Zero(pfn)
		return PageZero
	case old != nil:
		if !e.record(pfn, PageDelta) {
			return PageDelta
		}
		at := len(e.sec) // the delta length, then the delta
		sec, ok := xbzrle.Encode(append(e.sec, 0, 0), old, data)
		if ok {
			n := len(sec) - at - 2
			le.PutUint16(sec[at:], uint16(n))
			e.sec = sec
			e.stats.Delta++
			e.stats.DeltaBytes += n
			return PageDelta
		}
		// Take the record back and send the page raw.
		e.sec = e.sec[:at-pageRecordHeader]
		e.stats.Records--
	}
	e.raw(pfn, data)
	return PageRaw
}

// Finish completes the chunk and returns the whole memory chunk section
// (header, payload and CRC), compressed with the codec when that makes it
// smaller. The bytes are valid until the next Reset; calling Finish again
// returns them again. A chunk needs at least one record.
func (e *ChunkEncoder) Finish() ([]byte, error) {
	if e.done != nil || e.err != nil {
		return e.done, e.err
	}
	sec, flags, err := e.finishPayload()
	if err == nil {
		sec, _, err = sealSection(SectionMemory, flags, sec)
	}
	if err != nil {
		e.err = err
		return nil, err
	}
	e.done = sec
	e.stats.Stored = len(sec)
	return sec, nil
}

// finishPayload fills in the record count and compresses the chunk. It
// returns the section to seal: header room followed by the stored payload,
// with its flags.
func (e *ChunkEncoder) finishPayload() ([]byte, uint16, error) {
	if e.stats.Records == 0 {
		return nil, 0, errors.New("state: a memory chunk needs at least one page record")
	}
	le.PutUint32(e.sec[sectionHeaderSize:], uint32(e.stats.Records))
	payload := e.sec[sectionHeaderSize:]
	e.stats.Content = len(payload)
	flags := SectionRequired
	sec := e.sec
	switch e.codec {
	case CodecZstd:
		if e.out == nil {
			e.out = make([]byte, 0, sectionHeaderSize+MaxChunkLength+crcSize)
		}
		e.out = e.zstd.EncodeAll(payload, e.out[:sectionHeaderSize])
		if len(e.out)-sectionHeaderSize < len(payload) {
			sec, flags = e.out, flags|SectionZstd
		}
	case CodecLZ4:
		// The block must come out shorter than the payload less the
		// content length: the compressor gives up once it cannot.
		room := len(payload) - 4 - 1
		if room <= 0 {
			break
		}
		if cap(e.out) < sectionHeaderSize+4+room+crcSize {
			e.out = make([]byte, 0, sectionHeaderSize+MaxChunkLength+crcSize)
		}
		out := e.out[:sectionHeaderSize+4+room]
		var n int
		var err error
		if e.lz4 != nil {
			n, err = e.lz4.CompressBlock(payload, out[sectionHeaderSize+4:])
		} else {
			n, err = e.lz4hc.CompressBlock(payload, out[sectionHeaderSize+4:])
		}
		if err == nil && n > 0 {
			le.PutUint32(out[sectionHeaderSize:], uint32(len(payload)))
			sec, flags = out[:sectionHeaderSize+4+n], flags|SectionLZ4
		}
	}
	e.stats.Compressed = flags != SectionRequired
	return sec, flags, nil
}

// Close releases the compressor. The encoder must not be used after.
func (e *ChunkEncoder) Close() {
	if e.zstd != nil {
		e.zstd.Close()
		e.zstd = nil
	}
	e.lz4, e.lz4hc = nil, nil
	e.sec, e.out, e.done = nil, nil, nil
}

// ChunkDecoder holds what ApplyPageChunk needs from chunk to chunk: the
// decompressors and buffers. A migration engine gives each goroutine that
// applies chunks one decoder. The zero value is ready to use; Close
// releases the zstd decoder.
//
// A ChunkDecoder is not safe for concurrent use, and must not be copied
// after first use.
type ChunkDecoder struct {
	r       Reader // its decompressor and buffers carry over
	br      bytes.Reader
	m       Machine
	have    presence
	recs    []pageRecord
	regions []guestmem.Region
	content func([]byte) (uint64, error)
	collect func(pageRecord) error
}

// NewChunkDecoder returns a ChunkDecoder (the zero value works as well).
func NewChunkDecoder() *ChunkDecoder { return new(ChunkDecoder) }

// Close releases the decoder's zstd decoder; the decoder may be used
// again after.
func (d *ChunkDecoder) Close() { d.r.closeDecoder() }

// ApplyPageChunk applies one memory chunk section (as ChunkEncoder or
// EncodePageChunk produce, or cut from a stream) to the memory image mem,
// which is indexed by memory-file offset (guestmem.Memory.Bytes) and laid
// out by regions (the stream header's). Records are applied in order: a
// zero record clears its page, a raw one overwrites it, a delta record
// patches the page's current content and a dup record copies another
// page's current content. It returns the number of page records.
//
// The whole chunk is checked before memory is touched: the section's
// framing, CRC and flags, bounded decompression, every record's page frame
// (and a dup's source) against regions, and every delta. A chunk that is
// refused leaves mem unchanged. Errors are *FormatError (the chunk is
// section 0), except for regions that do not fit mem. dec may be nil (the
// call then uses a temporary decoder; pass one to reuse its buffers).
func ApplyPageChunk(chunk []byte, regions []guestmem.Region, mem []byte, dec *ChunkDecoder) (int, error) {
	if dec == nil {
		dec = chunkDecoderPool.Get().(*ChunkDecoder)
		defer chunkDecoderPool.Put(dec)
	}
	return dec.apply(chunk, regions, mem, false)
}

var chunkDecoderPool = sync.Pool{New: func() any { return new(ChunkDecoder) }}

func (d *ChunkDecoder) apply(chunk []byte, regions []guestmem.Region, mem []byte, skipChecksums bool) (int, error) {
	if err := checkMemRegions(mem, regions); err != nil {
		return 0, fmt.Errorf("state: %v", err)
	}
	if d.content == nil {
		d.collect = func(rec pageRecord) error {
			d.recs = append(d.recs, rec)
			return nil
		}
		d.content = func(p []byte) (uint64, error) { return parseChunk(p, d.regions, true, d.collect) }
	}
	d.br.Reset(chunk)
	d.r = Reader{r: &d.br, opts: ReaderOptions{skipChecksums: skipChecksums}, mode: modeChunk,
		buf: keepBuf(d.r.buf, 2*(sectionHeaderSize+MaxChunkLength)), dbuf: keepBuf(d.r.dbuf, 2*MaxChunkLength),
		dec: d.r.dec, content: d.content}
	d.r.h.Regions, d.regions = regions, regions
	d.recs = d.recs[:0]
	_, err := d.r.section(&d.m, nil, &d.have, noWarnings)
	d.r.h.Regions, d.regions = nil, nil
	if err != nil {
		return 0, err
	}
	r := &d.r
	if d.br.Len() != 0 {
		return 0, &FormatError{Section: 0, Name: sectionTypeName(SectionMemory), Offset: r.off,
			Msg: fmt.Sprintf("%d unexpected bytes after the section", d.br.Len())}
	}
	for i := range d.recs {
		rec := &d.recs[i]
		page := mem[rec.off : rec.off+PageSize : rec.off+PageSize]
		switch rec.enc {
		case PageZero:
			clear(page)
		case PageRaw:
			copy(page, rec.data)
		case PageDelta:
			if err := xbzrle.Decode(page, rec.data); err != nil {
				// Unreachable: parseChunk has checked the delta.
				return i, fmt.Errorf("state: page record %d (gpa %#x): checked delta refused: %v", i, rec.gpa, err)
			}
		case PageDup:
			copy(page, mem[rec.from:rec.from+PageSize])
		}
		rec.data = nil
	}
	n := len(d.recs)
	d.recs = d.recs[:0]
	return n, nil
}

// keepBuf returns buf emptied, or nil when it has grown beyond limit.
func keepBuf(buf []byte, limit int) []byte {
	if cap(buf) > limit {
		return nil
	}
	return buf[:0]
}

func noWarnings(...string) {}
