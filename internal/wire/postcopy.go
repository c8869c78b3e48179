package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Post-copy messages (protocol version 2, docs/protocol.md "Post-copy").
//
// A post-copy migration uses two connections: the main one (Hello ...,
// bulk pages) and a request channel the source opens with Attach right
// after the Welcome, so that the destination's page requests and their
// answers never queue behind bulk pages. After a broken link the source
// opens both again with Attach; the destination answers each with
// Attached, whose Missing list is what it still needs.

// PostcopyVersion is the lowest protocol version with post-copy.
const PostcopyVersion = 2

// EncodingsVersion is the lowest protocol version whose Pages chunks may
// be lz4-compressed and hold delta and dup records (state format
// encodings 2 and 3).
const EncodingsVersion = 3

// MaxPageRanges bounds the ranges of a Postcopy or Attached message.
const MaxPageRanges = 1 << 22

// PageRange is Count pages from guest-physical page frame StartPFN.
type PageRange struct {
	StartPFN uint64
	Count    uint64
}

// Channel says what an attached connection is for.
type Channel uint8

const (
	ChannelRequests Channel = 1 // page requests and their answers
	ChannelMain     Channel = 2 // the main connection, re-opened after a broken link
	ChannelStream   Channel = 3 // a further page stream (v3: Hello's streams > 1)
)

func (c Channel) String() string {
	switch c {
	case ChannelRequests:
		return "requests"
	case ChannelMain:
		return "main"
	case ChannelStream:
		return "stream"
	}
	return fmt.Sprintf("channel %d", uint8(c))
}

// Attach opens a further connection of a migration: the first message on
// it, from the source.
type Attach struct {
	MigrationID [16]byte
	Channel     Channel
	// Attempt counts the source's connection attempts since the migration
	// began (0 for the request channel's first opening); for the logs.
	Attempt uint32
	// Stream is a page stream's number, 1 to Hello's streams − 1
	// (ChannelStream; version 3, appended).
	Stream uint16
}

func (*Attach) Type() Type { return TypeAttach }

// attachV2Size is the length of a version-2 Attach (no stream field).
const attachV2Size = migrationIDBytes + 1 + 4

func (m *Attach) check() error {
	if m.MigrationID == [16]byte{} {
		return errors.New("migration id is zero")
	}
	if m.Channel != ChannelRequests && m.Channel != ChannelMain && m.Channel != ChannelStream {
		return fmt.Errorf("unknown channel %d", m.Channel)
	}
	if (m.Channel == ChannelStream) != (m.Stream != 0) {
		return fmt.Errorf("stream %d on the %s channel", m.Stream, m.Channel)
	}
	return nil
}

func (m *Attach) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *Attach) appendFields(b []byte) []byte {
	b = append(b, m.MigrationID[:]...)
	b = append(b, uint8(m.Channel))
	b = le.AppendUint32(b, m.Attempt)
	return le.AppendUint16(b, m.Stream)
}

func (m *Attach) decodePayload(p []byte) error {
	f := fields{p: p}
	var out Attach
	copy(out.MigrationID[:], f.take(migrationIDBytes, "migration id"))
	out.Channel = Channel(f.u8("channel"))
	out.Attempt = f.u32("attempt")
	if len(p) > attachV2Size { // appended in version 3
		out.Stream = f.u16("stream")
	}
	if f.err != nil {
		return f.err
	}
	if err := out.check(); err != nil {
		return err
	}
	*m = out
	return nil
}

// Attached is the destination's answer to an Attach. PostcopyStarted says
// whether the destination runs the guest in post-copy; Missing then lists
// the pages it still needs from the source (empty: it holds them all).
type Attached struct {
	Channel         Channel
	PostcopyStarted bool
	Missing         []PageRange
}

func (*Attached) Type() Type { return TypeAttached }

func (m *Attached) appendPayload(b []byte) ([]byte, error) {
	if err := checkRanges(m.Missing); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *Attached) appendFields(b []byte) []byte {
	b = append(b, uint8(m.Channel), boolByte(m.PostcopyStarted))
	return appendRanges(b, m.Missing)
}

func (m *Attached) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Attached{Channel: Channel(f.u8("channel")), PostcopyStarted: f.u8("post-copy started") != 0}
	out.Missing = f.ranges("missing pages")
	if f.err != nil {
		return f.err
	}
	if err := checkRanges(out.Missing); err != nil {
		return err
	}
	*m = out
	return nil
}

// Postcopy starts post-copy: the source paused the guest, and the
// destination will resume it before it holds all of its memory. Need lists
// the pages the destination must get from the source (they arrive as
// Pages in phases post-copy-push and post-copy-demand); a page in Need
// that the destination received before is stale and must be dropped. A
// page outside Need is either held already or zero. The machine state and
// a Complete follow.
type Postcopy struct {
	Need []PageRange
}

func (*Postcopy) Type() Type { return TypePostcopy }

func (m *Postcopy) appendPayload(b []byte) ([]byte, error) {
	if err := checkRanges(m.Need); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *Postcopy) appendFields(b []byte) []byte { return appendRanges(b, m.Need) }

func (m *Postcopy) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Postcopy{Need: f.ranges("needed pages")}
	if f.err != nil {
		return f.err
	}
	if err := checkRanges(out.Need); err != nil {
		return err
	}
	*m = out
	return nil
}

// PostcopyEnd says why post-copy ended.
type PostcopyEnd uint8

const (
	EndResident   PostcopyEnd = 1 // every needed page arrived
	EndGuestEnded PostcopyEnd = 2 // the guest stopped first; the rest is not needed
)

func (e PostcopyEnd) String() string {
	switch e {
	case EndResident:
		return "resident"
	case EndGuestEnded:
		return "guest-ended"
	}
	return fmt.Sprintf("end %d", uint8(e))
}

// PostcopyDone is the destination's last word in post-copy: the source
// may release the guest's memory. It carries the destination's
// measurements of the post-copy phase.
type PostcopyDone struct {
	End          PostcopyEnd
	PagesMissing uint64 // pages never fetched (EndGuestEnded)
	PagesPushed  uint64 // pages placed from the background push
	PagesDemand  uint64 // pages placed from answers to requests
	// Faults are the guest's accesses to pages not yet there that had to
	// wait for the source (remote faults), and the waits' distribution.
	Faults      uint64
	FaultP50    time.Duration
	FaultP99    time.Duration
	FaultMax    time.Duration
	FaultTotal  time.Duration // summed waits: vCPU time blocked on faults
	ZeroFaults  uint64        // faults on zero pages, served locally
	Residency   time.Duration // from the guest's resume to the last page placed
	LinkBreaks  uint32        // times the link broke and was re-established
	LinkDownFor time.Duration // time without a link, summed
}

func (*PostcopyDone) Type() Type { return TypePostcopyDone }

func (m *PostcopyDone) check() error {
	if m.End != EndResident && m.End != EndGuestEnded {
		return fmt.Errorf("unknown end %d", m.End)
	}
	for _, d := range []time.Duration{m.FaultP50, m.FaultP99, m.FaultMax, m.FaultTotal, m.Residency, m.LinkDownFor} {
		if d < 0 {
			return fmt.Errorf("negative duration %v", d)
		}
	}
	return nil
}

func (m *PostcopyDone) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *PostcopyDone) appendFields(b []byte) []byte {
	b = append(b, uint8(m.End))
	for _, v := range []uint64{m.PagesMissing, m.PagesPushed, m.PagesDemand, m.Faults,
		uint64(m.FaultP50), uint64(m.FaultP99), uint64(m.FaultMax), uint64(m.FaultTotal),
		m.ZeroFaults, uint64(m.Residency), uint64(m.LinkDownFor)} {
		b = le.AppendUint64(b, v)
	}
	return le.AppendUint32(b, m.LinkBreaks)
}

func (m *PostcopyDone) decodePayload(p []byte) error {
	f := fields{p: p}
	out := PostcopyDone{End: PostcopyEnd(f.u8("end")), PagesMissing: f.u64("pages missing"),
		PagesPushed: f.u64("pages pushed"), PagesDemand: f.u64("pages on demand"), Faults: f.u64("faults"),
		FaultP50: time.Duration(f.u64("fault p50")), FaultP99: time.Duration(f.u64("fault p99")),
		FaultMax: time.Duration(f.u64("fault max")), FaultTotal: time.Duration(f.u64("fault total")),
		ZeroFaults: f.u64("zero faults"), Residency: time.Duration(f.u64("residency")),
		LinkDownFor: time.Duration(f.u64("link down"))}
	out.LinkBreaks = f.u32("link breaks")
	if f.err != nil {
		return f.err
	}
	if err := out.check(); err != nil {
		return err
	}
	*m = out
	return nil
}

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

// checkRanges requires ranges in increasing order, not overlapping, not
// empty, within the 52-bit physical address space.
func checkRanges(rs []PageRange) error {
	if len(rs) > MaxPageRanges {
		return fmt.Errorf("%d page ranges, at most %d allowed", len(rs), MaxPageRanges)
	}
	const maxPFN = 1 << 40
	var next uint64
	for i, r := range rs {
		if r.Count == 0 {
			return fmt.Errorf("page range %d is empty", i)
		}
		if r.StartPFN < next {
			return fmt.Errorf("page range %d (pfn %#x) overlaps or precedes the one before", i, r.StartPFN)
		}
		if r.StartPFN >= maxPFN || r.Count > maxPFN-r.StartPFN {
			return fmt.Errorf("page range %d (pfn %#x, %d pages) lies beyond the physical address space", i, r.StartPFN, r.Count)
		}
		next = r.StartPFN + r.Count
	}
	return nil
}

// appendRanges writes a count and the ranges as (start, count) pairs of
// uvarints, the start as a delta from the end of the range before: ranges
// of a mostly contiguous memory map take a few bytes each.
func appendRanges(b []byte, rs []PageRange) []byte {
	b = le.AppendUint32(b, uint32(len(rs)))
	var next uint64
	for _, r := range rs {
		b = binary.AppendUvarint(b, r.StartPFN-next)
		b = binary.AppendUvarint(b, r.Count)
		next = r.StartPFN + r.Count
	}
	return b
}

// ranges reads what appendRanges wrote.
func (f *fields) ranges(what string) []PageRange {
	n := f.u32(what + " count")
	if f.err != nil {
		return nil
	}
	if n > MaxPageRanges || int(n) > len(f.p)/2 { // two bytes at least per range
		f.err = fmt.Errorf("%s: %d ranges in %d bytes", what, n, len(f.p))
		return nil
	}
	out := make([]PageRange, n)
	var next uint64
	for i := range out {
		gap, count := f.uvarint(what), f.uvarint(what)
		if f.err != nil {
			return nil
		}
		if gap > 1<<40 || next+gap < next {
			f.err = fmt.Errorf("%s: range %d starts beyond the physical address space", what, i)
			return nil
		}
		out[i] = PageRange{StartPFN: next + gap, Count: count}
		next = out[i].StartPFN + count
	}
	return out
}

func (f *fields) uvarint(what string) uint64 {
	if f.err != nil {
		return 0
	}
	v, n := binary.Uvarint(f.p)
	if n <= 0 {
		f.err = fmt.Errorf("%s: truncated or overlong number", what)
		return 0
	}
	f.p = f.p[n:]
	return v
}
