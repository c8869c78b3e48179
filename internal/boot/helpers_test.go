package boot

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/ferry-vmm/ferry/internal/guestmem"
)

func newMem(t testing.TB, size uint64) *guestmem.Memory {
	t.Helper()
	m, err := guestmem.New(size)
	if err != nil {
		t.Fatalf("guestmem.New(%d): %v", size, err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func read(t testing.TB, m *guestmem.Memory, gpa, n uint64) []byte {
	t.Helper()
	b, err := m.Slice(gpa, n)
	if err != nil {
		t.Fatalf("reading guest memory [%#x,+%#x): %v", gpa, n, err)
	}
	return b
}

func wantErr(t testing.TB, err error, substr string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one containing %q", substr)
	}
	if !strings.Contains(err.Error(), substr) {
		t.Fatalf("error %q does not contain %q", err, substr)
	}
}

// note builds one ELF note with 4-byte padding.
func note(name string, typ uint32, desc []byte) []byte {
	var b bytes.Buffer
	nm := append([]byte(name), 0)
	binary.Write(&b, binary.LittleEndian, uint32(len(nm)))
	binary.Write(&b, binary.LittleEndian, uint32(len(desc)))
	binary.Write(&b, binary.LittleEndian, typ)
	b.Write(nm)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	b.Write(desc)
	for b.Len()%4 != 0 {
		b.WriteByte(0)
	}
	return b.Bytes()
}

// pvhNote is a XEN_ELFNOTE_PHYS32_ENTRY note with a size-byte value.
func pvhNote(entry uint64, size int) []byte {
	d := make([]byte, size)
	switch size {
	case 4:
		binary.LittleEndian.PutUint32(d, uint32(entry))
	case 8:
		binary.LittleEndian.PutUint64(d, entry)
	}
	return note("Xen", 18, d)
}

type elfSeg struct {
	paddr uint64
	data  []byte
	memsz uint64 // 0: len(data)
}

type elfSpec struct {
	class       int // 32 or 64
	etype       uint16
	machine     uint16
	segs        []elfSeg
	notes       []byte // contents of the notes; nil for none
	noteSection bool   // notes as an SHT_NOTE section instead of PT_NOTE
}

// buildELF writes a little-endian x86 ELF executable: header, program
// headers, notes, segment data, and optionally a section header table.
func buildELF(s elfSpec) []byte {
	if s.class == 0 {
		s.class = 64
	}
	if s.etype == 0 {
		s.etype = etExec
	}
	if s.machine == 0 {
		s.machine = emX86_64
		if s.class == 32 {
			s.machine = em386
		}
	}
	ehsize, phsize, shsize := 64, 56, 64
	if s.class == 32 {
		ehsize, phsize, shsize = 52, 32, 40
	}
	nph := len(s.segs)
	if s.notes != nil && !s.noteSection {
		nph++
	}
	off := ehsize + nph*phsize
	notesOff := off
	off += len(s.notes)
	off = (off + 15) &^ 15
	segOffs := make([]int, len(s.segs))
	for i, sg := range s.segs {
		segOffs[i] = off
		off += len(sg.data)
		off = (off + 15) &^ 15
	}
	shoff := 0
	nsh := 0
	if s.notes != nil && s.noteSection {
		shoff = off
		nsh = 2 // null + note
		off += nsh * shsize
	}
	b := make([]byte, off)
	le := binary.LittleEndian
	copy(b, "\x7fELF")
	b[4] = byte(s.class / 32)
	b[5] = 1
	b[6] = 1
	le.PutUint16(b[16:], s.etype)
	le.PutUint16(b[18:], s.machine)
	le.PutUint32(b[20:], 1)
	if s.class == 64 {
		le.PutUint64(b[32:], uint64(ehsize))
		le.PutUint64(b[40:], uint64(shoff))
		le.PutUint16(b[52:], uint16(ehsize))
		le.PutUint16(b[54:], uint16(phsize))
		le.PutUint16(b[56:], uint16(nph))
		le.PutUint16(b[58:], uint16(shsize))
		le.PutUint16(b[60:], uint16(nsh))
	} else {
		le.PutUint32(b[28:], uint32(ehsize))
		le.PutUint32(b[32:], uint32(shoff))
		le.PutUint16(b[40:], uint16(ehsize))
		le.PutUint16(b[42:], uint16(phsize))
		le.PutUint16(b[44:], uint16(nph))
		le.PutUint16(b[46:], uint16(shsize))
		le.PutUint16(b[48:], uint16(nsh))
	}
	ph := func(i int, typ uint32, off, paddr, filesz, memsz, align uint64) {
		p := b[ehsize+i*phsize:]
		if s.class == 64 {
			le.PutUint32(p[0:], typ)
			le.PutUint32(p[4:], 7)
			le.PutUint64(p[8:], off)
			le.PutUint64(p[16:], paddr|0xffffffff80000000)
			le.PutUint64(p[24:], paddr)
			le.PutUint64(p[32:], filesz)
			le.PutUint64(p[40:], memsz)
			le.PutUint64(p[48:], align)
		} else {
			le.PutUint32(p[0:], typ)
			le.PutUint32(p[4:], uint32(off))
			le.PutUint32(p[8:], uint32(paddr))
			le.PutUint32(p[12:], uint32(paddr))
			le.PutUint32(p[16:], uint32(filesz))
			le.PutUint32(p[20:], uint32(memsz))
			le.PutUint32(p[24:], 7)
			le.PutUint32(p[28:], uint32(align))
		}
	}
	for i, sg := range s.segs {
		memsz := sg.memsz
		if memsz == 0 {
			memsz = uint64(len(sg.data))
		}
		ph(i, ptLoad, uint64(segOffs[i]), sg.paddr, uint64(len(sg.data)), memsz, 0x1000)
		copy(b[segOffs[i]:], sg.data)
	}
	copy(b[notesOff:], s.notes)
	if s.notes != nil && !s.noteSection {
		ph(len(s.segs), ptNote, uint64(notesOff), 0, uint64(len(s.notes)), uint64(len(s.notes)), 4)
	}
	if s.notes != nil && s.noteSection {
		sh := b[shoff+shsize:]
		le.PutUint32(sh[4:], shtNote)
		if s.class == 64 {
			le.PutUint64(sh[24:], uint64(notesOff))
			le.PutUint64(sh[32:], uint64(len(s.notes)))
			le.PutUint64(sh[48:], 4)
		} else {
			le.PutUint32(sh[16:], uint32(notesOff))
			le.PutUint32(sh[20:], uint32(len(s.notes)))
			le.PutUint32(sh[32:], 4)
		}
	}
	return b
}

// pattern returns n bytes of a recognisable non-zero pattern.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed | 1
	}
	return b
}

// simpleELF is a valid PVH kernel: text at 1 MiB with the entry at
// 1 MiB + 0x10, data+bss at 2 MiB.
func simpleELF(class int) []byte {
	size := 8
	if class == 32 {
		size = 4
	}
	return buildELF(elfSpec{
		class: class,
		segs: []elfSeg{
			{paddr: 0x100000, data: pattern(0x3000, 0x11)},
			{paddr: 0x200000, data: pattern(0x800, 0x22), memsz: 0x5000},
		},
		notes: append(note("Linux", 1, []byte("6.1\x00")), pvhNote(0x100010, size)...),
	})
}

type bzSpec struct {
	version     uint16
	setupSects  uint8
	jump        uint8 // header end = 0x202 + jump
	loadflags   uint8
	xloadflags  uint16
	relocatable bool
	align       uint32
	pref        uint64
	initSize    uint32
	cmdlineSize uint32
	initrdMax   uint32
	kernel      []byte
}

func defaultBz() bzSpec {
	return bzSpec{
		version:     0x020F,
		setupSects:  3,
		jump:        0x6A,
		loadflags:   lfLoadedHigh,
		xloadflags:  0x7F,
		relocatable: true,
		align:       0x200000,
		pref:        0x1000000,
		initSize:    0x400000,
		cmdlineSize: 0x7FF,
		initrdMax:   0x7FFFFFFF,
		kernel:      pattern(0x4000, 0x33),
	}
}

func buildBz(s bzSpec) []byte {
	sects := int(s.setupSects)
	if sects == 0 {
		sects = 4
	}
	b := make([]byte, (sects+1)*512, (sects+1)*512+len(s.kernel))
	for i := 0; i < 0x1F1; i++ {
		b[i] = 0xCC // boot sector filler; must not leak into the zero page
	}
	le := binary.LittleEndian
	b[0x1F1] = s.setupSects
	le.PutUint16(b[0x1F4:], uint16(len(s.kernel)/16))
	le.PutUint16(b[0x1FA:], 0xFFFF) // vid_mode
	b[0x1FE], b[0x1FF] = 0x55, 0xAA
	b[0x200], b[0x201] = 0xEB, s.jump
	copy(b[0x202:], "HdrS")
	le.PutUint16(b[0x206:], s.version)
	b[0x211] = s.loadflags
	le.PutUint32(b[0x214:], 0x100000)
	le.PutUint16(b[0x224:], 0x1234) // heap_end_ptr, to be replaced
	le.PutUint32(b[0x22C:], s.initrdMax)
	le.PutUint32(b[0x230:], s.align)
	if s.relocatable {
		b[0x234] = 1
	}
	b[0x235] = 21
	le.PutUint16(b[0x236:], s.xloadflags)
	le.PutUint32(b[0x238:], s.cmdlineSize)
	le.PutUint64(b[0x250:], 0xDEADBEEF) // setup_data garbage, must be cleared
	le.PutUint64(b[0x258:], s.pref)
	le.PutUint32(b[0x260:], s.initSize)
	return append(b, s.kernel...)
}
