package wire

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-vmm/ferry/internal/state"
)

// memoryImage lays pages out by the header's regions.
type memoryImage struct {
	h   state.Header
	mem []byte
}

func (m *memoryImage) page(gpa uint64) []byte {
	for _, r := range m.h.Regions {
		if gpa >= r.GPA && gpa-r.GPA < r.Size {
			off := r.Offset + gpa - r.GPA
			return m.mem[off : off+state.PageSize]
		}
	}
	panic(fmt.Sprintf("gpa %#x outside the layout", gpa))
}

// pfnsOf lists the page frames of the layout.
func pfnsOf(h state.Header) []uint64 {
	var out []uint64
	for _, r := range h.Regions {
		for off := uint64(0); off < r.Size; off += state.PageSize {
			out = append(out, (r.GPA+off)/state.PageSize)
		}
	}
	return out
}

// migrationResult is what the simulated destination ends up with.
type migrationResult struct {
	machine  *state.Machine
	mem      []byte
	acks     []IterationAck
	pongs    int
	resumed  *Resumed
	src, dst Stats
}

// simulateMigration runs a pre-copy migration of machine m and its memory
// over a net.Pipe: the source writes in one goroutine (and pings from
// another) and reads replies in a third; the destination reads and
// replies in its own.
func simulateMigration(t *testing.T, cfg Config, compress bool) (*state.Machine, []byte, migrationResult) {
	rng := rand.New(rand.NewPCG(13, 14))
	m := randomMachine(rng, 3, 4096+512)
	src := &memoryImage{h: m.Header, mem: make([]byte, m.Header.MemSize)}
	for _, p := range pfnsOf(m.Header) {
		switch p % 5 {
		case 0:
			copy(src.page(p*state.PageSize), randBytes(rng, state.PageSize))
		case 1:
			copy(src.page(p*state.PageSize), bytes.Repeat([]byte{byte(p)}, 100))
		}
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	srcConn, dstConn := NewConnConfig(a, cfg), NewConnConfig(b, cfg)

	// Destination.
	var res migrationResult
	dstDone := make(chan error, 1)
	go func() {
		dstDone <- func() error {
			msg, err := dstConn.ReadMsg()
			if err != nil {
				return err
			}
			hello, ok := msg.(*Hello)
			if !ok {
				return fmt.Errorf("first message %s", msg.Type())
			}
			w, r := Negotiate(hello, "0.4.0-dst")
			if r != nil {
				return r
			}
			if err := dstConn.WriteMsg(w); err != nil {
				return err
			}
			h := hello.Header
			dst := &memoryImage{h: h, mem: make([]byte, h.MemSize)}
			for i := range dst.mem {
				dst.mem[i] = 0xAA // garbage: every page must arrive
			}
			var iterPages, chunks, pages, chunkBytes uint64
			for {
				msg, err := dstConn.ReadMsg()
				if err != nil {
					return err
				}
				switch msg := msg.(type) {
				case *Pages:
					n, err := msg.Decode(h, func(gpa uint64, data []byte) error {
						copy(dst.page(gpa), data)
						return nil
					})
					if err != nil {
						return err
					}
					iterPages += uint64(n)
					pages += uint64(n)
					chunks++
					chunkBytes += uint64(len(msg.Chunk))
				case *IterationDone:
					if err := dstConn.WriteMsg(&IterationAck{Iteration: msg.Iteration, PagesReceived: iterPages}); err != nil {
						return err
					}
					iterPages = 0
				case *Ping:
					if err := dstConn.WriteMsg(msg.Reply(time.Now())); err != nil {
						return err
					}
				case *MachineState:
					mach, warnings, err := msg.Decode(h)
					if err != nil {
						return err
					}
					if len(warnings) > 0 {
						return fmt.Errorf("warnings %q", warnings)
					}
					res.machine = mach
				case *Complete:
					if msg.Chunks != chunks || msg.Pages != pages || msg.Bytes != chunkBytes {
						return fmt.Errorf("complete says %+v, received %d chunks, %d pages, %d bytes", msg, chunks, pages, chunkBytes)
					}
					if res.machine == nil {
						return errors.New("complete before the machine state")
					}
					res.mem = dst.mem
					return dstConn.WriteMsg(&Resumed{UnixNano: time.Now().UnixNano(), RestoreTime: time.Millisecond})
				default:
					return fmt.Errorf("unexpected %s", msg.Type())
				}
			}
		}()
	}()

	// Source: a reader for the reverse direction. It never blocks on
	// anything but the connection (a reader that did could deadlock both
	// sides): it hands the first reply over through a buffered channel and
	// records the others itself.
	first := make(chan Msg, 1)
	readerDone := make(chan error, 1)
	go func() {
		readerDone <- func() error {
			for i := 0; ; i++ {
				msg, err := srcConn.ReadMsg()
				if err != nil {
					return err
				}
				if i == 0 {
					first <- msg
					continue
				}
				switch msg := msg.(type) {
				case *IterationAck:
					res.acks = append(res.acks, *msg)
				case *Pong:
					res.pongs++
				case *Resumed:
					res.resumed = msg
					return nil
				default:
					return fmt.Errorf("source got %s", msg.Type())
				}
			}
		}()
	}()

	hello := testHello(m)
	if err := srcConn.WriteMsg(hello); err != nil {
		t.Fatal(err)
	}
	welcome, ok := (<-first).(*Welcome)
	if !ok || welcome.Check(hello) != nil {
		t.Fatalf("no welcome: %+v", welcome)
	}

	// A pinger writes concurrently with the page stream.
	stopPing := make(chan struct{})
	pingDone := make(chan error, 1)
	go func() {
		for i := uint64(0); ; i++ {
			select {
			case <-stopPing:
				pingDone <- nil
				return
			case <-time.After(time.Millisecond):
			}
			if err := srcConn.WriteMsg(&Ping{Nonce: i, UnixNano: time.Now().UnixNano()}); err != nil {
				pingDone <- err
				return
			}
		}
	}()

	var total Complete
	sendRound := func(iter uint32, phase Phase, dirty []uint64) {
		var sent, sentBytes uint64
		for len(dirty) > 0 {
			n := min(len(dirty), state.ChunkPages)
			data := make([][]byte, n)
			for i, p := range dirty[:n] {
				data[i] = src.page(p * state.PageSize)
			}
			msg, err := NewPages(iter, phase, dirty[:n], data, compress, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := srcConn.WriteMsg(msg); err != nil {
				t.Fatal(err)
			}
			sent += uint64(n)
			sentBytes += uint64(len(msg.Chunk))
			total.Chunks++
			total.Bytes += uint64(len(msg.Chunk))
			dirty = dirty[n:]
		}
		total.Pages += sent
		total.Iterations++
		if err := srcConn.WriteMsg(&IterationDone{Iteration: iter, PagesSent: sent, BytesSent: sentBytes}); err != nil {
			t.Fatal(err)
		}
	}
	// Round 0 sends everything; later rounds what the guest "dirtied",
	// including pages that became zero and pages sent twice.
	all := pfnsOf(m.Header)
	sendRound(0, PhasePreCopy, all)
	for iter := uint32(1); iter < 4; iter++ {
		var dirty []uint64
		for range 300 / iter {
			p := all[rng.IntN(len(all))]
			pg := src.page(p * state.PageSize)
			if rng.IntN(4) == 0 {
				clear(pg)
			} else {
				copy(pg[rng.IntN(state.PageSize-64):], randBytes(rng, 64))
			}
			dirty = append(dirty, p)
		}
		sendRound(iter, PhasePreCopy, dirty)
	}
	close(stopPing)
	if err := <-pingDone; err != nil {
		t.Fatal(err)
	}
	// Paused: the last dirty pages, the machine state, the totals.
	last := []uint64{all[3], all[len(all)-1], all[3]}
	clear(src.page(all[3] * state.PageSize))
	sendRound(4, PhaseStopCopy, last)
	ms, err := NewMachineState(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := srcConn.WriteMsg(ms); err != nil {
		t.Fatal(err)
	}
	if err := srcConn.WriteMsg(&total); err != nil {
		t.Fatal(err)
	}

	if err := <-readerDone; err != nil {
		t.Fatalf("source reader: %v", err)
	}
	if err := <-dstDone; err != nil {
		t.Fatalf("destination: %v", err)
	}
	res.src, res.dst = srcConn.Stats(), dstConn.Stats()
	return m, src.mem, res
}

// A whole pre-copy migration arrives intact: memory, machine state,
// acknowledgements, counters.
func TestSimulatedMigration(t *testing.T) {
	for _, c := range []struct {
		name     string
		cfg      Config
		compress bool
	}{
		{"default frames", Config{}, false},
		{"compressed", Config{}, true},
		{"small frames", Config{FramePayload: 4096}, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, mem, res := simulateMigration(t, c.cfg, c.compress)
			if !reflect.DeepEqual(res.machine, m) {
				t.Fatal("machine state differs")
			}
			if !bytes.Equal(res.mem, mem) {
				t.Fatal("memory differs")
			}
			if len(res.acks) != 5 || res.resumed == nil {
				t.Fatalf("%d acks, resumed %v", len(res.acks), res.resumed)
			}
			for i, a := range res.acks {
				if a.Iteration != uint32(i) || a.PagesReceived == 0 {
					t.Errorf("ack %d: %+v", i, a)
				}
			}
			if res.acks[0].PagesReceived != uint64(len(pfnsOf(m.Header))) {
				t.Errorf("round 0: %d pages acknowledged", res.acks[0].PagesReceived)
			}
			s, d := res.src, res.dst
			if s.BytesSent != d.BytesReceived || s.FramesSent != d.FramesReceived || s.MessagesSent != d.MessagesReceived ||
				d.BytesSent != s.BytesReceived || d.FramesSent != s.FramesReceived || d.MessagesSent != s.MessagesReceived {
				t.Errorf("counters disagree: source %+v, destination %+v", s, d)
			}
			if uint64(res.pongs)+uint64(len(res.acks))+2 != s.MessagesReceived {
				t.Errorf("%d pongs, %d acks, source received %d messages", res.pongs, len(res.acks), s.MessagesReceived)
			}
			t.Logf("source %+v; %d pongs", s, res.pongs)
		})
	}
}

// A single flipped bit anywhere in a stream is detected, and the error
// names the frame it is in (by sequence number) with its type.
func TestBitFlips(t *testing.T) {
	msgs := allMessages(t)
	data := stream(t, Config{FramePayload: 1000}, msgs...)
	frames := framesOf(data)
	frameAt := func(off int) int {
		for i, f := range frames {
			if off >= f.start && off < f.end {
				return i
			}
		}
		t.Fatalf("offset %d outside the frames", off)
		return -1
	}
	step := 1
	if testing.Short() {
		step = 13
	}
	flipped := make([]byte, len(data))
	kinds := map[string]int{}
	for off := 0; off < len(data); off += step {
		i := frameAt(off)
		header := off-frames[i].start < FrameHeaderSize
		for bit := range 8 {
			if !header && bit != off%8 {
				continue // every bit of the headers, one per payload byte
			}
			copy(flipped, data)
			flipped[off] ^= 1 << bit
			c := readConn(flipped, Config{})
			var err error
			for err == nil {
				_, err = c.ReadMsg()
			}
			var fe *FrameError
			if !errors.As(err, &fe) {
				t.Fatalf("bit %d of byte %d (frame %d): %v", bit, off, i, err)
			}
			if fe.Seq != uint64(i) {
				t.Fatalf("bit %d of byte %d (frame %d): error names frame %d: %v", bit, off, i, fe.Seq, err)
			}
			if want := fmt.Sprintf("wire: frame %d (%s): ", i, frames[i].typ); off-frames[i].start != 3 && fe.HaveType && !strings.HasPrefix(err.Error(), want) {
				t.Fatalf("bit %d of byte %d: %v does not start %q", bit, off, err, want)
			}
			kinds[strings.SplitN(fe.Msg, " ", 3)[0]+" "+strings.SplitN(fe.Msg, " ", 3)[1]]++
		}
	}
	t.Logf("%d bytes, %d frames; errors: %v", len(data), len(frames), kinds)
	copy(flipped, data)
	flipped[frames[5].start+FrameHeaderSize+3] ^= 0x40
	c := readConn(flipped, Config{})
	var err error
	for err == nil {
		_, err = c.ReadMsg()
	}
	t.Logf("e.g. %v", err)
	if !strings.HasPrefix(err.Error(), "wire: frame 5 (pages): checksum mismatch (stored 0x") {
		t.Errorf("payload flip: %v", err)
	}
}

// Every truncation is refused as such, naming the frame, except a cut
// between two messages, which is a clean io.EOF.
func TestTruncation(t *testing.T) {
	msgs := allMessages(t)
	data := stream(t, Config{FramePayload: 2000}, msgs...)
	frames := framesOf(data)
	boundaries := map[int]bool{0: true}
	for _, f := range frames {
		if f.flags&FlagMore == 0 {
			boundaries[f.end] = true
		}
	}
	for n := 0; n < len(data); n++ {
		c := readConn(data[:n], Config{})
		var err error
		read := 0
		for err == nil {
			if _, err = c.ReadMsg(); err == nil {
				read++
			}
		}
		if boundaries[n] {
			if err != io.EOF {
				t.Fatalf("cut at %d (between messages): %v", n, err)
			}
			continue
		}
		var fe *FrameError
		if !errors.As(err, &fe) || !fe.Truncated || !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("cut at %d: %v", n, err)
		}
		if _, again := c.ReadMsg(); again != err {
			t.Fatalf("cut at %d: the error does not stick: %v", n, again)
		}
	}
	for _, n := range []int{5, frames[0].end + 20, frames[4].end - 2} {
		c := readConn(data[:n], Config{})
		var err error
		for err == nil {
			_, err = c.ReadMsg()
		}
		t.Logf("cut at %d: %v", n, err)
	}
	// Inside a message split over several frames, at a frame boundary.
	for i, f := range frames {
		if f.flags&FlagMore != 0 {
			c := readConn(data[:f.end], Config{})
			var err error
			for err == nil {
				_, err = c.ReadMsg()
			}
			want := fmt.Sprintf("wire: frame %d (%s): input ended inside a message split over several frames", i+1, f.typ)
			if !strings.HasPrefix(err.Error(), want) || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Errorf("got %v, want %q", err, want)
			}
			break
		}
	}
}

// header builds a frame header.
func header(typ Type, flags, stream uint16, length, seq uint32) []byte {
	h := append([]byte(Magic), FrameVersion, uint8(typ))
	h = le.AppendUint16(h, flags)
	h = le.AppendUint16(h, stream)
	h = le.AppendUint32(h, length)
	return le.AppendUint32(h, seq)
}

// A length beyond the limit is refused before anything is allocated, and
// a lying length within it costs no more than a bounded buffer.
func TestLengthLimits(t *testing.T) {
	for _, c := range []struct {
		name  string
		data  []byte
		want  string
		alloc uint64
	}{
		{"over the limit", header(TypeMachineState, 0, 0, MaxFramePayload+1, 0), "wire: frame 0 (machine-state): payload length 8388609 exceeds the limit of 8388608", 1 << 10},
		{"4 GiB", header(TypePages, 0, 0, 0xffffffff, 0), "wire: frame 0 (pages): payload length 4294967295 exceeds the limit", 1 << 10},
		{"the limit, nothing sent", header(TypeMachineState, 0, 0, MaxFramePayload, 0), "wire: frame 0 (machine-state): truncated after 16 of 8388628 bytes", preallocLimit + 4<<10},
		{"the limit, 100 KiB sent", append(header(TypeMachineState, 0, 0, MaxFramePayload, 0), make([]byte, 100<<10)...), "wire: frame 0 (machine-state): truncated after 102416 of 8388628 bytes", preallocLimit + 4<<10},
	} {
		conn := readConn(c.data, Config{})
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		_, err := conn.ReadMsg()
		runtime.ReadMemStats(&after)
		if err == nil || !strings.HasPrefix(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > c.alloc {
			t.Errorf("%s: allocated %d bytes, at most %d expected", c.name, alloc, c.alloc)
		}
	}

	// A message reassembled beyond MaxMessage is refused.
	ms := &MachineState{Data: make([]byte, 300<<10)}
	data := stream(t, Config{FramePayload: 64 << 10}, ms)
	_, err := readConn(data, Config{MaxMessage: 256 << 10}).ReadMsg()
	if err == nil || err.Error() != "wire: frame 4 (machine-state): message of more than 262144 bytes" {
		t.Errorf("reassembly limit: %v", err)
	}
	if m, err := readConn(data, Config{}).ReadMsg(); err != nil || len(m.(*MachineState).Data) != 300<<10 {
		t.Errorf("reassembly within the limit: %v", err)
	}
}

// Frames that are intact but wrong.
func TestFrameErrors(t *testing.T) {
	welcome := &Welcome{ProtocolVersion: 1, MinVersion: 1, MaxVersion: 1, FerryVersion: "0.4.0"}
	wp, err := Encode(welcome)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		write func(c *Conn) error
		want  string
	}{
		{"unknown required", func(c *Conn) error { return c.writeRawFrame(0xf3, 0, []byte{1, 2}) },
			"wire: frame 0 (type 0xf3): required message type 0xf3 unknown (sent by a newer ferry?)"},
		{"type 0", func(c *Conn) error { return c.writeRawFrame(0, 0, nil) },
			"wire: frame 0 (type 0x00): required message type 0x00 unknown"},
		{"unknown flags", func(c *Conn) error { return c.writeRawFrame(TypeWelcome, 0x10, wp) },
			"wire: frame 0 (welcome): unknown frame flags 0x0010"},
		{"sequence gap", func(c *Conn) error {
			if err := c.WriteMsg(welcome); err != nil {
				return err
			}
			c.wseq++
			return c.WriteMsg(welcome)
		}, "wire: frame 1 (welcome): sequence number 2, expected 1 (frames lost, repeated or reordered)"},
		{"sequence repeated", func(c *Conn) error {
			if err := c.WriteMsg(welcome); err != nil {
				return err
			}
			c.wseq--
			return c.WriteMsg(welcome)
		}, "wire: frame 1 (welcome): sequence number 0, expected 1"},
		{"other stream", func(c *Conn) error { c.stream = 3; return c.WriteMsg(welcome) },
			"wire: frame 0 (welcome): stream 3, this connection carries stream 0"},
		{"invalid payload", func(c *Conn) error {
			return c.writeRawFrame(TypeWelcome, 0, rawPayload(t, &Welcome{ProtocolVersion: 5, MinVersion: 1, MaxVersion: 2, FerryVersion: "x"}))
		}, "wire: frame 0 (welcome): chosen protocol version 5 is outside the destination's range 1 to 2"},
		{"short payload", func(c *Conn) error { return c.writeRawFrame(TypeIterationAck, 0, []byte{1, 0, 0, 0, 9}) },
			"wire: frame 0 (iteration-ack): payload ends in pages received (8 bytes needed, 1 left)"},
		{"interleaved", func(c *Conn) error {
			if err := c.writeRawFrame(TypeMachineState, FlagMore, []byte{4, 0, 0, 0}); err != nil {
				return err
			}
			return c.writeRawFrame(TypePing, FlagOptional, make([]byte, 16))
		}, "wire: frame 1 (ping): frame with flags 0x0001 inside a machine-state message split over several frames"},
		{"empty continuation", func(c *Conn) error { return c.writeRawFrame(TypeMachineState, FlagMore, nil) },
			"wire: frame 0 (machine-state): empty frame with the more flag"},
		{"optional flag changes", func(c *Conn) error {
			if err := c.writeRawFrame(0xf5, FlagOptional|FlagMore, []byte{1}); err != nil {
				return err
			}
			return c.writeRawFrame(0xf5, FlagMore, []byte{1})
		}, "wire: frame 1 (type 0xf5): frame with flags 0x0002 inside a type 0xf5 message"},
	} {
		var buf bytes.Buffer
		w := NewConnConfig(rw{nil, &buf}, Config{})
		if err := c.write(w); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		r := readConn(buf.Bytes(), Config{})
		var err error
		for err == nil {
			_, err = r.ReadMsg()
		}
		var fe *FrameError
		if !strings.HasPrefix(err.Error(), c.want) || !errors.As(err, &fe) {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
	}

	for _, c := range []struct {
		name, data, want string
	}{
		{"http", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", `wire: frame 0: not a ferry migration stream (magic "GE", want "FM")`},
		{"newer framing", "FM\x02\x01" + strings.Repeat("\x00", 12), "wire: frame 0: framing version 2 not supported (this ferry speaks 1)"},
		{"short header", "FM\x01", "wire: frame 0: truncated after 3 of the frame header's 16 bytes"},
	} {
		_, err := readConn([]byte(c.data), Config{}).ReadMsg()
		if err == nil || err.Error() != c.want {
			t.Errorf("%s: got %v, want %q", c.name, err, c.want)
		}
	}
}

// Unknown message types marked optional are skipped, in one frame or
// several, and counted.
func TestUnknownOptionalSkipped(t *testing.T) {
	var buf bytes.Buffer
	w := NewConnConfig(rw{nil, &buf}, Config{})
	ping := &Ping{Nonce: 1, UnixNano: 2}
	for _, step := range []func() error{
		func() error { return w.writeRawFrame(0xf4, FlagOptional, []byte("future")) },
		func() error { return w.writeRawFrame(0xf4, FlagOptional|FlagMore, []byte("split ")) },
		func() error { return w.writeRawFrame(0xf4, FlagOptional|FlagMore, []byte("over ")) },
		func() error { return w.writeRawFrame(0xf4, FlagOptional, nil) },
		func() error { return w.WriteMsg(ping) },
		func() error { return w.writeRawFrame(0xf6, FlagOptional, nil) },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	r := readConn(buf.Bytes(), Config{})
	m, err := r.ReadMsg()
	if err != nil || !reflect.DeepEqual(m, ping) {
		t.Fatalf("got %v, %v", m, err)
	}
	if _, err := r.ReadMsg(); err != io.EOF {
		t.Fatalf("at the end: %v", err)
	}
	if st := r.Stats(); st.Skipped != 3 || st.MessagesReceived != 1 || st.FramesReceived != 6 {
		t.Errorf("stats %+v", st)
	}
	// Known types are decoded with or without the flag (Ping is sent with it).
	if buf.Bytes()[framesOf(buf.Bytes())[4].start+4]&byte(FlagOptional) == 0 {
		t.Error("ping sent without the optional flag")
	}
}

// Many goroutines writing at once produce intact, unmixed messages.
func TestConcurrentWrites(t *testing.T) {
	const writers, each = 12, 40
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	w := NewConnConfig(a, Config{FramePayload: 1000})
	r := NewConnConfig(b, Config{})
	msgFor := func(g, i int) Msg {
		switch i % 3 {
		case 0:
			return &Ping{Nonce: uint64(g)<<32 | uint64(i), UnixNano: int64(i)}
		case 1:
			// Split over several frames.
			return &MachineState{Data: bytes.Repeat([]byte{byte(g), byte(i)}, 1500+i)}
		}
		return &Cancel{Reason: fmt.Sprintf("writer %d message %d", g, i)}
	}
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for g := range writers {
		wg.Go(func() {
			for i := range each {
				if err := w.WriteMsg(msgFor(g, i)); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	next := make([]int, writers) // per writer, the next message expected
	for range writers * each {
		m, err := r.ReadMsg()
		if err != nil {
			t.Fatal(err)
		}
		var g int
		switch m := m.(type) {
		case *Ping:
			g = int(m.Nonce >> 32)
		case *MachineState:
			g = int(m.Data[0])
		case *Cancel:
			fmt.Sscanf(m.Reason, "writer %d", &g)
		}
		if g < 0 || g >= writers {
			t.Fatalf("message from writer %d", g)
		}
		if want := msgFor(g, next[g]); !reflect.DeepEqual(m, want) {
			t.Fatalf("writer %d message %d: got %s, want %s", g, next[g], m.Type(), want.Type())
		}
		next[g]++
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	ws, rs := w.Stats(), r.Stats()
	if ws.MessagesSent != writers*each || ws.FramesSent != rs.FramesReceived || ws.BytesSent != rs.BytesReceived {
		t.Errorf("writer %+v, reader %+v", ws, rs)
	}
}

// failWriter fails after n bytes.
type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if len(p) > f.n {
		n := f.n
		f.n = 0
		return n, errors.New("connection reset")
	}
	f.n -= len(p)
	return len(p), nil
}

// A failed write leaves the stream out of step: every later write fails.
func TestWriteErrorSticks(t *testing.T) {
	c := NewConnConfig(rw{nil, &failWriter{n: 40}}, Config{})
	ping := &Ping{Nonce: 1}
	if err := c.WriteMsg(ping); err != nil {
		t.Fatal(err)
	}
	err := c.WriteMsg(ping)
	if err == nil || err.Error() != "wire: writing frame 1 (ping): connection reset" {
		t.Fatalf("got %v", err)
	}
	if again := c.WriteMsg(&Cancel{Reason: "x"}); again != err {
		t.Errorf("second write: %v", again)
	}
	if st := c.Stats(); st.FramesSent != 1 || st.BytesSent != 40 {
		t.Errorf("stats %+v", st)
	}
}

// The example frame of docs/protocol.md.
func TestDocExample(t *testing.T) {
	var buf bytes.Buffer
	c := NewConnConfig(rw{nil, &buf}, Config{})
	c.wseq = 7
	if err := c.WriteMsg(&Ping{Nonce: 0x0102030405060708, UnixNano: 1767225600000000000}); err != nil {
		t.Fatal(err)
	}
	want := "46 4d 01 31 01 00 00 00 10 00 00 00 07 00 00 00 " +
		"08 07 06 05 04 03 02 01 00 00 fa ed 51 72 86 18 " +
		"fe ce d7 43"
	if got := fmt.Sprintf("% x", buf.Bytes()); got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

// Full-chunk Pages messages through a pipe: framing, CRC and the state
// chunk's encoding and decoding, uncompressed.
func BenchmarkPagesPipe(b *testing.B) {
	rng := rand.New(rand.NewPCG(15, 16))
	h := randomMachine(rng, 1, 0).Header
	pfns := make([]uint64, state.ChunkPages)
	data := make([][]byte, state.ChunkPages)
	for i := range pfns {
		pfns[i], data[i] = uint64(i), randBytes(rng, state.PageSize)
	}
	pr, pw := io.Pipe()
	w := NewConn(rw{nil, pw})
	r := NewConn(rw{pr, nil})
	b.SetBytes(state.ChunkPages * state.PageSize)
	b.ResetTimer()
	go func() {
		for range b.N {
			p, err := NewPages(0, PhasePreCopy, pfns, data, false, 0)
			if err == nil {
				err = w.WriteMsg(p)
			}
			if err != nil {
				pw.CloseWithError(err)
				return
			}
		}
	}()
	for range b.N {
		m, err := r.ReadMsg()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.(*Pages).Decode(h, func(uint64, []byte) error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
}

// A Notice is sent optional: a source from before Notices skips it and
// reads the Welcome that follows.
func TestNoticeSentOptional(t *testing.T) {
	data := stream(t, Config{}, &Notice{Code: NoticeTSC, Text: "TSC rates differ"},
		&Welcome{ProtocolVersion: 3, MinVersion: 1, MaxVersion: 3, FerryVersion: "0.9.0"})
	f := framesOf(data)
	if len(f) != 2 || f[0].typ != TypeNotice || f[0].flags&FlagOptional == 0 {
		t.Fatalf("frames %+v", f)
	}
	// What an older reader sees: the same frame with a type it does not know.
	old := bytes.Clone(data)
	old[f[0].start+3] = 0xf5
	fixFrames(old)
	r := readConn(old, Config{})
	m, err := r.ReadMsg()
	if err != nil || m.Type() != TypeWelcome || r.Stats().Skipped != 1 {
		t.Fatalf("got %v, %v, stats %+v", m, err, r.Stats())
	}
}
