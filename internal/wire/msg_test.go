package wire

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/state"
)

// Every message survives Encode/Decode and a trip through a Conn
// unchanged, and every type is covered.
func TestRoundTripEveryMessage(t *testing.T) {
	msgs := allMessages(t)
	seen := map[Type]bool{}
	for _, m := range msgs {
		seen[m.Type()] = true
		p, err := Encode(m)
		if err != nil {
			t.Fatalf("%s: %v", m.Type(), err)
		}
		got, err := Decode(m.Type(), p)
		if err != nil {
			t.Fatalf("%s: %v", m.Type(), err)
		}
		if !reflect.DeepEqual(got, m) {
			t.Errorf("%s: got %+v, want %+v", m.Type(), got, m)
		}
		// Bytes appended by a later protocol version are ignored.
		got, err = Decode(m.Type(), append(bytes.Clone(p), 1, 2, 3, 4, 5, 6, 7, 8, 9))
		if err != nil || !reflect.DeepEqual(got, m) {
			t.Errorf("%s with trailing fields: %v", m.Type(), err)
		}
		// Every strict prefix is refused, but for fields a later version
		// appended (Attach's stream, version 3), whose absence reads as
		// what version 2 meant.
		for n := range len(p) {
			if a, ok := m.(*Attach); ok && a.Stream == 0 && n == attachV2Size {
				continue
			}
			if _, err := Decode(m.Type(), p[:n]); err == nil {
				t.Fatalf("%s: payload cut to %d of %d bytes accepted", m.Type(), n, len(p))
			}
		}
	}
	for t2 := range typeNames {
		if !seen[t2] {
			t.Errorf("no test message of type %s", t2)
		}
	}

	for _, cfg := range []Config{{}, {FramePayload: 100}} {
		data := stream(t, cfg, msgs...)
		c := readConn(data, cfg)
		for _, want := range msgs {
			got, err := c.ReadMsg()
			if err != nil {
				t.Fatalf("frame payload %d: reading %s: %v", cfg.FramePayload, want.Type(), err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("frame payload %d: %s differs", cfg.FramePayload, want.Type())
			}
		}
		if _, err := c.ReadMsg(); err != io.EOF {
			t.Errorf("after the last message: %v", err)
		}
		st := c.Stats()
		if st.MessagesReceived != uint64(len(msgs)) || st.BytesReceived != uint64(len(data)) || st.Skipped != 0 {
			t.Errorf("stats %+v for %d messages in %d bytes", st, len(msgs), len(data))
		}
		t.Logf("frame payload %d: %d messages in %d frames, %d bytes", cfg.FramePayload, len(msgs), st.FramesReceived, len(data))
	}
}

// The Pages and MachineState helpers carry state's encodings.
func TestPagesAndMachineStateHelpers(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	m := randomMachine(rng, 3, 4096)
	ms, err := NewMachineState(m)
	if err != nil {
		t.Fatal(err)
	}
	got, warnings, err := ms.Decode(m.Header)
	if err != nil || len(warnings) != 0 || !reflect.DeepEqual(got, m) {
		t.Fatalf("machine state: %v, warnings %q", err, warnings)
	}
	bad := *m
	bad.Header.CPUs = 4
	if _, err := NewMachineState(&bad); err == nil {
		t.Error("NewMachineState accepted a machine that does not match its header")
	}

	data := [][]byte{randBytes(rng, state.PageSize), make([]byte, state.PageSize)}
	p, err := NewPages(0, PhaseStopCopy, []uint64{5, 0x100005}, data, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	var gpas []uint64
	n, err := p.Decode(m.Header, func(gpa uint64, d []byte) error {
		if !bytes.Equal(d, data[len(gpas)]) {
			t.Errorf("page %#x differs", gpa)
		}
		gpas = append(gpas, gpa)
		return nil
	})
	if err != nil || n != 2 || !reflect.DeepEqual(gpas, []uint64{5 << 12, 0x100005 << 12}) {
		t.Fatalf("pages: %d %v %#x", n, err, gpas)
	}
	if _, err := NewPages(0, PhaseStopCopy, nil, nil, false, 0); err == nil {
		t.Error("NewPages accepted no pages")
	}
}

// Invalid messages are refused by the encoder (so nothing is written) and,
// when produced by hand, by the decoder.
func TestMessageValidation(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	m := randomMachine(rng, 1, 0)
	hello := func(f func(h *Hello)) *Hello {
		h := testHello(m)
		f(h)
		return h
	}
	for _, c := range []struct {
		msg  Msg
		want string
	}{
		{hello(func(h *Hello) { h.MinVersion = 0 }), "protocol versions 0 to 3"},
		{hello(func(h *Hello) { h.MinVersion = 4 }), "protocol versions 4 to 3"},
		{hello(func(h *Hello) { h.MigrationID = [16]byte{} }), "migration id is zero"},
		{hello(func(h *Hello) { h.FerryVersion = "" }), "ferry version is empty"},
		{hello(func(h *Hello) { h.VMName = "a\x1bb" }), `vm name "a\x1bb": character '\x1b' not allowed`},
		{hello(func(h *Hello) { h.VMName = strings.Repeat("n", 257) }), "vm name of 257 bytes, 1 to 256 allowed"},
		{hello(func(h *Hello) { h.VMName = "\xff" }), "vm name is not UTF-8"},
		{hello(func(h *Hello) { h.Mode = "Pre Copy" }), `mode "Pre Copy": character 'P' not allowed`},
		{hello(func(h *Hello) { h.Options.Codec = "" }), "codec is empty"},
		{hello(func(h *Hello) { h.Options.PageSize = 3000 }), "page size 3000: not a power of two"},
		{hello(func(h *Hello) { h.Options.PageSize = 2048 }), "page size 2048"},
		{hello(func(h *Hello) { h.Options.Streams = 0 }), "0 streams, 1 to 256 allowed"},
		{hello(func(h *Hello) { h.CPUID = nil }), "0 CPUID entries"},
		{hello(func(h *Hello) { h.CPUID = append([]kvm.CPUIDEntry{{Function: 9}}, h.CPUID...) }), "does not match the header's CPUID fingerprint"},
		{hello(func(h *Hello) { h.Header.CPUs = 0 }), "header: state file: header: 0 vCPUs"},
		{hello(func(h *Hello) { h.Header.Regions = nil }), "header: state file: header: 0 memory regions"},
		{&Welcome{ProtocolVersion: 2, MinVersion: 1, MaxVersion: 1, FerryVersion: "x"}, "chosen protocol version 2 is outside the destination's range 1 to 1"},
		{&Welcome{ProtocolVersion: 0, MinVersion: 0, MaxVersion: 0, FerryVersion: "x"}, "protocol versions 0 to 0"},
		{&Welcome{ProtocolVersion: 1, MinVersion: 1, MaxVersion: 1}, "ferry version is empty"},
		{&Refuse{MinVersion: 1, MaxVersion: 1, FerryVersion: "x", Reason: "r"}, "refuse code 0"},
		{&Refuse{Code: RefuseBusy, MinVersion: 1, MaxVersion: 1, FerryVersion: "x"}, "reason is empty"},
		{&Refuse{Code: RefuseBusy, MinVersion: 1, MaxVersion: 1, FerryVersion: "x", Reason: strings.Repeat("r", MaxText+1)}, "reason of 4097 bytes"},
		{&Pages{Phase: 4, Chunk: make([]byte, 100)}, "unknown phase 4"},
		{&Pages{Chunk: make([]byte, 15)}, "chunk of 15 bytes, 16 to 1050900 allowed"},
		{&Pages{Chunk: make([]byte, MaxChunk+1)}, "chunk of 1050901 bytes"},
		{&MachineState{}, "machine state of 0 bytes"},
		{&Resumed{RestoreTime: -1}, "negative restore time"},
		{&Error{Message: "m"}, "error code 0"},
		{&Error{Code: ErrorInternal}, "message is empty"},
		{&Error{Code: ErrorInternal, Message: "bell\a"}, `character '\a' not allowed`},
		{&Cancel{}, "reason is empty"},
		{&PageRequest{}, "0 addresses, 1 to 4096 allowed"},
		{&PageRequest{GPAs: make([]uint64, MaxPageRequest+1)}, "4097 addresses"},
		{&PageRequest{GPAs: []uint64{0x1000, 0x1001}}, "address 1 (0x1001) is not page-aligned"},
		{&Attach{Channel: ChannelMain}, "migration id is zero"},
		{&Attach{MigrationID: [16]byte{1}, Channel: 9}, "unknown channel 9"},
		{&Attach{MigrationID: [16]byte{1}, Channel: ChannelStream}, "stream 0 on the stream channel"},
		{&Attached{Missing: []PageRange{{5, 1}, {5, 1}}}, "page range 1 (pfn 0x5) overlaps"},
		{&Postcopy{Need: []PageRange{{1, 0}}}, "page range 0 is empty"},
		{&Postcopy{Need: []PageRange{{1 << 40, 1}}}, "beyond the physical address space"},
		{&PostcopyDone{}, "unknown end 0"},
		{&PostcopyDone{End: EndResident, FaultMax: -1}, "negative duration"},
	} {
		c2 := NewConn(rw{bytes.NewReader(nil), new(bytes.Buffer)})
		err := c2.WriteMsg(c.msg)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "wire: encoding "+c.msg.Type().String()+": ") {
			t.Errorf("%s: got %v, want %q", c.msg.Type(), err, c.want)
		}
		if st := c2.Stats(); st.FramesSent != 0 || st.BytesSent != 0 {
			t.Errorf("%s: an invalid message was written: %+v", c.msg.Type(), st)
		}
		// The decoder refuses what the encoder would not produce.
		payload := rawPayload(t, c.msg)
		if _, err := Decode(c.msg.Type(), payload); err == nil {
			t.Errorf("%s: decoder accepted %q", c.msg.Type(), c.want)
		}
	}
}

// rawPayload encodes a message without validating it, as a buggy or
// hostile peer could.
func rawPayload(t *testing.T, m Msg) []byte {
	f, ok := m.(interface{ appendFields([]byte) []byte })
	if !ok {
		t.Fatalf("no raw encoding for %T", m)
	}
	return f.appendFields(nil)
}

func TestNegotiation(t *testing.T) {
	for _, c := range []struct {
		aMin, aMax, bMin, bMax uint16
		want                   uint16
		ok                     bool
	}{
		{1, 1, 1, 1, 1, true},
		{1, 3, 2, 5, 3, true},
		{2, 5, 1, 3, 3, true},
		{1, 2, 3, 4, 0, false},
		{4, 6, 1, 3, 0, false},
		{0, 0, 0, 0, 0, false},
	} {
		v, ok := NegotiateVersion(c.aMin, c.aMax, c.bMin, c.bMax)
		if v != c.want || ok != c.ok {
			t.Errorf("%d-%d with %d-%d: got %d %v, want %d %v", c.aMin, c.aMax, c.bMin, c.bMax, v, ok, c.want, c.ok)
		}
	}

	rng := rand.New(rand.NewPCG(11, 12))
	h := testHello(randomMachine(rng, 1, 0))
	w, r := Negotiate(h, "0.4.0")
	if r != nil || w.ProtocolVersion != ProtocolVersion || w.Check(h) != nil {
		t.Fatalf("same versions: %+v %+v", w, r)
	}
	if _, err := Encode(w); err != nil {
		t.Fatal(err)
	}

	// A newer source that no longer speaks versions 1 to 3.
	h.MinVersion, h.ProtocolVersion = 4, 5
	w, r = Negotiate(h, "0.4.0")
	if w != nil || r == nil || r.Code != RefuseVersion {
		t.Fatalf("no common version: %+v %+v", w, r)
	}
	want := "the destination (ferry 0.4.0) refused the migration (version mismatch): no common protocol version: the source (ferry 0.4.0-test) speaks 4 to 5, this destination (ferry 0.4.0) 1 to 3"
	if r.Error() != want {
		t.Errorf("refusal:\n got %s\nwant %s", r.Error(), want)
	}
	if _, err := Encode(r); err != nil {
		t.Fatal(err)
	}
	// A destination that speaks 1-4 picks 3 for a 2-3 source.
	h.MinVersion, h.ProtocolVersion = 2, 3
	w, r = negotiate(h, 1, 4, "0.9.0")
	if r != nil || w.ProtocolVersion != 3 || w.Check(h) != nil {
		t.Fatalf("1-4 with 2-3: %+v %+v", w, r)
	}
	// A destination that does not pick the highest common version.
	w.ProtocolVersion = 2
	if err := w.Check(h); err == nil || !strings.Contains(err.Error(), "chose protocol version 2; the source speaks 2 to 3") {
		t.Errorf("lower version: %v", err)
	}
}

func TestNames(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{TypeMachineState.String(), "machine-state"},
		{Type(0xf3).String(), "type 0xf3"},
		{PhasePostCopyDemand.String(), "postcopy-demand"},
		{Phase(9).String(), "phase 9"},
		{RefuseBusy.String(), "busy"},
		{RefuseCode(77).String(), "code 77"},
		{ErrorTimeout.String(), "timeout"},
		{(&Error{Code: ErrorState, Message: "bad"}).Error(), "peer failed (state): bad"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
	var err error = &Error{Code: ErrorRestore, Message: "x"}
	var we *Error
	if !errors.As(err, &we) {
		t.Error("an Error is not an error")
	}
	p := &Ping{Nonce: 7, UnixNano: 1000}
	pong := p.Reply(time.Unix(0, 5000))
	if pong.Nonce != 7 || pong.PingUnixNano != 1000 || pong.UnixNano != 5000 || pong.RTT(time.Unix(0, 9000)) != 8000 {
		t.Errorf("ping/pong: %+v", pong)
	}
}

// A Refuse needs only a code and a reason; a range, when given, must be one.
func TestRefuseOptionalFields(t *testing.T) {
	r := &Refuse{Code: RefuseBusy, Reason: `a VM named "guest-1" exists`}
	p, err := Encode(r)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(TypeRefuse, p)
	if err != nil || !reflect.DeepEqual(got, r) {
		t.Fatalf("got %+v, %v", got, err)
	}
	if want := `the destination refused the migration (busy): a VM named "guest-1" exists`; r.Error() != want {
		t.Errorf("got %q, want %q", r.Error(), want)
	}
	for _, bad := range []*Refuse{
		{Code: RefuseBusy, Reason: "x", MinVersion: 2, MaxVersion: 1},
		{Code: RefuseBusy, Reason: "x", MaxVersion: 1},
		{Code: RefuseBusy, Reason: "x", MinVersion: 1},
	} {
		if _, err := Encode(bad); err == nil || !strings.Contains(err.Error(), "neither a range of versions from 1 nor unspecified") {
			t.Errorf("%+v: %v", bad, err)
		}
		if _, err := Decode(TypeRefuse, rawPayload(t, bad)); err == nil {
			t.Errorf("%+v decoded", bad)
		}
	}
}
