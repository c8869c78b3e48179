package state

import (
	"fmt"
	"hash/crc32"
)

// Magic opens every state stream.
const Magic = "FERRYST\x00"

// Sizes and limits of the encoding (docs/state-format.md, "Limits").
const (
	// PageSize is the size of a memory page record's data.
	PageSize = 4096

	prefixSize        = 16 // magic, version, header length
	headerFixedSize   = 64 // fixed part of the header body
	regionSize        = 24 // one memory region in the header
	sectionHeaderSize = 12 // type, flags, length
	crcSize           = 4

	// MaxHeaderLength bounds the header body.
	MaxHeaderLength = 64 << 10
	// MaxRegions bounds the number of memory regions in the header.
	MaxRegions = 64
	// MaxArchLength and MaxProducerLength bound the header's strings.
	MaxArchLength     = 32
	MaxProducerLength = 256
	// MaxCPUs bounds the header's vCPU count.
	MaxCPUs = 4096

	// MaxSectionLength bounds the stored length of every section other than
	// a memory chunk, and the decompressed length of a compressed one.
	MaxSectionLength = 16 << 20

	// ChunkPages is the largest number of page records in a memory chunk.
	ChunkPages = 256
	// pageRecordHeader is a page record's pfn and encoding byte.
	pageRecordHeader = 9
	// MaxChunkLength bounds a memory chunk's stored length and its payload
	// after decompression: the record count and ChunkPages raw pages.
	MaxChunkLength = 4 + ChunkPages*(pageRecordHeader+PageSize)

	// endPayloadSize is the length of the end section's payload.
	endPayloadSize = 20

	// MaxPCINameLength bounds a PCI slot's name.
	MaxPCINameLength = 256
	// MaxVirtioQueues bounds a virtio function's queue count.
	MaxVirtioQueues = 1024
	// MaxMSIXTableLength and MaxMSIXPBALength bound a virtio function's
	// MSI-X table and pending-bit array: 2048 vectors (the most MSI-X can
	// describe) of 16 bytes, and one bit per vector.
	MaxMSIXTableLength = 2048 * 16
	MaxMSIXPBALength   = 2048 / 8
	// MaxVirtioDeviceLength bounds a virtio device's own saved state.
	MaxVirtioDeviceLength = 64 << 10
)

// Section types.
const (
	SectionVCPU     uint16 = 0x0001
	SectionIRQChip  uint16 = 0x0002
	SectionPIT      uint16 = 0x0003
	SectionClock    uint16 = 0x0004
	SectionDevices  uint16 = 0x0005
	SectionPCI      uint16 = 0x0006
	SectionMemory   uint16 = 0x0010
	SectionEnd      uint16 = 0xFFFF
	sectionTestBase uint16 = 0x7000 // tests use types from here for unknown sections
)

// Section flags.
const (
	// SectionRequired marks a section a reader must understand: a reader
	// that does not know its type refuses the stream. Unknown sections
	// without it are skipped with a warning.
	SectionRequired uint16 = 1 << 0
	// SectionZstd says the payload is a zstd frame; the section's content
	// is its decompressed form.
	SectionZstd uint16 = 1 << 1
	// SectionLZ4 says the payload is the content's length (u32) followed
	// by one LZ4 block (the LZ4 block format, no frame) holding the
	// content.
	SectionLZ4 uint16 = 1 << 2

	sectionFlagsKnown = SectionRequired | SectionZstd | SectionLZ4
)

// Record tags inside vCPU, irqchip, PIT, clock and devices sections. Tags
// with bit 15 set are critical: a reader that does not know one refuses the
// section; other unknown tags are skipped with a warning.
const (
	tagCritical uint16 = 0x8000

	// vCPU section.
	TagRegs      uint16 = 0x0001
	TagSregs     uint16 = 0x0002
	TagSregs2    uint16 = 0x0003
	TagFPU       uint16 = 0x0004
	TagXSave     uint16 = 0x0005
	TagXCRs      uint16 = 0x0006
	TagMSRs      uint16 = 0x0007
	TagLAPIC     uint16 = 0x0008
	TagEvents    uint16 = 0x0009
	TagDebugRegs uint16 = 0x000A
	TagMPState   uint16 = 0x000B
	TagCPUID     uint16 = 0x000C
	TagTSCKHz    uint16 = 0x000D

	// irqchip section.
	TagPICMaster uint16 = 0x0001
	TagPICSlave  uint16 = 0x0002
	TagIOAPIC    uint16 = 0x0003

	// PIT section.
	TagPITState2 uint16 = 0x0001

	// clock section.
	TagClockData uint16 = 0x0001

	// devices section.
	TagSerial uint16 = 0x0001
	TagCMOS   uint16 = 0x0002
	TagI8042  uint16 = 0x0003
	TagPost   uint16 = 0x0004

	// PCI section. Unlike the other sections' records, slot and virtio
	// records repeat: one per slot, one per virtio function.
	TagPCIBus    uint16 = 0x0001
	TagPCISlot   uint16 = 0x0002
	TagPCIVirtio uint16 = 0x0003
)

// Page record encodings inside a memory chunk.
const (
	PageZero uint8 = 0 // the page is all zeros; no data follows
	PageRaw  uint8 = 1 // PageSize bytes of data follow
	// PageDelta: a u16 length L (at most MaxDeltaLength) and L bytes of
	// xbzrle delta, applied to the receiver's current content of the page.
	PageDelta uint8 = 2
	// PageDup: a u64 page frame number; the page becomes a copy of the
	// receiver's current content of that page.
	PageDup uint8 = 3
)

// MaxDeltaLength bounds a delta record's data, so that a delta record is
// never longer than a raw one (and a chunk of ChunkPages records of any
// encoding fits in MaxChunkLength).
const MaxDeltaLength = PageSize - 2

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// sectionTypeName names a section type for messages.
func sectionTypeName(t uint16) string {
	switch t {
	case SectionVCPU:
		return "vcpu"
	case SectionIRQChip:
		return "irqchip"
	case SectionPIT:
		return "pit"
	case SectionClock:
		return "clock"
	case SectionDevices:
		return "devices"
	case SectionPCI:
		return "pci"
	case SectionMemory:
		return "memory chunk"
	case SectionEnd:
		return "end"
	}
	return fmt.Sprintf("type %#04x", t)
}

// FormatError reports a stream that is not a valid state encoding: corrupt,
// truncated, of another version or with a required part this reader does
// not understand. Its message names the part that is wrong.
type FormatError struct {
	// Section is the index of the offending section, counting from 0 after
	// the file header; -1 for the file header itself.
	Section int
	// Name describes the part: "header", "vcpu 1", "memory chunk", ...
	Name string
	// Offset is the byte offset in the stream at which the problem was
	// found (for truncation: how many bytes there were).
	Offset int64
	// Truncated is set when the stream ended early.
	Truncated bool
	// Msg says what is wrong.
	Msg string
}

func (e *FormatError) Error() string {
	switch {
	case e.Truncated && e.Section < 0:
		return fmt.Sprintf("state file: truncated in the header at byte %d", e.Offset)
	case e.Truncated && e.Name == "":
		return fmt.Sprintf("state file: truncated before section %d at byte %d (end section missing)", e.Section, e.Offset)
	case e.Truncated:
		return fmt.Sprintf("state file: truncated in section %d (%s) at byte %d", e.Section, e.Name, e.Offset)
	case e.Section < 0 && e.Name == "":
		return "state file: " + e.Msg
	case e.Section < 0:
		return fmt.Sprintf("state file: %s: %s", e.Name, e.Msg)
	}
	return fmt.Sprintf("state file: section %d (%s): %s", e.Section, e.Name, e.Msg)
}
