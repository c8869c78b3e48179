package migration

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/wire"
)

// The pre-copy and stop-and-copy page pipeline (docs/migration.md,
// "Transfer optimizations"):
//
//	producer (one)            workers (Options.Workers)       writer (one)
//	pages in pass order  ──►  encode a chunk: zero, raw,  ──►  chunks in order:
//	snapshot each page,       delta (XBZRLE), dup records;     bandwidth limit,
//	pick delta base and       compress (or not, when the       Pages messages
//	dedup source              writer is starving)
//
// The producer copies each page into the job before anything looks at
// it, so that what is hashed for dedup and what is delta-encoded is
// exactly what is sent, whatever the running guest writes meanwhile. It
// alone owns the delta cache and the dedup index; chunks reach the
// destination in the order the producer made them, so a dup or delta
// record always refers to content the destination already holds.

// chunkJob is one chunk on its way through the pipeline.
type chunkJob struct {
	iter   int
	stream int // the connection it goes on
	phase  Phase
	n      int
	pfns   [state.ChunkPages]uint64
	snap   []byte   // n pages, copied from guest memory
	old    [][]byte // per record: the destination's current content (delta base), or nil
	dup    []uint64 // per record: 1 + the pfn it duplicates, or 0
	out    []byte
	stats  state.ChunkStats
	plain  bool // sent uncompressed because the writer was waiting for the workers
	err    error
	done   chan struct{}
}

// pipeline is the page pipeline of one migration.
type pipeline struct {
	x       *sender
	work    chan *chunkJob
	workers sync.WaitGroup
	// Producer-owned state.
	delta     map[uint64][]byte // pfn → content last sent (XBZRLE cache)
	deltaFIFO []uint64
	dedup     map[[16]byte]uint64 // content hash → a pfn last sent with it
	pageHash  map[uint64][16]byte // pfn → hash of the content last sent
	seeds     [2]maphash.Seed
	snaps     chan []byte // free snapshot buffers
	// starved counts the writers waiting for a worker: compression, not
	// the link, is then the limit.
	starved atomic.Int32
}

func newPipeline(x *sender) (*pipeline, error) {
	o := x.Opts
	p := &pipeline{x: x, work: make(chan *chunkJob, 2*o.Workers)}
	p.snaps = make(chan []byte, 4*o.Workers)
	if o.Delta {
		p.delta = map[uint64][]byte{}
	}
	if o.Dedup {
		p.dedup, p.pageHash = map[[16]byte]uint64{}, map[uint64][16]byte{}
		p.seeds = [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}
	}
	for range o.Workers {
		enc, err := state.NewChunkEncoder(o.Codec, o.CodecLevel)
		if err != nil {
			p.close()
			return nil, err
		}
		plain, _ := state.NewChunkEncoder(state.CodecNone, 0)
		p.workers.Add(1)
		go p.encode(enc, plain)
	}
	return p, nil
}

func (p *pipeline) snapBuf() []byte {
	select {
	case b := <-p.snaps:
		return b
	default:
		return make([]byte, state.ChunkPages*guestmem.PageSize)
	}
}

func (p *pipeline) freeSnap(b []byte) {
	select {
	case p.snaps <- b:
	default:
	}
}

func (p *pipeline) close() {
	close(p.work)
	p.workers.Wait()
}

// encode is a worker: it turns jobs into chunk sections.
func (p *pipeline) encode(enc, plain *state.ChunkEncoder) {
	defer p.workers.Done()
	defer enc.Close()
	defer plain.Close()
	for j := range p.work {
		e := enc
		// The writer is waiting for the workers: compression is what
		// holds the link back, so this chunk goes as it is.
		if p.x.Opts.Codec != state.CodecNone && p.starved.Load() > 0 {
			e, j.plain = plain, true
		}
		e.Reset()
		for i := range j.n {
			page := j.snap[i*guestmem.PageSize : (i+1)*guestmem.PageSize]
			if j.dup[i] != 0 {
				e.Dup(j.pfns[i], j.dup[i]-1)
			} else {
				e.Page(j.pfns[i], j.old[i], page)
			}
		}
		out, err := e.Finish()
		j.out, j.err, j.stats = append([]byte(nil), out...), err, e.Stats()
		close(j.done)
	}
}

// streamOf is the stream a page (memfd index) always travels on.
func (x *sender) streamOf(idx uint64) int { return int(idx / 64 % uint64(x.Opts.Streams)) }

// sendPassPipelined sends the pages set in todo through the pipeline, on
// every stream. With skipZero (iteration 0, stop-and-copy) zero pages are
// left out.
func (x *sender) sendPassPipelined(iter int, phase Phase, todo []uint64, skipZero bool) (*Iteration, error) {
	p := x.pipe
	it := &Iteration{N: iter, Phase: phase}
	start := time.Now()
	bytes0 := x.bytesSent()
	ctx, cancel := context.WithCancelCause(x.ctx)
	defer cancel(nil)
	n := x.Opts.Streams
	orders := make([]chan *chunkJob, n)
	written := make(chan error, n)
	for s := range n {
		orders[s] = make(chan *chunkJob, 2*x.Opts.Workers)
		conn := x.conn
		if s > 0 {
			conn = x.streams[s-1].conn
		}
		go func() { written <- x.writeChunks(ctx, cancel, it, start, bytes0, s, conn, orders[s]) }()
	}

	mem := x.mem.Bytes()
	left := countSet(todo)
	jobs := make([]*chunkJob, n)
	// A writer stuck on a connection whose peer stopped reading must not
	// outlive a cancel: past write deadlines end its write.
	unstick := context.AfterFunc(ctx, func() { x.setWriteDeadlines(time.Unix(1, 0)) })
	defer func() {
		if !unstick() {
			x.setWriteDeadlines(time.Time{})
		}
	}()
	dispatch := func(s int) {
		j := jobs[s]
		if j == nil || j.n == 0 {
			return
		}
		jobs[s] = nil
		select {
		case p.work <- j:
		case <-ctx.Done():
			p.freeSnap(j.snap)
			return
		}
		select {
		case orders[s] <- j: // the writer waits for the worker
		case <-ctx.Done(): // the worker finishes it for nobody
		}
	}
	// A pre-copy pass with a time bound stops where the bound falls; the
	// pages it did not reach are left in x.unsent for the switch.
	deadline := x.passDeadline
	var visited []uint64
	if !deadline.IsZero() {
		visited = make([]uint64, len(todo))
	}
	err := x.forEachByHeat(todo, func(idx uint64) error {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		if visited != nil {
			if time.Now().After(deadline) {
				return errPassCut
			}
			setBit(visited, idx)
		}
		left--
		x.left.Store(left)
		s := x.streamOf(idx)
		job := jobs[s]
		if job == nil {
			job = &chunkJob{iter: iter, phase: phase, stream: s, snap: p.snapBuf(), done: make(chan struct{}),
				old: make([][]byte, 0, state.ChunkPages), dup: make([]uint64, 0, state.ChunkPages)}
			jobs[s] = job
		}
		off := idx * guestmem.PageSize
		snap := job.snap[job.n*guestmem.PageSize : (job.n+1)*guestmem.PageSize]
		copy(snap, mem[off:off+guestmem.PageSize])
		zero := isZeroPage(snap)
		if zero && skipZero {
			x.rep.ZeroPagesSkipped++
			return nil
		}
		pfn := x.pages.gpa(idx) / guestmem.PageSize
		if zero {
			it.ZeroPages++
		}
		if hasBit(x.sent, idx) {
			it.Resent++
		}
		setBit(x.sent, idx)
		it.Pages++
		job.pfns[job.n] = pfn
		job.old = append(job.old, nil)
		job.dup = append(job.dup, 0)
		if !zero {
			p.chooseEncoding(job, job.n, pfn, snap, iter)
		} else {
			p.forget(pfn)
		}
		job.n++
		if job.n == state.ChunkPages {
			dispatch(s)
		}
		return nil
	})
	x.unsent = nil
	if errors.Is(err, errPassCut) {
		err, it.Cut = nil, true
		x.unsent = x.unreached(todo, visited)
	}
	for s := range n {
		dispatch(s)
		close(orders[s])
	}
	for range n {
		if werr := <-written; err == nil {
			err = werr
		}
	}
	if err != nil {
		return nil, err
	}
	it.Duration = time.Since(start)
	it.Bytes = x.bytesSent() - bytes0
	if it.Duration > 0 {
		it.Throughput = float64(it.Bytes) / it.Duration.Seconds()
	}
	x.rep.PagesSent += it.Pages
	x.rep.PagesResent += it.Resent
	return it, nil
}

// errPassCut ends a pass at its deadline.
var errPassCut = errors.New("pass cut at its time bound")

// unreached is the pages of todo a cut pass did not visit that the
// destination must still get: those sent before, and those that hold data
// (a page never sent that is zero is zero there too; if the guest writes
// it after this look, the dirty log has it).
func (x *sender) unreached(todo, visited []uint64) []uint64 {
	mem := x.mem.Bytes()
	out := make([]uint64, len(todo))
	for w := range todo {
		out[w] = todo[w] &^ visited[w]
	}
	forEachSet(out, func(idx uint64) error {
		off := idx * guestmem.PageSize
		if !hasBit(x.sent, idx) && isZeroPage(mem[off:off+guestmem.PageSize]) {
			clearBit(out, idx)
		}
		return nil
	})
	return out
}

// chooseEncoding picks, for record i of job (page pfn with content snap),
// a dup of a page the destination holds with the same content, or the
// delta base the destination holds for this page; and records what the
// destination will hold.
func (p *pipeline) chooseEncoding(job *chunkJob, i int, pfn uint64, snap []byte, iter int) {
	if p.dedup != nil {
		h := [16]byte{}
		a, b := maphash.Bytes(p.seeds[0], snap), maphash.Bytes(p.seeds[1], snap)
		for k := range 8 {
			h[k], h[8+k] = byte(a>>(8*k)), byte(b>>(8*k))
		}
		if old, ok := p.pageHash[pfn]; ok && old != h && p.dedup[old] == pfn {
			delete(p.dedup, old)
		}
		if src, ok := p.dedup[h]; ok && src != pfn && p.pageHash[src] == h && p.sameStream(src, pfn) {
			job.dup[i] = src + 1
			p.pageHash[pfn] = h
			p.setDelta(pfn, snap, iter)
			return
		}
		p.dedup[h] = pfn
		p.pageHash[pfn] = h
	}
	if p.delta != nil {
		if old, ok := p.delta[pfn]; ok {
			job.old[i] = old
		}
		p.setDelta(pfn, snap, iter)
	}
}

// sameStream says whether two pages travel on the same stream: a dup
// record may only refer to a page whose content arrived before it.
func (p *pipeline) sameStream(a, b uint64) bool {
	if p.x.Opts.Streams == 1 {
		return true
	}
	ia, _ := p.x.pages.index(a)
	ib, _ := p.x.pages.index(b)
	return p.x.streamOf(ia) == p.x.streamOf(ib)
}

// setDelta remembers what the destination holds for pfn, for delta
// encoding its next version. Pages enter the cache from their second send
// on (the pages the guest re-dirties); the oldest leave it first.
func (p *pipeline) setDelta(pfn uint64, snap []byte, iter int) {
	if p.delta == nil || iter == 0 {
		return
	}
	if _, ok := p.delta[pfn]; !ok {
		for len(p.delta) >= p.x.Opts.DeltaCachePages() && len(p.deltaFIFO) > 0 {
			delete(p.delta, p.deltaFIFO[0])
			p.deltaFIFO = p.deltaFIFO[1:]
		}
		p.deltaFIFO = append(p.deltaFIFO, pfn)
	}
	// A new buffer: a worker may still read the old one as a base.
	p.delta[pfn] = append([]byte(nil), snap...)
}

// forget drops what the dedup index and delta cache know of pfn (it is
// sent as a zero record now).
func (p *pipeline) forget(pfn uint64) {
	if p.dedup != nil {
		if old, ok := p.pageHash[pfn]; ok {
			if p.dedup[old] == pfn {
				delete(p.dedup, old)
			}
			delete(p.pageHash, pfn)
		}
	}
	if p.delta != nil {
		delete(p.delta, pfn) // its FIFO entry expires harmlessly
	}
}

// writeChunks writes one stream's chunks of a pass, in order, as they
// are encoded. Stream 0 (the main connection) also watches for the
// destination's errors and reports progress.
func (x *sender) writeChunks(ctx context.Context, cancel context.CancelCauseFunc, it *Iteration, start time.Time, bytes0 uint64, stream int, conn *wire.Conn, order <-chan *chunkJob) error {
	var failed error
	for j := range order {
		select {
		case <-j.done:
		default:
			x.pipe.starved.Add(1)
			<-j.done
			x.pipe.starved.Add(-1)
		}
		x.pipe.freeSnap(j.snap)
		if failed != nil {
			continue // drain: the producer must not block
		}
		err := j.err
		if err == nil {
			err = x.writeChunk(ctx, conn, j, it)
		}
		if err == nil && stream == 0 {
			x.statMu.Lock()
			x.progress.RemainingBytes = x.left.Load() * guestmem.PageSize
			x.progress.BytesSent = x.bytesSent()
			if d := time.Since(start); d > 0 {
				x.progress.Throughput = float64(x.bytesSent()-bytes0) / d.Seconds()
			}
			x.progress.Phase, x.progress.Iteration = it.Phase, it.N
			x.statMu.Unlock()
			x.emit()
			err = x.checkPeer()
		}
		if err != nil {
			failed = err
			cancel(err)
		}
	}
	return failed
}

func (x *sender) writeChunk(ctx context.Context, conn *wire.Conn, j *chunkJob, it *Iteration) error {
	if err := x.limiter.Wait(ctx, len(j.out)); err != nil {
		return context.Cause(ctx)
	}
	msg := &wire.Pages{Iteration: uint32(j.iter), Phase: phaseCode(j.phase), Chunk: j.out}
	if err := conn.WriteMsg(msg); err != nil {
		if j.stream > 0 {
			return fmt.Errorf("page stream %d to the destination lost: %w", j.stream, err)
		}
		return fmt.Errorf("connection to the destination lost while sending pages: %w", err)
	}
	x.statMu.Lock()
	defer x.statMu.Unlock()
	x.chunks++
	x.chunkBytes += uint64(len(j.out))
	s := j.stats
	it.DupPages += uint64(s.Dup)
	it.DeltaPages += uint64(s.Delta)
	t := &x.rep.Transfer
	t.PageBytes += uint64(s.Raw+s.Delta+s.Dup) * guestmem.PageSize
	t.ChunkBytes += uint64(len(j.out))
	t.DupPages += uint64(s.Dup)
	t.DeltaPages += uint64(s.Delta)
	t.DeltaBytes += uint64(s.DeltaBytes)
	if s.Compressed {
		t.CompressedChunks++
	}
	if j.plain {
		t.PlainUnderLoad++
	}
	t.Chunks++
	return nil
}

// setWriteDeadlines sets the write deadline of every page connection.
func (x *sender) setWriteDeadlines(t time.Time) {
	x.net.SetWriteDeadline(t)
	for _, l := range x.streams {
		l.nc.SetWriteDeadline(t)
	}
}
