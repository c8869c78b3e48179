package migration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/version"
	"github.com/ferry-vmm/ferry/internal/vmm"
	"github.com/ferry-vmm/ferry/internal/wire"
)

// ErrOutcomeUnknown means the connection failed after the last byte was
// sent and before the destination confirmed: the destination may or may
// not run the guest, so the source leaves it paused rather than risk two
// running copies.
var ErrOutcomeUnknown = errors.New("migration outcome unknown: the destination may be running the guest; the source VM is left paused")

// Source sends a running VM.
type Source struct {
	VM   *vmm.VM
	Name string
	Opts Options
	// Progress, if set, receives a snapshot after every batch of pages.
	Progress func(Progress)
	// Resolve, if set, is asked when the connection fails after the
	// complete machine was sent and before the destination's confirmation:
	// it must find out (from the destination host, on another channel)
	// whether the destination runs the guest, and make sure it never will
	// if it does not yet. Without it such a failure leaves the source paused.
	Resolve func(ctx context.Context, id string) (destinationRunning bool, err error)
	Log     *slog.Logger

	limiter *limiter
	// onFinalState sees the machine state sent at hand-over (tests).
	onFinalState func(*state.Machine)
	mu           sync.Mutex
	cancel       context.CancelCauseFunc
	postcopy     *pcSource // set once the guest runs at the destination
	switching    bool      // Postcopy sent: the destination may run the guest
}

// SetBandwidth changes the bandwidth cap of a running migration.
func (s *Source) SetBandwidth(bytesPerSec int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Opts.Bandwidth = bytesPerSec
	if s.limiter != nil {
		s.limiter.SetRate(bytesPerSec)
	}
}

// ErrCancelled is the cause of a migration cancelled by the operator.
var ErrCancelled = errors.New("migration cancelled by the operator")

// Cancel aborts a running migration; the guest keeps running on the
// source. A migration in post-copy cannot be cancelled: the guest runs at
// the destination and needs the memory held here.
func (s *Source) Cancel() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.switching {
		return errors.New("the migration is in post-copy: the guest runs at the destination and cannot come back; it completes when the destination holds every page")
	}
	if s.cancel != nil {
		s.cancel(ErrCancelled)
	}
	return nil
}

// sender is the state of one outgoing migration.
type sender struct {
	*Source
	ctx   context.Context
	dial  Dialer
	conn  *wire.Conn // the main connection
	net   *liveConn  // under conn
	req   *link      // the post-copy request channel (nil unless it may be needed)
	mem   *guestmem.Memory
	pages pageIndex
	rep   *Report
	start time.Time
	sent  []uint64 // bitmap: pages sent at least once
	// inbox carries the destination's messages and, last, the read error
	// that ended them: one channel, so that a Resumed that arrived just
	// before the connection closed is never overtaken by the close.
	inbox     chan received
	progress  Progress
	id        [16]byte
	paused    bool
	pausedAt  time.Time
	complete  bool          // every byte of the guest was handed to the connection
	resumedAt bool          // the destination runs the guest (post-copy: from the switch)
	version   uint16        // negotiated protocol version
	profile   *DirtyProfile // the guest's writes, sampled before the migration (auto)
	// heat counts, per page, the pre-copy passes during which the guest
	// dirtied it (saturating): passes send cold pages first.
	heat    []uint8
	pipe    *pipeline
	streams []*link       // page streams 1 … Streams−1 (stream 0 is the main connection)
	statMu  sync.Mutex    // the counters the streams' writers share
	left    atomic.Uint64 // pages still to send in the current pass
	// bytesBefore counts bytes sent on connections closed before the
	// current ones (post-copy links re-opened after a break).
	bytesBefore uint64
	chunks      uint64 // Pages messages sent
	chunkBytes  uint64 // bytes of their chunks
	// passDeadline cuts the current pre-copy pass (zero: none); unsent
	// is what a cut pass did not reach and the destination still needs.
	passDeadline time.Time
	unsent       []uint64
}

// Dialer opens a connection to the destination (a mutually authenticated
// TLS connection in practice). A migration opens one, or two when it may
// end in post-copy, and more after a post-copy link broke.
type Dialer func(ctx context.Context) (net.Conn, error)

// Run migrates the VM to the destination dial reaches. On success the
// destination runs the guest and the source VM has been stopped. On
// failure before the destination ran the guest, the guest runs on at the
// source (Report.RolledBack); after it (post-copy), the source keeps the
// guest paused and its memory until the destination has every page.
func (s *Source) Run(ctx context.Context, dial Dialer) (*Report, error) {
	opts := s.Opts.withDefaults()
	s.Opts = opts
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	s.mu.Lock()
	s.cancel = cancel
	s.limiter = newLimiter(opts.Bandwidth)
	s.mu.Unlock()

	mem := s.VM.Memory()
	idb := make([]byte, 16)
	rand.Read(idb)
	x := &sender{
		Source: s, ctx: ctx, dial: dial, mem: mem,
		pages: pageIndex{regions: mem.Regions()}, start: time.Now(),
		sent:  make([]uint64, s.VM.DirtyBitmapWords()),
		inbox: make(chan received, 16),
		rep: &Report{
			ID: hex.EncodeToString(idb), VM: s.Name, Mode: opts.Mode, MemoryBytes: mem.Size(),
			BandwidthLimit: opts.Bandwidth, DowntimeLimit: opts.DowntimeLimit,
		},
	}
	copy(x.id[:], idb)
	err := x.run()
	x.closeLinks()
	x.rep.TotalTime = time.Since(x.start)
	x.rep.BytesTotal = x.bytesSent()
	if x.rep.TotalTime > 0 {
		x.rep.AvgThroughput = float64(x.rep.BytesTotal) / x.rep.TotalTime.Seconds()
	}
	if err != nil {
		x.rep.Result = "failed"
		if errors.Is(err, ErrCancelled) {
			x.rep.Result = "cancelled"
		}
		x.rep.Error = err.Error()
		x.report(PhaseFailed)
		return x.rep, err
	}
	x.rep.Result = "completed"
	x.progress.RemainingBytes = 0
	x.report(PhaseCompleted)
	return x.rep, nil
}

func (x *sender) run() error {
	if err := x.handshake(); err != nil {
		// Nothing was paused: the guest never stopped and runs on here,
		// whether the destination refused, the link failed or the
		// operator cancelled before the Welcome.
		x.rep.RolledBack = true
		return err
	}
	go x.receive(x.conn, x.inbox)
	x.rep.SetupTime = time.Since(x.start)
	pipe, err := newPipeline(x)
	if err != nil {
		return x.rollback(err)
	}
	x.pipe = pipe
	defer pipe.close()
	x.rep.Transfer.Codec = state.FormatCodec(x.Opts.Codec, x.Opts.CodecLevel)
	x.rep.Transfer.Workers = x.Opts.Workers
	err = x.transfer()
	x.endThrottle()
	if err == nil {
		return nil
	}
	return x.rollback(err)
}

// handshake sends Hello and waits for Welcome: protocol version, memory
// layout, vCPU count and CPU features are checked before anything stops.
func (x *sender) handshake() error {
	x.report(PhaseSetup)
	c, err := x.dial(x.ctx)
	if err != nil {
		return fmt.Errorf("connecting to the destination: %w", err)
	}
	l := newLink(c)
	x.net, x.conn = l.nc, l.conn
	cpuid, header, err := x.VM.GuestCPUID()
	if err != nil {
		return fmt.Errorf("reading the guest's CPU model: %w", err)
	}
	hello := &wire.Hello{
		ProtocolVersion: wire.ProtocolVersion, MinVersion: wire.MinProtocolVersion,
		FerryVersion: version.Version, VMName: x.Name, Mode: string(x.Opts.Mode),
		Header: header, CPUID: cpuid, MigrationID: x.id,
		// The codec's level is the sender's business: the name is enough.
		Options: wire.Options{Codec: x.Opts.Codec.String(), PageSize: guestmem.PageSize, Streams: uint16(x.Opts.Streams)},
	}
	if err := x.conn.WriteMsg(hello); err != nil {
		return fmt.Errorf("sending hello: %w", err)
	}
	reply, err := x.readDirect()
	for err == nil {
		n, ok := reply.(*wire.Notice)
		if !ok {
			break
		}
		// Before the Welcome, so before anything moves: say it now.
		x.Log.Warn("the destination warns", "id", x.rep.ID, "about", n.Code.String(), "warning", n.Text)
		x.rep.Warnings = append(x.rep.Warnings, "destination: "+n.Text)
		reply, err = x.readDirect()
	}
	if err != nil {
		return fmt.Errorf("waiting for the destination's welcome: %w", err)
	}
	switch r := reply.(type) {
	case *wire.Welcome:
		if err := r.Check(hello); err != nil {
			return fmt.Errorf("destination's welcome: %w", err)
		}
		x.version = r.ProtocolVersion
		if r.ProtocolVersion < wire.EncodingsVersion && x.Opts.needsEncodings() {
			return fmt.Errorf("the destination (ferry %s) speaks migration protocol version %d, which has no lz4, delta or dedup records: use --compress zstd|none without --delta and --dedup", r.FerryVersion, r.ProtocolVersion)
		}
		for s := 1; s < x.Opts.Streams; s++ {
			l, _, err := x.attachStream(wire.ChannelStream, 0, uint16(s))
			if err != nil {
				return fmt.Errorf("opening page stream %d: %w", s, err)
			}
			x.streams = append(x.streams, l)
		}
		if !x.Opts.mayPostcopy() {
			return nil
		}
		if r.ProtocolVersion < wire.PostcopyVersion {
			return fmt.Errorf("the destination (ferry %s) speaks migration protocol version %d, which has no post-copy: use --mode precopy", r.FerryVersion, r.ProtocolVersion)
		}
		x.req, _, err = x.attach(wire.ChannelRequests, 0)
		return err
	case *wire.Refuse:
		return fmt.Errorf("destination refused the migration (%s): %s", r.Code, r.Reason)
	case *wire.Error:
		return fmt.Errorf("destination error: %s", r.Message)
	}
	return fmt.Errorf("destination answered hello with %T", reply)
}

// readDirect reads one message before the receive goroutine runs,
// honouring cancellation.
func (x *sender) readDirect() (wire.Msg, error) {
	type res struct {
		m   wire.Msg
		err error
	}
	ch := make(chan res, 1)
	go func() {
		m, err := x.conn.ReadMsg()
		ch <- res{m, err}
	}()
	select {
	case r := <-ch:
		return r.m, r.err
	case <-x.ctx.Done():
		return nil, context.Cause(x.ctx)
	}
}

// received is one message from the destination, or the error that ended
// the connection.
type received struct {
	msg wire.Msg
	err error
}

// receive passes the destination's messages on conn to inbox.
func (x *sender) receive(conn *wire.Conn, inbox chan<- received) {
	for {
		m, err := conn.ReadMsg()
		select {
		case inbox <- received{m, err}:
		case <-x.ctx.Done():
			return
		}
		if err != nil {
			return
		}
	}
}

// checkPeer surfaces an error or cancellation from the destination side
// without blocking.
func (x *sender) checkPeer() error {
	for {
		select {
		case r := <-x.inbox:
			if r.err != nil {
				return fmt.Errorf("connection to the destination lost: %w", r.err)
			}
			if err := peerError(r.msg); err != nil {
				return err
			}
		case <-x.ctx.Done():
			return context.Cause(x.ctx)
		default:
			return nil
		}
	}
}

func peerError(m wire.Msg) error {
	switch r := m.(type) {
	case *wire.Error:
		return fmt.Errorf("destination failed (%s): %s", r.Code, r.Message)
	case *wire.Cancel:
		return fmt.Errorf("destination cancelled: %s", r.Reason)
	}
	return nil
}

func (x *sender) transfer() error {
	switch x.Opts.Mode {
	case ModeStopCopy:
		x.rep.SwitchReason = SwitchStopCopyMode
		return x.handover(nil)
	case ModePostCopy, ModeDemand:
		x.predictFixed()
		return x.postcopyAtOnce()
	case ModeAuto:
		// Watch the guest's writes first: the prediction after the
		// first pass decides the technique.
		p, err := SampleDirty(x.ctx, x.VM, x.Opts.SampleTime, sampleTick)
		if err != nil {
			return fmt.Errorf("sampling the guest's dirty rate: %w", err)
		}
		x.profile = p
		x.rep.SampleTime = p.SampleTime
	}
	return x.precopy()
}

// precopy sends every page while the guest runs, then what it dirtied,
// pass after pass, until the rest fits the downtime limit (then
// stop-and-copy) or a bound says to switch: stop-and-copy for plain
// pre-copy, post-copy for hybrid and for --postcopy-on-stall.
func (x *sender) precopy() error {
	dirty := make([]uint64, len(x.sent))
	if err := x.VM.StartDirtyLog(); err != nil {
		return err
	}
	defer x.VM.StopDirtyLog()
	precopyStart := time.Now()
	var stalls int
	var lastRemaining float64
	// Iteration 0: every page that is not zero; later iterations: what
	// the guest dirtied meanwhile.
	todo, err := x.dataPages()
	if err != nil {
		return err
	}
	for iter := 0; ; iter++ {
		// A pass stops where a time bound falls, not at its end: a first
		// pass over a big guest can outlast hybrid's pre-copy time (or the
		// forced switch) many times over.
		x.passDeadline = precopyStart.Add(x.precopyBound())
		it, err := x.sendPassPipelined(iter, PhasePreCopy, todo, iter == 0)
		x.passDeadline = time.Time{}
		if err != nil {
			return err
		}
		clear(dirty)
		n, err := x.VM.FetchDirty(dirty)
		if err != nil {
			return err
		}
		// What is left: the pages dirtied (n, the guest's dirty rate) and
		// those a cut pass did not reach.
		pending := n
		if x.unsent != nil {
			for i := range dirty {
				dirty[i] |= x.unsent[i]
			}
			pending, x.unsent = int(countSet(dirty)), nil
		}
		x.warm(dirty)
		it.DirtyPages = uint64(n)
		if it.Duration > 0 {
			it.DirtyRate = float64(n) * guestmem.PageSize / it.Duration.Seconds()
		}
		x.rep.Iterations = append(x.rep.Iterations, *it)
		x.rep.BytesPrecopy += it.Bytes
		x.adjustThrottle(iter, float64(it.Pages)*guestmem.PageSize, float64(n)*guestmem.PageSize, it.Duration)
		if err := x.conn.WriteMsg(&wire.IterationDone{Iteration: uint32(iter), PagesSent: it.Pages, BytesSent: it.Bytes, DirtyPages: uint64(n)}); err != nil {
			return fmt.Errorf("connection to the destination lost: %w", err)
		}
		remaining := float64(pending) * guestmem.PageSize
		// What is left counts pages; the pass moved pages at this rate
		// (compression and dedup make it faster than the wire's). A
		// short pass measures how fast the socket buffers fill, not the
		// link: never count on more than the cap allows.
		bw := 0.0
		if it.Duration > 0 && it.Pages > 0 {
			bw = float64(it.Pages) * guestmem.PageSize / it.Duration.Seconds()
			ratio := float64(it.Bytes) / (float64(it.Pages) * guestmem.PageSize)
			if lim := float64(x.limiter.Rate()); lim > 0 && ratio > 0 && bw > lim/ratio {
				bw = lim / ratio
			}
		}
		x.progress.RemainingBytes = uint64(remaining)
		x.progress.DirtyRate = it.DirtyRate
		// A pass that did not shrink what is left by a tenth made no
		// progress; two in a row are a stall.
		if iter > 0 && remaining > 0.9*lastRemaining {
			stalls++
		} else {
			stalls = 0
		}
		lastRemaining = remaining
		elapsed := time.Since(precopyStart)
		toPostcopy := false
		autoPostcopy := iter == 0 && x.decideAfterFirstPass(it, n)
		switch {
		case bw > 0 && time.Duration(remaining/bw*float64(time.Second)) <= x.Opts.DowntimeLimit:
			x.rep.SwitchReason = SwitchConverged
		case x.Opts.Mode == ModeHybrid && x.Opts.PrecopyPasses > 0 && iter+1 >= x.Opts.PrecopyPasses:
			x.rep.SwitchReason, toPostcopy = SwitchHybridPasses, true
		case x.Opts.Mode == ModeHybrid && x.Opts.PrecopyTime > 0 && elapsed >= x.Opts.PrecopyTime:
			x.rep.SwitchReason, toPostcopy = SwitchHybridTime, true
		case autoPostcopy:
			x.rep.SwitchReason, toPostcopy = SwitchAutoPostcopy, true
		case x.postcopyOnStall() && stalls >= 2:
			x.rep.SwitchReason, toPostcopy = SwitchStalled, true
		case iter+1 >= x.Opts.MaxIterations:
			x.rep.SwitchReason, toPostcopy = SwitchMaxIterations, x.Opts.mayPostcopy()
		case elapsed >= x.Opts.PrecopyTimeout:
			x.rep.SwitchReason, toPostcopy = SwitchTimeout, x.Opts.mayPostcopy()
		}
		if x.rep.SwitchReason == "" {
			todo = append(todo[:0:0], dirty...)
			continue
		}
		x.rep.PrecopyTime = elapsed
		if toPostcopy {
			return x.switchToPostcopy(dirty)
		}
		return x.handover(dirty)
	}
}

// precopyBound is the longest pre-copy may run: hybrid's pre-copy time
// or the forced switch, whichever comes first.
func (x *sender) precopyBound() time.Duration {
	bound := x.Opts.PrecopyTimeout
	if x.Opts.Mode == ModeHybrid && x.Opts.PrecopyTime > 0 {
		bound = min(bound, x.Opts.PrecopyTime)
	}
	return bound
}

// dataPages is a bitmap of the pages that may hold data: the memfd's
// holes (never written) are zero without reading them.
func (x *sender) dataPages() ([]uint64, error) {
	bm := make([]uint64, len(x.sent))
	if err := x.mem.MarkData(bm); err != nil {
		return nil, err
	}
	return bm, nil
}

func phaseCode(p Phase) wire.Phase {
	if p == PhaseStopCopy {
		return wire.PhaseStopCopy
	}
	return wire.PhasePreCopy
}

// handover pauses the guest, sends what is still dirty (everything in
// stop-and-copy mode) and the machine state, and waits for the destination
// to confirm it runs the guest.
func (x *sender) handover(dirty []uint64) error {
	if err := x.pause(); err != nil {
		return err
	}
	var todo []uint64
	skipZero := false
	if dirty == nil { // stop-and-copy: everything, zero pages left out
		var err error
		if todo, err = x.dataPages(); err != nil {
			return err
		}
		skipZero = true
	} else {
		if _, err := x.VM.FetchDirty(dirty); err != nil {
			return err
		}
		todo = dirty
	}
	it, err := x.sendPassPipelined(len(x.rep.Iterations), PhaseStopCopy, todo, skipZero)
	if err != nil {
		return err
	}
	x.rep.Iterations = append(x.rep.Iterations, *it)
	x.rep.BytesStopCopy = it.Bytes
	if err := x.sendMachine(); err != nil {
		return err
	}
	if err := x.awaitResumed(); err != nil {
		return err
	}
	x.VM.Stop() // released: the guest lives on at the destination
	return nil
}

func (x *sender) pause() error {
	if err := x.VM.Pause(); err != nil {
		return err
	}
	x.paused = true
	x.pausedAt = time.Now()
	x.rep.SwitchUnixNano = x.pausedAt.UnixNano()
	return nil
}

// sendMachine sends the machine state and the totals; from here the
// destination may run the guest.
func (x *sender) sendMachine() error {
	m, err := x.VM.Capture()
	if err != nil {
		return err
	}
	if x.onFinalState != nil {
		x.onFinalState(m)
	}
	ms, err := wire.NewMachineState(m)
	if err != nil {
		return err
	}
	b0 := x.conn.BytesSent()
	if err := x.conn.WriteMsg(ms); err != nil {
		return fmt.Errorf("connection to the destination lost while sending the machine state: %w", err)
	}
	done := &wire.Complete{Iterations: uint32(len(x.rep.Iterations)), Chunks: x.chunks, Pages: x.rep.PagesSent, Bytes: x.chunkBytes}
	if err := x.conn.WriteMsg(done); err != nil {
		return fmt.Errorf("connection to the destination lost while sending the end of the migration: %w", err)
	}
	x.rep.BytesState = x.conn.BytesSent() - b0
	x.complete = true
	x.report(PhaseHandover)
	return nil
}

// awaitResumed waits for the destination's confirmation that it runs the
// guest.
func (x *sender) awaitResumed() error {
	timer := time.NewTimer(x.Opts.AckTimeout)
	defer timer.Stop()
	for {
		select {
		case in := <-x.inbox:
			if in.err != nil {
				return fmt.Errorf("connection to the destination lost before it confirmed: %w", in.err)
			}
			msg := in.msg
			if r, ok := msg.(*wire.Resumed); ok {
				x.rep.Downtime = time.Since(x.pausedAt)
				x.rep.RestoreTime = r.RestoreTime
				x.resumedAt = true
				return nil
			}
			if err := peerError(msg); err != nil {
				return err
			}
		case <-timer.C:
			return fmt.Errorf("destination did not confirm within %s", x.Opts.AckTimeout)
		case <-x.ctx.Done():
			return context.Cause(x.ctx)
		}
	}
}

// rollback decides what happens to the guest after a failure. Before the
// last byte went out the destination cannot run the guest: resume here.
// After it, only the destination's side can tell.
func (x *sender) rollback(cause error) error {
	if x.resumedAt {
		// Post-copy: the guest runs at the destination and part of its
		// memory is only here. Nothing can be rolled back; the VM stays
		// paused here (never to run again) and its memory goes with
		// this process.
		x.VM.Stop()
		return fmt.Errorf("post-copy failed after the guest moved (the destination stops it when it cannot get its memory): %w", cause)
	}
	x.conn.WriteMsg(&wire.Cancel{Reason: cause.Error()}) // best effort
	if !x.paused {
		x.rep.RolledBack = true
		return cause
	}
	if x.complete {
		if x.Resolve == nil {
			return fmt.Errorf("%w (%v)", ErrOutcomeUnknown, cause)
		}
		running, err := x.Resolve(context.WithoutCancel(x.ctx), x.rep.ID)
		if err != nil {
			return fmt.Errorf("%w (%v; asking the destination: %v)", ErrOutcomeUnknown, cause, err)
		}
		if running {
			x.VM.Stop()
			x.rep.Error = ""
			return nil // the destination confirmed on the other channel
		}
	}
	x.VM.Resume()
	x.rep.RolledBack = true
	return cause
}

func (x *sender) report(p Phase) {
	x.progress.Phase = p
	x.emit()
}

func (x *sender) emit() {
	if x.Progress == nil {
		return
	}
	p := x.progress
	p.Elapsed = time.Since(x.start)
	if p.Throughput > 0 && p.RemainingBytes > 0 {
		p.ETA = time.Duration(float64(p.RemainingBytes) / p.Throughput * float64(time.Second))
	}
	x.Progress(p)
}
