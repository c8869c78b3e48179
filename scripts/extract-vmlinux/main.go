// Command extract-vmlinux recovers the uncompressed ELF kernel (vmlinux)
// from an x86 Linux bzImage and checks that it can be booted through the
// PVH entry point.
//
// A bzImage is a real-mode setup block followed by a small decompressor
// and the compressed kernel ("payload"). The boot protocol header
// (boot protocol 2.08 and later) records where the payload starts and
// how long it is, so no magic-number scanning of the whole image is
// needed: the compression format is identified from the first bytes of
// the payload, and its last four bytes hold the uncompressed size.
//
// Usage:
//
//	extract-vmlinux [-o vmlinux] bzImage
//
// On success it prints one line describing the result, including the
// PVH entry address taken from the Xen ELF note of type 18
// (XEN_ELFNOTE_PHYS32_ENTRY). It fails if the result is not an x86-64
// ELF file or carries no such note.
package main

import (
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"debug/elf"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"github.com/ulikunitz/xz/lzma"
)

// Offsets into the x86 boot protocol setup header
// (Documentation/arch/x86/boot.rst).
const (
	offSetupSects    = 0x1f1 // u8: size of setup in 512-byte sectors, minus one
	offHeaderMagic   = 0x202 // u32: "HdrS"
	offVersion       = 0x206 // u16: boot protocol version
	offKernelVersion = 0x20e // u16: pointer to version string, minus 0x200
	offPayloadOffset = 0x248 // u32: payload offset from the protected-mode code
	offPayloadLength = 0x24c // u32: payload length
	minHeaderLen     = 0x250
	minProtocol      = 0x0208 // first protocol version with payload fields
)

// xenElfnotePhys32Entry is XEN_ELFNOTE_PHYS32_ENTRY: the note that holds
// the 32-bit physical entry point used by PVH boot.
const xenElfnotePhys32Entry = 18

// maxKernelSize bounds the size accepted for a decompressed kernel.
const maxKernelSize = 1 << 30

type format struct {
	name  string
	magic []byte
}

// formats lists the compressors the kernel build can use for the payload,
// with the magic bytes each one's stream starts with.
var formats = []format{
	{"gzip", []byte{0x1f, 0x8b}},
	{"xz", []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}},
	{"zstd", []byte{0x28, 0xb5, 0x2f, 0xfd}},
	{"lz4", []byte{0x02, 0x21, 0x4c, 0x18}}, // legacy frame format (lz4 -l)
	{"bzip2", []byte{'B', 'Z', 'h'}},
	{"lzo", []byte{0x89, 'L', 'Z', 'O', 0x00, '\r', '\n', 0x1a, '\n'}},
	// lzma-alone has no magic; the kernel build always writes the
	// properties byte 0x5d (lc=3, lp=0, pb=2) followed by the dictionary size.
	{"lzma", []byte{0x5d, 0x00, 0x00}},
}

func main() {
	out := flag.String("o", "vmlinux", "where to write the uncompressed ELF kernel")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [-o vmlinux] bzImage\n", filepath.Base(os.Args[0]))
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(flag.Arg(0), *out); err != nil {
		fmt.Fprintf(os.Stderr, "extract-vmlinux: %v\n", err)
		os.Exit(1)
	}
}

func run(in, out string) error {
	image, err := os.ReadFile(in)
	if err != nil {
		return err
	}
	hdr, err := parseHeader(image)
	if err != nil {
		return fmt.Errorf("%s: %w", in, err)
	}
	kernel, err := decompress(hdr.format, hdr.payload)
	if err != nil {
		return fmt.Errorf("%s: decompressing %s payload: %w", in, hdr.format, err)
	}
	if uint32(len(kernel)) != hdr.size {
		return fmt.Errorf("%s: %s payload decompressed to %d bytes, header says %d",
			in, hdr.format, len(kernel), hdr.size)
	}
	entry, err := pvhEntry(kernel)
	if err != nil {
		return fmt.Errorf("%s: decompressed kernel: %w", in, err)
	}
	if err := writeAtomic(out, kernel, 0o644); err != nil {
		return err
	}
	version := hdr.version
	if version == "" {
		version = "unknown version"
	}
	fmt.Printf("%s: %d bytes, ELF x86-64, from %s payload of %s (%s), PVH entry 0x%x\n",
		out, len(kernel), hdr.format, in, version, entry)
	return nil
}

type header struct {
	format  string
	payload []byte // compressed stream, without the trailing size word
	size    uint32 // uncompressed size, from the payload's last 4 bytes
	version string // kernel version string, if the header has one
}

func parseHeader(image []byte) (*header, error) {
	if len(image) < minHeaderLen {
		return nil, errors.New("too short to be a bzImage")
	}
	le := binary.LittleEndian
	if string(image[offHeaderMagic:offHeaderMagic+4]) != "HdrS" {
		return nil, errors.New("no \"HdrS\" boot header: not a bzImage")
	}
	if v := le.Uint16(image[offVersion:]); v < minProtocol {
		return nil, fmt.Errorf("boot protocol %d.%02d has no payload fields (need 2.08 or later)", v>>8, v&0xff)
	}
	setupSects := int(image[offSetupSects])
	if setupSects == 0 {
		setupSects = 4 // as the boot protocol specifies
	}
	pmStart := (setupSects + 1) * 512
	off := uint64(pmStart) + uint64(le.Uint32(image[offPayloadOffset:]))
	length := uint64(le.Uint32(image[offPayloadLength:]))
	if length < 8 || off+length > uint64(len(image)) {
		return nil, fmt.Errorf("payload [%#x, %#x) lies outside the %d-byte image", off, off+length, len(image))
	}
	payload := image[off : off+length]

	h := &header{
		size:    le.Uint32(payload[len(payload)-4:]),
		version: kernelVersion(image),
	}
	for _, f := range formats {
		if bytes.HasPrefix(payload, f.magic) {
			h.format = f.name
			break
		}
	}
	if h.format == "" {
		return nil, fmt.Errorf("unknown payload compression (starts with % x)", payload[:8])
	}
	if h.format == "gzip" {
		// gzip ends with its own size field (ISIZE); the kernel build
		// appends nothing after it.
		h.payload = payload
	} else {
		// Every other format is followed by the size appended by the
		// kernel build (scripts/Makefile.lib, size_append).
		h.payload = payload[:len(payload)-4]
	}
	if h.size == 0 || h.size > maxKernelSize {
		return nil, fmt.Errorf("implausible uncompressed size %d", h.size)
	}
	return h, nil
}

// kernelVersion returns the version string the header points to, or "".
func kernelVersion(image []byte) string {
	p := int(binary.LittleEndian.Uint16(image[offKernelVersion:]))
	if p == 0 {
		return ""
	}
	p += 0x200
	if p >= len(image) {
		return ""
	}
	s := image[p:min(p+256, len(image))]
	if i := bytes.IndexByte(s, 0); i >= 0 {
		s = s[:i]
	}
	return string(s)
}

func decompress(name string, data []byte) ([]byte, error) {
	var r io.Reader
	switch name {
	case "gzip":
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		zr.Multistream(false)
		r = zr
	case "bzip2":
		r = bzip2.NewReader(bytes.NewReader(data))
	case "xz":
		zr, err := xz.ReaderConfig{SingleStream: true}.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		r = zr
	case "lzma":
		zr, err := lzma.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		r = zr
	case "zstd":
		zr, err := zstd.NewReader(bytes.NewReader(data), zstd.WithDecoderMaxMemory(maxKernelSize))
		if err != nil {
			return nil, err
		}
		defer zr.Close()
		r = zr
	case "lz4":
		return unlz4Legacy(data)
	default:
		return nil, fmt.Errorf("%s is detected but not supported by this tool", name)
	}
	out, err := io.ReadAll(io.LimitReader(r, maxKernelSize+1))
	if err != nil {
		return nil, err
	}
	if len(out) > maxKernelSize {
		return nil, errors.New("output exceeds 1 GiB")
	}
	return out, nil
}

// lz4LegacyMagic starts every chunk sequence of the lz4 legacy frame
// format, which is what the kernel build produces with "lz4 -l".
const lz4LegacyMagic = 0x184c2102

// lz4LegacyBlockMax is the uncompressed size of each legacy-format block
// (the last one may be shorter).
const lz4LegacyBlockMax = 8 << 20

// unlz4Legacy decodes an lz4 legacy frame: the magic number, then blocks
// that are each a little-endian 32-bit compressed size followed by that
// many bytes of raw lz4 block data. Concatenated frames repeat the magic.
func unlz4Legacy(data []byte) ([]byte, error) {
	le := binary.LittleEndian
	if len(data) < 4 || le.Uint32(data) != lz4LegacyMagic {
		return nil, errors.New("lz4: missing legacy frame magic")
	}
	data = data[4:]
	var out []byte
	for len(data) > 0 {
		if len(data) < 4 {
			return nil, fmt.Errorf("lz4: %d stray bytes at end of stream", len(data))
		}
		n := le.Uint32(data)
		data = data[4:]
		if n == lz4LegacyMagic {
			continue // start of a concatenated frame
		}
		if uint64(n) > uint64(len(data)) {
			return nil, fmt.Errorf("lz4: block of %d bytes, only %d left", n, len(data))
		}
		var err error
		start := len(out)
		out, err = lz4Block(out, data[:n])
		if err != nil {
			return nil, err
		}
		if len(out)-start > lz4LegacyBlockMax {
			return nil, fmt.Errorf("lz4: block decoded to %d bytes, more than %d", len(out)-start, lz4LegacyBlockMax)
		}
		if len(out) > maxKernelSize {
			return nil, errors.New("lz4: output exceeds 1 GiB")
		}
		data = data[n:]
	}
	return out, nil
}

// lz4Block appends the decoding of one raw lz4 block to dst. Matches may
// refer back into anything already in dst, which covers both independent
// and linked blocks.
//
// A block is a run of sequences. Each starts with a token whose high
// nibble is the literal count and low nibble the match length minus 4
// (15 in either means more length bytes follow, each added until one is
// below 255). The literals come next, then, except in the last sequence,
// a little-endian 16-bit match offset.
func lz4Block(dst, src []byte) ([]byte, error) {
	i := 0
	readLen := func(n int) (int, error) {
		if n != 15 {
			return n, nil
		}
		for {
			if i >= len(src) {
				return 0, errors.New("lz4: truncated length")
			}
			b := src[i]
			i++
			n += int(b)
			if n > maxKernelSize {
				return 0, errors.New("lz4: length overflow")
			}
			if b != 255 {
				return n, nil
			}
		}
	}
	for {
		if i >= len(src) {
			return nil, errors.New("lz4: truncated block")
		}
		token := src[i]
		i++
		lit, err := readLen(int(token >> 4))
		if err != nil {
			return nil, err
		}
		if lit > len(src)-i {
			return nil, errors.New("lz4: literals run past end of block")
		}
		dst = append(dst, src[i:i+lit]...)
		i += lit
		if i == len(src) {
			return dst, nil // the last sequence has literals only
		}
		if len(src)-i < 2 {
			return nil, errors.New("lz4: truncated match offset")
		}
		offset := int(binary.LittleEndian.Uint16(src[i:]))
		i += 2
		if offset == 0 || offset > len(dst) {
			return nil, fmt.Errorf("lz4: match offset %d outside %d bytes of output", offset, len(dst))
		}
		mlen, err := readLen(int(token & 15))
		if err != nil {
			return nil, err
		}
		mlen += 4
		from := len(dst) - offset
		if offset >= mlen {
			dst = append(dst, dst[from:from+mlen]...)
		} else {
			// Overlapping copy: repeats the last offset bytes.
			for k := 0; k < mlen; k++ {
				dst = append(dst, dst[from+k])
			}
		}
	}
}

// pvhEntry checks that kernel is an x86-64 ELF executable and returns the
// address from its Xen PHYS32_ENTRY note, looked up in PT_NOTE segments.
func pvhEntry(kernel []byte) (uint64, error) {
	f, err := elf.NewFile(bytes.NewReader(kernel))
	if err != nil {
		return 0, fmt.Errorf("not an ELF file: %w", err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return 0, fmt.Errorf("ELF is %v %v, want ELFCLASS64 EM_X86_64", f.Class, f.Machine)
	}
	sawNote := false
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		sawNote = true
		notes, err := io.ReadAll(p.Open())
		if err != nil {
			return 0, fmt.Errorf("reading PT_NOTE segment: %w", err)
		}
		entry, ok, err := findNote(notes, f.ByteOrder, "Xen", xenElfnotePhys32Entry)
		if err != nil {
			return 0, err
		}
		if ok {
			return entry, nil
		}
	}
	if !sawNote {
		return 0, errors.New("ELF has no PT_NOTE segment, so no PVH entry note")
	}
	return 0, errors.New("no Xen ELF note of type 18 (XEN_ELFNOTE_PHYS32_ENTRY): kernel built without CONFIG_PVH cannot be booted through PVH")
}

// findNote walks a sequence of ELF notes and returns the descriptor of
// the first one with the given owner name and type, read as a 32- or
// 64-bit number.
func findNote(b []byte, bo binary.ByteOrder, name string, typ uint32) (uint64, bool, error) {
	align4 := func(n uint64) uint64 { return (n + 3) &^ 3 }
	for len(b) >= 12 {
		namesz := uint64(bo.Uint32(b[0:]))
		descsz := uint64(bo.Uint32(b[4:]))
		ntype := bo.Uint32(b[8:])
		b = b[12:]
		if align4(namesz)+align4(descsz) > uint64(len(b)) {
			return 0, false, errors.New("malformed ELF note")
		}
		n := string(bytes.TrimRight(b[:namesz], "\x00"))
		desc := b[align4(namesz) : align4(namesz)+descsz]
		b = b[align4(namesz)+align4(descsz):]
		if n != name || ntype != typ {
			continue
		}
		switch len(desc) {
		case 4:
			return uint64(bo.Uint32(desc)), true, nil
		case 8:
			return bo.Uint64(desc), true, nil
		default:
			return 0, false, fmt.Errorf("%s note type %d has a %d-byte descriptor", name, typ, len(desc))
		}
	}
	return 0, false, nil
}

// writeAtomic writes data to a temporary file beside path and renames it
// into place, so an interrupted run never leaves a truncated output.
func writeAtomic(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
