// Package migration moves a running VM from one VMM process to another:
// pre-copy (iterative, with dirty logging) and stop-and-copy, with rollback
// to the source on any failure before the destination confirms, and full
// metrics. It drives internal/vmm on both ends and speaks internal/wire
// over any connection the caller provides (the daemon provides mutually
// authenticated TLS).
//
// It must not know about daemons, sockets it did not get, or the CLI.
package migration

import (
	"fmt"
	"time"
)

// Mode is a migration technique.
type Mode string

// Modes implemented by this package.
const (
	ModeStopCopy Mode = "stopcopy"
	ModePreCopy  Mode = "precopy"
)

// ParseMode checks a user-given mode.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case ModeStopCopy, ModePreCopy:
		return Mode(s), nil
	}
	return "", fmt.Errorf("unknown migration mode %q (known: precopy, stopcopy)", s)
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
	// Compress page data with zstd.
	Compress bool
	// AckTimeout bounds the wait for the destination's resume
	// acknowledgement after the last byte was sent.
	AckTimeout time.Duration
}

// Defaults used where Options leaves a field zero.
const (
	DefaultDowntimeLimit  = 300 * time.Millisecond
	DefaultMaxIterations  = 30
	DefaultPrecopyTimeout = 60 * time.Second
	DefaultAckTimeout     = 30 * time.Second
)

func (o Options) withDefaults() Options {
	if o.Mode == "" {
		o.Mode = ModePreCopy
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
	return o
}
