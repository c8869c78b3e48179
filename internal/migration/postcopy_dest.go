package migration

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
	"unsafe"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/uffd"
	"github.com/ferry-vmm/ferry/internal/vmm"
	"github.com/ferry-vmm/ferry/internal/wire"
)

// The destination's side of post-copy: guest RAM registered with
// userfaultfd, a fault handler that asks the source for missing pages on
// the request channel, placement of pushed and requested pages, and the
// wait for a broken link to come back (docs/migration.md, "Post-copy").

// startPostcopy takes the source's Postcopy message: the pages listed are
// to come from the source; any of them received before the switch is stale
// and dropped when userfaultfd is on (newPCDest), after every page stream
// has delivered its last pre-copy chunk: a late dup record may still copy
// from a page that is to be dropped.
func (d *Destination) startPostcopy(vm *vmm.VM, m *wire.Postcopy) error {
	if d.postcopy {
		return errors.New("source switched to post-copy twice")
	}
	pages := pageIndex{regions: vm.Memory().Regions()}
	need, err := pages.bitmapOf(m.Need, vm.DirtyBitmapWords())
	if err != nil {
		return fmt.Errorf("source's post-copy page list: %w", err)
	}
	d.postcopy, d.need, d.needRanges = true, need, m.Need
	return nil
}

// dropPages punches the ranges out of guest RAM.
func dropPages(mem *guestmem.Memory, pages pageIndex, rs []wire.PageRange) error {
	for _, r := range rs {
		start, _ := pages.index(r.StartPFN)
		if err := mem.PunchHole(start*guestmem.PageSize, r.Count*guestmem.PageSize); err != nil {
			return err
		}
	}
	return nil
}

// guestFatal marks an error after which the guest must not run on: its
// memory is wrong or cannot be completed.
type guestFatal struct{ error }

func (e guestFatal) Unwrap() error { return e.error }

// pcDest is the destination's post-copy state.
type pcDest struct {
	d     *Destination
	vm    *vmm.VM
	fd    *uffd.FD
	base  uintptr // guest RAM in this process
	size  uint64
	pages pageIndex
	opts  Options // LinkTimeout, RecoveryTimeout

	mu         sync.Mutex
	need       []uint64               // pages still to come
	placing    []uint64               // pages being placed (or placed)
	left       uint64                 // bits set in need
	waiting    map[uint64][]time.Time // requested pages → when each fault on them arrived
	req        *link                  // the request channel, nil while the link is down
	linkCh     chan attachment        // channels the source (re-)opened
	resident   chan struct{}          // closed when left reaches 0
	resumedAt  time.Time
	residentAt time.Time
	latencies  []time.Duration
	stats      wire.PostcopyDone
	needed     uint64 // pages needed at the switch
	bytesPrev  uint64 // bytes received on links closed before
	faultsDone chan struct{}
	final      *wire.PostcopyDone // what was sent at the end (re-sent to a source that re-attaches)
	gateWait   int                // devices waiting in ensure
	gateCh     chan struct{}      // closed (and replaced) when a page arrives while gateWait > 0
}

type attachment struct {
	l *link
	a *wire.Attach
}

// newPCDest registers guest RAM with userfaultfd and starts the fault
// handler: from now on a vCPU touching a missing page waits for it.
func newPCDest(d *Destination, vm *vmm.VM) (*pcDest, error) {
	fd, err := uffd.Open()
	if err != nil {
		return nil, fmt.Errorf("post-copy needs userfaultfd: %w", err)
	}
	mem := vm.Memory().Bytes()
	p := &pcDest{
		d: d, vm: vm, fd: fd, base: uintptr(unsafe.Pointer(&mem[0])), size: uint64(len(mem)),
		pages: pageIndex{regions: vm.Memory().Regions()},
		opts:  Options{LinkTimeout: d.LinkTimeout, RecoveryTimeout: d.RecoveryTimeout}.withDefaults(),
		need:  d.need, placing: make([]uint64, len(d.need)), left: countSet(d.need), needed: countSet(d.need),
		waiting: map[uint64][]time.Time{},
		linkCh:  make(chan attachment, 4), resident: make(chan struct{}), faultsDone: make(chan struct{}),
		gateCh: make(chan struct{}),
	}
	if err := fd.Register(p.base, p.size); err != nil {
		fd.Close()
		return nil, fmt.Errorf("registering guest RAM with userfaultfd: %w", err)
	}
	// Drop the needed pages now that a touch faults: stale versions from
	// pre-copy, and whatever restoring the machine wrote (KVM writes the
	// kvmclock page when its MSR is set), so that none holds anything
	// but the source's data.
	if err := dropPages(vm.Memory(), p.pages, d.needRanges); err != nil {
		fd.Close()
		return nil, err
	}
	if p.left == 0 {
		close(p.resident)
	}
	d.mu.Lock()
	p.req, d.reqLink = d.reqLink, nil
	d.mu.Unlock()
	go p.handleFaults()
	vm.SetMemoryGate(p.ensure) // devices must not fault on missing pages
	return p, nil
}

func (p *pcDest) resumed(t time.Time) {
	p.mu.Lock()
	p.resumedAt = t
	if p.left == 0 {
		p.residentAt = t
	}
	p.mu.Unlock()
}

// close releases userfaultfd. Only when the guest has everything or will
// never run again: closing lets faulting vCPUs read holes as zeros.
func (p *pcDest) close() {
	p.vm.SetMemoryGate(nil)
	p.fd.Close()
	<-p.faultsDone
	p.mu.Lock()
	p.req.close()
	p.mu.Unlock()
}

// handleFaults reads the guest's faults: a page still at the source is
// requested (once, however many vCPUs wait for it); any other missing page
// is zero and placed here at once.
func (p *pcDest) handleFaults() {
	defer close(p.faultsDone)
	buf := make([]uffd.Fault, 0, 64)
	for {
		faults, err := p.fd.ReadFaults(buf[:0])
		if err != nil {
			if !errors.Is(err, uffd.ErrClosed) {
				p.vm.Fail(fmt.Errorf("post-copy: reading the guest's page faults: %w; the guest was stopped", err))
			}
			return
		}
		now := time.Now()
		var ask []uint64
		p.mu.Lock()
		for _, f := range faults {
			off := uint64(f.Addr - p.base)
			if off >= p.size {
				continue
			}
			idx := off / guestmem.PageSize
			if hasBit(p.need, idx) {
				if _, asked := p.waiting[idx]; !asked {
					ask = append(ask, p.pages.gpa(idx))
				}
				p.waiting[idx] = append(p.waiting[idx], now)
				p.stats.Faults++
				continue
			}
			// Not from the source: a zero page, or one placed while the
			// fault was on its way (then only the wake is needed).
			err := p.fd.ZeroPage(f.Addr, guestmem.PageSize, true)
			switch {
			case err == nil:
				p.stats.ZeroFaults++
			case errors.Is(err, uffd.ErrExists):
			default:
				p.vm.Fail(fmt.Errorf("post-copy: placing a zero page at %#x: %w; the guest was stopped", p.pages.gpa(idx), err))
			}
		}
		req := p.req
		p.mu.Unlock()
		if len(ask) > 0 && req != nil {
			p.request(req, ask)
		}
	}
}

// request asks the source for pages; with the link down they stay in
// waiting and are asked again when it is back.
func (p *pcDest) request(l *link, gpas []uint64) {
	for len(gpas) > 0 {
		n := min(len(gpas), wire.MaxPageRequest)
		if err := l.conn.WriteMsg(&wire.PageRequest{GPAs: gpas[:n]}); err != nil {
			l.close() // the link's reader notices and declares it broken
			return
		}
		gpas = gpas[n:]
	}
}

// place puts pages from the source into guest RAM and wakes the vCPUs
// waiting for them.
func (p *pcDest) place(m *wire.Pages) error {
	_, err := m.Decode(p.d.hello.Header, func(gpa uint64, data []byte) error {
		idx, ok := p.pages.index(gpa / guestmem.PageSize)
		if !ok {
			return fmt.Errorf("page %#x is not guest RAM", gpa)
		}
		// A page comes twice when it was pushed and requested at once:
		// the first placement wins, the second is skipped.
		p.mu.Lock()
		first := hasBit(p.need, idx) && !hasBit(p.placing, idx)
		if first {
			setBit(p.placing, idx)
		}
		p.mu.Unlock()
		if !first {
			return nil
		}
		// Place first, then clear the need bit: a fault seen in between
		// asks again (harmless) instead of getting a zero page.
		addr := p.base + uintptr(idx*guestmem.PageSize)
		var err error
		if isZeroPage(data) {
			err = p.fd.ZeroPage(addr, guestmem.PageSize, true)
		} else {
			err = p.fd.Copy(addr, data, true)
		}
		if errors.Is(err, uffd.ErrExists) {
			// Something wrote the page before its data arrived: the guest
			// may have seen the wrong contents. Never run on that.
			return guestFatal{fmt.Errorf("page %#x was already present when its data arrived from the source", gpa)}
		}
		if err != nil {
			return guestFatal{fmt.Errorf("placing page %#x: %w", gpa, err)}
		}
		now := time.Now()
		p.mu.Lock()
		defer p.mu.Unlock()
		clearBit(p.need, idx)
		p.left--
		if m.Phase == wire.PhasePostCopyDemand {
			p.stats.PagesDemand++
		} else {
			p.stats.PagesPushed++
		}
		for _, t := range p.waiting[idx] {
			p.latencies = append(p.latencies, now.Sub(t))
		}
		delete(p.waiting, idx)
		if p.gateWait > 0 {
			close(p.gateCh)
			p.gateCh = make(chan struct{})
		}
		if p.left == 0 {
			p.residentAt = now
			close(p.resident)
		}
		return nil
	})
	var gf guestFatal
	if err != nil && !errors.As(err, &gf) {
		err = guestFatal{fmt.Errorf("bad pages from the source: %w", err)}
	}
	return err
}

// attach takes a channel the source opened (called with d.mu held). A
// newer attempt replaces a stale one still queued.
func (p *pcDest) attach(l *link, a *wire.Attach) {
	for {
		select {
		case p.linkCh <- attachment{l, a}:
			return
		default:
		}
		select {
		case old := <-p.linkCh:
			old.l.close()
		default:
		}
	}
}

// run serves post-copy until every page is here or the guest ended, across
// link breaks; past the recovery timeout without a link it stops the guest.
func (p *pcDest) run(main *link) error {
	defer p.close()
	p.mu.Lock()
	req := p.req
	p.mu.Unlock()
	for {
		if req != nil {
			end, err := p.serve(main, req)
			if end != 0 {
				return p.ended(end)
			}
			var gf guestFatal
			if errors.As(err, &gf) {
				err = fmt.Errorf("post-copy cannot complete: %w; the guest was stopped (it cannot run without its memory)", err)
				p.vm.Fail(err)
				return err
			}
			p.d.Log.Warn("post-copy link broken; the guest waits for it", "err", err)
		}
		p.stats.LinkBreaks++
		down := time.Now()
		var end wire.PostcopyEnd
		var err error
		main, req, end, err = p.awaitLink(down)
		p.stats.LinkDownFor += time.Since(down)
		if err != nil {
			p.vm.Fail(err)
			return err
		}
		if end != 0 {
			p.sendDone(main, end)
			main.close()
			return p.ended(end)
		}
	}
}

// ended releases userfaultfd once every page is here and says whether
// the guest's end was a failure.
func (p *pcDest) ended(end wire.PostcopyEnd) error {
	if end == wire.EndResident {
		p.vm.SetMemoryGate(nil)
		if err := p.fd.Unregister(p.base, p.size); err != nil {
			p.d.Log.Warn("unregistering guest RAM from userfaultfd", "err", err)
		}
		return nil
	}
	if _, err := p.vm.Outcome(); err != nil {
		return fmt.Errorf("the guest failed during post-copy: %w", err)
	}
	return nil
}

// awaitLink waits for the source to re-open both channels.
func (p *pcDest) awaitLink(down time.Time) (main, req *link, end wire.PostcopyEnd, err error) {
	p.mu.Lock()
	p.req = nil
	p.mu.Unlock()
	timer := time.NewTimer(p.opts.RecoveryTimeout)
	defer timer.Stop()
	for main == nil || req == nil {
		select {
		case at := <-p.linkCh:
			reply := wire.Attached{Channel: at.a.Channel, PostcopyStarted: true}
			if at.a.Channel == wire.ChannelMain {
				p.mu.Lock()
				reply.Missing = p.pages.rangesOf(p.need)
				p.mu.Unlock()
			}
			if err := at.l.conn.WriteMsg(&reply); err != nil {
				p.d.Log.Warn("answering the source's attach", "channel", at.a.Channel, "err", err)
				at.l.close()
				continue
			}
			if at.a.Channel == wire.ChannelMain {
				main.close()
				main = at.l
			} else {
				req.close()
				req = at.l
			}
		case <-timer.C:
			main.close()
			req.close()
			p.mu.Lock()
			left := p.left
			p.mu.Unlock()
			return nil, nil, 0, fmt.Errorf("post-copy cannot complete: no link to the source for %s (recovery timeout) with %d pages still missing; the guest was stopped (it cannot run without them)",
				p.opts.RecoveryTimeout.Round(time.Millisecond), left)
		case <-p.resident:
			// Every page arrived before the link broke.
			req.close()
			return main, nil, wire.EndResident, nil
		case <-p.vm.Done():
			req.close()
			return main, nil, wire.EndGuestEnded, nil
		}
	}
	p.d.Log.Info("post-copy link re-opened", "down", time.Since(down))
	p.mu.Lock()
	p.req = req
	var again []uint64
	for idx := range p.waiting {
		again = append(again, p.pages.gpa(idx))
	}
	p.mu.Unlock()
	slices.Sort(again)
	if len(again) > 0 {
		p.request(req, again)
	}
	return main, req, 0, nil
}

// serve runs one link: pages pushed on main, answers on the request
// channel, pings on both. It returns how post-copy ended, or the link's
// error.
func (p *pcDest) serve(main, req *link) (wire.PostcopyEnd, error) {
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	fail := func(err error) {
		var gf guestFatal
		if errors.As(err, &gf) {
			// Tell the source at once: it stops serving instead of
			// re-opening the link until its recovery timeout.
			main.nc.SetWriteDeadline(time.Now().Add(time.Second))
			main.conn.WriteMsg(&wire.Error{Code: wire.ErrorState, Message: "post-copy cannot complete: " + err.Error()})
		}
		cancel(err)
		main.close()
		req.close()
	}
	main.watch(p.opts.LinkTimeout)
	req.watch(p.opts.LinkTimeout)
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); p.readLink(ctx, main, "main connection", fail) }()
	go func() { defer wg.Done(); p.readLink(ctx, req, "request channel", fail) }()
	go func() { defer wg.Done(); pingLinks(ctx, p.opts.LinkTimeout/5, fail, main, req) }()
	var end wire.PostcopyEnd
	select {
	case <-p.resident:
	case <-p.vm.Done():
	case <-ctx.Done():
	}
	// The end wins over a link error that came at the same time.
	select {
	case <-p.resident:
		end = wire.EndResident
	default:
		select {
		case <-p.vm.Done():
			end = wire.EndGuestEnded
		default:
		}
	}
	err := context.Cause(ctx)
	if end != 0 {
		// PostcopyDone goes on main; the source closes both channels
		// once it has read it. Until then the readers keep reading (a
		// read cut short mid-frame would lose the stream's place); pages
		// still arriving are duplicates and are skipped.
		cancel(nil)
		p.sendDone(main, end)
		t := time.AfterFunc(p.opts.LinkTimeout, func() { main.close(); req.close() })
		defer t.Stop()
		err = nil
	}
	wg.Wait()
	main.close()
	req.close()
	p.mu.Lock()
	p.bytesPrev += main.conn.BytesReceived() + req.conn.BytesReceived()
	p.mu.Unlock()
	return end, err
}

// pingLinks keeps both ends' liveness checks fed.
func pingLinks(ctx context.Context, every time.Duration, fail func(error), links ...*link) {
	t := time.NewTicker(every)
	defer t.Stop()
	for n := uint64(1); ; n++ {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			for _, l := range links {
				if err := l.conn.WriteMsg(&wire.Ping{Nonce: n, UnixNano: now.UnixNano()}); err != nil {
					fail(fmt.Errorf("sending a ping: %w", err))
					return
				}
			}
		}
	}
}

// readLink reads one channel until it fails or, after the end, closes.
func (p *pcDest) readLink(ctx context.Context, l *link, name string, fail func(error)) {
	for {
		m, err := l.conn.ReadMsg()
		if err != nil && ctx.Err() != nil {
			return // post-copy ended: the source closed, or the link broke meanwhile
		}
		if err != nil {
			var fe *wire.FrameError
			if errors.As(err, &fe) && !fe.Truncated && fe.Err == nil {
				fail(guestFatal{fmt.Errorf("corrupt data from the source on the %s: %w", name, err)})
				return
			}
			fail(linkError(name, err, p.opts.LinkTimeout))
			return
		}
		switch m := m.(type) {
		case *wire.Pages:
			if err := p.place(m); err != nil {
				fail(err)
				return
			}
		case *wire.Ping, *wire.Pong:
		case *wire.Error:
			fail(guestFatal{fmt.Errorf("source failed (%s): %s", m.Code, m.Message)})
			return
		case *wire.Cancel:
			fail(guestFatal{fmt.Errorf("source abandoned post-copy: %s", m.Reason)})
			return
		}
	}
}

// sendDone tells the source that post-copy ended: it may release the
// guest's memory.
func (p *pcDest) sendDone(main *link, end wire.PostcopyEnd) {
	done := p.snapshot(end)
	p.mu.Lock()
	p.final = done
	p.mu.Unlock()
	p.d.Log.Info("post-copy done", "end", end, "pushed", done.PagesPushed, "demand", done.PagesDemand,
		"faults", done.Faults, "zero_faults", done.ZeroFaults, "never_needed", done.PagesMissing, "residency", done.Residency)
	if main == nil {
		return // a source that re-attaches gets it (linger)
	}
	if err := main.conn.WriteMsg(done); err != nil {
		p.d.Log.Warn("the source did not get the end of post-copy; it gets it if it re-attaches", "err", err)
	}
}

// linger answers a source that re-attaches after post-copy ended (it
// missed PostcopyDone, or the link broke just then): no page missing, and
// PostcopyDone again. It returns when the source has it or after d.
func (p *pcDest) linger(d time.Duration) {
	p.mu.Lock()
	done := p.final
	p.mu.Unlock()
	if done == nil {
		return
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	var open []*link
	defer func() {
		for _, l := range open {
			l.close()
		}
	}()
	for {
		select {
		case at := <-p.linkCh:
			open = append(open, at.l)
			if at.l.conn.WriteMsg(&wire.Attached{Channel: at.a.Channel, PostcopyStarted: true}) != nil || at.a.Channel != wire.ChannelMain {
				continue
			}
			if at.l.conn.WriteMsg(done) == nil {
				// Wait for the source to close: then it has read it.
				at.l.nc.SetReadDeadline(time.Now().Add(p.opts.LinkTimeout))
				for {
					if _, err := at.l.conn.ReadMsg(); err != nil {
						return
					}
				}
			}
		case <-timer.C:
			return
		}
	}
}

// snapshot is the post-copy measurements as the destination's last message.
func (p *pcDest) snapshot(end wire.PostcopyEnd) *wire.PostcopyDone {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stats
	s.End, s.PagesMissing = end, p.left
	lat := slices.Clone(p.latencies)
	slices.Sort(lat)
	if n := len(lat); n > 0 {
		s.FaultP50, s.FaultP99, s.FaultMax = lat[n/2], lat[min(n-1, n*99/100)], lat[n-1]
		for _, l := range lat {
			s.FaultTotal += l
		}
	}
	if !p.residentAt.IsZero() {
		s.Residency = p.residentAt.Sub(p.resumedAt)
	}
	return &s
}

func (p *pcDest) report() *PostcopyReport {
	s := p.snapshot(wire.EndResident)
	p.mu.Lock()
	end := "resident"
	if p.left > 0 {
		end = "incomplete"
		select {
		case <-p.vm.Done():
			end = "guest-ended"
		default:
		}
	}
	p.mu.Unlock()
	return &PostcopyReport{
		PagesNeeded: p.needed, PagesPushed: s.PagesPushed, PagesDemand: s.PagesDemand,
		Faults: s.Faults, ZeroFaults: s.ZeroFaults, FaultP50: s.FaultP50, FaultP99: s.FaultP99, FaultMax: s.FaultMax,
		Blocked: s.FaultTotal, Residency: s.Residency, LinkBreaks: int(s.LinkBreaks), LinkDownFor: s.LinkDownFor,
		End: end, PagesNever: s.PagesMissing,
	}
}

func (p *pcDest) bytesReceived() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bytesPrev
}

// ensure returns once guest RAM [gpa, gpa+n) is resident: a device of the
// VMM is about to read or write it (vmm.VM.SetMemoryGate). Devices run on
// goroutines, and a goroutine blocked in a userfaultfd fault keeps its
// scheduler slot: with as few slots as CPUs, the fault handler could wait
// forever behind it. So pages still at the source are requested like a
// fault's and waited for here, on a channel; missing pages that are not
// at the source get their zero page placed now.
func (p *pcDest) ensure(gpa, n uint64) error {
	if n == 0 {
		return nil
	}
	first, last := gpa/guestmem.PageSize, (gpa+n-1)/guestmem.PageSize
	if last < first || last-first >= 1<<20 {
		return fmt.Errorf("post-copy: device access of %d bytes at %#x", n, gpa)
	}
	for {
		missing, ch, err := p.askMissing(first, last)
		if err != nil || missing == 0 {
			return err
		}
		select {
		case <-ch:
		case <-p.resident:
		case <-p.vm.Done():
			p.mu.Lock()
			p.gateWait--
			p.mu.Unlock()
			return errors.New("post-copy: the guest stopped while a device waited for its memory")
		}
		p.mu.Lock()
		p.gateWait--
		p.mu.Unlock()
	}
}

// askMissing requests the pages of [first, last] still at the source and
// places zero pages for the others that are not present. With pages to
// wait for it returns their count and the channel to wait on (gateWait
// counted).
func (p *pcDest) askMissing(first, last uint64) (int, chan struct{}, error) {
	var ask []uint64
	var missing int
	p.mu.Lock()
	for pfn := first; pfn <= last; pfn++ {
		idx, ok := p.pages.index(pfn)
		if !ok {
			p.mu.Unlock()
			return 0, nil, fmt.Errorf("post-copy: device access to %#x, which is not guest RAM", pfn*guestmem.PageSize)
		}
		if !hasBit(p.need, idx) {
			err := p.fd.ZeroPage(p.base+uintptr(idx*guestmem.PageSize), guestmem.PageSize, true)
			if err != nil && !errors.Is(err, uffd.ErrExists) {
				p.mu.Unlock()
				return 0, nil, fmt.Errorf("post-copy: placing a zero page at %#x for a device: %w", pfn*guestmem.PageSize, err)
			}
			continue
		}
		missing++
		if _, asked := p.waiting[idx]; !asked {
			p.waiting[idx] = nil // asked, with no vCPU fault to time
			ask = append(ask, pfn*guestmem.PageSize)
		}
	}
	if missing == 0 {
		p.mu.Unlock()
		return 0, nil, nil
	}
	p.gateWait++
	ch, req := p.gateCh, p.req
	p.mu.Unlock()
	if len(ask) > 0 && req != nil {
		p.request(req, ask)
	}
	return missing, ch, nil
}
