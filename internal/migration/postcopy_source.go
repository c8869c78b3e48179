package migration

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/wire"
)

// The source's side of post-copy: the switch, the background push, the
// request server, and re-opening a broken link (docs/migration.md,
// "Post-copy").

// prepageWindow is how many pages after a faulting page the push sends
// first: guests touch memory in runs, so the neighbourhood of a fault is
// likely to be touched next.
const prepageWindow = 128

// attach opens a further connection of this migration.
func (x *sender) attach(ch wire.Channel, attempt uint32) (*link, *wire.Attached, error) {
	return x.attachStream(ch, attempt, 0)
}

// attachStream is attach with a page stream's number.
func (x *sender) attachStream(ch wire.Channel, attempt uint32, stream uint16) (*link, *wire.Attached, error) {
	ctx, cancel := context.WithTimeout(x.ctx, x.Opts.LinkTimeout)
	defer cancel()
	nc, err := x.dial(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("opening the %s channel: %w", ch, err)
	}
	l := newLink(nc)
	// The answer may be long (the missing pages): a link timeout of
	// silence, not for the whole exchange.
	l.watch(x.Opts.LinkTimeout)
	nc.SetWriteDeadline(time.Now().Add(x.Opts.LinkTimeout))
	if err := l.conn.WriteMsg(&wire.Attach{MigrationID: x.id, Channel: ch, Attempt: attempt, Stream: stream}); err != nil {
		l.close()
		return nil, nil, fmt.Errorf("opening the %s channel: %w", ch, err)
	}
	m, err := l.conn.ReadMsg()
	if err != nil {
		l.close()
		return nil, nil, fmt.Errorf("opening the %s channel: %w", ch, err)
	}
	nc.SetWriteDeadline(time.Time{})
	l.watch(0)
	switch r := m.(type) {
	case *wire.Attached:
		return l, r, nil
	case *wire.Error:
		l.close()
		return nil, nil, &peerGaveUp{fmt.Errorf("destination refused the %s channel (%s): %s", ch, r.Code, r.Message)}
	}
	l.close()
	return nil, nil, fmt.Errorf("destination answered attach with %T", m)
}

// peerGaveUp marks an error the destination sent: retrying cannot help.
type peerGaveUp struct{ error }

func (e *peerGaveUp) Unwrap() error { return e.error }

// closeLinks closes every connection of the migration.
func (x *sender) closeLinks() {
	if x.net != nil {
		x.net.Close()
	}
	x.req.close()
	for _, l := range x.streams {
		l.close()
	}
}

// bytesSent counts every byte sent to the destination, on every
// connection this migration opened.
func (x *sender) bytesSent() uint64 {
	n := x.bytesBefore
	if x.conn != nil {
		n += x.conn.BytesSent()
	}
	if x.req != nil {
		n += x.req.conn.BytesSent()
	}
	for _, l := range x.streams {
		n += l.conn.BytesSent()
	}
	return n
}

// postcopyAtOnce switches to post-copy without pre-copy. The pages the
// destination needs are those that are not zero: the memfd's holes are
// zero without a look; pages with data are read for zeros while the guest
// still runs, and dirty logging catches what it writes meanwhile.
func (x *sender) postcopyAtOnce() error {
	if err := x.VM.StartDirtyLog(); err != nil {
		return err
	}
	defer x.VM.StopDirtyLog()
	need, err := x.dataPages()
	if err != nil {
		return err
	}
	bytes := x.mem.Bytes()
	forEachSet(need, func(idx uint64) error {
		off := idx * guestmem.PageSize
		if isZeroPage(bytes[off : off+guestmem.PageSize]) {
			clearBit(need, idx)
		}
		return nil
	})
	x.rep.SwitchReason = SwitchPostCopyMode
	if x.Opts.Mode == ModeDemand {
		x.rep.SwitchReason = SwitchDemandMode
	}
	return x.switchToPostcopy(need)
}

// switchToPostcopy pauses the guest, tells the destination which pages it
// needs (need, plus what the guest dirtied since), sends the machine state
// and, once the destination runs the guest, serves its memory until it
// holds every page.
func (x *sender) switchToPostcopy(need []uint64) error {
	if err := x.pause(); err != nil {
		return err
	}
	dirty := make([]uint64, len(need))
	if _, err := x.VM.FetchDirty(dirty); err != nil {
		return err
	}
	for i := range need {
		need[i] |= dirty[i]
	}
	x.rep.Postcopy = &PostcopyReport{PagesNeeded: countSet(need)}
	x.mu.Lock()
	x.switching = true // from here a cancel could leave the guest without its memory
	x.mu.Unlock()
	msg := &wire.Postcopy{Need: x.pages.rangesOf(need)}
	if _, err := wire.Encode(msg); err != nil {
		return fmt.Errorf("switching to post-copy: %w", err)
	}
	b0 := x.conn.BytesSent()
	if err := x.conn.WriteMsg(msg); err != nil {
		return fmt.Errorf("connection to the destination lost while switching to post-copy: %w", err)
	}
	if err := x.sendMachine(); err != nil {
		return err
	}
	x.rep.BytesState += x.conn.BytesSent() - b0
	linkUp := true
	if err := x.awaitResumed(); err != nil {
		// The destination may have resumed the guest and lost only the
		// confirmation: then it needs the pages whatever happened here.
		// Its daemon can tell; without one, re-attaching tells (the
		// destination answers whether post-copy started).
		if x.Resolve != nil {
			running, rerr := x.Resolve(context.WithoutCancel(x.ctx), x.rep.ID)
			if rerr != nil || !running {
				return err
			}
			x.resumedAt = true
		}
		x.Log.Warn("no confirmation from the destination; re-attaching to serve its post-copy", "err", err)
		x.rep.Downtime = time.Since(x.pausedAt)
		linkUp = false
	}
	return x.postcopyPhase(need, linkUp)
}

// pcSource is the source's post-copy state.
type pcSource struct {
	x      *sender
	mu     sync.Mutex
	need   []uint64 // pages not yet sent on the current link
	left   uint64
	hot    []uint64 // pages that faulted, most recent last
	cursor uint64   // where the linear push goes on
	push   bool     // background push on (demand paging: after Finish)
	wake   chan struct{}
	retry  chan struct{} // the operator asks to re-open the link now
}

func (p *pcSource) signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// postcopyPhase serves the guest's memory to the destination until it
// holds every page (or the guest ended there), across link breaks.
func (x *sender) postcopyPhase(need []uint64, linkUp bool) error {
	p := &pcSource{x: x, need: need, left: countSet(need), push: x.Opts.Mode != ModeDemand,
		wake: make(chan struct{}, 1), retry: make(chan struct{}, 1)}
	x.mu.Lock()
	x.postcopy = p
	x.mu.Unlock()
	start := time.Now()
	x.report(PhasePostCopy)
	for {
		if linkUp {
			done, err := p.runLink()
			if done != nil {
				x.finishPostcopy(done, time.Since(start))
				x.VM.Stop() // every page is at the destination: release
				return nil
			}
			var gaveUp *peerGaveUp
			if errors.As(err, &gaveUp) || x.ctx.Err() != nil {
				return err
			}
			x.Log.Warn("post-copy link broken; re-opening it", "err", err)
		}
		down := time.Now()
		x.rep.Postcopy.LinkBreaks++
		missing, err := p.reconnect(down)
		if err != nil {
			return err
		}
		x.resumedAt = true // the destination said post-copy started
		x.rep.Postcopy.LinkDownFor += time.Since(down)
		if err := p.reset(missing); err != nil {
			return err
		}
		linkUp = true
	}
}

func (x *sender) finishPostcopy(d *wire.PostcopyDone, dur time.Duration) {
	pr := x.rep.Postcopy
	pr.Duration = dur
	pr.Faults, pr.ZeroFaults = d.Faults, d.ZeroFaults
	pr.FaultP50, pr.FaultP99, pr.FaultMax, pr.Blocked = d.FaultP50, d.FaultP99, d.FaultMax, d.FaultTotal
	pr.Residency = d.Residency
	pr.End = d.End.String()
	pr.PagesNever = d.PagesMissing
}

// reset takes the destination's list of missing pages after a link was
// re-opened: pages in flight when it broke may be lost.
func (p *pcSource) reset(missing []wire.PageRange) error {
	bm, err := p.x.pages.bitmapOf(missing, len(p.need))
	if err != nil {
		return fmt.Errorf("destination's missing pages: %w", err)
	}
	p.mu.Lock()
	p.need, p.left = bm, countSet(bm)
	p.mu.Unlock()
	return nil
}

// reconnect re-opens the main and request channels, trying until the
// recovery timeout, and returns what the destination still misses.
func (p *pcSource) reconnect(down time.Time) ([]wire.PageRange, error) {
	x := p.x
	x.closeLinks()
	x.report(PhasePostCopy)
	for attempt := uint32(1); ; attempt++ {
		if time.Since(down) > x.Opts.RecoveryTimeout {
			return nil, fmt.Errorf("post-copy link to the destination down for %s (recovery timeout): giving up; the destination's state is unknown (if its guest still needed pages held here, it stops the guest)", x.Opts.RecoveryTimeout)
		}
		main, att, err := x.attach(wire.ChannelMain, attempt)
		if err == nil {
			var req *link
			if req, _, err = x.attach(wire.ChannelRequests, attempt); err == nil {
				if !att.PostcopyStarted {
					main.close()
					req.close()
					return nil, &peerGaveUp{errors.New("destination no longer knows the post-copy of this migration")}
				}
				x.bytesBefore += x.conn.BytesSent() + x.req.conn.BytesSent()
				x.net, x.conn, x.req = main.nc, main.conn, req
				x.inbox = make(chan received, 16)
				go x.receive(x.conn, x.inbox)
				x.Log.Info("post-copy link re-opened", "attempt", attempt, "down", time.Since(down), "missing_ranges", len(att.Missing))
				return att.Missing, nil
			}
			main.close()
		}
		var gaveUp *peerGaveUp
		if errors.As(err, &gaveUp) {
			return nil, err
		}
		x.Log.Info("re-opening the post-copy link failed; retrying", "attempt", attempt, "err", err)
		t := time.NewTimer(500 * time.Millisecond)
		select {
		case <-t.C:
		case <-p.retry:
			t.Stop()
		case <-x.ctx.Done():
			t.Stop()
			return nil, context.Cause(x.ctx)
		}
	}
}

// runLink serves one link until the destination's PostcopyDone (returned)
// or until the link breaks (the error says how).
func (p *pcSource) runLink() (*wire.PostcopyDone, error) {
	x := p.x
	ctx, cancel := context.WithCancelCause(x.ctx)
	defer cancel(nil)
	fail := func(err error) {
		cancel(err)
		x.closeLinks() // unblocks the others' reads and writes
	}
	main := &link{nc: x.net, conn: x.conn}
	main.watch(x.Opts.LinkTimeout)
	x.req.watch(x.Opts.LinkTimeout)
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); p.serveRequests(ctx, fail) }()
	go func() { defer wg.Done(); pingLinks(ctx, x.Opts.LinkTimeout/5, fail, main, x.req) }()
	go func() { defer wg.Done(); p.pushPages(ctx, fail) }()
	defer wg.Wait()
	for {
		select {
		case in := <-x.inbox:
			if in.err != nil {
				fail(linkError("main connection", in.err, x.Opts.LinkTimeout))
				continue
			}
			switch m := in.msg.(type) {
			case *wire.PostcopyDone:
				cancel(nil)
				x.closeLinks() // the destination waits for this to close its side
				return m, nil
			case *wire.Error:
				err := &peerGaveUp{fmt.Errorf("destination failed in post-copy (%s): %s", m.Code, m.Message)}
				fail(err)
				return nil, err
			}
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
}

// serveRequests answers the destination's page requests on the request
// channel, before anything else is sent there, and marks their
// neighbourhood for the push.
func (p *pcSource) serveRequests(ctx context.Context, fail func(error)) {
	x, l := p.x, p.x.req
	for ctx.Err() == nil {
		m, err := l.conn.ReadMsg()
		if err != nil {
			fail(linkError("request channel", err, x.Opts.LinkTimeout))
			return
		}
		switch r := m.(type) {
		case *wire.PageRequest:
			if err := p.answer(l, r.GPAs); err != nil {
				fail(err)
				return
			}
		case *wire.Ping:
			l.conn.WriteMsg(r.Reply(time.Now()))
		case *wire.Error:
			fail(&peerGaveUp{fmt.Errorf("destination failed in post-copy (%s): %s", r.Code, r.Message)})
			return
		}
	}
}

// answer sends the requested pages.
func (p *pcSource) answer(l *link, gpas []uint64) error {
	x := p.x
	bytes := x.mem.Bytes()
	pfns := make([]uint64, 0, len(gpas))
	data := make([][]byte, 0, len(gpas))
	p.mu.Lock()
	for _, gpa := range gpas {
		idx, ok := x.pages.index(gpa / guestmem.PageSize)
		if !ok {
			p.mu.Unlock()
			return &peerGaveUp{fmt.Errorf("destination requested page %#x, which is not guest RAM", gpa)}
		}
		if hasBit(p.need, idx) {
			clearBit(p.need, idx)
			p.left--
		}
		p.hot = append(p.hot, idx+1)
		off := idx * guestmem.PageSize
		pfns = append(pfns, gpa/guestmem.PageSize)
		data = append(data, bytes[off:off+guestmem.PageSize])
	}
	if len(p.hot) > 64 {
		p.hot = append(p.hot[:0], p.hot[len(p.hot)-64:]...)
	}
	x.rep.Postcopy.Requests += uint64(len(gpas))
	p.mu.Unlock()
	p.signal(p.wake)
	for len(pfns) > 0 {
		n := min(len(pfns), state.ChunkPages)
		msg, err := wire.NewPages(0, wire.PhasePostCopyDemand, pfns[:n], data[:n], x.Opts.Compress, 0)
		if err != nil {
			return err
		}
		x.limiter.Take(len(msg.Chunk))
		if err := l.conn.WriteMsg(msg); err != nil {
			return fmt.Errorf("request channel: %w", err)
		}
		p.mu.Lock()
		x.rep.Postcopy.PagesDemand += uint64(n)
		x.rep.Postcopy.BytesDemand += uint64(len(msg.Chunk))
		p.mu.Unlock()
		pfns, data = pfns[n:], data[n:]
	}
	return nil
}

// pushPages sends the needed pages in the background on the main
// connection: the neighbourhood of recent faults first, then in order.
func (p *pcSource) pushPages(ctx context.Context, fail func(error)) {
	x := p.x
	bytes := x.mem.Bytes()
	var pfns []uint64
	var data [][]byte
	for {
		batch := p.nextBatch(ctx)
		if batch == nil {
			return
		}
		pfns, data = pfns[:0], data[:0]
		for _, idx := range batch {
			off := idx * guestmem.PageSize
			pfns = append(pfns, x.pages.gpa(idx)/guestmem.PageSize)
			data = append(data, bytes[off:off+guestmem.PageSize])
		}
		msg, err := wire.NewPages(0, wire.PhasePostCopyPush, pfns, data, x.Opts.Compress, 0)
		if err != nil {
			fail(err)
			return
		}
		if err := x.limiter.Wait(ctx, len(msg.Chunk)); err != nil {
			return
		}
		if err := x.conn.WriteMsg(msg); err != nil {
			fail(fmt.Errorf("main connection: %w", err))
			return
		}
		p.mu.Lock()
		x.rep.Postcopy.PagesPushed += uint64(len(batch))
		x.rep.Postcopy.BytesPushed += uint64(len(msg.Chunk))
		x.progress.RemainingBytes = p.left * guestmem.PageSize
		p.mu.Unlock()
		x.progress.Phase = PhasePostCopy
		x.progress.BytesSent = x.bytesSent()
		x.emit()
	}
}

// nextBatch takes up to state.ChunkPages needed pages off the list,
// waiting while there are none or the push is off. Nil when ctx ends.
func (p *pcSource) nextBatch(ctx context.Context) []uint64 {
	for {
		p.mu.Lock()
		if p.push && p.left > 0 {
			b := p.takeLocked(state.ChunkPages)
			p.mu.Unlock()
			return b
		}
		p.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil
		case <-p.wake:
		}
	}
}

func (p *pcSource) takeLocked(max int) []uint64 {
	var out []uint64
	take := func(idx uint64) {
		clearBit(p.need, idx)
		p.left--
		out = append(out, idx)
	}
	pages := uint64(len(p.need)) * 64
	if len(p.hot) > 0 {
		// The linear push goes on after the latest fault's window: a guest
		// that walks its memory then finds the pages it needs next already
		// on the way instead of faulting every window (QEMU's post-copy
		// does the same; ferry bench showed the walk faulting otherwise).
		p.cursor = min(p.hot[len(p.hot)-1]+prepageWindow, pages)
	}
	for len(p.hot) > 0 && len(out) < max {
		h := p.hot[len(p.hot)-1]
		p.hot = p.hot[:len(p.hot)-1]
		for i := h; i < h+prepageWindow && i < pages && len(out) < max; i++ {
			if hasBit(p.need, i) {
				take(i)
			}
		}
	}
	for len(out) < max && p.left > 0 {
		if p.cursor >= pages {
			p.cursor = 0
		}
		w := p.need[p.cursor/64] >> (p.cursor % 64)
		if w == 0 {
			p.cursor = (p.cursor/64 + 1) * 64
			continue
		}
		if w&1 != 0 {
			take(p.cursor)
		}
		p.cursor++
	}
	return out
}

// Finish ends a demand-paging migration: the source pushes every page the
// destination still needs, and the migration completes when it has them.
func (s *Source) Finish() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.postcopy
	if p == nil {
		return errors.New("the migration is not in post-copy")
	}
	p.mu.Lock()
	already := p.push
	p.push = true
	p.mu.Unlock()
	if !already && p.x.rep.Postcopy != nil {
		p.x.rep.Postcopy.Finished = true
	}
	p.signal(p.wake)
	return nil
}

// RetryLink makes a post-copy migration whose link broke try to re-open
// it now instead of at its next attempt.
func (s *Source) RetryLink() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.postcopy == nil {
		return errors.New("the migration is not in post-copy")
	}
	s.postcopy.signal(s.postcopy.retry)
	return nil
}
