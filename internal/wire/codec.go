package wire

import (
	"encoding/binary"
	"fmt"
	"unicode"
	"unicode/utf8"
)

// Payload field encoding (docs/protocol.md, "Conventions"): little-endian
// integers; strings as a u16 byte length and UTF-8 bytes; byte strings as
// a u32 length and the bytes. Decoders ignore bytes after the fields they
// know (where later protocol versions append fields).

var le = binary.LittleEndian

func appendString(b []byte, s string) []byte {
	b = le.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func appendBytes(b []byte, p []byte) []byte {
	b = le.AppendUint32(b, uint32(len(p)))
	return append(b, p...)
}

// fields reads consecutive payload fields, remembering the first error.
type fields struct {
	p   []byte
	err error
}

func (f *fields) take(n int, what string) []byte {
	if f.err != nil {
		return nil
	}
	if n > len(f.p) {
		f.err = fmt.Errorf("payload ends in %s (%d bytes needed, %d left)", what, n, len(f.p))
		return nil
	}
	v := f.p[:n:n]
	f.p = f.p[n:]
	return v
}

func (f *fields) u8(what string) uint8 {
	if b := f.take(1, what); b != nil {
		return b[0]
	}
	return 0
}

func (f *fields) u16(what string) uint16 {
	if b := f.take(2, what); b != nil {
		return le.Uint16(b)
	}
	return 0
}

func (f *fields) u32(what string) uint32 {
	if b := f.take(4, what); b != nil {
		return le.Uint32(b)
	}
	return 0
}

func (f *fields) u64(what string) uint64 {
	if b := f.take(8, what); b != nil {
		return le.Uint64(b)
	}
	return 0
}

// str reads a u16-length string of at most max bytes; the length is
// checked before the bytes are taken.
func (f *fields) str(what string, max int) string {
	n := int(f.u16(what + " length"))
	if f.err != nil {
		return ""
	}
	if n > max {
		f.err = fmt.Errorf("%s of %d bytes, at most %d allowed", what, n, max)
		return ""
	}
	return string(f.take(n, what))
}

// bytes reads a u32-length byte string of at most max bytes (aliasing the
// payload).
func (f *fields) bytes(what string, max int) []byte {
	n := uint64(f.u32(what + " length"))
	if f.err != nil {
		return nil
	}
	if n > uint64(max) {
		f.err = fmt.Errorf("%s of %d bytes, at most %d allowed", what, n, max)
		return nil
	}
	return f.take(int(n), what)
}

// String kinds that checkString enforces.
type strKind int

const (
	kindText  strKind = iota // UTF-8 without control characters other than tab and newline
	kindName                 // UTF-8 without control characters
	kindToken                // ASCII lower-case letters, digits, '-', '.', '_'
)

// checkString validates a string field: its length (min..max bytes) and
// its characters.
func checkString(what, s string, min, max int, kind strKind) error {
	if len(s) < min || len(s) > max {
		if min == 1 && len(s) == 0 {
			return fmt.Errorf("%s is empty", what)
		}
		return fmt.Errorf("%s of %d bytes, %d to %d allowed", what, len(s), min, max)
	}
	if !utf8.ValidString(s) {
		return fmt.Errorf("%s is not UTF-8", what)
	}
	for _, r := range s {
		ok := true
		switch kind {
		case kindText:
			ok = !unicode.IsControl(r) || r == '\n' || r == '\t'
		case kindName:
			ok = !unicode.IsControl(r)
		case kindToken:
			ok = r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.' || r == '_'
		}
		if !ok {
			return fmt.Errorf("%s %q: character %q not allowed", what, s, r)
		}
	}
	return nil
}
