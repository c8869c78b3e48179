package migration

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/version"
	"github.com/ferry-vmm/ferry/internal/vmm"
	"github.com/ferry-vmm/ferry/internal/wire"
)

// Destination receives a VM.
type Destination struct {
	// Config gives the console and logger of the VM to be built; memory
	// size and vCPUs come from the source.
	Config vmm.Config
	// Admit, if set, may refuse a migration after seeing its Hello (a VM
	// of that name exists, the host is full ...).
	Admit func(h *wire.Hello) error
	// Commit, if set, is called after the state is restored and before the
	// guest starts: it is the point of no return, where the destination's
	// host records that it runs the guest (the source's Resolve asks
	// there). An error stops the migration with the guest never run here.
	Commit func(id string) error
	Log    *slog.Logger
	// RecoveryTimeout bounds how long a guest in post-copy waits for a
	// broken link to the source to come back; past it the guest is
	// stopped (it cannot run without its memory). LinkTimeout declares the
	// link broken when nothing arrived on it for that long. Zero values
	// take the defaults of Options.
	RecoveryTimeout time.Duration
	LinkTimeout     time.Duration
	// AcceptTimeout bounds the wait for the source's first connection
	// (0: as long as ctx allows).
	AcceptTimeout time.Duration

	// onRestored sees the VM after its state is applied, before it runs (tests).
	onRestored func(*vmm.VM)

	ln        net.Listener
	hello     *wire.Hello
	id        [16]byte
	mu        sync.Mutex
	reqLink   *link   // the request channel, attached before the switch
	pc        *pcDest // post-copy, once the source switched
	postcopy  bool    // the source announced post-copy (Postcopy received)
	mainTaken bool    // the main connection arrived
	streams   []*link // page streams 1 … n−1
	// Pages applied from the page streams, and the first stream error;
	// streamed is signalled after every chunk.
	streamPages atomic.Uint64
	streamErr   error
	streamed    chan struct{}
	readers     sync.WaitGroup   // stream readers
	noStreams   bool             // closeStreams ran: no more readers
	vm          *vmm.VM          // being received
	mainNC      net.Conn         // the main connection (a failing stream interrupts its reads)
	need        []uint64         // with postcopy: pages the source will send
	needRanges  []wire.PageRange // the same, as the source listed them
	done        chan struct{}
	endErr      error
	rep         *DestReport
}

// DestReport is the destination's view.
type DestReport struct {
	ID           string        `json:"id"`
	VM           string        `json:"vm"`
	Mode         string        `json:"mode"`
	PagesLoaded  uint64        `json:"pages_loaded"`
	BytesRecv    uint64        `json:"bytes_received"`
	RestoreTime  time.Duration `json:"restore_time_ns"`
	TotalTime    time.Duration `json:"total_time_ns"`
	Iterations   int           `json:"iterations"`
	RestoreNotes []string      `json:"restore_warnings,omitempty"`
	// Warnings are what this host told the source before accepting the
	// guest (wire.Notice): it runs the guest, but not exactly as the
	// source did.
	Warnings []string `json:"warnings,omitempty"`
	// Postcopy is set when the guest resumed in post-copy; complete once
	// Wait returned.
	Postcopy *PostcopyReport `json:"postcopy,omitempty"`
}

// Run receives one migration on the connections ln accepts (the main one,
// and for post-copy a request channel and the re-opened links after a
// break). On success it returns the VM, already running; in post-copy the
// guest then runs before all its memory is here, and Wait tells when the
// migration really ended. On failure nothing runs and the partly received
// VM is gone. Run closes ln when the migration has ended.
func (d *Destination) Run(ctx context.Context, ln net.Listener) (*vmm.VM, *DestReport, error) {
	if d.Log == nil {
		d.Log = slog.New(slog.DiscardHandler)
	}
	d.ln, d.done, d.streamed = ln, make(chan struct{}), make(chan struct{}, 1)
	d.rep = &DestReport{}
	mainCh := make(chan opened, 1)
	go d.accept(mainCh)
	var first opened
	var timeout <-chan time.Time
	if d.AcceptTimeout > 0 {
		t := time.NewTimer(d.AcceptTimeout)
		defer t.Stop()
		timeout = t.C
	}
	select {
	case first = <-mainCh:
	case <-timeout:
		err := fmt.Errorf("no migration arrived within %s", d.AcceptTimeout)
		d.end(err)
		d.closeListener()
		return nil, d.rep, err
	case <-ctx.Done():
		d.end(context.Cause(ctx))
		d.closeListener()
		return nil, d.rep, fmt.Errorf("waiting for the source: %w", context.Cause(ctx))
	}
	nc, conn := first.l.nc, first.l.conn
	d.mu.Lock()
	d.mainNC = nc
	d.mu.Unlock()
	start := time.Now()
	// Reads block; a cancelled context must still end the wait.
	stop := context.AfterFunc(ctx, func() { nc.SetReadDeadline(time.Unix(1, 0)) })
	vm, err := d.receive(ctx, conn, first.hello, d.rep)
	if !stop() && err == nil {
		nc.SetReadDeadline(time.Time{}) // cancelled just after the end: the connection lives on
	}
	d.rep.BytesRecv = conn.BytesReceived()
	d.rep.TotalTime = time.Since(start)
	if err != nil {
		// Stream readers write into guest RAM: stop them before it goes.
		d.closeStreams()
		if vm != nil {
			vm.Close()
		}
		if d.pc != nil {
			d.pc.close()
		}
		// Tell the source, if it still listens, why.
		var pe peerErr
		if !errors.As(err, &pe) {
			conn.WriteMsg(&wire.Error{Code: wire.ErrorInternal, Message: err.Error()})
		}
		nc.Close()
		d.end(err)
		d.closeListener()
		return nil, d.rep, err
	}
	d.mu.Lock()
	pc := d.pc
	d.mu.Unlock()
	if pc == nil {
		go func() { <-vm.Done(); nc.Close() }()
		d.end(nil)
		d.closeListener()
		return vm, d.rep, nil
	}
	go func() {
		err := pc.run(first.l)
		d.mu.Lock()
		d.rep.Postcopy = pc.report()
		d.rep.BytesRecv = pc.bytesReceived()
		d.rep.TotalTime = time.Since(start)
		d.mu.Unlock()
		d.end(err)
		if err == nil {
			// A source that missed the end re-attaches to hear it.
			pc.linger(pc.opts.RecoveryTimeout)
		}
		d.closeListener()
	}()
	return vm, d.rep, nil
}

// Report is the destination's report; complete once Wait returned.
func (d *Destination) Report() *DestReport {
	d.mu.Lock()
	defer d.mu.Unlock()
	r := *d.rep
	return &r
}

// Wait blocks until the migration has ended, post-copy included, and
// returns its error: after a post-copy failure the guest was stopped.
func (d *Destination) Wait() error {
	<-d.done
	return d.endErr
}

func (d *Destination) end(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	select {
	case <-d.done:
		return
	default:
	}
	d.endErr = err
	close(d.done)
}

func (d *Destination) closeListener() {
	d.ln.Close()
	d.mu.Lock()
	d.reqLink.close()
	for _, l := range d.streams {
		l.close()
	}
	d.mu.Unlock()
}

// readStream applies the chunks of one page stream as they come. Pages
// always travel on the same stream, so the streams never touch the same
// page and each applies its chunks in order.
func (d *Destination) readStream(l *link, n uint16) {
	dec := state.NewChunkDecoder()
	defer dec.Close()
	mem := d.vm.Memory()
	regions := mem.Regions()
	fail := func(err error) {
		d.mu.Lock()
		if d.streamErr == nil {
			d.streamErr = err
		}
		main := d.mainNC
		d.mu.Unlock()
		l.close()
		// The main connection's reader learns it now, not at Complete.
		if main != nil {
			main.SetReadDeadline(time.Unix(1, 0))
		}
		d.signalStreamed()
	}
	for {
		m, err := l.conn.ReadMsg()
		if err != nil {
			if d.hasEnded() {
				return
			}
			fail(fmt.Errorf("page stream %d: %w", n, err))
			return
		}
		pages, ok := m.(*wire.Pages)
		if !ok {
			fail(fmt.Errorf("page stream %d: unexpected %T", n, m))
			return
		}
		k, err := state.ApplyPageChunk(pages.Chunk, regions, mem.Bytes(), dec)
		if err != nil {
			fail(fmt.Errorf("bad pages from the source on stream %d (iteration %d): %w", n, pages.Iteration, err))
			return
		}
		d.streamPages.Add(uint64(k))
		d.signalStreamed()
	}
}

// closeStreams closes the page streams, refuses new ones and waits for
// their readers to stop writing into guest RAM.
func (d *Destination) closeStreams() {
	d.mu.Lock()
	d.noStreams = true
	for _, l := range d.streams {
		l.close()
	}
	d.mu.Unlock()
	d.readers.Wait()
}

func (d *Destination) signalStreamed() {
	select {
	case d.streamed <- struct{}{}:
	default:
	}
}

// hasEnded says whether Run's result is known (the streams may close).
func (d *Destination) hasEnded() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// awaitStreams waits until the page streams have delivered what Complete
// counts, besides the main connection's pages.
func (d *Destination) awaitStreams(want, onMain uint64) error {
	timeout := time.NewTimer(DefaultAckTimeout)
	defer timeout.Stop()
	for {
		d.mu.Lock()
		err := d.streamErr
		d.mu.Unlock()
		if err != nil {
			return err
		}
		got := onMain + d.streamPages.Load()
		if got == want {
			return nil
		}
		if got > want {
			return fmt.Errorf("source sent %d pages, %d arrived", want, got)
		}
		select {
		case <-d.streamed:
		case <-timeout.C:
			return fmt.Errorf("source sent %d pages, %d arrived within %s", want, got, DefaultAckTimeout)
		}
	}
}

// opened is the main connection and its Hello.
type opened struct {
	l     *link
	hello *wire.Hello
}

// accept takes the migration's connections: the first Hello is the main
// connection; Attach opens a further channel. Anything else is refused.
func (d *Destination) accept(mainCh chan<- opened) {
	for {
		nc, err := d.ln.Accept()
		if err != nil {
			return
		}
		go d.classify(nc, mainCh)
	}
}

func (d *Destination) classify(nc net.Conn, mainCh chan<- opened) {
	nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	l := newLink(nc)
	conn := l.conn
	m, err := conn.ReadMsg()
	if err != nil {
		d.Log.Warn("connection without a first message", "remote", nc.RemoteAddr(), "err", err)
		nc.Close()
		return
	}
	nc.SetReadDeadline(time.Time{})
	switch a := m.(type) {
	case *wire.Hello:
		d.mu.Lock()
		taken := d.mainTaken
		d.mainTaken = true
		d.mu.Unlock()
		if !taken {
			mainCh <- opened{l, a}
			return
		}
		conn.WriteMsg(&wire.Error{Code: wire.ErrorProtocol, Message: "a migration is already running on this address"})
	case *wire.Attach:
		d.attach(l, a)
		return
	default:
		conn.WriteMsg(&wire.Error{Code: wire.ErrorProtocol, Message: fmt.Sprintf("a connection must open with hello or attach, not %s", m.Type())})
	}
	nc.Close()
}

// attach takes a further channel of the running migration.
func (d *Destination) attach(l *link, a *wire.Attach) {
	d.mu.Lock()
	defer d.mu.Unlock()
	refuse := func(msg string) {
		l.conn.WriteMsg(&wire.Error{Code: wire.ErrorProtocol, Message: msg})
		l.close()
	}
	if d.id == ([16]byte{}) || a.MigrationID != d.id {
		refuse(fmt.Sprintf("no migration %x here", a.MigrationID))
		return
	}
	if d.pc != nil {
		d.pc.attach(l, a)
		return
	}
	if a.Channel == wire.ChannelStream {
		if d.vm == nil || d.noStreams || int(a.Stream) >= int(d.hello.Options.Streams) {
			refuse(fmt.Sprintf("page stream %d: the migration has %d", a.Stream, d.hello.Options.Streams))
			return
		}
		if err := l.conn.WriteMsg(&wire.Attached{Channel: a.Channel}); err != nil {
			l.close()
			return
		}
		d.streams = append(d.streams, l)
		d.readers.Add(1)
		go func() {
			defer d.readers.Done()
			d.readStream(l, a.Stream)
		}()
		return
	}
	if a.Channel != wire.ChannelRequests {
		refuse("the main connection is open; post-copy has not started")
		return
	}
	if err := l.conn.WriteMsg(&wire.Attached{Channel: a.Channel}); err != nil {
		l.close()
		return
	}
	d.reqLink.close()
	d.reqLink = l
}

// peerErr marks errors that came from the source (no need to echo them).
type peerErr struct{ error }

func (d *Destination) receive(ctx context.Context, conn *wire.Conn, hello *wire.Hello, rep *DestReport) (*vmm.VM, error) {
	rep.ID, rep.VM, rep.Mode = hex.EncodeToString(hello.MigrationID[:]), hello.VMName, hello.Mode
	d.mu.Lock()
	d.id, d.hello = hello.MigrationID, hello
	d.mu.Unlock()
	refuse := func(code wire.RefuseCode, err error) (*vmm.VM, error) {
		conn.WriteMsg(&wire.Refuse{Code: code, Reason: err.Error()})
		return nil, peerErr{fmt.Errorf("refused migration of %q: %w", hello.VMName, err)}
	}
	welcome, refusal := wire.Negotiate(hello, version.Version)
	if refusal != nil {
		conn.WriteMsg(refusal)
		return nil, peerErr{fmt.Errorf("refused migration of %q: %s", hello.VMName, refusal.Reason)}
	}
	if _, err := ParseMode(hello.Mode); err != nil {
		return refuse(wire.RefuseOptions, fmt.Errorf("mode %q is not supported here", hello.Mode))
	}
	if codec, _, err := state.ParseCodec(hello.Options.Codec); err != nil || (codec == state.CodecLZ4 && welcome.ProtocolVersion < wire.EncodingsVersion) {
		return refuse(wire.RefuseOptions, fmt.Errorf("codec %q is not supported here", hello.Options.Codec))
	}
	if d.Admit != nil {
		if err := d.Admit(hello); err != nil {
			return refuse(wire.RefuseBusy, err)
		}
	}
	vm, err := vmm.NewForRestore(hello.Header, d.Config)
	if err != nil {
		return refuse(wire.RefuseLayout, err)
	}
	if err := vm.CheckGuestCPUID(hello.CPUID); err != nil {
		vm.Close()
		return refuse(wire.RefuseCPU, err)
	}
	notices, err := checkTSC(vm.TSCFit(hello.CPUID))
	if err != nil {
		vm.Close()
		return refuse(wire.RefuseCPU, err)
	}
	if s := hello.Options.Streams; s > 1 && welcome.ProtocolVersion < wire.EncodingsVersion {
		vm.Close()
		return refuse(wire.RefuseOptions, fmt.Errorf("%d streams need protocol version %d", s, wire.EncodingsVersion))
	}
	for _, n := range notices {
		// Before the Welcome: the source has it before anything moves.
		d.Log.Warn("migration accepted with a warning", "id", rep.ID, "vm", hello.VMName, "warning", n.Text)
		rep.Warnings = append(rep.Warnings, n.Text)
		if err := conn.WriteMsg(n); err != nil {
			vm.Close()
			return nil, fmt.Errorf("answering the source: %w", err)
		}
	}
	d.mu.Lock()
	d.vm = vm // page streams may attach from the welcome on
	d.mu.Unlock()
	if err := conn.WriteMsg(welcome); err != nil {
		return vm, fmt.Errorf("answering the source: %w", err)
	}
	mem := vm.Memory()
	regions := mem.Regions()
	dec := state.NewChunkDecoder()
	defer dec.Close()
	var machine *state.Machine
	for {
		if err := ctx.Err(); err != nil {
			return vm, err
		}
		msg, err := conn.ReadMsg()
		if err != nil {
			var fe *wire.FrameError
			if errors.As(err, &fe) && !fe.Truncated && fe.Err == nil { // bad bytes, not a broken stream
				return vm, fmt.Errorf("corrupt data from the source: %w", err)
			}
			d.mu.Lock()
			serr := d.streamErr
			d.mu.Unlock()
			if serr != nil {
				return vm, serr
			}
			return vm, fmt.Errorf("connection from the source lost: %w", err)
		}
		switch m := msg.(type) {
		case *wire.Pages:
			n, err := state.ApplyPageChunk(m.Chunk, regions, mem.Bytes(), dec)
			if err != nil {
				return vm, fmt.Errorf("bad pages from the source (iteration %d): %w", m.Iteration, err)
			}
			rep.PagesLoaded += uint64(n)
		case *wire.IterationDone:
			rep.Iterations = int(m.Iteration) + 1
			if err := conn.WriteMsg(&wire.IterationAck{Iteration: m.Iteration, PagesReceived: rep.PagesLoaded}); err != nil {
				return vm, fmt.Errorf("acknowledging iteration %d: %w", m.Iteration, err)
			}
		case *wire.MachineState:
			mach, warnings, err := m.Decode(hello.Header)
			if err != nil {
				return vm, fmt.Errorf("bad machine state from the source: %w", err)
			}
			machine = mach
			rep.RestoreNotes = append(rep.RestoreNotes, warnings...)
		case *wire.Postcopy:
			if welcome.ProtocolVersion < wire.PostcopyVersion {
				return vm, fmt.Errorf("post-copy in protocol version %d", welcome.ProtocolVersion)
			}
			if err := d.startPostcopy(vm, m); err != nil {
				return vm, err
			}
		case *wire.Complete:
			if machine == nil {
				return vm, errors.New("source completed without sending the machine state")
			}
			if err := d.awaitStreams(m.Pages, rep.PagesLoaded); err != nil {
				return vm, err
			}
			rep.PagesLoaded = m.Pages
			return d.finish(conn, vm, machine, rep)
		case *wire.Cancel:
			return vm, peerErr{fmt.Errorf("source cancelled the migration: %s", m.Reason)}
		case *wire.Error:
			return vm, peerErr{fmt.Errorf("source failed (%s): %s", m.Code, m.Message)}
		default:
			return vm, fmt.Errorf("unexpected %T from the source", msg)
		}
	}
}

// finish restores the state, passes the point of no return, starts the
// guest and confirms to the source.
func (d *Destination) finish(conn *wire.Conn, vm *vmm.VM, m *state.Machine, rep *DestReport) (*vmm.VM, error) {
	t := time.Now()
	if err := vm.Restore(m); err != nil {
		return vm, err
	}
	rep.RestoreNotes = append(rep.RestoreNotes, vm.RestoreWarnings()...)
	if d.onRestored != nil {
		d.onRestored(vm)
	}
	if d.postcopy {
		// From here a vCPU touching a page the source still holds
		// waits for it.
		pc, err := newPCDest(d, vm)
		if err != nil {
			return vm, err
		}
		d.mu.Lock()
		d.pc = pc
		d.mu.Unlock()
	}
	if d.Commit != nil {
		if err := d.Commit(rep.ID); err != nil {
			return vm, fmt.Errorf("commit refused: %w", err)
		}
	}
	if err := vm.Start(); err != nil {
		return vm, err
	}
	rep.RestoreTime = time.Since(t)
	if d.pc != nil {
		d.pc.resumed(time.Now())
	}
	// From here the guest runs here whatever happens to the connection: the
	// source learns it from this message or, if it is lost, by asking.
	if err := conn.WriteMsg(&wire.Resumed{UnixNano: time.Now().UnixNano(), RestoreTime: rep.RestoreTime}); err != nil {
		d.Log.Warn("guest runs here but the source did not get the confirmation", "err", err)
	}
	return vm, nil
}

// checkTSC decides what a destination does about the guest's TSC
// frequency before it accepts the guest: nothing when this host runs it
// as the source did (same rate within KVM's tolerance, or KVM scales); an
// error, for a Refuse, when the rates differ, KVM here cannot scale and the
// guest was promised an invariant TSC; a Notice for the source's report
// otherwise.
func checkTSC(fit vmm.TSCFit) ([]*wire.Notice, error) {
	msg, refuse := fit.Problem()
	switch {
	case msg == "":
		return nil, nil
	case refuse:
		return nil, errors.New(msg)
	}
	return []*wire.Notice{{Code: wire.NoticeTSC, Text: msg}}, nil
}
