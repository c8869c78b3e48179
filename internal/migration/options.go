// Package migration moves a running VM from one VMM process to another:
// pre-copy (iterative, with dirty logging), stop-and-copy, post-copy
// (resume at the destination first, pages pushed and fetched on fault via
// userfaultfd), pure demand paging and hybrid (bounded pre-copy, then
// post-copy), with rollback to the source on any failure before the
// destination runs the guest, recovery of a link that breaks during
// post-copy, and full metrics. It drives internal/vmm on both ends and speaks internal/wire
// over any connection the caller provides (the daemon provides mutually
// authenticated TLS).
//
// It must not know about daemons, sockets it did not get, or the CLI.
package migration

import (
	"errors"
	"fmt"
	"runtime"
	"time"

	"github.com/ferry-vmm/ferry/internal/state"
)

// Mode is a migration technique.
type Mode string

// Modes implemented by this package.
const (
	ModeStopCopy Mode = "stopcopy"
	ModePreCopy  Mode = "precopy"
	// ModePostCopy switches at once and pushes every page in the
	// background while the destination fetches what the guest faults on.
	ModePostCopy Mode = "postcopy"
	// ModeDemand switches at once and sends only what the guest faults on,
	// until the guest has everything, ends, or the operator finishes it.
	ModeDemand Mode = "demand"
	// ModeHybrid runs a bounded pre-copy, then post-copy (or finishes as
	// pre-copy if it converged within the bound).
	ModeHybrid Mode = "hybrid"
	// ModeAuto predicts every technique from a sample of the guest's
	// writes and the link, picks one within the user's limits, and
	// switches pre-copy to post-copy (or throttles the guest, when
	// rollback is required) when it stalls. The default.
	ModeAuto Mode = "auto"
)

// ParseMode checks a user-given mode.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case ModeStopCopy, ModePreCopy, ModePostCopy, ModeDemand, ModeHybrid, ModeAuto:
		return Mode(s), nil
	}
	return "", fmt.Errorf("unknown migration mode %q (known: auto, precopy, stopcopy, postcopy, demand, hybrid)", s)
}

// mayPostcopy says whether a migration can end in post-copy.
func (o Options) mayPostcopy() bool {
	return o.Mode == ModePostCopy || o.Mode == ModeDemand || o.Mode == ModeHybrid ||
		(o.Mode == ModePreCopy && o.PostcopyOnStall) || (o.Mode == ModeAuto && !o.RequireRollback)
}

// Options tune a migration. Zero values take the defaults below.
type Options struct {
	Mode Mode
	// DowntimeLimit: pre-copy switches to stop-and-copy once the remaining
	// dirty data can be sent within it at the measured bandwidth.
	DowntimeLimit time.Duration
	// MaxIterations forces the switch after this many pre-copy passes.
	MaxIterations int
	// PrecopyTimeout forces the switch after this long in pre-copy (the
	// seed paper forced stop-and-copy at 60 s).
	PrecopyTimeout time.Duration
	// Bandwidth caps the page stream, bytes per second (0 = unlimited).
	Bandwidth int64
	// Compress page data with zstd (the fastest level) when Codec is
	// none; kept for callers of the first version.
	Compress bool
	// Codec and CodecLevel compress page chunks (state.ParseCodec).
	Codec      state.Codec
	CodecLevel int
	// Workers encode and compress chunks in parallel (default: one per
	// CPU).
	Workers int
	// Dedup sends a page whose content the destination already holds in
	// another page as a reference to it. Delta sends a re-dirtied page as
	// an XBZRLE delta to its previous version, with a cache of DeltaCache
	// bytes of previous versions (default DefaultDeltaCache).
	Dedup      bool
	Delta      bool
	DeltaCache int64
	// AckTimeout bounds the wait for the destination's resume
	// acknowledgement after the last byte was sent.
	AckTimeout time.Duration

	// PrecopyTime and PrecopyPasses bound hybrid's pre-copy (the first
	// reached ends it); with neither set, DefaultHybridPrecopyTime.
	PrecopyTime   time.Duration
	PrecopyPasses int
	// PostcopyOnStall makes pre-copy switch to post-copy instead of a
	// forced stop-and-copy when it stops making progress.
	PostcopyOnStall bool
	// LinkTimeout declares a post-copy link broken when nothing arrived on
	// it for this long (both sides send a ping every LinkTimeout/5).
	LinkTimeout time.Duration
	// RecoveryTimeout bounds how long the source keeps trying to re-open a
	// broken post-copy link before it gives up.
	RecoveryTimeout time.Duration
	// MaxTotalTime bounds the whole migration for the automatic mode's
	// choice (0: no bound). RequireRollback forbids post-copy: only
	// pre-copy can fall back to the source.
	MaxTotalTime    time.Duration
	RequireRollback bool
	// SampleTime is how long the automatic mode watches the guest's
	// writes before it predicts (default DefaultSampleTime).
	SampleTime time.Duration
	// AutoConverge throttles the guest's vCPUs in steps while pre-copy
	// does not converge because the guest dirties memory faster than the
	// link carries it (on in auto mode when rollback is required).
	// DirtyLimit (bytes/s) throttles the guest whenever its dirty rate
	// exceeds it during pre-copy.
	AutoConverge bool
	DirtyLimit   int64
	// Streams is how many connections carry pre-copy pages (default 1):
	// each page always travels on the same one, so that its versions
	// arrive in order.
	Streams int
}

// Defaults used where Options leaves a field zero.
const (
	DefaultDowntimeLimit  = 300 * time.Millisecond
	DefaultMaxIterations  = 30
	DefaultPrecopyTimeout = 60 * time.Second
	DefaultAckTimeout     = 30 * time.Second

	DefaultHybridPrecopyTime = 5 * time.Second
	DefaultLinkTimeout       = 5 * time.Second
	// DefaultRecoveryTimeout: a post-copy guest survives a link cut this
	// long; past it the destination stops the guest (it cannot run without
	// its memory) and the source gives up.
	DefaultRecoveryTimeout = 2 * time.Minute
	DefaultSampleTime      = time.Second
	DefaultDeltaCache      = 64 << 20
	sampleTick             = 100 * time.Millisecond
)

func (o Options) withDefaults() Options {
	if o.Mode == "" {
		o.Mode = ModeAuto
	}
	if o.SampleTime <= 0 {
		o.SampleTime = DefaultSampleTime
	}
	if o.Compress && o.Codec == state.CodecNone {
		o.Codec, o.CodecLevel = state.CodecZstd, state.ZstdFastest
	}
	if o.Workers <= 0 {
		o.Workers = runtime.NumCPU()
	}
	if o.DeltaCache <= 0 {
		o.DeltaCache = DefaultDeltaCache
	}
	if o.Streams <= 0 {
		o.Streams = 1
	}
	if o.DowntimeLimit <= 0 {
		o.DowntimeLimit = DefaultDowntimeLimit
	}
	if o.MaxIterations <= 0 {
		o.MaxIterations = DefaultMaxIterations
	}
	if o.PrecopyTimeout <= 0 {
		o.PrecopyTimeout = DefaultPrecopyTimeout
	}
	if o.AckTimeout <= 0 {
		o.AckTimeout = DefaultAckTimeout
	}
	if o.Mode == ModeHybrid && o.PrecopyTime <= 0 && o.PrecopyPasses <= 0 {
		o.PrecopyTime = DefaultHybridPrecopyTime
	}
	if o.LinkTimeout <= 0 {
		o.LinkTimeout = DefaultLinkTimeout
	}
	if o.RecoveryTimeout <= 0 {
		o.RecoveryTimeout = DefaultRecoveryTimeout
	}
	return o
}

// Params are a migration's settings as the CLI, the daemon API and a VMM's
// control socket carry them (JSON; zero values take the defaults).
type Params struct {
	Mode            string        `json:"mode,omitempty"`
	DowntimeLimit   time.Duration `json:"downtime_limit_ns,omitempty"`
	MaxIterations   int           `json:"max_iterations,omitempty"`
	PrecopyTimeout  time.Duration `json:"precopy_timeout_ns,omitempty"`
	Bandwidth       int64         `json:"bandwidth,omitempty"` // bytes/s
	Compress        bool          `json:"compress,omitempty"`
	PrecopyTime     time.Duration `json:"precopy_time_ns,omitempty"`
	PrecopyPasses   int           `json:"precopy_passes,omitempty"`
	PostcopyOnStall bool          `json:"postcopy_on_stall,omitempty"`
	RecoveryTimeout time.Duration `json:"recovery_timeout_ns,omitempty"`
	MaxTotalTime    time.Duration `json:"max_total_time_ns,omitempty"`
	RequireRollback bool          `json:"require_rollback,omitempty"`
	DryRun          bool          `json:"dry_run,omitempty"` // predict only
	AutoConverge    bool          `json:"auto_converge,omitempty"`
	DirtyLimit      int64         `json:"dirty_limit,omitempty"` // bytes/s
	Streams         int           `json:"streams,omitempty"`
	Codec           string        `json:"codec,omitempty"` // state.ParseCodec syntax
	Workers         int           `json:"workers,omitempty"`
	Dedup           bool          `json:"dedup,omitempty"`
	Delta           bool          `json:"delta,omitempty"`
	DeltaCache      int64         `json:"delta_cache,omitempty"` // bytes
}

// Options checks the parameters and turns them into Options.
func (p Params) Options() (Options, error) {
	mode := ModeAuto
	if p.Mode != "" {
		var err error
		if mode, err = ParseMode(p.Mode); err != nil {
			return Options{}, err
		}
	}
	if (p.PrecopyTime > 0 || p.PrecopyPasses > 0) && mode != ModeHybrid {
		return Options{}, fmt.Errorf("--precopy-time and --precopy-passes bound hybrid's pre-copy; mode %s has none (use --precopy-timeout or --max-iterations)", mode)
	}
	if p.PostcopyOnStall && mode != ModePreCopy {
		return Options{}, fmt.Errorf("--postcopy-on-stall applies to pre-copy, not to mode %s", mode)
	}
	if p.RequireRollback && mode != ModeAuto && mode != ModePreCopy && mode != ModeStopCopy {
		return Options{}, fmt.Errorf("--require-rollback forbids post-copy, which mode %s uses", mode)
	}
	if p.Bandwidth < 0 || p.DowntimeLimit < 0 || p.PrecopyTimeout < 0 || p.PrecopyTime < 0 || p.RecoveryTimeout < 0 {
		return Options{}, errors.New("negative migration limit")
	}
	codec, level := state.CodecNone, 0
	if p.Codec != "" {
		var err error
		if codec, level, err = state.ParseCodec(p.Codec); err != nil {
			return Options{}, err
		}
	}
	if (p.AutoConverge || p.DirtyLimit > 0) && mode != ModePreCopy && mode != ModeAuto && mode != ModeHybrid {
		return Options{}, fmt.Errorf("--auto-converge and --dirty-limit throttle pre-copy; mode %s has none", mode)
	}
	if p.Streams < 0 || p.Streams > 256 {
		return Options{}, fmt.Errorf("%d streams: 1 to 256", p.Streams)
	}
	if p.Workers < 0 || p.DeltaCache < 0 || p.DirtyLimit < 0 {
		return Options{}, errors.New("negative workers or delta cache")
	}
	return Options{Mode: mode, DowntimeLimit: p.DowntimeLimit, MaxIterations: p.MaxIterations,
		Codec: codec, CodecLevel: level, Workers: p.Workers, Dedup: p.Dedup, Delta: p.Delta, DeltaCache: p.DeltaCache,
		AutoConverge: p.AutoConverge, DirtyLimit: p.DirtyLimit, Streams: p.Streams,
		PrecopyTimeout: p.PrecopyTimeout, Bandwidth: p.Bandwidth, Compress: p.Compress,
		PrecopyTime: p.PrecopyTime, PrecopyPasses: p.PrecopyPasses, PostcopyOnStall: p.PostcopyOnStall,
		RecoveryTimeout: p.RecoveryTimeout, MaxTotalTime: p.MaxTotalTime, RequireRollback: p.RequireRollback}, nil
}

// DeltaCachePages is the delta cache's size in pages.
func (o Options) DeltaCachePages() int { return int(o.DeltaCache / 4096) }

// needsEncodings says whether the migration uses what protocol version 3
// added: lz4, delta and dup records.
func (o Options) needsEncodings() bool {
	return o.Codec == state.CodecLZ4 || o.Delta || o.Dedup || o.Streams > 1
}
