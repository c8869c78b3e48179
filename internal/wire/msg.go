package wire

import (
	"errors"
	"fmt"
	"math/bits"
	"time"

	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/state"
)

// Msg is a protocol message: one of the types of this package (*Hello,
// *Welcome, *Refuse, *Pages, *IterationDone, *IterationAck,
// *MachineState, *Complete, *Resumed, *Error, *Cancel, *PageRequest,
// *Ping, *Pong, *Notice, and the post-copy messages *Attach, *Attached, *Postcopy,
// *PostcopyDone). Messages are validated when encoded and when decoded:
// what one side can send, the other accepts.
type Msg interface {
	Type() Type
	// appendPayload validates the message and appends its payload.
	appendPayload(b []byte) ([]byte, error)
	// decodePayload parses and validates a payload.
	decodePayload(p []byte) error
}

// newMsg returns an empty message of a known type, or nil.
func newMsg(t Type) Msg {
	switch t {
	case TypeHello:
		return new(Hello)
	case TypeWelcome:
		return new(Welcome)
	case TypeRefuse:
		return new(Refuse)
	case TypeNotice:
		return new(Notice)
	case TypePages:
		return new(Pages)
	case TypeIterationDone:
		return new(IterationDone)
	case TypeIterationAck:
		return new(IterationAck)
	case TypeMachineState:
		return new(MachineState)
	case TypeComplete:
		return new(Complete)
	case TypeResumed:
		return new(Resumed)
	case TypeError:
		return new(Error)
	case TypeCancel:
		return new(Cancel)
	case TypePageRequest:
		return new(PageRequest)
	case TypePing:
		return new(Ping)
	case TypePong:
		return new(Pong)
	case TypeAttach:
		return new(Attach)
	case TypeAttached:
		return new(Attached)
	case TypePostcopy:
		return new(Postcopy)
	case TypePostcopyDone:
		return new(PostcopyDone)
	}
	return nil
}

// Encode validates m and returns its payload (without framing).
func Encode(m Msg) ([]byte, error) {
	b, err := m.appendPayload(nil)
	if err != nil {
		return nil, fmt.Errorf("wire: encoding %s: %v", m.Type(), err)
	}
	return b, nil
}

// Decode parses and validates the payload of a message of type t. The
// message may alias payload (Pages.Chunk, MachineState.Data).
func Decode(t Type, payload []byte) (Msg, error) {
	m := newMsg(t)
	if m == nil {
		return nil, fmt.Errorf("wire: message %s unknown", t)
	}
	if err := m.decodePayload(payload); err != nil {
		return nil, fmt.Errorf("wire: %s: %v", t, err)
	}
	return m, nil
}

// Limits of message fields (docs/protocol.md, "Limits").
const (
	MaxFerryVersion  = 128                       // bytes of a FerryVersion string
	MaxVMName        = 256                       // bytes of a VM name
	MaxToken         = 32                        // bytes of a mode or codec name
	MaxText          = 4096                      // bytes of a reason or error message
	MaxCPUIDEntries  = 4096                      // entries of Hello's CPUID table
	MaxStreams       = 256                       // Options.Streams
	MaxPageSize      = 1 << 30                   // Options.PageSize
	MaxPageRequest   = 4096                      // addresses in one PageRequest
	MaxChunk         = 16 + state.MaxChunkLength // bytes of a Pages chunk (framing included)
	MaxMachineState  = MaxMessage - 4            // bytes of MachineState data
	maxHeaderBytes   = 16 + state.MaxHeaderLength + 4
	cpuidEntrySize   = 28
	minChunk         = 16 // a chunk section's framing
	migrationIDBytes = 16
)

// ---- Hello ----

// Options are the transfer options the source proposes in its Hello.
type Options struct {
	// Codec names the page compression: "none" or "zstd" (a token of
	// lower-case letters, digits, '-', '.', '_').
	Codec string
	// PageSize is the guest page size of the page records: 4096 (a power
	// of two from 4096 to 1 GiB on the wire).
	PageSize uint32
	// Streams is the number of parallel streams (connections) the source
	// wants to use: 1 in protocol version 1.
	Streams uint16
}

// Hello opens a migration: the source's first message. It says what will
// be sent before anything is, so that the destination can refuse an
// incompatible migration while the guest still runs on the source.
type Hello struct {
	// ProtocolVersion and MinVersion are the highest and the lowest
	// protocol versions the source speaks.
	ProtocolVersion uint16
	MinVersion      uint16
	// MigrationID identifies the migration in both sides' logs; not zero.
	MigrationID  [16]byte
	FerryVersion string // the source's ferry version, e.g. "0.4.0"
	VMName       string // the guest's name
	// Mode is the migration strategy: "stopcopy", "precopy", "postcopy",
	// "hybrid", "demand" (a token; the destination decides what it
	// supports).
	Mode    string
	Options Options
	// Header is the state header of the machine: memory size and layout,
	// vCPU count, CPUID fingerprint. It travels as state.EncodeHeader's
	// bytes; when decoded its FormatVersion is set.
	Header state.Header
	// CPUID is vCPU 0's CPUID table; it must have the header's
	// fingerprint.
	CPUID []kvm.CPUIDEntry
}

func (*Hello) Type() Type { return TypeHello }

func (m *Hello) check(h *state.Header) error {
	if m.MinVersion == 0 || m.MinVersion > m.ProtocolVersion {
		return fmt.Errorf("protocol versions %d to %d: not a range of versions from 1", m.MinVersion, m.ProtocolVersion)
	}
	if m.MigrationID == [16]byte{} {
		return errors.New("migration id is zero")
	}
	if err := checkString("ferry version", m.FerryVersion, 1, MaxFerryVersion, kindName); err != nil {
		return err
	}
	if err := checkString("vm name", m.VMName, 1, MaxVMName, kindName); err != nil {
		return err
	}
	if err := checkString("mode", m.Mode, 1, MaxToken, kindToken); err != nil {
		return err
	}
	if err := checkString("codec", m.Options.Codec, 1, MaxToken, kindToken); err != nil {
		return err
	}
	if ps := m.Options.PageSize; ps < 4096 || ps > MaxPageSize || bits.OnesCount32(ps) != 1 {
		return fmt.Errorf("page size %d: not a power of two from 4096 to %d", ps, MaxPageSize)
	}
	if s := m.Options.Streams; s == 0 || s > MaxStreams {
		return fmt.Errorf("%d streams, 1 to %d allowed", s, MaxStreams)
	}
	if len(m.CPUID) == 0 || len(m.CPUID) > MaxCPUIDEntries {
		return fmt.Errorf("%d CPUID entries, 1 to %d allowed", len(m.CPUID), MaxCPUIDEntries)
	}
	if state.CPUIDFingerprint(m.CPUID) != h.CPUIDFingerprint {
		return fmt.Errorf("CPUID table (%d entries) does not match the header's CPUID fingerprint", len(m.CPUID))
	}
	return nil
}

func (m *Hello) appendPayload(b []byte) ([]byte, error) {
	h, err := state.DecodeHeader(state.EncodeHeader(m.Header))
	if err != nil {
		return nil, fmt.Errorf("header: %v", err)
	}
	if err := m.check(&h); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

// appendFields encodes the fields without validating them (appendPayload
// validates first; tests use it to play a buggy or hostile peer).
func (m *Hello) appendFields(b []byte) []byte {
	hb := state.EncodeHeader(m.Header)
	b = le.AppendUint16(b, m.ProtocolVersion)
	b = le.AppendUint16(b, m.MinVersion)
	b = append(b, m.MigrationID[:]...)
	b = le.AppendUint32(b, m.Options.PageSize)
	b = le.AppendUint16(b, m.Options.Streams)
	b = appendString(b, m.FerryVersion)
	b = appendString(b, m.VMName)
	b = appendString(b, m.Mode)
	b = appendString(b, m.Options.Codec)
	b = appendBytes(b, hb)
	b = le.AppendUint32(b, uint32(len(m.CPUID)))
	for _, e := range m.CPUID {
		for _, v := range [...]uint32{e.Function, e.Index, e.Flags, e.EAX, e.EBX, e.ECX, e.EDX} {
			b = le.AppendUint32(b, v)
		}
	}
	return b
}

func (m *Hello) decodePayload(p []byte) error {
	f := fields{p: p}
	var out Hello
	out.ProtocolVersion = f.u16("protocol version")
	out.MinVersion = f.u16("minimum version")
	copy(out.MigrationID[:], f.take(migrationIDBytes, "migration id"))
	out.Options.PageSize = f.u32("page size")
	out.Options.Streams = f.u16("streams")
	out.FerryVersion = f.str("ferry version", MaxFerryVersion)
	out.VMName = f.str("vm name", MaxVMName)
	out.Mode = f.str("mode", MaxToken)
	out.Options.Codec = f.str("codec", MaxToken)
	hb := f.bytes("header", maxHeaderBytes)
	n := f.u32("CPUID entry count")
	if f.err != nil {
		return f.err
	}
	h, err := state.DecodeHeader(hb)
	if err != nil {
		return fmt.Errorf("header: %v", err)
	}
	out.Header = h
	if n == 0 || n > MaxCPUIDEntries {
		return fmt.Errorf("%d CPUID entries, 1 to %d allowed", n, MaxCPUIDEntries)
	}
	d := f.take(int(n)*cpuidEntrySize, "CPUID table")
	if f.err != nil {
		return f.err
	}
	out.CPUID = make([]kvm.CPUIDEntry, n)
	for i := range out.CPUID {
		e := d[i*cpuidEntrySize:]
		out.CPUID[i] = kvm.CPUIDEntry{
			Function: le.Uint32(e), Index: le.Uint32(e[4:]), Flags: le.Uint32(e[8:]),
			EAX: le.Uint32(e[12:]), EBX: le.Uint32(e[16:]), ECX: le.Uint32(e[20:]), EDX: le.Uint32(e[24:]),
		}
	}
	if err := out.check(&out.Header); err != nil {
		return err
	}
	*m = out
	return nil
}

// NegotiateVersion returns the highest protocol version in both ranges
// [aMin, aMax] and [bMin, bMax], and false when they do not overlap.
func NegotiateVersion(aMin, aMax, bMin, bMax uint16) (uint16, bool) {
	v := min(aMax, bMax)
	if v < max(aMin, bMin) || v == 0 {
		return 0, false
	}
	return v, true
}

// Negotiate is the destination's answer to h as far as protocol versions
// go: a Welcome with the highest version both sides speak (this package
// speaks MinProtocolVersion to ProtocolVersion), or, when there is none, a
// Refuse with RefuseVersion saying which versions each side speaks. The
// destination checks everything else (layout, CPU features, options,
// name) before it sends the Welcome, and may send a Refuse instead.
func Negotiate(h *Hello, ferryVersion string) (*Welcome, *Refuse) {
	return negotiate(h, MinProtocolVersion, ProtocolVersion, ferryVersion)
}

func negotiate(h *Hello, ourMin, ourMax uint16, ferryVersion string) (*Welcome, *Refuse) {
	v, ok := NegotiateVersion(h.MinVersion, h.ProtocolVersion, ourMin, ourMax)
	if !ok {
		return nil, &Refuse{Code: RefuseVersion, MinVersion: ourMin, MaxVersion: ourMax, FerryVersion: ferryVersion,
			Reason: fmt.Sprintf("no common protocol version: the source (ferry %s) speaks %d to %d, this destination (ferry %s) %d to %d",
				h.FerryVersion, h.MinVersion, h.ProtocolVersion, ferryVersion, ourMin, ourMax)}
	}
	return &Welcome{ProtocolVersion: v, MinVersion: ourMin, MaxVersion: ourMax, FerryVersion: ferryVersion}, nil
}

// ---- Welcome, Refuse ----

// Welcome is the destination's acceptance of a Hello: the protocol version
// both sides speak from now on, and the destination's own range.
type Welcome struct {
	ProtocolVersion uint16 // the chosen protocol version
	MinVersion      uint16 // the lowest version the destination speaks
	MaxVersion      uint16 // the highest version the destination speaks
	FerryVersion    string // the destination's ferry version
}

func (*Welcome) Type() Type { return TypeWelcome }

func (m *Welcome) check() error {
	if m.MinVersion == 0 || m.MinVersion > m.MaxVersion {
		return fmt.Errorf("protocol versions %d to %d: not a range of versions from 1", m.MinVersion, m.MaxVersion)
	}
	if m.ProtocolVersion < m.MinVersion || m.ProtocolVersion > m.MaxVersion {
		return fmt.Errorf("chosen protocol version %d is outside the destination's range %d to %d", m.ProtocolVersion, m.MinVersion, m.MaxVersion)
	}
	return checkString("ferry version", m.FerryVersion, 1, MaxFerryVersion, kindName)
}

// Check is the source's check of the destination's Welcome to its Hello:
// the chosen version must be the highest version both sides speak.
func (m *Welcome) Check(h *Hello) error {
	v, ok := NegotiateVersion(h.MinVersion, h.ProtocolVersion, m.MinVersion, m.MaxVersion)
	if !ok || v != m.ProtocolVersion {
		return fmt.Errorf("wire: the destination (ferry %s, protocol versions %d to %d) chose protocol version %d; the source speaks %d to %d",
			m.FerryVersion, m.MinVersion, m.MaxVersion, m.ProtocolVersion, h.MinVersion, h.ProtocolVersion)
	}
	return nil
}

func (m *Welcome) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *Welcome) appendFields(b []byte) []byte {
	b = le.AppendUint16(b, m.ProtocolVersion)
	b = le.AppendUint16(b, m.MinVersion)
	b = le.AppendUint16(b, m.MaxVersion)
	return appendString(b, m.FerryVersion)
}

func (m *Welcome) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Welcome{
		ProtocolVersion: f.u16("version"),
		MinVersion:      f.u16("minimum version"),
		MaxVersion:      f.u16("maximum version"),
		FerryVersion:    f.str("ferry version", MaxFerryVersion),
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

// RefuseCode says why a destination refused a migration.
type RefuseCode uint16

// Refuse codes. Receivers accept codes they do not know (and show them as
// numbers).
const (
	RefuseVersion  RefuseCode = 1 // no common protocol version
	RefuseLayout   RefuseCode = 2 // memory size or layout, vCPU count or state format not supported
	RefuseCPU      RefuseCode = 3 // the destination's CPU lacks features the guest's CPUID table uses
	RefuseBusy     RefuseCode = 4 // the destination is busy or already has a VM of that name
	RefuseInternal RefuseCode = 5 // the destination failed to prepare
	RefuseOptions  RefuseCode = 6 // mode, codec, page size or stream count not supported
)

func (c RefuseCode) String() string {
	switch c {
	case RefuseVersion:
		return "version mismatch"
	case RefuseLayout:
		return "layout mismatch"
	case RefuseCPU:
		return "cpu features"
	case RefuseBusy:
		return "busy"
	case RefuseInternal:
		return "internal"
	case RefuseOptions:
		return "unsupported options"
	}
	return fmt.Sprintf("code %d", uint16(c))
}

// Refuse is the destination's refusal of a Hello, sent instead of a
// Welcome; the destination closes the connection after it. Code and
// Reason are required. The destination's protocol range (both zero when
// not given) and ferry version (empty when not given) let the source
// report a version mismatch precisely; Negotiate fills them in.
type Refuse struct {
	Code         RefuseCode
	Reason       string // for humans, non-empty
	MinVersion   uint16
	MaxVersion   uint16
	FerryVersion string
}

func (*Refuse) Type() Type { return TypeRefuse }

// Error lets a Refuse be returned as an error by the source.
func (m *Refuse) Error() string {
	if m.FerryVersion == "" {
		return fmt.Sprintf("the destination refused the migration (%s): %s", m.Code, m.Reason)
	}
	return fmt.Sprintf("the destination (ferry %s) refused the migration (%s): %s", m.FerryVersion, m.Code, m.Reason)
}

func (m *Refuse) check() error {
	if m.Code == 0 {
		return errors.New("refuse code 0")
	}
	if (m.MinVersion != 0 || m.MaxVersion != 0) && (m.MinVersion == 0 || m.MinVersion > m.MaxVersion) {
		return fmt.Errorf("protocol versions %d to %d: neither a range of versions from 1 nor unspecified (0 to 0)", m.MinVersion, m.MaxVersion)
	}
	if err := checkString("ferry version", m.FerryVersion, 0, MaxFerryVersion, kindName); err != nil {
		return err
	}
	return checkString("reason", m.Reason, 1, MaxText, kindText)
}

func (m *Refuse) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *Refuse) appendFields(b []byte) []byte {
	b = le.AppendUint16(b, uint16(m.Code))
	b = le.AppendUint16(b, m.MinVersion)
	b = le.AppendUint16(b, m.MaxVersion)
	b = appendString(b, m.FerryVersion)
	return appendString(b, m.Reason)
}

func (m *Refuse) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Refuse{
		Code:         RefuseCode(f.u16("code")),
		MinVersion:   f.u16("minimum version"),
		MaxVersion:   f.u16("maximum version"),
		FerryVersion: f.str("ferry version", MaxFerryVersion),
		Reason:       f.str("reason", MaxText),
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

// ---- Notice ----

// NoticeCode says what a Notice is about.
type NoticeCode uint16

// Notice codes. Receivers accept codes they do not know (and show them as
// numbers).
const (
	// NoticeTSC: the destination cannot run the guest's TSC at its
	// frequency exactly (the rates differ beyond KVM's tolerance and KVM
	// there cannot scale).
	NoticeTSC NoticeCode = 1
)

func (c NoticeCode) String() string {
	switch c {
	case NoticeTSC:
		return "tsc"
	}
	return fmt.Sprintf("code %d", uint16(c))
}

// Notice is a warning from the destination for the operator about a
// migration it accepts: something of the guest it will run, but not
// exactly as the source did. The destination sends its Notices before its
// Welcome, so that the source has them before anything moves; the source
// puts them in its report. Sent with FlagOptional: a source that does not
// know the type skips it.
type Notice struct {
	Code NoticeCode // not 0
	Text string     // for humans, non-empty
}

func (*Notice) Type() Type { return TypeNotice }

func (m *Notice) check() error {
	if m.Code == 0 {
		return errors.New("notice code 0")
	}
	return checkString("text", m.Text, 1, MaxText, kindText)
}

func (m *Notice) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	b = le.AppendUint16(b, uint16(m.Code))
	return appendString(b, m.Text), nil
}

func (m *Notice) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Notice{Code: NoticeCode(f.u16("code")), Text: f.str("text", MaxText)}
	if f.err != nil {
		return f.err
	}
	if err := out.check(); err != nil {
		return err
	}
	*m = out
	return nil
}

// ---- Pages ----

// Phase says in which phase of a migration pages are sent.
type Phase uint8

const (
	PhasePreCopy        Phase = 0 // while the guest runs on the source
	PhaseStopCopy       Phase = 1 // after the source paused the guest
	PhasePostCopyPush   Phase = 2 // after the destination resumed, pushed by the source (v2)
	PhasePostCopyDemand Phase = 3 // an answer to a PageRequest (v2)
)

func (p Phase) String() string {
	switch p {
	case PhasePreCopy:
		return "precopy"
	case PhaseStopCopy:
		return "stopcopy"
	case PhasePostCopyPush:
		return "postcopy-push"
	case PhasePostCopyDemand:
		return "postcopy-demand"
	}
	return fmt.Sprintf("phase %d", uint8(p))
}

// Pages carries one memory chunk: up to state.ChunkPages page records, as
// state.EncodePageChunk produces them (a state-format memory chunk
// section, CRC and optional zstd compression included). Pages may come in
// any order and repeat; the last copy of a page wins.
type Pages struct {
	Iteration uint32 // the pre-copy round (0 first); the final round's number in stop-copy
	Phase     Phase
	Chunk     []byte // state.EncodePageChunk's bytes; 16 to MaxChunk bytes
}

func (*Pages) Type() Type { return TypePages }

// NewPages encodes pages into a Pages message (see state.EncodePageChunk).
func NewPages(iteration uint32, phase Phase, pfns []uint64, data [][]byte, compress bool, level int) (*Pages, error) {
	c, err := state.EncodePageChunk(pfns, data, compress, level)
	if err != nil {
		return nil, err
	}
	return &Pages{Iteration: iteration, Phase: phase, Chunk: c}, nil
}

// Decode checks the chunk against the stream's header and hands its pages
// to page (see state.DecodePageChunk). It returns the number of page
// records.
func (m *Pages) Decode(h state.Header, page func(gpa uint64, data []byte) error) (int, error) {
	return state.DecodePageChunk(m.Chunk, h, page)
}

func (m *Pages) check() error {
	if m.Phase > PhasePostCopyDemand {
		return fmt.Errorf("unknown phase %d", m.Phase)
	}
	if len(m.Chunk) < minChunk || len(m.Chunk) > MaxChunk {
		return fmt.Errorf("chunk of %d bytes, %d to %d allowed", len(m.Chunk), minChunk, MaxChunk)
	}
	return nil
}

func (m *Pages) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *Pages) appendFields(b []byte) []byte {
	b = le.AppendUint32(b, m.Iteration)
	b = append(b, uint8(m.Phase))
	return appendBytes(b, m.Chunk)
}

func (m *Pages) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Pages{Iteration: f.u32("iteration"), Phase: Phase(f.u8("phase")), Chunk: f.bytes("chunk", MaxChunk)}
	if f.err != nil {
		return f.err
	}
	if err := out.check(); err != nil {
		return err
	}
	*m = out
	return nil
}

// ---- IterationDone, IterationAck ----

// IterationDone ends a round of pages. The numbers are informational:
// what the source sent in the round, and how many pages it found dirty for
// the next one.
type IterationDone struct {
	Iteration  uint32
	PagesSent  uint64 // page records sent in this round
	BytesSent  uint64 // bytes of Pages chunks sent in this round
	DirtyPages uint64 // pages found dirty since the round began
}

func (*IterationDone) Type() Type { return TypeIterationDone }

func (m *IterationDone) appendPayload(b []byte) ([]byte, error) {
	b = le.AppendUint32(b, m.Iteration)
	b = le.AppendUint64(b, m.PagesSent)
	b = le.AppendUint64(b, m.BytesSent)
	return le.AppendUint64(b, m.DirtyPages), nil
}

func (m *IterationDone) decodePayload(p []byte) error {
	f := fields{p: p}
	out := IterationDone{Iteration: f.u32("iteration"), PagesSent: f.u64("pages sent"),
		BytesSent: f.u64("bytes sent"), DirtyPages: f.u64("dirty pages")}
	if f.err != nil {
		return f.err
	}
	*m = out
	return nil
}

// IterationAck answers an IterationDone once the destination has applied
// every page of the round: the source measures end-to-end throughput
// from it and notices a destination that stopped keeping up.
type IterationAck struct {
	Iteration     uint32
	PagesReceived uint64 // page records received in this round
}

func (*IterationAck) Type() Type { return TypeIterationAck }

func (m *IterationAck) appendPayload(b []byte) ([]byte, error) {
	b = le.AppendUint32(b, m.Iteration)
	return le.AppendUint64(b, m.PagesReceived), nil
}

func (m *IterationAck) decodePayload(p []byte) error {
	f := fields{p: p}
	out := IterationAck{Iteration: f.u32("iteration"), PagesReceived: f.u64("pages received")}
	if f.err != nil {
		return f.err
	}
	*m = out
	return nil
}

// ---- MachineState ----

// MachineState carries the machine's non-memory state, as
// state.EncodeMachine produces it. It usually spans several frames.
type MachineState struct {
	Data []byte // 1 to MaxMachineState bytes
}

func (*MachineState) Type() Type { return TypeMachineState }

// NewMachineState encodes m (see state.EncodeMachine).
func NewMachineState(m *state.Machine) (*MachineState, error) {
	b, err := state.EncodeMachine(m)
	if err != nil {
		return nil, err
	}
	return &MachineState{Data: b}, nil
}

// Decode decodes the machine state for a stream with header h (see
// state.DecodeMachine).
func (m *MachineState) Decode(h state.Header) (*state.Machine, []string, error) {
	return state.DecodeMachine(m.Data, h)
}

func (m *MachineState) check() error {
	if len(m.Data) == 0 || len(m.Data) > MaxMachineState {
		return fmt.Errorf("machine state of %d bytes, 1 to %d allowed", len(m.Data), MaxMachineState)
	}
	return nil
}

func (m *MachineState) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *MachineState) appendFields(b []byte) []byte { return appendBytes(b, m.Data) }

func (m *MachineState) decodePayload(p []byte) error {
	f := fields{p: p}
	out := MachineState{Data: f.bytes("machine state", MaxMachineState)}
	if f.err != nil {
		return f.err
	}
	if err := out.check(); err != nil {
		return err
	}
	*m = out
	return nil
}

// ---- Complete, Resumed ----

// Complete says the source has sent everything. Its totals cover every
// Pages message of the migration, so that the destination can check that
// nothing was lost before it resumes the guest.
type Complete struct {
	Iterations uint32 // rounds of pages, the stop-copy round included
	Chunks     uint64 // Pages messages
	Pages      uint64 // page records in them
	Bytes      uint64 // bytes of their chunks (the sum of len(Pages.Chunk))
}

func (*Complete) Type() Type { return TypeComplete }

func (m *Complete) appendPayload(b []byte) ([]byte, error) {
	b = le.AppendUint32(b, m.Iterations)
	b = le.AppendUint64(b, m.Chunks)
	b = le.AppendUint64(b, m.Pages)
	return le.AppendUint64(b, m.Bytes), nil
}

func (m *Complete) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Complete{Iterations: f.u32("iterations"), Chunks: f.u64("chunks"), Pages: f.u64("pages"), Bytes: f.u64("bytes")}
	if f.err != nil {
		return f.err
	}
	*m = out
	return nil
}

// Resumed says the destination restored the machine and the guest runs
// there: from now on the destination owns the guest.
type Resumed struct {
	UnixNano    int64         // the destination's clock when the guest resumed, ns since the Unix epoch
	RestoreTime time.Duration // from Complete received to the guest resumed; not negative
}

func (*Resumed) Type() Type { return TypeResumed }

func (m *Resumed) appendPayload(b []byte) ([]byte, error) {
	if m.RestoreTime < 0 {
		return nil, fmt.Errorf("negative restore time %v", m.RestoreTime)
	}
	return m.appendFields(b), nil
}

func (m *Resumed) appendFields(b []byte) []byte {
	b = le.AppendUint64(b, uint64(m.UnixNano))
	return le.AppendUint64(b, uint64(m.RestoreTime))
}

func (m *Resumed) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Resumed{UnixNano: int64(f.u64("time")), RestoreTime: time.Duration(f.u64("restore time"))}
	if f.err != nil {
		return f.err
	}
	if out.RestoreTime < 0 {
		return fmt.Errorf("negative restore time %v", out.RestoreTime)
	}
	*m = out
	return nil
}

// ---- Error, Cancel ----

// ErrorCode classifies an Error message.
type ErrorCode uint16

// Error codes. Receivers accept codes they do not know.
const (
	ErrorProtocol  ErrorCode = 1 // a malformed or unexpected message
	ErrorState     ErrorCode = 2 // the state encoding was refused (corrupt, incompatible)
	ErrorRestore   ErrorCode = 3 // restoring or resuming the machine failed
	ErrorResources ErrorCode = 4 // out of memory, disk, file descriptors
	ErrorTimeout   ErrorCode = 5 // the peer stopped making progress
	ErrorInternal  ErrorCode = 6 // anything else
)

func (c ErrorCode) String() string {
	switch c {
	case ErrorProtocol:
		return "protocol"
	case ErrorState:
		return "state"
	case ErrorRestore:
		return "restore"
	case ErrorResources:
		return "resources"
	case ErrorTimeout:
		return "timeout"
	case ErrorInternal:
		return "internal"
	}
	return fmt.Sprintf("code %d", uint16(c))
}

// Error says the sender gives up on the migration; it closes the
// connection after it. Either side may send one.
type Error struct {
	Code    ErrorCode // not 0
	Message string    // for humans, non-empty
}

func (*Error) Type() Type { return TypeError }

// Error lets a received Error be returned as an error.
func (m *Error) Error() string { return fmt.Sprintf("peer failed (%s): %s", m.Code, m.Message) }

func (m *Error) check() error {
	if m.Code == 0 {
		return errors.New("error code 0")
	}
	return checkString("message", m.Message, 1, MaxText, kindText)
}

func (m *Error) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *Error) appendFields(b []byte) []byte {
	return appendString(le.AppendUint16(b, uint16(m.Code)), m.Message)
}

func (m *Error) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Error{Code: ErrorCode(f.u16("code")), Message: f.str("message", MaxText)}
	if f.err != nil {
		return f.err
	}
	if err := out.check(); err != nil {
		return err
	}
	*m = out
	return nil
}

// Cancel says the source abandons the migration (an operator cancelled
// it, or a deadline passed) and keeps running the guest; the destination
// discards what it received.
type Cancel struct {
	Reason string // non-empty
}

func (*Cancel) Type() Type { return TypeCancel }

func (m *Cancel) appendPayload(b []byte) ([]byte, error) {
	if err := checkString("reason", m.Reason, 1, MaxText, kindText); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *Cancel) appendFields(b []byte) []byte { return appendString(b, m.Reason) }

func (m *Cancel) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Cancel{Reason: f.str("reason", MaxText)}
	if f.err != nil {
		return f.err
	}
	if err := checkString("reason", out.Reason, 1, MaxText, kindText); err != nil {
		return err
	}
	*m = out
	return nil
}

// ---- post-copy requests and measurements ----

// PageRequest asks the source for pages the destination needs now
// (post-copy: the guest faulted on them), on the request channel.
// Protocol version 1 defined it but no mode of version 1 sends it.
type PageRequest struct {
	GPAs []uint64 // 1 to MaxPageRequest page-aligned guest-physical addresses
}

func (*PageRequest) Type() Type { return TypePageRequest }

func (m *PageRequest) check() error {
	if len(m.GPAs) == 0 || len(m.GPAs) > MaxPageRequest {
		return fmt.Errorf("%d addresses, 1 to %d allowed", len(m.GPAs), MaxPageRequest)
	}
	for i, a := range m.GPAs {
		if a%state.PageSize != 0 {
			return fmt.Errorf("address %d (%#x) is not page-aligned", i, a)
		}
	}
	return nil
}

func (m *PageRequest) appendPayload(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return nil, err
	}
	return m.appendFields(b), nil
}

func (m *PageRequest) appendFields(b []byte) []byte {
	b = le.AppendUint32(b, uint32(len(m.GPAs)))
	for _, a := range m.GPAs {
		b = le.AppendUint64(b, a)
	}
	return b
}

func (m *PageRequest) decodePayload(p []byte) error {
	f := fields{p: p}
	n := f.u32("address count")
	if f.err != nil {
		return f.err
	}
	if n == 0 || n > MaxPageRequest {
		return fmt.Errorf("%d addresses, 1 to %d allowed", n, MaxPageRequest)
	}
	d := f.take(int(n)*8, "addresses")
	if f.err != nil {
		return f.err
	}
	out := PageRequest{GPAs: make([]uint64, n)}
	for i := range out.GPAs {
		out.GPAs[i] = le.Uint64(d[i*8:])
	}
	if err := out.check(); err != nil {
		return err
	}
	*m = out
	return nil
}

// Ping asks the peer for a Pong, to measure the round-trip time. Sent
// with FlagOptional.
type Ping struct {
	Nonce    uint64
	UnixNano int64 // the sender's clock
}

func (*Ping) Type() Type { return TypePing }

// Reply returns the Pong that answers m at time now.
func (m *Ping) Reply(now time.Time) *Pong {
	return &Pong{Nonce: m.Nonce, PingUnixNano: m.UnixNano, UnixNano: now.UnixNano()}
}

func (m *Ping) appendPayload(b []byte) ([]byte, error) {
	b = le.AppendUint64(b, m.Nonce)
	return le.AppendUint64(b, uint64(m.UnixNano)), nil
}

func (m *Ping) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Ping{Nonce: f.u64("nonce"), UnixNano: int64(f.u64("time"))}
	if f.err != nil {
		return f.err
	}
	*m = out
	return nil
}

// Pong answers a Ping, echoing its nonce and time. Sent with FlagOptional.
type Pong struct {
	Nonce        uint64
	PingUnixNano int64 // the Ping's UnixNano, echoed
	UnixNano     int64 // the replier's clock
}

func (*Pong) Type() Type { return TypePong }

// RTT is the round-trip time of the Ping this Pong answers, measured on
// the pinger's clock at now.
func (m *Pong) RTT(now time.Time) time.Duration {
	return time.Duration(now.UnixNano() - m.PingUnixNano)
}

func (m *Pong) appendPayload(b []byte) ([]byte, error) {
	b = le.AppendUint64(b, m.Nonce)
	b = le.AppendUint64(b, uint64(m.PingUnixNano))
	return le.AppendUint64(b, uint64(m.UnixNano)), nil
}

func (m *Pong) decodePayload(p []byte) error {
	f := fields{p: p}
	out := Pong{Nonce: f.u64("nonce"), PingUnixNano: int64(f.u64("ping time")), UnixNano: int64(f.u64("time"))}
	if f.err != nil {
		return f.err
	}
	*m = out
	return nil
}
