package migration

import (
	"context"
	"fmt"
	"io"
	"math"
	"time"

	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/units"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

// Prediction (docs/migration.md, "Prediction and the automatic mode"):
// ferry samples which pages the guest dirties over a few seconds, models
// each technique on those numbers and the link's bandwidth, and predicts
// total time, downtime and bytes. The automatic mode picks a technique
// from the predictions and the user's limits.

// DirtyProfile is what sampling the guest's writes found.
type DirtyProfile struct {
	Pages      uint64        `json:"pages"`       // pages of guest RAM
	DataPages  uint64        `json:"data_pages"`  // pages that are not zero (what a full copy sends)
	SampleTime time.Duration `json:"sample_ns"`   // how long the guest was watched
	Tick       time.Duration `json:"tick_ns"`     // the sampling interval
	Rate       float64       `json:"dirty_rate"`  // bytes/s dirtied, every write counted once per tick
	Horizon    []uint64      `json:"dirty_union"` // Horizon[i]: distinct pages dirtied within (i+1) ticks, averaged over the sample
}

// DirtyWithin estimates how many distinct pages the guest dirties in d:
// measured up to the sample's length; beyond it, a working-set model fitted
// to the measurements (below); never more than all of RAM.
func (p *DirtyProfile) DirtyWithin(d time.Duration) float64 {
	n := len(p.Horizon)
	if n == 0 || p.Tick <= 0 || d <= 0 {
		return 0
	}
	x := float64(d) / float64(p.Tick) // in ticks
	var v float64
	switch {
	case x <= 1:
		v = x * float64(p.Horizon[0])
	case x <= float64(n):
		i := int(x) // between Horizon[i-1] (i ticks) and Horizon[i] (i+1 ticks)
		lo, hi := float64(p.Horizon[i-1]), float64(p.Horizon[min(i, n-1)])
		v = lo + (x-float64(i))*(hi-lo)
	default:
		w, r := p.fit()
		v = w * (1 - math.Exp(-r*x/w))
	}
	return math.Min(v, float64(p.Pages))
}

// fit fits the measured horizons with the distinct pages touched by r
// writes per tick spread over a working set of w pages,
// d(x) = w·(1 − e^(−r·x/w)) (x in ticks): it saturates at the working set
// as random writes do, and is nearly linear for a sequential writer (large
// w). r follows from the first tick; w is the best of a logarithmic grid
// from the largest measurement to all of RAM.
func (p *DirtyProfile) fit() (w, r float64) {
	h0 := float64(p.Horizon[0])
	last := float64(p.Horizon[len(p.Horizon)-1])
	best, bestErr := float64(p.Pages), math.Inf(1)
	lo := math.Max(last*1.001, 1)
	hi := math.Max(float64(p.Pages), lo)
	for i := 0; i <= 200; i++ {
		cw := lo * math.Pow(hi/lo, float64(i)/200)
		if h0 >= cw {
			continue
		}
		cr := -cw * math.Log(1-h0/cw)
		var e float64
		for j, m := range p.Horizon {
			d := cw*(1-math.Exp(-cr*float64(j+1)/cw)) - float64(m)
			e += d * d
		}
		if e < bestErr {
			best, bestErr = cw, e
		}
	}
	if h0 >= best {
		return best, h0
	}
	return best, -best * math.Log(1-h0/best)
}

// SampleDirty watches the guest's writes for d in ticks of tick (dirty
// logging must be free: no migration running) and counts its pages with
// data.
func SampleDirty(ctx context.Context, vm *vmm.VM, d, tick time.Duration) (*DirtyProfile, error) {
	if tick <= 0 || d < tick {
		return nil, fmt.Errorf("sampling %s in ticks of %s", d, tick)
	}
	words := vm.DirtyBitmapWords()
	mem := vm.Memory()
	data := make([]uint64, words)
	if err := mem.MarkData(data); err != nil {
		return nil, err
	}
	bytes := mem.Bytes()
	forEachSet(data, func(idx uint64) error {
		off := idx * guestmem.PageSize
		if isZeroPage(bytes[off : off+guestmem.PageSize]) {
			clearBit(data, idx)
		}
		return nil
	})
	p := &DirtyProfile{Pages: mem.Size() / guestmem.PageSize, DataPages: countSet(data), Tick: tick}
	if err := vm.StartDirtyLog(); err != nil {
		return nil, err
	}
	defer vm.StopDirtyLog()
	var ticks [][]uint64
	start := time.Now()
	t := time.NewTicker(tick)
	defer t.Stop()
	vm.FetchDirty(make([]uint64, words)) // from now on
	for len(ticks) < int(d/tick) {
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-t.C:
		}
		bm := make([]uint64, words)
		if _, err := vm.FetchDirty(bm); err != nil {
			return nil, err
		}
		ticks = append(ticks, bm)
	}
	p.SampleTime = time.Since(start)
	var writes uint64
	for _, bm := range ticks {
		writes += countSet(bm)
	}
	p.Rate = float64(writes) * guestmem.PageSize / p.SampleTime.Seconds()
	// Distinct pages dirtied within windows of w ticks, averaged over
	// every window position.
	union := make([]uint64, words)
	for w := 1; w <= len(ticks); w++ {
		var sum uint64
		for s := 0; s+w <= len(ticks); s++ {
			clear(union)
			for _, bm := range ticks[s : s+w] {
				for i := range union {
					union[i] |= bm[i]
				}
			}
			sum += countSet(union)
		}
		p.Horizon = append(p.Horizon, sum/uint64(len(ticks)-w+1))
	}
	return p, nil
}

// Estimate is the predicted outcome of one technique.
type Estimate struct {
	Mode      Mode          `json:"mode"`
	TotalTime time.Duration `json:"total_time_ns"`
	Downtime  time.Duration `json:"downtime_ns"`
	Bytes     uint64        `json:"bytes"`
	Passes    int           `json:"passes,omitempty"`      // pre-copy passes before the switch
	Converges bool          `json:"converges"`             // pre-copy reaches the downtime limit on its own
	Note      string        `json:"note,omitempty"`        // what the numbers leave out
	Degraded  time.Duration `json:"degraded_ns,omitempty"` // post-copy: how long the guest runs on remote faults
}

// Prediction holds an estimate per technique for one guest and link.
type Prediction struct {
	Profile   DirtyProfile `json:"profile"`
	Bandwidth float64      `json:"bandwidth"`            // bytes/s assumed for the link
	WireRatio float64      `json:"wire_ratio,omitempty"` // wire bytes per page byte measured by the first pass (1: no savings)
	Estimates []Estimate   `json:"estimates"`
	Choice    Mode         `json:"choice,omitempty"` // what --mode auto picks
	Reason    string       `json:"reason,omitempty"`
}

// Estimate returns the estimate for mode m, if there is one.
func (p *Prediction) Estimate(m Mode) (Estimate, bool) {
	for _, e := range p.Estimates {
		if e.Mode == m {
			return e, true
		}
	}
	return Estimate{}, false
}

// switchCost is what a switch-over costs besides memory: pausing,
// capturing and sending the machine state, restoring it (measured here:
// a few milliseconds; kept conservative).
const switchCost = 10 * time.Millisecond

// Predict models every technique on profile and a link of bandwidth
// bytes/s under opts' limits, and says what the automatic mode picks.
func Predict(profile *DirtyProfile, bandwidth float64, opts Options) *Prediction {
	opts = opts.withDefaults()
	pr := &Prediction{Profile: *profile, Bandwidth: bandwidth}
	if bandwidth <= 0 {
		return pr
	}
	page := float64(guestmem.PageSize)
	xfer := func(pages float64) time.Duration {
		return time.Duration(pages * page / bandwidth * float64(time.Second))
	}
	all := float64(profile.DataPages)

	stop := Estimate{Mode: ModeStopCopy, Bytes: uint64(all * page)}
	stop.Downtime = xfer(all) + switchCost
	stop.TotalTime = stop.Downtime
	pr.Estimates = append(pr.Estimates, stop)

	pre, _ := simulatePrecopy(profile, all, xfer, opts.DowntimeLimit, opts.MaxIterations, opts.PrecopyTimeout)
	pre.Mode = ModePreCopy
	pr.Estimates = append(pr.Estimates, pre)

	post := Estimate{Mode: ModePostCopy, Bytes: uint64(all * page), Downtime: switchCost}
	post.Degraded = xfer(all)
	post.TotalTime = post.Degraded + switchCost
	post.Note = "the guest runs at the destination while pages arrive; it waits on pages it touches first"
	pr.Estimates = append(pr.Estimates, post)

	passes, bound := opts.PrecopyPasses, opts.PrecopyTime
	if passes <= 0 && bound <= 0 {
		bound = DefaultHybridPrecopyTime
	}
	if passes <= 0 {
		passes = opts.MaxIterations
	}
	if bound <= 0 {
		bound = opts.PrecopyTimeout
	}
	hyb, left := simulatePrecopy(profile, all, xfer, opts.DowntimeLimit, passes, bound)
	hyb.Mode = ModeHybrid
	if !hyb.Converges {
		// What is left when pre-copy stops goes by post-copy.
		hyb.Degraded = xfer(left)
		hyb.TotalTime += hyb.Degraded - hyb.Downtime + switchCost
		hyb.Downtime = switchCost
	}
	pr.Estimates = append(pr.Estimates, hyb)

	dem := Estimate{Mode: ModeDemand, Bytes: uint64(all * page), Downtime: switchCost,
		Note: "at most this many bytes; it moves what the guest touches, so its total time depends on the guest"}
	pr.Estimates = append(pr.Estimates, dem)

	pr.Choice, pr.Reason = choose(pr, opts)
	// The automatic mode's plan: pre-copy when it converges (or rollback
	// is required); else one pass, then post-copy for what it dirtied.
	auto := pre
	if pr.Choice == ModeHybrid {
		var left float64
		auto, left = simulatePrecopy(profile, all, xfer, opts.DowntimeLimit, 1, 0)
		auto.Degraded = xfer(left)
		auto.TotalTime += auto.Degraded - auto.Downtime + switchCost
		auto.Downtime = switchCost
		auto.Note = "one pre-copy pass, then post-copy"
	}
	auto.Mode = ModeAuto
	pr.Estimates = append(pr.Estimates, auto)
	return pr
}

// simulatePrecopy plays pre-copy's passes on the profile: each pass sends
// what the guest dirtied during the one before, until the rest fits the
// downtime limit or a bound (passes, time) forces the switch. It returns
// the estimate with a stop-and-copy of the rest, and the rest in pages.
func simulatePrecopy(profile *DirtyProfile, all float64, xfer func(float64) time.Duration, limit time.Duration, maxPasses int, bound time.Duration) (Estimate, float64) {
	e := Estimate{}
	todo := all
	var elapsed time.Duration
	var sent float64
	for {
		t := xfer(todo)
		elapsed += t
		sent += todo
		e.Passes++
		todo = profile.DirtyWithin(t)
		if xfer(todo) <= limit {
			e.Converges = true
			break
		}
		if e.Passes >= maxPasses || elapsed >= bound {
			break
		}
	}
	e.Downtime = xfer(todo) + switchCost
	e.TotalTime = elapsed + e.Downtime
	e.Bytes = uint64((sent + todo) * guestmem.PageSize)
	return e, todo
}

// choose is the automatic mode's decision: pre-copy when it converges
// within the limits (it can always fall back to the source); otherwise
// post-copy's short downtime, by hybrid so that what pre-copy can move
// while the guest runs at full speed moves first — unless the user
// requires rollback, which only pre-copy offers.
func choose(pr *Prediction, opts Options) (Mode, string) {
	pre, _ := pr.Estimate(ModePreCopy)
	withinTotal := func(e Estimate) bool { return opts.MaxTotalTime <= 0 || e.TotalTime <= opts.MaxTotalTime }
	if pre.Converges && pre.Downtime <= opts.DowntimeLimit+switchCost && withinTotal(pre) {
		return ModePreCopy, fmt.Sprintf("pre-copy converges in %s with %s downtime", plural(pre.Passes, "pass", "passes"), ms(pre.Downtime))
	}
	if opts.RequireRollback {
		return ModePreCopy, fmt.Sprintf("pre-copy does not converge on its own (predicted downtime %s), but rollback is required: pre-copy with auto-converge", ms(pre.Downtime))
	}
	hyb, _ := pr.Estimate(ModeHybrid)
	return ModeHybrid, fmt.Sprintf("pre-copy would stop the guest for %s; hybrid keeps the downtime at %s and moves the rest by post-copy", ms(pre.Downtime), ms(hyb.Downtime))
}

// WriteTable renders the prediction for people.
func (pr *Prediction) WriteTable(w io.Writer) {
	p := pr.Profile
	fmt.Fprintf(w, "guest: %s of RAM, %s with data; dirties %s (sampled %s)\n",
		units.FormatBytes(p.Pages*guestmem.PageSize), units.FormatBytes(p.DataPages*guestmem.PageSize), rate(p.Rate), ms(p.SampleTime))
	if n := len(p.Horizon); n > 0 {
		fmt.Fprintf(w, "distinct pages dirtied within %s: %s; within %s: %s\n", ms(p.Tick), units.FormatBytes(p.Horizon[0]*guestmem.PageSize),
			ms(time.Duration(n)*p.Tick), units.FormatBytes(p.Horizon[n-1]*guestmem.PageSize))
	}
	fmt.Fprintf(w, "link: %s\n", rate(pr.Bandwidth))
	fmt.Fprintf(w, "  %-9s %10s %10s %10s  %s\n", "mode", "total", "downtime", "bytes", "")
	for _, e := range pr.Estimates {
		extra := e.Note
		if e.Note == "" && e.Passes > 0 {
			extra = fmt.Sprintf("%s, %s", plural(e.Passes, "pass", "passes"), map[bool]string{true: "converges", false: "forced switch"}[e.Converges])
		}
		if e.Degraded > 0 {
			extra = fmt.Sprintf("guest on remote faults for %s; %s", ms(e.Degraded), extra)
		}
		total := ms(e.TotalTime)
		if e.TotalTime == 0 {
			total = "-"
		}
		fmt.Fprintf(w, "  %-9s %10s %10s %10s  %s\n", e.Mode, total, ms(e.Downtime), units.FormatBytes(e.Bytes), extra)
	}
	if pr.Choice != "" {
		fmt.Fprintf(w, "auto: %s (%s)\n", pr.Choice, pr.Reason)
	}
}

// decideAfterFirstPass predicts every technique once the first pass
// measured the link (and, without a sample, the guest's writes during it),
// records the prediction, and for the automatic mode says whether to
// switch to post-copy now.
func (x *sender) decideAfterFirstPass(it *Iteration, dirtied int) bool {
	bw := it.Throughput
	if lim := float64(x.limiter.Rate()); lim > 0 && (bw <= 0 || bw > lim) {
		bw = lim
	}
	profile := x.profile
	if profile == nil {
		// The first pass is a sample of one tick: the pages dirtied
		// while it ran.
		profile = &DirtyProfile{Pages: x.mem.Size() / guestmem.PageSize, DataPages: it.Pages,
			SampleTime: it.Duration, Tick: it.Duration, Horizon: []uint64{uint64(dirtied)}}
		if it.Duration > 0 {
			profile.Rate = float64(dirtied) * guestmem.PageSize / it.Duration.Seconds()
		}
	}
	// The first pass sent every page with data as it was then (the
	// guest may have written new ones since the sample).
	sampled := *profile
	sampled.DataPages = it.Pages
	// The model counts pages; compression, dedup and deltas put fewer
	// bytes than pages on the wire. The first pass measured how many:
	// predict in page bytes at the rate pages went, then scale bytes back.
	ratio := 1.0
	if it.Pages > 0 && it.Bytes > 0 {
		ratio = float64(it.Bytes) / float64(it.Pages*guestmem.PageSize)
	}
	opts := x.Opts
	pr := Predict(&sampled, bw/ratio, opts)
	pr.Bandwidth = bw
	pr.WireRatio = ratio
	for i := range pr.Estimates {
		pr.Estimates[i].Bytes = uint64(float64(pr.Estimates[i].Bytes) * ratio)
	}
	// The first pass is done: what remains is predicted from here, and
	// the pass itself is added to each estimate that includes it.
	x.rep.Prediction = pr
	if x.Opts.Mode != ModeAuto {
		x.rep.Predicted = x.predictedFor(x.Opts.Mode)
		return false
	}
	x.rep.Chosen = pr.Choice
	x.rep.ChoiceReason = pr.Reason
	x.rep.Predicted = x.predictedFor(ModeAuto)
	x.Log.Info("automatic mode", "choice", pr.Choice, "reason", pr.Reason)
	return pr.Choice == ModeHybrid
}

func (x *sender) predictedFor(m Mode) *Estimate {
	if x.rep.Prediction == nil {
		return nil
	}
	if e, ok := x.rep.Prediction.Estimate(m); ok {
		return &e
	}
	return nil
}

// predictFixed predicts the techniques that do not depend on the guest's
// writes (post-copy, demand paging) when the link's bandwidth is known.
func (x *sender) predictFixed() {
	bw := float64(x.limiter.Rate())
	if bw <= 0 {
		return
	}
	data, err := x.dataPages()
	if err != nil {
		return
	}
	profile := &DirtyProfile{Pages: x.mem.Size() / guestmem.PageSize, DataPages: countSet(data)}
	x.rep.Prediction = Predict(profile, bw, x.Opts)
	x.rep.Predicted = x.predictedFor(x.Opts.Mode)
}

// postcopyOnStall says whether a stalled pre-copy switches to post-copy.
func (x *sender) postcopyOnStall() bool {
	return x.Opts.PostcopyOnStall || (x.Opts.Mode == ModeAuto && !x.Opts.RequireRollback)
}

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}
