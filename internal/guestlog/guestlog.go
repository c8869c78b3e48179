// Package guestlog parses the line protocol the ferry test guest prints on
// its serial console (documented in docs/guest.md): "ferry-guest: KIND
// key=value ...". Tests, the migration reports and the benchmark harness
// read the guest's own view of its health through it.
//
// It depends on nothing else in ferry.
package guestlog

import (
	"bufio"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Prefix starts every line of the protocol.
const Prefix = "ferry-guest: "

// Line kinds.
const (
	KindBoot      = "boot"      // kernel set-up done: cpus, tsc_khz, region...
	KindFill      = "fill"      // one CPU filled its slice of the fill area: cpu base pages content ms took_us
	KindStart     = "start"     // one CPU starts its workload
	KindHeartbeat = "hb"        // idle/dirty heartbeat: cpu seq tsc pages rate worst_us, with dirty check=1 also checked errors
	KindVerify    = "verify"    // verify heartbeat: cpu seq tsc passes checked mutated regs errors
	KindFillCheck = "fillcheck" // fill_check=1 at exit: cpu base pages bad ms took_us
	KindFail      = "FAIL"      // the guest found corruption: cpu what=mem|reg|tsc|fill|config ...
	KindException = "EXCEPTION" // a CPU exception stopped the guest
	KindExit      = "exit"      // exit_after reached: errors ms
	KindWarning   = "warning"   // a command-line argument was ignored
)

// Line is one parsed protocol line.
type Line struct {
	Kind   string
	Fields map[string]string
	Raw    string
}

// Parse reads one console line; ok is false for lines that are not part of
// the protocol (other console output).
func Parse(s string) (Line, bool) {
	s = strings.TrimRight(s, "\r\n")
	i := strings.Index(s, Prefix)
	if i < 0 {
		return Line{}, false
	}
	rest := s[i+len(Prefix):]
	kind, args, _ := strings.Cut(rest, " ")
	l := Line{Kind: kind, Fields: map[string]string{}, Raw: s}
	for args != "" {
		args = strings.TrimLeft(args, " ")
		if args == "" {
			break
		}
		var tok string
		k, v, found := strings.Cut(args, "=")
		if found && strings.HasPrefix(v, `"`) {
			// quoted value: up to the closing quote
			end := strings.Index(v[1:], `"`)
			if end < 0 {
				l.Fields[k] = v[1:]
				break
			}
			l.Fields[k] = v[1 : end+1]
			args = v[end+2:]
			continue
		}
		tok, args, _ = strings.Cut(args, " ")
		k, v, found = strings.Cut(tok, "=")
		if found {
			l.Fields[k] = v
		} else {
			l.Fields[tok] = ""
		}
	}
	return l, true
}

// Uint returns a numeric field (decimal or 0x hex).
func (l Line) Uint(key string) (uint64, error) {
	v, ok := l.Fields[key]
	if !ok {
		return 0, fmt.Errorf("guest line %q has no field %s", l.Raw, key)
	}
	n, err := strconv.ParseUint(v, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("guest line %q: field %s: %w", l.Raw, key, err)
	}
	return n, nil
}

// MustUint is Uint returning 0 for missing or malformed fields.
func (l Line) MustUint(key string) uint64 {
	n, _ := l.Uint(key)
	return n
}

// ParseAll reads every protocol line from r.
func ParseAll(r io.Reader) ([]Line, error) {
	var out []Line
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if l, ok := Parse(sc.Text()); ok {
			out = append(out, l)
		}
	}
	return out, sc.Err()
}

// Summary is what a console log says about the guest's health.
type Summary struct {
	Booted      bool
	CPUs        uint64
	Heartbeats  int // hb and verify lines
	Failures    []Line
	Exceptions  []Line
	Exited      bool
	ExitErrors  uint64
	MaxBeatGaps map[uint64]uint64 // per CPU: largest TSC gap between heartbeats
	FillPages   uint64            // fill pages written, all CPUs (fill lines)
	FillChecked uint64            // fill pages checked at exit, all CPUs (fillcheck lines)
	// Checking is set when some hb line carries the dirty workload's
	// check=1 counters (checked, errors).
	Checking bool
	// Checked is the pages the guest verified, all CPUs: per CPU the
	// largest cumulative checked= on its hb (check=1) and verify lines.
	Checked uint64
	// BeatErrors is the errors the guest counted, all CPUs: per CPU the
	// largest cumulative errors= on its hb (check=1) and verify lines. It
	// still shows errors whose FAIL lines were capped or printed on a
	// console no one read (the source of a migration).
	BeatErrors uint64
}

// HasCheck reports whether a heartbeat carries verification counters:
// verify lines, and hb lines of the dirty workload with check=1.
func HasCheck(l Line) bool {
	if l.Kind == KindVerify {
		return true
	}
	_, ok := l.Fields["checked"]
	return l.Kind == KindHeartbeat && ok
}

// Summarize folds protocol lines into a Summary.
func Summarize(lines []Line) Summary {
	s := Summary{MaxBeatGaps: map[uint64]uint64{}}
	last := map[uint64]uint64{}
	checked, errs := map[uint64]uint64{}, map[uint64]uint64{}
	for _, l := range lines {
		switch l.Kind {
		case KindBoot:
			s.Booted = true
			s.CPUs = l.MustUint("cpus")
		case KindHeartbeat, KindVerify:
			s.Heartbeats++
			cpu, tsc := l.MustUint("cpu"), l.MustUint("tsc")
			if prev, ok := last[cpu]; ok && tsc > prev && tsc-prev > s.MaxBeatGaps[cpu] {
				s.MaxBeatGaps[cpu] = tsc - prev
			}
			last[cpu] = tsc
			if HasCheck(l) {
				s.Checking = s.Checking || l.Kind == KindHeartbeat
				checked[cpu] = max(checked[cpu], l.MustUint("checked"))
				errs[cpu] = max(errs[cpu], l.MustUint("errors"))
			}
		case KindFill:
			s.FillPages += l.MustUint("pages")
		case KindFillCheck:
			s.FillChecked += l.MustUint("pages")
		case KindFail:
			s.Failures = append(s.Failures, l)
		case KindException:
			s.Exceptions = append(s.Exceptions, l)
		case KindExit:
			s.Exited = true
			s.ExitErrors = l.MustUint("errors")
		}
	}
	for _, n := range checked {
		s.Checked += n
	}
	for _, n := range errs {
		s.BeatErrors += n
	}
	return s
}

// Healthy reports whether the guest booted, beat, and saw no failure.
func (s Summary) Healthy() error {
	switch {
	case !s.Booted:
		return fmt.Errorf("guest never printed its boot line")
	case len(s.Exceptions) > 0:
		return fmt.Errorf("guest exception: %s", s.Exceptions[0].Raw)
	case len(s.Failures) > 0:
		return fmt.Errorf("guest found %d failures, first: %s", len(s.Failures), s.Failures[0].Raw)
	case s.ExitErrors > 0:
		return fmt.Errorf("guest exited reporting %d errors", s.ExitErrors)
	case s.BeatErrors > 0:
		return fmt.Errorf("guest heartbeats report %d errors", s.BeatErrors)
	case s.Heartbeats == 0:
		return fmt.Errorf("guest never printed a heartbeat")
	}
	return nil
}
