package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"net"
	"slices"
	"strings"
	"time"
)

// MigrationStatus is QEMU's MigrationStatus enum.
type MigrationStatus string

// Migration states (QEMU 7.2). query-migrate leaves the status out before
// any migration; QueryMigrate reports that as StatusNone.
const (
	StatusNone            MigrationStatus = "none"
	StatusSetup           MigrationStatus = "setup"
	StatusActive          MigrationStatus = "active"
	StatusPostcopyActive  MigrationStatus = "postcopy-active"
	StatusPostcopyPaused  MigrationStatus = "postcopy-paused"
	StatusPostcopyRecover MigrationStatus = "postcopy-recover"
	StatusPreSwitchover   MigrationStatus = "pre-switchover"
	StatusDevice          MigrationStatus = "device"
	StatusWaitUnplug      MigrationStatus = "wait-unplug"
	StatusCancelling      MigrationStatus = "cancelling"
	StatusCancelled       MigrationStatus = "cancelled"
	StatusCompleted       MigrationStatus = "completed"
	StatusFailed          MigrationStatus = "failed"
	StatusColo            MigrationStatus = "colo"
)

// Finished reports whether a migration in this state is over.
func (s MigrationStatus) Finished() bool {
	return s == StatusCompleted || s == StatusFailed || s == StatusCancelled
}

// MigrationInfo is query-migrate's answer as QEMU 7.2 gives it. Times are
// milliseconds as QEMU counts them; fields QEMU leaves out are zero/nil.
type MigrationInfo struct {
	Status             MigrationStatus `json:"status"`
	TotalTimeMs        int64           `json:"total-time"`        // since migrate, while running and at the end
	ExpectedDowntimeMs int64           `json:"expected-downtime"` // while active (pre-copy)
	DowntimeMs         int64           `json:"downtime"`          // once completed
	SetupTimeMs        int64           `json:"setup-time"`
	RAM                *RAMStats       `json:"ram"`
	XBZRLECache        *XBZRLEStats    `json:"xbzrle-cache"` // with the xbzrle capability
	Compression        *CompressStats  `json:"compression"`  // with the compress capability
	// CPUThrottlePercentage is auto-converge's current vCPU throttle.
	CPUThrottlePercentage int64  `json:"cpu-throttle-percentage"`
	ErrorDesc             string `json:"error-desc"` // why it failed
	// BlockedReasons says why a migration cannot start (devices, options).
	BlockedReasons []string `json:"blocked-reasons"`
	// PostcopyBlocktimeMs and PostcopyVCPUBlocktimeMs are the time vCPUs
	// spent blocked on post-copy page faults, on the destination with the
	// postcopy-blocktime capability.
	PostcopyBlocktimeMs     int64   `json:"postcopy-blocktime"`
	PostcopyVCPUBlocktimeMs []int64 `json:"postcopy-vcpu-blocktime"`
	// SocketAddress is where an incoming migration listens (destination);
	// with port 0 it names the port the kernel chose.
	SocketAddress []SocketAddress `json:"socket-address"`
}

// RAMStats is query-migrate's "ram" object (QEMU 7.2).
type RAMStats struct {
	Transferred             uint64  `json:"transferred"` // bytes on the wire, all phases
	Remaining               uint64  `json:"remaining"`   // bytes still dirty
	Total                   uint64  `json:"total"`       // guest RAM bytes
	Duplicate               uint64  `json:"duplicate"`   // zero pages (sent as a flag)
	Skipped                 uint64  `json:"skipped"`
	Normal                  uint64  `json:"normal"`       // pages sent whole
	NormalBytes             uint64  `json:"normal-bytes"` // bytes of those pages
	DirtyPagesRate          uint64  `json:"dirty-pages-rate"`
	Mbps                    float64 `json:"mbps"` // throughput, megabits/s
	DirtySyncCount          uint64  `json:"dirty-sync-count"`
	PostcopyRequests        uint64  `json:"postcopy-requests"` // page faults the destination asked for
	PageSize                uint64  `json:"page-size"`
	MultifdBytes            uint64  `json:"multifd-bytes"`
	PagesPerSecond          uint64  `json:"pages-per-second"`
	PrecopyBytes            uint64  `json:"precopy-bytes"`
	DowntimeBytes           uint64  `json:"downtime-bytes"` // sent while the guest was stopped
	PostcopyBytes           uint64  `json:"postcopy-bytes"`
	DirtySyncMissedZeroCopy uint64  `json:"dirty-sync-missed-zero-copy"`
}

// XBZRLEStats is query-migrate's "xbzrle-cache" object.
type XBZRLEStats struct {
	CacheSize     uint64  `json:"cache-size"`
	Bytes         uint64  `json:"bytes"` // encoded bytes sent
	Pages         uint64  `json:"pages"` // pages sent encoded
	CacheMiss     uint64  `json:"cache-miss"`
	CacheMissRate float64 `json:"cache-miss-rate"`
	EncodingRate  float64 `json:"encoding-rate"`
	Overflow      uint64  `json:"overflow"` // pages whose encoding was too large
}

// CompressStats is query-migrate's "compression" object (the compress
// capability's thread compression, not multifd's).
type CompressStats struct {
	Pages           uint64  `json:"pages"`
	Busy            uint64  `json:"busy"`
	BusyRate        float64 `json:"busy-rate"`
	CompressedSize  uint64  `json:"compressed-size"`
	CompressionRate float64 `json:"compression-rate"`
}

// SocketAddress is an entry of query-migrate's "socket-address".
type SocketAddress struct {
	Type string `json:"type"` // "inet", "unix", ...
	Host string `json:"host"`
	Port string `json:"port"`
	Path string `json:"path"`
}

// RunState is query-status's answer.
type RunState struct {
	Status  string `json:"status"` // "running", "paused", "inmigrate", "postmigrate", ...
	Running bool   `json:"running"`
}

// SetCapabilities sets migration capabilities (QEMU names: "xbzrle",
// "postcopy-ram", "multifd", "events", ...). Capabilities not named keep
// their state.
func (c *Client) SetCapabilities(ctx context.Context, caps map[string]bool) error {
	type cap struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	var list []cap
	for _, name := range slices.Sorted(maps.Keys(caps)) {
		list = append(list, cap{name, caps[name]})
	}
	if err := c.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list}, nil); err != nil {
		return fmt.Errorf("setting migration capabilities %v: %w", caps, err)
	}
	return nil
}

// QueryCapabilities returns every migration capability and its state.
func (c *Client) QueryCapabilities(ctx context.Context) (map[string]bool, error) {
	var list []struct {
		Capability string `json:"capability"`
		State      bool   `json:"state"`
	}
	if err := c.Execute(ctx, "query-migrate-capabilities", nil, &list); err != nil {
		return nil, err
	}
	caps := make(map[string]bool, len(list))
	for _, e := range list {
		caps[e.Capability] = e.State
	}
	return caps, nil
}

// SetParameters sets migration parameters (QEMU names: "downtime-limit"
// in ms, "max-bandwidth" in bytes/s, "multifd-channels",
// "multifd-compression", "xbzrle-cache-size", ...).
func (c *Client) SetParameters(ctx context.Context, params map[string]any) error {
	if err := c.Execute(ctx, "migrate-set-parameters", params, nil); err != nil {
		return fmt.Errorf("setting migration parameters %v: %w", params, err)
	}
	return nil
}

// QueryParameters returns every migration parameter. Numbers are
// json.Number, so that 64-bit values (max-bandwidth) keep every digit.
func (c *Client) QueryParameters(ctx context.Context) (map[string]any, error) {
	var raw json.RawMessage
	if err := c.Execute(ctx, "query-migrate-parameters", nil, &raw); err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var params map[string]any
	if err := dec.Decode(&params); err != nil {
		return nil, fmt.Errorf("decoding migration parameters: %w", err)
	}
	return params, nil
}

// Migrate starts an outgoing migration to uri ("tcp:HOST:PORT", ...). It
// returns once QEMU has accepted the command; QueryMigrate follows it.
func (c *Client) Migrate(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate", map[string]any{"uri": uri}, nil)
}

// MigrateIncoming makes a QEMU started with -incoming defer listen on uri.
func (c *Client) MigrateIncoming(ctx context.Context, uri string) error {
	return c.Execute(ctx, "migrate-incoming", map[string]any{"uri": uri}, nil)
}

// StartPostcopy switches a running migration to post-copy (needs the
// postcopy-ram capability on both sides). Issued before the migration
// leaves setup, QEMU switches as soon as it can.
func (c *Client) StartPostcopy(ctx context.Context) error {
	return c.Execute(ctx, "migrate-start-postcopy", nil, nil)
}

// Cancel cancels the outgoing migration; the source keeps running.
func (c *Client) Cancel(ctx context.Context) error {
	return c.Execute(ctx, "migrate_cancel", nil, nil)
}

// QueryMigrate returns the state of the current or last migration.
func (c *Client) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var info MigrationInfo
	if err := c.Execute(ctx, "query-migrate", nil, &info); err != nil {
		return MigrationInfo{}, err
	}
	if info.Status == "" {
		info.Status = StatusNone
	}
	return info, nil
}

// QueryStatus returns the VM's run state.
func (c *Client) QueryStatus(ctx context.Context) (RunState, error) {
	var st RunState
	err := c.Execute(ctx, "query-status", nil, &st)
	return st, err
}

// CPUFeature reports whether QEMU's first vCPU has a CPU feature (QEMU's
// property names: "avx", "xsave", "avx2", ...), after QEMU dropped what
// KVM does not support. See DefaultCPU for why "avx" matters.
func (c *Client) CPUFeature(ctx context.Context, name string) (bool, error) {
	var cpus []struct {
		QOMPath string `json:"qom-path"`
	}
	if err := c.Execute(ctx, "query-cpus-fast", nil, &cpus); err != nil {
		return false, err
	}
	if len(cpus) == 0 {
		return false, errors.New("query-cpus-fast: no vCPUs")
	}
	var on bool
	if err := c.Execute(ctx, "qom-get", map[string]any{"path": cpus[0].QOMPath, "property": name}, &on); err != nil {
		return false, fmt.Errorf("CPU feature %q: %w", name, err)
	}
	return on, nil
}

// Stop pauses the guest's vCPUs.
func (c *Client) Stop(ctx context.Context) error { return c.Execute(ctx, "stop", nil, nil) }

// Cont resumes a paused guest.
func (c *Client) Cont(ctx context.Context) error { return c.Execute(ctx, "cont", nil, nil) }

// Quit makes QEMU exit.
func (c *Client) Quit(ctx context.Context) error { return c.Execute(ctx, "quit", nil, nil) }

// Technique is how MigrateTo moves the guest.
type Technique string

const (
	// Precopy copies memory while the guest runs and stops it for the
	// last dirty pages and device state.
	Precopy Technique = "precopy"
	// Postcopy switches to the destination right after migrate starts;
	// pages follow on demand and in the background.
	Postcopy Technique = "postcopy"
	// Hybrid runs pre-copy for Plan.PrecopyFor, then switches to
	// post-copy (unless pre-copy finished first).
	Hybrid Technique = "hybrid"
	// Offline stops the source first and copies everything with the
	// guest stopped; the destination is continued once loaded.
	Offline Technique = "offline"
)

// DefaultDowntimeLimit is QEMU's default downtime-limit. MigrateTo sets
// it when Plan.DowntimeLimit is 0, so that a limit raised by an earlier
// ForceAfter does not carry over to the next migration.
const DefaultDowntimeLimit = 300 * time.Millisecond

// MaxDowntimeLimit is the largest downtime-limit QEMU 7.2 accepts (2000 s).
const MaxDowntimeLimit = 2000 * time.Second

// Unlimited is the max-bandwidth MigrateTo sets when Plan.MaxBandwidth is
// 0. QEMU 7.2 limits migration to 128 MiB/s unless told otherwise, and 0
// is not "unlimited" for max-bandwidth.
const Unlimited = math.MaxInt64

// Plan is one QEMU-to-QEMU migration.
type Plan struct {
	// URI is where the source sends, "tcp:HOST:PORT". With port 0 the
	// destination listens on a port the kernel chooses and MigrateTo
	// sends there (needs dst).
	URI string
	// IncomingURI is what the destination listens on when it differs
	// from URI (e.g. "tcp:0.0.0.0:4444" in another network namespace).
	IncomingURI string
	Technique   Technique // default Precopy
	PrecopyFor  time.Duration
	// DowntimeLimit is QEMU's downtime-limit; 0 means
	// DefaultDowntimeLimit.
	DowntimeLimit time.Duration
	// MaxBandwidth in bytes/s; 0 means Unlimited.
	MaxBandwidth int64
	// ForceAfter: if pre-copy has not completed this long after it
	// started, raise downtime-limit to MaxDowntimeLimit so that QEMU
	// stops the guest and copies the rest at its next convergence check.
	// 0: never.
	ForceAfter time.Duration
	// Capabilities set on both sides ("xbzrle", "multifd", ...).
	// postcopy-ram (post-copy and hybrid) and events are added.
	Capabilities map[string]bool
	// Parameters set on both sides ("multifd-channels",
	// "multifd-compression", "xbzrle-cache-size", ...): multifd needs the
	// same on each end.
	Parameters map[string]any
	// Poll is the query-migrate interval; default 50 ms. State changes
	// (MIGRATION events) are seen at once regardless.
	Poll time.Duration
	// Progress, if set, gets every source query-migrate while the
	// migration runs (from MigrateTo's goroutine).
	Progress func(MigrationInfo)
}

// Outcome is what happened in MigrateTo. Times are host wall-clock times;
// those of QEMU events are QEMU's own timestamps.
type Outcome struct {
	Technique Technique
	URI       string // the URI the source sent to
	// Completed: the source reported completed and the destination runs.
	Completed bool
	Status    MigrationStatus // the source's final status
	Source    MigrationInfo   // the source's final query-migrate
	Dest      MigrationInfo   // the destination's query-migrate once it runs
	// SourceState is the source's run state at the end ("postmigrate"
	// after success, "running" after a failure QEMU recovered from).
	SourceState string
	// Capabilities and Parameters in effect on the source.
	Capabilities map[string]bool
	Parameters   map[string]any

	Started           time.Time // migrate issued
	SourceStopped     time.Time // the source's STOP event
	PostcopyRequested time.Time // migrate-start-postcopy issued
	PostcopyStarted   time.Time // the source's MIGRATION postcopy-active event
	CompletedAt       time.Time // the source's MIGRATION completed event
	DestRunning       time.Time // the destination's RESUME event
	ForcedStop        bool      // ForceAfter raised the downtime limit
	ForcedAt          time.Time
	Error             string // the error MigrateTo returned, with QEMU's error-desc

	SourceEvents []Event // the source's QMP events from the start of the migration
	DestEvents   []Event
}

// MigrateTo migrates the guest in src to dst, which must have been
// started with Incoming "defer": it sets capabilities on both sides and
// parameters, makes dst listen, starts the migration, applies the
// technique, and follows it until the source reports completed and dst
// runs. dst may be nil when something else listens at plan.URI; then only
// the source is followed. When the migration fails the source keeps
// running if QEMU could resume it (not after post-copy started), and the
// error carries QEMU's error-desc. When ctx ends, the migration is
// cancelled.
func MigrateTo(ctx context.Context, src, dst *Instance, plan Plan) (Outcome, error) {
	out := Outcome{Technique: plan.Technique}
	if out.Technique == "" {
		out.Technique = Precopy
	}
	var s, d *Client
	srcMark, dstMark := -1, -1
	// events copies the QMP events since the marks into the outcome.
	events := func() {
		if srcMark >= 0 {
			out.SourceEvents = eventsFrom(s, srcMark)
		}
		if dstMark >= 0 {
			out.DestEvents = eventsFrom(d, dstMark)
		}
	}
	fail := func(err error) (Outcome, error) {
		events()
		to := out.URI
		if to == "" {
			to = plan.URI
		}
		err = fmt.Errorf("qemu %s migration to %s: %w", out.Technique, to, err)
		out.Error = err.Error()
		return out, err
	}
	if err := plan.check(out.Technique, dst); err != nil {
		return fail(err)
	}
	s = src.QMP()
	if dst != nil {
		d = dst.QMP()
	}
	if s == nil || (dst != nil && d == nil) {
		return fail(errors.New("instance has no QMP connection"))
	}
	poll := plan.Poll
	if poll <= 0 {
		poll = 50 * time.Millisecond
	}

	caps := maps.Clone(plan.Capabilities)
	if caps == nil {
		caps = map[string]bool{}
	}
	caps["events"] = true // MIGRATION events time the state changes
	if out.Technique == Postcopy || out.Technique == Hybrid {
		caps["postcopy-ram"] = true
	}
	srcParams := maps.Clone(plan.Parameters)
	if srcParams == nil {
		srcParams = map[string]any{}
	}
	srcParams["max-bandwidth"] = int64(Unlimited)
	if plan.MaxBandwidth > 0 {
		srcParams["max-bandwidth"] = plan.MaxBandwidth
	}
	srcParams["downtime-limit"] = DefaultDowntimeLimit.Milliseconds()
	if plan.DowntimeLimit > 0 {
		srcParams["downtime-limit"] = plan.DowntimeLimit.Milliseconds()
	}

	// The destination first: it must listen, with matching capabilities
	// (postcopy-ram, multifd), before the source connects.
	uri := plan.URI
	if d != nil {
		if err := d.SetCapabilities(ctx, caps); err != nil {
			return fail(fmt.Errorf("destination: %w", dst.explain(err)))
		}
		if len(plan.Parameters) > 0 {
			if err := d.SetParameters(ctx, plan.Parameters); err != nil {
				return fail(fmt.Errorf("destination: %w", dst.explain(err)))
			}
		}
	}
	if err := s.SetCapabilities(ctx, caps); err != nil {
		return fail(fmt.Errorf("source: %w", src.explain(err)))
	}
	if err := s.SetParameters(ctx, srcParams); err != nil {
		return fail(fmt.Errorf("source: %w", src.explain(err)))
	}
	var err error
	if out.Capabilities, err = s.QueryCapabilities(ctx); err != nil {
		return fail(fmt.Errorf("source: %w", src.explain(err)))
	}
	if out.Parameters, err = s.QueryParameters(ctx); err != nil {
		return fail(fmt.Errorf("source: %w", src.explain(err)))
	}
	if d != nil {
		dstMark = d.EventCount()
		in := plan.IncomingURI
		if in == "" {
			in = plan.URI
		}
		if err := d.MigrateIncoming(ctx, in); err != nil {
			return fail(fmt.Errorf("destination: %w", dst.explain(err)))
		}
		if uri, err = resolvePort(ctx, d, plan.URI); err != nil {
			return fail(fmt.Errorf("destination: %w", dst.explain(err)))
		}
	}
	out.URI = uri
	srcMark = s.EventCount()

	if out.Technique == Offline {
		if err := s.Stop(ctx); err != nil {
			return fail(fmt.Errorf("source: stopping the guest: %w", src.explain(err)))
		}
	}
	out.Started = time.Now()
	if err := s.Migrate(ctx, uri); err != nil {
		return fail(withRecovery(fmt.Errorf("source: %w", src.explain(err)), recoverSource(src, out.Technique, &out)))
	}
	if out.Technique == Postcopy {
		if err := s.StartPostcopy(ctx); err != nil {
			return fail(withRecovery(fmt.Errorf("source: %w", src.explain(err)), recoverSource(src, out.Technique, &out)))
		}
		out.PostcopyRequested = time.Now()
	}

	// Follow the source until it is done.
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		info, err := s.QueryMigrate(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return fail(withRecovery(ctx.Err(), recoverSource(src, out.Technique, &out)))
			}
			return fail(fmt.Errorf("source: %w", src.explain(err)))
		}
		out.Source, out.Status = info, info.Status
		if plan.Progress != nil {
			plan.Progress(info)
		}
		if info.Status == StatusCompleted {
			break
		}
		switch info.Status {
		case StatusFailed, StatusCancelled:
			why := info.ErrorDesc
			if why == "" {
				why = "no error-desc"
			}
			err := fmt.Errorf("%s: %s", info.Status, why)
			if dst != nil {
				select {
				case <-dst.Exited():
					err = fmt.Errorf("%w (destination: %v)", err, dst.exitError())
				default:
				}
			}
			return fail(withRecovery(err, recoverSource(src, out.Technique, &out)))
		case StatusPostcopyPaused:
			// The guest runs on the destination with part of its memory
			// still on the source: neither side can go on alone.
			return fail(fmt.Errorf("post-copy paused (the connection broke; the guest's memory is split between source and destination): %s", info.ErrorDesc))
		}
		elapsed := time.Since(out.Started)
		if out.Technique == Hybrid && out.PostcopyRequested.IsZero() && elapsed >= plan.PrecopyFor && info.Status == StatusActive {
			if err := s.StartPostcopy(ctx); err != nil {
				// Pre-copy may have completed since the query: then
				// there is nothing to switch, and the loop sees it.
				if now, qerr := s.QueryMigrate(ctx); qerr != nil || !now.Status.Finished() {
					return fail(withRecovery(fmt.Errorf("source: switching to post-copy: %w", src.explain(err)), recoverSource(src, out.Technique, &out)))
				}
			} else {
				out.PostcopyRequested = time.Now()
			}
		}
		if plan.ForceAfter > 0 && !out.ForcedStop && out.PostcopyRequested.IsZero() && elapsed >= plan.ForceAfter && info.Status == StatusActive {
			// QEMU completes pre-copy when the remaining dirty memory fits
			// in downtime-limit at the measured bandwidth; the largest
			// limit makes the next check (every 100 ms) pass.
			if err := s.SetParameters(ctx, map[string]any{"downtime-limit": MaxDowntimeLimit.Milliseconds()}); err != nil {
				return fail(fmt.Errorf("source: forcing stop-and-copy: %w", src.explain(err)))
			}
			out.ForcedStop, out.ForcedAt = true, time.Now()
		}
		select {
		case <-ctx.Done():
			return fail(withRecovery(ctx.Err(), recoverSource(src, out.Technique, &out)))
		case <-tick.C:
		case <-s.nextEvent():
		}
	}
	out.CompletedAt = time.Now()
	// QEMU 7.2 reports completed a moment before it has worked out the
	// totals (total-time, downtime, mbps read 0) and while the source is
	// still in finish-migrate: wait for those to settle.
	settle := time.Now().Add(2 * time.Second)
	for {
		st, err := s.QueryStatus(ctx)
		if err != nil {
			return fail(fmt.Errorf("source: %w", src.explain(err)))
		}
		out.SourceState = st.Status
		if out.Source.TotalTimeMs > 0 && st.Status != "finish-migrate" || time.Now().After(settle) {
			break
		}
		select {
		case <-ctx.Done():
			return fail(ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
		if out.Source, err = s.QueryMigrate(ctx); err != nil {
			return fail(fmt.Errorf("source: %w", src.explain(err)))
		}
	}
	if ev, ok := s.findEvent(srcMark, func(e Event) bool { return e.MigrationStatus() == StatusCompleted }); ok {
		out.CompletedAt = ev.Time
	}
	if ev, ok := s.findEvent(srcMark, Named("STOP")); ok {
		out.SourceStopped = ev.Time
	}
	if ev, ok := s.findEvent(srcMark, func(e Event) bool { return e.MigrationStatus() == StatusPostcopyActive }); ok {
		out.PostcopyStarted = ev.Time
	}

	if d != nil {
		if err := waitRunning(ctx, dst, out.Technique == Offline, poll); err != nil {
			return fail(fmt.Errorf("destination: %w", err))
		}
		out.DestRunning = time.Now()
		if ev, ok := d.findEvent(dstMark, Named("RESUME")); ok {
			out.DestRunning = ev.Time
		}
		if out.Dest, err = d.QueryMigrate(ctx); err != nil {
			return fail(fmt.Errorf("destination: %w", dst.explain(err)))
		}
	}
	out.Completed = true
	events()
	return out, nil
}

// check validates a plan.
func (p Plan) check(t Technique, dst *Instance) error {
	switch t {
	case Precopy, Postcopy, Hybrid, Offline:
	default:
		return fmt.Errorf("unknown technique %q: precopy, postcopy, hybrid or offline", t)
	}
	if t == Hybrid && p.PrecopyFor <= 0 {
		return errors.New("hybrid needs PrecopyFor > 0")
	}
	if on, set := p.Capabilities["postcopy-ram"]; set && !on && (t == Postcopy || t == Hybrid) {
		return fmt.Errorf("%s with the postcopy-ram capability off", t)
	}
	if p.URI == "" {
		return errors.New("no URI")
	}
	if dst == nil && strings.HasPrefix(p.URI, "tcp:") && strings.HasSuffix(p.URI, ":0") {
		return errors.New("port 0 needs a destination instance to learn the port from")
	}
	if p.DowntimeLimit > MaxDowntimeLimit {
		return fmt.Errorf("downtime limit %v above QEMU's maximum %v", p.DowntimeLimit, MaxDowntimeLimit)
	}
	return nil
}

// resolvePort replaces port 0 in a tcp: URI with the port the destination
// listens on (query-migrate's socket-address).
func resolvePort(ctx context.Context, d *Client, uri string) (string, error) {
	hostport, ok := strings.CutPrefix(uri, "tcp:")
	if !ok {
		return uri, nil
	}
	host, port, err := net.SplitHostPort(hostport)
	if err != nil || port != "0" {
		return uri, nil // not ours to judge: QEMU reports bad URIs
	}
	info, err := d.QueryMigrate(ctx)
	if err != nil {
		return "", err
	}
	for _, a := range info.SocketAddress {
		if a.Type == "inet" && a.Port != "" && a.Port != "0" {
			return "tcp:" + net.JoinHostPort(host, a.Port), nil
		}
	}
	return "", fmt.Errorf("listening on %s but query-migrate names no port: %+v", uri, info.SocketAddress)
}

// recoverSource leaves the source running after a migration that did not
// complete: cancels a migration still in flight (QEMU then resumes the
// guest) and continues a guest Offline stopped. Post-copy cannot be
// undone: once the destination runs, the source's copy is stale. It uses
// its own short context, since the caller's may be what ended.
func recoverSource(src *Instance, t Technique, out *Outcome) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := src.QMP()
	info, err := s.QueryMigrate(ctx)
	if err != nil {
		return fmt.Errorf("source: %w", src.explain(err))
	}
	out.Source, out.Status = info, info.Status
	switch info.Status {
	case StatusCompleted:
		return errors.New("the migration completed meanwhile: the guest is on the destination")
	case StatusPostcopyActive, StatusPostcopyPaused, StatusPostcopyRecover:
		return errors.New("post-copy had started: the source cannot resume")
	case StatusSetup, StatusActive, StatusPreSwitchover, StatusDevice, StatusWaitUnplug:
		if err := s.Cancel(ctx); err != nil {
			return fmt.Errorf("source: cancelling: %w", err)
		}
		for !info.Status.Finished() {
			select {
			case <-ctx.Done():
				return fmt.Errorf("source: waiting for the cancel: %w", ctx.Err())
			case <-time.After(10 * time.Millisecond):
			}
			if info, err = s.QueryMigrate(ctx); err != nil {
				return fmt.Errorf("source: %w", src.explain(err))
			}
		}
		out.Source, out.Status = info, info.Status
	}
	// QEMU reports failed or cancelled a moment before it restarts the
	// guest (the source sits in finish-migrate if it had stopped it).
	resumed := false
	for {
		st, err := s.QueryStatus(ctx)
		if err != nil {
			return fmt.Errorf("source: %w", src.explain(err))
		}
		out.SourceState = st.Status
		switch {
		case st.Running:
			return nil
		case t == Offline && !resumed && st.Status != "finish-migrate":
			// MigrateTo stopped it, so MigrateTo resumes it.
			if err := s.Cont(ctx); err != nil {
				return fmt.Errorf("source: resuming the guest: %w", err)
			}
			resumed = true
			continue
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the source is %s, not running", st.Status)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitRunning waits for the destination to load the guest and run it.
// A live migration's destination starts the guest by itself; an offline
// one stays paused (the source was) and is continued here.
func waitRunning(ctx context.Context, dst *Instance, cont bool, poll time.Duration) error {
	d := dst.QMP()
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		st, err := d.QueryStatus(ctx)
		if err != nil {
			return dst.explain(err)
		}
		if st.Running {
			return nil
		}
		info, err := d.QueryMigrate(ctx)
		if err != nil {
			return dst.explain(err)
		}
		switch {
		case info.Status == StatusFailed:
			return fmt.Errorf("incoming migration failed: %s", info.ErrorDesc)
		case cont && info.Status == StatusCompleted && st.Status == "paused":
			if err := d.Cont(ctx); err != nil {
				return fmt.Errorf("continuing the guest: %w", err)
			}
		case st.Status != "inmigrate" && st.Status != "paused" && st.Status != "finish-migrate" && st.Status != "prelaunch":
			return fmt.Errorf("the guest is %s after the migration", st.Status)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the guest to run (it is %s): %w", st.Status, ctx.Err())
		case <-tick.C:
		case <-d.nextEvent():
		}
	}
}

// explain adds why QEMU went away to a QMP error, when it did.
func (i *Instance) explain(err error) error {
	select {
	case <-i.exited:
		return fmt.Errorf("%w (%v)", err, i.exitError())
	default:
	}
	// The QMP socket closes a moment before the process is reaped.
	if i.qmp != nil {
		select {
		case <-i.qmp.Done():
			select {
			case <-i.exited:
				return fmt.Errorf("%w (%v)", err, i.exitError())
			case <-time.After(time.Second):
			}
		default:
		}
	}
	return err
}

// withRecovery adds what went wrong leaving the source running.
func withRecovery(err, recoverErr error) error {
	if recoverErr == nil {
		return err
	}
	return fmt.Errorf("%w; then %w", err, recoverErr)
}

func eventsFrom(c *Client, mark int) []Event {
	all := c.Events()
	if mark > len(all) {
		return nil
	}
	return all[mark:]
}
