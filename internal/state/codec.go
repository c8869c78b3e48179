package state

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/ferry-vmm/ferry/internal/devices"
	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/kvm"
)

// This file encodes and decodes section payloads. Fixed-size KVM structures
// are stored exactly as the kernel lays them out (little-endian, padding and
// reserved fields written as zeros and ignored when read); everything else
// is encoded field by field as documented in docs/state-format.md.

var le = binary.LittleEndian

// Encoded sizes of the fixed-size KVM structures (equal to the kernel's
// sizeof; see TestStructSizes).
var (
	sizeRegs      = binary.Size(kvm.Regs{})
	sizeSregs     = binary.Size(kvm.Sregs{})
	sizeSregs2    = binary.Size(kvm.Sregs2{})
	sizeFPU       = binary.Size(kvm.FPU{})
	sizeXCRs      = binary.Size(kvm.XCRs{})
	sizeLAPIC     = binary.Size(kvm.LAPICState{})
	sizeEvents    = binary.Size(kvm.VCPUEvents{})
	sizeDebugRegs = binary.Size(kvm.DebugRegs{})
	sizeMPState   = binary.Size(kvm.MPState{})
	sizePIC       = binary.Size(kvm.PICState{})
	sizeIOAPIC    = binary.Size(kvm.IOAPICState{})
	sizePIT       = binary.Size(kvm.PITState2{})
	sizeClock     = binary.Size(kvm.ClockData{})
)

const (
	msrEntrySize = 12  // index uint32, data uint64
	cmosSize     = 138 // index, nmi_disabled, ram[128], clock_offset
	postSize     = 9   // last, writes
)

// appendStruct appends the little-endian encoding of a fixed-size struct.
func appendStruct(b []byte, v any) []byte {
	out, err := binary.Append(b, le, v)
	if err != nil {
		// Only reachable with a type that is not fixed-size: a bug here.
		panic(fmt.Sprintf("state: encoding %T: %v", v, err))
	}
	return out
}

// decodeStruct fills v from data, which must be exactly its encoded size.
func decodeStruct(data []byte, v any, want int) error {
	if len(data) != want {
		return fmt.Errorf("length %d, expected %d", len(data), want)
	}
	if _, err := binary.Decode(data, le, v); err != nil {
		return err
	}
	return nil
}

// appendRecord appends a tag/length/value record whose value is produced by
// f appending to the buffer.
func appendRecord(b []byte, tag uint16, f func([]byte) []byte) []byte {
	b = le.AppendUint16(b, tag)
	at := len(b)
	b = append(b, 0, 0, 0, 0)
	b = f(b)
	le.PutUint32(b[at:], uint32(len(b)-at-4))
	return b
}

func appendBool(b []byte, v bool) []byte {
	if v {
		return append(b, 1)
	}
	return append(b, 0)
}

// recordSet is the result of splitting a payload into records: the records
// known to the caller, keyed by tag, and warnings for skipped unknown ones.
type recordSet struct {
	byTag    map[uint16][]byte
	warnings []string
}

// splitRecords parses a sequence of records. names maps the known tags to
// their names; an unknown critical tag is an error, other unknown tags are
// skipped with a warning; a known tag may appear once.
func splitRecords(p []byte, names map[uint16]string) (recordSet, error) {
	rs := recordSet{byTag: make(map[uint16][]byte, len(names))}
	for off := 0; off < len(p); {
		if len(p)-off < 6 {
			return rs, fmt.Errorf("record at payload offset %d: %d bytes left, a record header needs 6", off, len(p)-off)
		}
		tag := le.Uint16(p[off:])
		n := uint64(le.Uint32(p[off+2:]))
		off += 6
		if n > uint64(len(p)-off) {
			return rs, fmt.Errorf("record %s: length %d exceeds the %d bytes left in the section", tagName(tag, names), n, len(p)-off)
		}
		data := p[off : off+int(n)]
		off += int(n)
		if _, ok := names[tag]; !ok {
			if tag&tagCritical != 0 {
				return rs, fmt.Errorf("critical record tag %#04x unknown", tag)
			}
			rs.warnings = append(rs.warnings, fmt.Sprintf("skipped unknown record tag %#04x (%d bytes)", tag, n))
			continue
		}
		if _, dup := rs.byTag[tag]; dup {
			return rs, fmt.Errorf("record %s appears twice", tagName(tag, names))
		}
		rs.byTag[tag] = data
	}
	return rs, nil
}

func tagName(tag uint16, names map[uint16]string) string {
	if n, ok := names[tag]; ok {
		return fmt.Sprintf("%#04x (%s)", tag, n)
	}
	return fmt.Sprintf("%#04x", tag)
}

// need fetches a required record.
func (rs recordSet) need(tag uint16, names map[uint16]string) ([]byte, error) {
	d, ok := rs.byTag[tag]
	if !ok {
		return nil, fmt.Errorf("required record %s missing", tagName(tag, names))
	}
	return d, nil
}

// fixed decodes a required fixed-size record into v.
func (rs recordSet) fixed(tag uint16, names map[uint16]string, v any, size int) error {
	d, err := rs.need(tag, names)
	if err != nil {
		return err
	}
	if err := decodeStruct(d, v, size); err != nil {
		return fmt.Errorf("record %s: %v", tagName(tag, names), err)
	}
	return nil
}

// ---- header ----

func encodeHeader(h *Header) []byte {
	b := make([]byte, 0, headerFixedSize+len(h.Regions)*regionSize+4+len(h.Arch)+len(h.Producer))
	b = le.AppendUint32(b, h.CPUs)
	b = le.AppendUint32(b, uint32(len(h.Regions)))
	b = le.AppendUint64(b, h.Flags)
	b = le.AppendUint64(b, h.MemSize)
	b = le.AppendUint64(b, uint64(h.CreatedUnixNano))
	b = append(b, h.CPUIDFingerprint[:]...)
	for _, r := range h.Regions {
		b = le.AppendUint64(b, r.GPA)
		b = le.AppendUint64(b, r.Size)
		b = le.AppendUint64(b, r.Offset)
	}
	b = le.AppendUint16(b, uint16(len(h.Arch)))
	b = append(b, h.Arch...)
	b = le.AppendUint16(b, uint16(len(h.Producer)))
	b = append(b, h.Producer...)
	return b
}

// decodeHeader parses a header body. Bytes after the known fields are
// ignored (room for compatible additions).
func decodeHeader(p []byte) (Header, error) {
	var h Header
	if len(p) < headerFixedSize {
		return h, fmt.Errorf("header length %d, at least %d expected", len(p), headerFixedSize)
	}
	h.CPUs = le.Uint32(p[0:])
	nreg := le.Uint32(p[4:])
	h.Flags = le.Uint64(p[8:])
	h.MemSize = le.Uint64(p[16:])
	h.CreatedUnixNano = int64(le.Uint64(p[24:]))
	copy(h.CPUIDFingerprint[:], p[32:64])
	p = p[headerFixedSize:]
	if nreg > MaxRegions {
		return h, fmt.Errorf("%d memory regions, at most %d allowed", nreg, MaxRegions)
	}
	if uint64(len(p)) < uint64(nreg)*regionSize {
		return h, fmt.Errorf("%d memory regions do not fit in the header", nreg)
	}
	h.Regions = make([]guestmem.Region, nreg)
	for i := range h.Regions {
		h.Regions[i] = guestmem.Region{GPA: le.Uint64(p), Size: le.Uint64(p[8:]), Offset: le.Uint64(p[16:])}
		p = p[regionSize:]
	}
	var err error
	if h.Arch, p, err = headerString(p, "architecture", MaxArchLength); err != nil {
		return h, err
	}
	if h.Producer, _, err = headerString(p, "producer", MaxProducerLength); err != nil {
		return h, err
	}
	return h, nil
}

func headerString(p []byte, what string, max int) (string, []byte, error) {
	if len(p) < 2 {
		return "", p, fmt.Errorf("%s string does not fit in the header", what)
	}
	n := int(le.Uint16(p))
	p = p[2:]
	if n > max {
		return "", p, fmt.Errorf("%s string of %d bytes, at most %d allowed", what, n, max)
	}
	if n > len(p) {
		return "", p, fmt.Errorf("%s string does not fit in the header", what)
	}
	s := string(p[:n])
	if !utf8.ValidString(s) {
		return "", p, fmt.Errorf("%s string is not UTF-8", what)
	}
	return s, p[n:], nil
}

// validateHeader checks what every stream's header must satisfy, for
// writers and readers alike.
func validateHeader(h *Header) error {
	if h.Arch != ArchX86_64 {
		return fmt.Errorf("architecture %q not supported (this ferry reads %q)", h.Arch, ArchX86_64)
	}
	if len(h.Producer) > MaxProducerLength || !utf8.ValidString(h.Producer) {
		return fmt.Errorf("producer string must be UTF-8 of at most %d bytes", MaxProducerLength)
	}
	if h.CPUs == 0 || h.CPUs > MaxCPUs {
		return fmt.Errorf("%d vCPUs, 1 to %d allowed", h.CPUs, MaxCPUs)
	}
	if unknown := h.Flags & flagsIncompatible &^ flagsKnown; unknown != 0 {
		return fmt.Errorf("incompatible feature flags %#x not supported", unknown)
	}
	if len(h.Regions) == 0 || len(h.Regions) > MaxRegions {
		return fmt.Errorf("%d memory regions, 1 to %d allowed", len(h.Regions), MaxRegions)
	}
	var total uint64
	for i, r := range h.Regions {
		switch {
		case r.Size == 0 || r.GPA%PageSize != 0 || r.Size%PageSize != 0 || r.Offset%PageSize != 0:
			return fmt.Errorf("memory region %d (gpa %#x size %#x offset %#x) is empty or not page-aligned", i, r.GPA, r.Size, r.Offset)
		case r.GPA+r.Size < r.GPA || r.Offset+r.Size < r.Offset:
			return fmt.Errorf("memory region %d (gpa %#x size %#x offset %#x) overflows", i, r.GPA, r.Size, r.Offset)
		case i > 0 && r.GPA < h.Regions[i-1].GPA+h.Regions[i-1].Size:
			return fmt.Errorf("memory region %d (gpa %#x) overlaps or precedes region %d", i, r.GPA, i-1)
		case r.Offset+r.Size > h.MemSize:
			return fmt.Errorf("memory region %d (offset %#x size %#x) lies beyond the memory size %#x", i, r.Offset, r.Size, h.MemSize)
		}
		total += r.Size
	}
	if total != h.MemSize {
		return fmt.Errorf("memory regions total %#x bytes, memory size is %#x", total, h.MemSize)
	}
	return nil
}

// regionOf returns the index of the region holding gpa's page, or -1.
func regionOf(regions []guestmem.Region, gpa uint64) int {
	for i, r := range regions {
		if gpa >= r.GPA && gpa-r.GPA < r.Size {
			return i
		}
	}
	return -1
}

// ---- vCPU ----

var vcpuTags = map[uint16]string{
	TagRegs: "regs", TagSregs: "sregs", TagSregs2: "sregs2", TagFPU: "fpu",
	TagXSave: "xsave", TagXCRs: "xcrs", TagMSRs: "msrs", TagLAPIC: "lapic",
	TagEvents: "events", TagDebugRegs: "debugregs", TagMPState: "mp_state",
	TagCPUID: "cpuid", TagTSCKHz: "tsc_khz",
}

// sortedMSRs returns v's MSRs sorted by index, or an error for duplicates.
func sortedMSRs(msrs []kvm.MSREntry) ([]kvm.MSREntry, error) {
	s := slices.Clone(msrs)
	slices.SortStableFunc(s, func(a, b kvm.MSREntry) int {
		switch {
		case a.Index < b.Index:
			return -1
		case a.Index > b.Index:
			return 1
		}
		return 0
	})
	for i := 1; i < len(s); i++ {
		if s[i].Index == s[i-1].Index {
			return nil, fmt.Errorf("MSR %#x listed twice", s[i].Index)
		}
	}
	return s, nil
}

func encodeVCPU(b []byte, v *VCPU) ([]byte, error) {
	msrs, err := sortedMSRs(v.MSRs)
	if err != nil {
		return nil, fmt.Errorf("vcpu %d: %v", v.ID, err)
	}
	if uint64(len(v.XSave)) > MaxSectionLength/2 {
		return nil, fmt.Errorf("vcpu %d: XSAVE area of %d bytes is too large", v.ID, len(v.XSave))
	}
	if len(v.CPUID) > 4096 {
		return nil, fmt.Errorf("vcpu %d: %d CPUID entries, at most 4096", v.ID, len(v.CPUID))
	}
	if len(v.MSRs) > 65536 {
		return nil, fmt.Errorf("vcpu %d: %d MSRs, at most 65536", v.ID, len(v.MSRs))
	}
	b = le.AppendUint32(b, v.ID)
	b = appendRecord(b, TagRegs, func(b []byte) []byte { return appendStruct(b, &v.Regs) })
	b = appendRecord(b, TagSregs, func(b []byte) []byte { return appendStruct(b, &v.Sregs) })
	if v.Sregs2 != nil {
		b = appendRecord(b, TagSregs2, func(b []byte) []byte { return appendStruct(b, v.Sregs2) })
	}
	b = appendRecord(b, TagFPU, func(b []byte) []byte { return appendStruct(b, &v.FPU) })
	if len(v.XSave) > 0 {
		b = appendRecord(b, TagXSave, func(b []byte) []byte { return append(b, v.XSave...) })
	}
	b = appendRecord(b, TagXCRs, func(b []byte) []byte { return appendStruct(b, &v.XCRs) })
	b = appendRecord(b, TagMSRs, func(b []byte) []byte {
		for _, e := range msrs {
			b = le.AppendUint32(b, e.Index)
			b = le.AppendUint64(b, e.Data)
		}
		return b
	})
	b = appendRecord(b, TagLAPIC, func(b []byte) []byte { return appendStruct(b, &v.LAPIC) })
	b = appendRecord(b, TagEvents, func(b []byte) []byte { return appendStruct(b, &v.Events) })
	b = appendRecord(b, TagDebugRegs, func(b []byte) []byte { return appendStruct(b, &v.DebugRegs) })
	b = appendRecord(b, TagMPState, func(b []byte) []byte { return appendStruct(b, &v.MPState) })
	b = appendRecord(b, TagCPUID, func(b []byte) []byte {
		for _, e := range v.CPUID {
			b = appendCPUIDEntry(b, e)
		}
		return b
	})
	b = appendRecord(b, TagTSCKHz, func(b []byte) []byte { return le.AppendUint32(b, v.TSCKHz) })
	return b, nil
}

// vcpuID reads the id at the start of a vCPU payload (for messages).
func vcpuID(p []byte) (uint32, bool) {
	if len(p) < 4 {
		return 0, false
	}
	return le.Uint32(p), true
}

func decodeVCPU(p []byte) (VCPU, []string, error) {
	var v VCPU
	id, ok := vcpuID(p)
	if !ok {
		return v, nil, errors.New("payload too short for the vCPU id")
	}
	v.ID = id
	rs, err := splitRecords(p[4:], vcpuTags)
	if err != nil {
		return v, nil, err
	}
	names := vcpuTags
	for _, f := range []struct {
		tag  uint16
		v    any
		size int
	}{
		{TagRegs, &v.Regs, sizeRegs},
		{TagSregs, &v.Sregs, sizeSregs},
		{TagFPU, &v.FPU, sizeFPU},
		{TagXCRs, &v.XCRs, sizeXCRs},
		{TagLAPIC, &v.LAPIC, sizeLAPIC},
		{TagEvents, &v.Events, sizeEvents},
		{TagDebugRegs, &v.DebugRegs, sizeDebugRegs},
		{TagMPState, &v.MPState, sizeMPState},
	} {
		if err := rs.fixed(f.tag, names, f.v, f.size); err != nil {
			return v, nil, err
		}
	}
	if d, ok := rs.byTag[TagSregs2]; ok {
		v.Sregs2 = new(kvm.Sregs2)
		if err := decodeStruct(d, v.Sregs2, sizeSregs2); err != nil {
			return v, nil, fmt.Errorf("record %s: %v", tagName(TagSregs2, names), err)
		}
	}
	if d, ok := rs.byTag[TagXSave]; ok {
		if len(d) == 0 {
			return v, nil, fmt.Errorf("record %s is empty", tagName(TagXSave, names))
		}
		v.XSave = slices.Clone(d)
	}
	d, err := rs.need(TagMSRs, names)
	if err != nil {
		return v, nil, err
	}
	if len(d)%msrEntrySize != 0 {
		return v, nil, fmt.Errorf("record %s: length %d is not a multiple of %d", tagName(TagMSRs, names), len(d), msrEntrySize)
	}
	if len(d) > 0 {
		v.MSRs = make([]kvm.MSREntry, len(d)/msrEntrySize)
	}
	for i := range v.MSRs {
		e := d[i*msrEntrySize:]
		v.MSRs[i] = kvm.MSREntry{Index: le.Uint32(e), Data: le.Uint64(e[4:])}
		if i > 0 && v.MSRs[i].Index <= v.MSRs[i-1].Index {
			return v, nil, fmt.Errorf("record %s: MSR %#x follows %#x: not in ascending order", tagName(TagMSRs, names), v.MSRs[i].Index, v.MSRs[i-1].Index)
		}
	}
	if d, err = rs.need(TagCPUID, names); err != nil {
		return v, nil, err
	}
	if len(d)%cpuidEntrySize != 0 {
		return v, nil, fmt.Errorf("record %s: length %d is not a multiple of %d", tagName(TagCPUID, names), len(d), cpuidEntrySize)
	}
	if len(d) > 0 {
		v.CPUID = make([]kvm.CPUIDEntry, len(d)/cpuidEntrySize)
	}
	for i := range v.CPUID {
		e := d[i*cpuidEntrySize:]
		v.CPUID[i] = kvm.CPUIDEntry{
			Function: le.Uint32(e), Index: le.Uint32(e[4:]), Flags: le.Uint32(e[8:]),
			EAX: le.Uint32(e[12:]), EBX: le.Uint32(e[16:]), ECX: le.Uint32(e[20:]), EDX: le.Uint32(e[24:]),
		}
	}
	if d, err = rs.need(TagTSCKHz, names); err != nil {
		return v, nil, err
	}
	if len(d) != 4 {
		return v, nil, fmt.Errorf("record %s: length %d, expected 4", tagName(TagTSCKHz, names), len(d))
	}
	v.TSCKHz = le.Uint32(d)
	return v, rs.warnings, nil
}

// ---- irqchip, PIT, clock ----

var irqchipTags = map[uint16]string{TagPICMaster: "pic master", TagPICSlave: "pic slave", TagIOAPIC: "ioapic"}

func encodeIRQChip(b []byte, m *Machine) []byte {
	b = appendRecord(b, TagPICMaster, func(b []byte) []byte { return appendStruct(b, &m.PIC[0]) })
	b = appendRecord(b, TagPICSlave, func(b []byte) []byte { return appendStruct(b, &m.PIC[1]) })
	return appendRecord(b, TagIOAPIC, func(b []byte) []byte { return appendStruct(b, &m.IOAPIC) })
}

func decodeIRQChip(p []byte, m *Machine) ([]string, error) {
	rs, err := splitRecords(p, irqchipTags)
	if err != nil {
		return nil, err
	}
	var pic [2]kvm.PICState
	var ioapic kvm.IOAPICState
	if err := rs.fixed(TagPICMaster, irqchipTags, &pic[0], sizePIC); err != nil {
		return nil, err
	}
	if err := rs.fixed(TagPICSlave, irqchipTags, &pic[1], sizePIC); err != nil {
		return nil, err
	}
	if err := rs.fixed(TagIOAPIC, irqchipTags, &ioapic, sizeIOAPIC); err != nil {
		return nil, err
	}
	m.PIC, m.IOAPIC = pic, ioapic
	return rs.warnings, nil
}

var pitTags = map[uint16]string{TagPITState2: "pit_state2"}

func encodePIT(b []byte, m *Machine) []byte {
	return appendRecord(b, TagPITState2, func(b []byte) []byte { return appendStruct(b, &m.PIT) })
}

func decodePIT(p []byte, m *Machine) ([]string, error) {
	rs, err := splitRecords(p, pitTags)
	if err != nil {
		return nil, err
	}
	var pit kvm.PITState2
	if err := rs.fixed(TagPITState2, pitTags, &pit, sizePIT); err != nil {
		return nil, err
	}
	m.PIT = pit
	return rs.warnings, nil
}

var clockTags = map[uint16]string{TagClockData: "clock_data"}

func encodeClock(b []byte, m *Machine) []byte {
	return appendRecord(b, TagClockData, func(b []byte) []byte { return appendStruct(b, &m.Clock) })
}

func decodeClock(p []byte, m *Machine) ([]string, error) {
	rs, err := splitRecords(p, clockTags)
	if err != nil {
		return nil, err
	}
	var c kvm.ClockData
	if err := rs.fixed(TagClockData, clockTags, &c, sizeClock); err != nil {
		return nil, err
	}
	m.Clock = c
	return rs.warnings, nil
}

// ---- devices ----

var deviceTags = map[uint16]string{TagSerial: "serial", TagCMOS: "cmos", TagI8042: "i8042", TagPost: "post"}

func encodeDevices(b []byte, d *Devices) ([]byte, error) {
	s := &d.Serial
	if len(s.RXFIFO) > 1<<20 || len(s.Backlog) > 1<<20 {
		return nil, fmt.Errorf("serial state: %d FIFO and %d backlog bytes, at most 1 MiB each", len(s.RXFIFO), len(s.Backlog))
	}
	if len(d.I8042.Output) > 1<<20 {
		return nil, fmt.Errorf("i8042 state: %d output bytes, at most 1 MiB", len(d.I8042.Output))
	}
	b = appendRecord(b, TagSerial, func(b []byte) []byte {
		b = append(b, s.IER, s.FCR, s.LCR, s.MCR, s.LSR, s.MSR, s.SCR, s.DLL, s.DLM)
		b = appendBool(b, s.THREPending)
		b = le.AppendUint64(b, s.Dropped)
		b = le.AppendUint64(b, s.WriteErrors)
		b = le.AppendUint32(b, uint32(len(s.RXFIFO)))
		b = append(b, s.RXFIFO...)
		b = le.AppendUint32(b, uint32(len(s.Backlog)))
		return append(b, s.Backlog...)
	})
	c := &d.CMOS
	b = appendRecord(b, TagCMOS, func(b []byte) []byte {
		b = append(b, c.Index)
		b = appendBool(b, c.NMIDisabled)
		b = append(b, c.RAM[:]...)
		return le.AppendUint64(b, uint64(c.ClockOffset))
	})
	k := &d.I8042
	b = appendRecord(b, TagI8042, func(b []byte) []byte {
		b = append(b, k.CTR, k.OutputPort)
		b = appendBool(b, k.LastWasCommand)
		b = append(b, k.PendingCommand, k.LastData)
		b = le.AppendUint64(b, k.Resets)
		b = le.AppendUint64(b, k.Dropped)
		b = le.AppendUint32(b, uint32(len(k.Output)))
		for _, o := range k.Output {
			b = append(b, o.Value)
			b = appendBool(b, o.Aux)
		}
		return b
	})
	b = appendRecord(b, TagPost, func(b []byte) []byte {
		b = append(b, d.Post.Last)
		return le.AppendUint64(b, d.Post.Writes)
	})
	return b, nil
}

// fieldReader reads consecutive fields of a record, remembering the first
// error.
type fieldReader struct {
	p   []byte
	err error
}

func (r *fieldReader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.p) {
		r.err = fmt.Errorf("%d bytes needed, %d left", n, len(r.p))
		return nil
	}
	v := r.p[:n]
	r.p = r.p[n:]
	return v
}

func (r *fieldReader) u8() uint8 {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *fieldReader) boolean() bool {
	v := r.u8()
	if v > 1 && r.err == nil {
		r.err = fmt.Errorf("boolean byte %#x is neither 0 nor 1", v)
	}
	return v == 1
}

func (r *fieldReader) u32() uint32 {
	if b := r.take(4); b != nil {
		return le.Uint32(b)
	}
	return 0
}

func (r *fieldReader) u64() uint64 {
	if b := r.take(8); b != nil {
		return le.Uint64(b)
	}
	return 0
}

// bytes reads a uint32 length and that many bytes (nil when empty).
func (r *fieldReader) bytes() []byte {
	n := r.u32()
	b := r.take(int(min(n, 1<<30)))
	if len(b) == 0 {
		return nil
	}
	return slices.Clone(b)
}

func (r *fieldReader) done() error {
	if r.err == nil && len(r.p) != 0 {
		r.err = fmt.Errorf("%d unexpected bytes at the end", len(r.p))
	}
	return r.err
}

func decodeDevices(p []byte, d *Devices) ([]string, error) {
	rs, err := splitRecords(p, deviceTags)
	if err != nil {
		return nil, err
	}
	var out Devices
	wrap := func(tag uint16, err error) error {
		return fmt.Errorf("record %s: %v", tagName(tag, deviceTags), err)
	}

	data, err := rs.need(TagSerial, deviceTags)
	if err != nil {
		return nil, err
	}
	r := fieldReader{p: data}
	s := &out.Serial
	for _, f := range []*uint8{&s.IER, &s.FCR, &s.LCR, &s.MCR, &s.LSR, &s.MSR, &s.SCR, &s.DLL, &s.DLM} {
		*f = r.u8()
	}
	s.THREPending = r.boolean()
	s.Dropped = r.u64()
	s.WriteErrors = r.u64()
	s.RXFIFO = r.bytes()
	s.Backlog = r.bytes()
	if err := r.done(); err != nil {
		return nil, wrap(TagSerial, err)
	}

	if data, err = rs.need(TagCMOS, deviceTags); err != nil {
		return nil, err
	}
	if len(data) != cmosSize {
		return nil, wrap(TagCMOS, fmt.Errorf("length %d, expected %d", len(data), cmosSize))
	}
	r = fieldReader{p: data}
	c := &out.CMOS
	c.Index = r.u8()
	c.NMIDisabled = r.boolean()
	copy(c.RAM[:], r.take(len(c.RAM)))
	c.ClockOffset = time.Duration(r.u64())
	if err := r.done(); err != nil {
		return nil, wrap(TagCMOS, err)
	}

	if data, err = rs.need(TagI8042, deviceTags); err != nil {
		return nil, err
	}
	r = fieldReader{p: data}
	k := &out.I8042
	k.CTR = r.u8()
	k.OutputPort = r.u8()
	k.LastWasCommand = r.boolean()
	k.PendingCommand = r.u8()
	k.LastData = r.u8()
	k.Resets = r.u64()
	k.Dropped = r.u64()
	n := r.u32()
	if r.err == nil && uint64(n)*2 != uint64(len(r.p)) {
		return nil, wrap(TagI8042, fmt.Errorf("%d output bytes announced, %d bytes of record left", n, len(r.p)))
	}
	if n > 0 && r.err == nil {
		k.Output = make([]devices.I8042Byte, n)
		for i := range k.Output {
			k.Output[i].Value = r.u8()
			k.Output[i].Aux = r.boolean()
		}
	}
	if err := r.done(); err != nil {
		return nil, wrap(TagI8042, err)
	}

	if data, err = rs.need(TagPost, deviceTags); err != nil {
		return nil, err
	}
	if len(data) != postSize {
		return nil, wrap(TagPost, fmt.Errorf("length %d, expected %d", len(data), postSize))
	}
	out.Post = devices.PostState{Last: data[0], Writes: le.Uint64(data[1:])}

	*d = out
	return rs.warnings, nil
}
