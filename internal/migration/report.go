package migration

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/ferry-vmm/ferry/internal/units"
)

// Phase names a stage of a migration, for progress and the report.
type Phase string

// Phases in the order a migration passes them.
const (
	PhaseSetup     Phase = "setup"
	PhasePreCopy   Phase = "precopy"
	PhaseStopCopy  Phase = "stopcopy"
	PhaseHandover  Phase = "handover"
	PhasePostCopy  Phase = "postcopy" // the guest runs at the destination; pages follow
	PhaseCompleted Phase = "completed"
	PhaseFailed    Phase = "failed"
)

// Switch reasons: why pre-copy ended.
const (
	SwitchConverged     = "converged"
	SwitchMaxIterations = "forced: max iterations"
	SwitchTimeout       = "forced: pre-copy timeout"
	SwitchStopCopyMode  = "stop-and-copy mode"
	SwitchPostCopyMode  = "post-copy mode"
	SwitchDemandMode    = "demand-paging mode"
	SwitchHybridTime    = "hybrid: pre-copy time bound"
	SwitchHybridPasses  = "hybrid: pre-copy pass bound"
	SwitchStalled       = "pre-copy stalled: post-copy"
	SwitchAutoPostcopy  = "auto: pre-copy cannot converge: post-copy"
)

// PostcopyReport measures the post-copy phase: the source's counts and
// the destination's fault measurements (sent in its PostcopyDone).
type PostcopyReport struct {
	PagesNeeded uint64        `json:"pages_needed"` // pages the destination lacked at the switch
	PagesPushed uint64        `json:"pages_pushed"` // sent in the background push
	PagesDemand uint64        `json:"pages_demand"` // sent in answer to requests
	BytesPushed uint64        `json:"bytes_pushed"`
	BytesDemand uint64        `json:"bytes_demand"`
	Requests    uint64        `json:"requests"`    // page requests received
	Faults      uint64        `json:"faults"`      // guest accesses that waited for the source
	ZeroFaults  uint64        `json:"zero_faults"` // faults on zero pages, served at the destination
	FaultP50    time.Duration `json:"fault_p50_ns"`
	FaultP99    time.Duration `json:"fault_p99_ns"`
	FaultMax    time.Duration `json:"fault_max_ns"`
	Blocked     time.Duration `json:"blocked_ns"`   // vCPU time spent waiting on faults, summed
	Residency   time.Duration `json:"residency_ns"` // guest resumed → every needed page placed
	Duration    time.Duration `json:"duration_ns"`  // switch → the destination's PostcopyDone
	LinkBreaks  int           `json:"link_breaks"`
	LinkDownFor time.Duration `json:"link_down_ns"`
	End         string        `json:"end"`                  // "resident", "guest-ended"
	PagesNever  uint64        `json:"pages_never_sent"`     // needed pages the guest never touched (guest-ended)
	Finished    bool          `json:"finished_by_operator"` // demand paging ended by --finish
	// GuestWorkDuring is the workload's progress (pages/s) at the
	// destination during post-copy, Degradation the fraction of its
	// progress before the migration that it lost (0.3 = 30 % slower).
	GuestWorkDuring float64 `json:"guest_work_during,omitempty"`
	Degradation     float64 `json:"degradation,omitempty"`
}

// Iteration is one pass over the pages to send.
type Iteration struct {
	N          int           `json:"n"`
	Phase      Phase         `json:"phase"`
	Pages      uint64        `json:"pages"`      // pages sent (zero records included)
	Resent     uint64        `json:"resent"`     // of those, pages sent before
	ZeroPages  uint64        `json:"zero_pages"` // sent as zero records (no data)
	Bytes      uint64        `json:"bytes"`      // bytes on the wire for this pass
	Duration   time.Duration `json:"duration_ns"`
	DirtyPages uint64        `json:"dirty_pages"`           // dirtied while this pass ran
	DirtyRate  float64       `json:"dirty_rate"`            // bytes/s dirtied while this pass ran
	Throughput float64       `json:"throughput"`            // bytes/s on the wire
	DupPages   uint64        `json:"dup_pages,omitempty"`   // sent as references to identical pages
	DeltaPages uint64        `json:"delta_pages,omitempty"` // sent as deltas to their previous version
	Cut        bool          `json:"cut,omitempty"`         // stopped at the pre-copy time bound (hybrid, forced switch)
}

// ThrottleReport says how much the guest was slowed during pre-copy
// (auto-converge, dirty-rate limit).
type ThrottleReport struct {
	Steps      []int         `json:"steps"`       // the percentages set, in order
	MaxPercent int           `json:"max_percent"` // the highest
	Active     time.Duration `json:"active_ns"`   // wall time the guest was throttled
	Held       time.Duration `json:"held_ns"`     // vCPU time held back, summed over vCPUs
	Reason     string        `json:"reason"`      // "auto-converge" or "dirty-rate limit"
}

// TransferStats counts what the page encodings and compression did.
type TransferStats struct {
	Codec            string `json:"codec"`
	Workers          int    `json:"workers"`
	Chunks           uint64 `json:"chunks"`
	CompressedChunks uint64 `json:"compressed_chunks"`    // stored compressed (smaller that way)
	PlainUnderLoad   uint64 `json:"plain_under_cpu_load"` // sent uncompressed: the link was waiting for the CPU
	PageBytes        uint64 `json:"page_bytes"`           // bytes of page contents sent (zero records excluded)
	ChunkBytes       uint64 `json:"chunk_bytes"`          // bytes of the chunks that carried them
	DupPages         uint64 `json:"dup_pages"`            // pages sent as a reference to an identical page
	DeltaPages       uint64 `json:"delta_pages"`          // pages sent as a delta to their previous version
	DeltaBytes       uint64 `json:"delta_bytes"`          // bytes of those deltas
}

// Report is what a migration measured. Durations are nanoseconds in JSON.
type Report struct {
	ID               string          `json:"id"`
	VM               string          `json:"vm"`
	Mode             Mode            `json:"mode"`
	Destination      string          `json:"destination,omitempty"`
	Result           string          `json:"result"` // "completed", "failed", "cancelled"
	Error            string          `json:"error,omitempty"`
	RolledBack       bool            `json:"rolled_back"` // the guest kept running on the source
	SwitchReason     string          `json:"switch_reason,omitempty"`
	TotalTime        time.Duration   `json:"total_time_ns"`
	SetupTime        time.Duration   `json:"setup_time_ns"`
	PrecopyTime      time.Duration   `json:"precopy_time_ns"`
	SwitchUnixNano   int64           `json:"switch_unix_nano,omitempty"`  // when the source paused the guest (host clock)
	Downtime         time.Duration   `json:"downtime_ns"`                 // source pause to destination resume (VMM view)
	GuestDowntime    time.Duration   `json:"guest_downtime_ns,omitempty"` // largest heartbeat gap around the switch (guest view)
	RestoreTime      time.Duration   `json:"restore_time_ns"`             // destination: state applied
	BytesTotal       uint64          `json:"bytes_total"`
	BytesPrecopy     uint64          `json:"bytes_precopy"`
	BytesStopCopy    uint64          `json:"bytes_stopcopy"`
	BytesState       uint64          `json:"bytes_state"` // machine state (registers, devices)
	PagesSent        uint64          `json:"pages_sent"`
	PagesResent      uint64          `json:"pages_resent"`
	ZeroPagesSkipped uint64          `json:"zero_pages_skipped"` // never sent: zero at iteration 0
	MemoryBytes      uint64          `json:"memory_bytes"`
	AvgThroughput    float64         `json:"avg_throughput"` // bytes/s over the whole migration
	Iterations       []Iteration     `json:"iterations"`
	Postcopy         *PostcopyReport `json:"postcopy,omitempty"`
	Transfer         TransferStats   `json:"transfer"`
	Throttle         *ThrottleReport `json:"throttle,omitempty"` // the guest slowed during pre-copy
	BandwidthLimit   int64           `json:"bandwidth_limit,omitempty"`
	DowntimeLimit    time.Duration   `json:"downtime_limit_ns"`
	// GuestWorkBefore is the guest workload's progress (pages/s, from its
	// heartbeats) in the 5 s before the migration began; 0 if unknown.
	GuestWorkBefore float64 `json:"guest_work_before,omitempty"`
	// Prediction is the model's view (auto mode, and every mode that
	// measured a pre-copy pass or had a bandwidth cap); Predicted its
	// estimate for the technique that ran, to compare with the actual.
	Prediction   *Prediction   `json:"prediction,omitempty"`
	Predicted    *Estimate     `json:"predicted,omitempty"`
	Chosen       Mode          `json:"chosen,omitempty"`    // auto: the technique it picked
	SampleTime   time.Duration `json:"sample_ns,omitempty"` // auto: watching the guest's writes before the first pass
	ChoiceReason string        `json:"choice_reason,omitempty"`
	// Warnings are what the migration cannot carry over exactly, said
	// before the switch: the destination's Notices (a TSC frequency it
	// cannot scale to).
	Warnings []string `json:"warnings,omitempty"`
}

// WriteTable renders the report for people.
func (r *Report) WriteTable(w io.Writer) {
	row := func(k, v string) { fmt.Fprintf(w, "  %-22s %s\n", k, v) }
	fmt.Fprintf(w, "migration %s of %s: %s\n", r.ID, r.VM, r.Result)
	if r.Error != "" {
		row("error", r.Error)
	}
	if r.RolledBack {
		row("rollback", "guest kept running on the source")
	}
	for _, w := range r.Warnings {
		row("warning", w)
	}
	row("mode", string(r.Mode))
	if r.Chosen != "" {
		row("auto", fmt.Sprintf("%s: %s", r.Chosen, r.ChoiceReason))
	}
	if r.SwitchReason != "" {
		row("switch", r.SwitchReason)
	}
	row("total time", ms(r.TotalTime))
	row("setup", ms(r.SetupTime))
	row("pre-copy", ms(r.PrecopyTime))
	row("downtime (VMM)", ms(r.Downtime)+fmt.Sprintf("  (limit %s)", ms(r.DowntimeLimit)))
	if r.GuestDowntime > 0 {
		row("downtime (guest)", ms(r.GuestDowntime))
	}
	row("restore (dest)", ms(r.RestoreTime))
	row("memory", units.FormatBytes(r.MemoryBytes))
	row("bytes on the wire", fmt.Sprintf("%s (pre-copy %s, stop-copy %s, state %s)", units.FormatBytes(r.BytesTotal),
		units.FormatBytes(r.BytesPrecopy), units.FormatBytes(r.BytesStopCopy), units.FormatBytes(r.BytesState)))
	row("pages", fmt.Sprintf("%d sent, %d re-sent, %d zero pages skipped", r.PagesSent, r.PagesResent, r.ZeroPagesSkipped))
	row("throughput", rate(r.AvgThroughput))
	if t := r.Transfer; t.PageBytes > 0 {
		row("encoding", fmt.Sprintf("%s, %d workers: %s of pages in %s of chunks (%.2fx); %d dup, %d delta pages; %d of %d chunks compressed, %d sent plain (CPU-bound)",
			t.Codec, t.Workers, units.FormatBytes(t.PageBytes), units.FormatBytes(t.ChunkBytes), float64(t.PageBytes)/float64(max(t.ChunkBytes, 1)),
			t.DupPages, t.DeltaPages, t.CompressedChunks, t.Chunks, t.PlainUnderLoad))
	}
	if th := r.Throttle; th != nil {
		row("throttle", fmt.Sprintf("%s: up to %d%% (steps %v) for %s; vCPUs held back %s in all", th.Reason, th.MaxPercent, th.Steps, ms(th.Active), ms(th.Held)))
	}
	if p := r.Predicted; p != nil {
		row("predicted", fmt.Sprintf("transfer %s (actual %s), downtime %s (actual %s), %s on the wire (actual %s)",
			ms(p.TotalTime), ms(r.TransferTime()), ms(p.Downtime), ms(r.Downtime), units.FormatBytes(p.Bytes), units.FormatBytes(r.BytesTotal)))
	}
	if p := r.Postcopy; p != nil {
		row("post-copy", fmt.Sprintf("%s, %s until resident (%s)", ms(p.Duration), ms(p.Residency), p.End))
		row("post-copy pages", fmt.Sprintf("%d needed: %d pushed (%s), %d on demand (%s), %d never needed",
			p.PagesNeeded, p.PagesPushed, units.FormatBytes(p.BytesPushed), p.PagesDemand, units.FormatBytes(p.BytesDemand), p.PagesNever))
		row("remote faults", fmt.Sprintf("%d (p50 %s, p99 %s, max %s; vCPUs blocked %s); %d zero-page faults served locally",
			p.Faults, us(p.FaultP50), us(p.FaultP99), us(p.FaultMax), ms(p.Blocked), p.ZeroFaults))
		if p.GuestWorkDuring > 0 {
			row("guest workload", fmt.Sprintf("%.0f pages/s before, %.0f during post-copy (%.0f%% slower)", r.GuestWorkBefore, p.GuestWorkDuring, 100*p.Degradation))
		}
		if p.LinkBreaks > 0 {
			row("link breaks", fmt.Sprintf("%d, down %s in all, recovered", p.LinkBreaks, ms(p.LinkDownFor)))
		}
	}
	if len(r.Iterations) > 0 {
		fmt.Fprintf(w, "  %4s %-9s %9s %9s %10s %9s %11s %11s\n", "iter", "phase", "pages", "resent", "bytes", "time", "dirty rate", "throughput")
		for _, it := range r.Iterations {
			fmt.Fprintf(w, "  %4d %-9s %9d %9d %10s %9s %11s %11s\n", it.N, it.Phase, it.Pages, it.Resent,
				units.FormatBytes(it.Bytes), ms(it.Duration), rate(it.DirtyRate), rate(it.Throughput))
		}
	}
}

func ms(d time.Duration) string {
	if d < time.Second {
		return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

func us(d time.Duration) string {
	if d < time.Millisecond {
		return fmt.Sprintf("%d µs", d.Microseconds())
	}
	return ms(d)
}

func rate(bps float64) string {
	if bps <= 0 {
		return "-"
	}
	s := units.FormatBytes(uint64(bps))
	return strings.Replace(s, "iB", "iB/s", 1)
}

// Progress is a snapshot of a running migration for the live display.
type Progress struct {
	Phase          Phase         `json:"phase"`
	Iteration      int           `json:"iteration"`
	RemainingBytes uint64        `json:"remaining_bytes"` // dirty data still to send
	DirtyRate      float64       `json:"dirty_rate"`
	Throughput     float64       `json:"throughput"`
	ETA            time.Duration `json:"eta_ns"`
	Elapsed        time.Duration `json:"elapsed_ns"`
	BytesSent      uint64        `json:"bytes_sent"`
}

// Line renders Progress as one status line.
func (p Progress) Line() string {
	eta := "-"
	if p.ETA > 0 {
		eta = ms(p.ETA)
	}
	return fmt.Sprintf("%-9s iter %-3d remaining %9s  dirty %11s  throughput %11s  sent %9s  elapsed %8s  eta %s",
		p.Phase, p.Iteration, units.FormatBytes(p.RemainingBytes), rate(p.DirtyRate), rate(p.Throughput),
		units.FormatBytes(p.BytesSent), ms(p.Elapsed), eta)
}

// TransferTime is the migration's time after the handshake and the
// sampling: what a prediction's total time predicts.
func (r *Report) TransferTime() time.Duration { return r.TotalTime - r.SetupTime - r.SampleTime }
