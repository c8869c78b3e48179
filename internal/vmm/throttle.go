package vmm

import (
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// vCPU throttling, for migration auto-converge: a guest that dirties
// memory faster than the link carries it never converges by pre-copy
// alone; holding its vCPUs out of the guest part of the time lowers its
// dirty rate about in proportion.
//
// A ticker goroutine, running only while the throttle is on, starts a hold
// every period: it sets the hold's end (now + pct% of the period) and
// kicks every vCPU (immediate_exit plus the kick signal, as for Pause).
// Each vCPU thread then sleeps, outside KVM_RUN, until the hold ends, and
// runs freely for the rest of the period. The sleep is taken where the
// vCPU would park for a pause (parkIfRequested), after it has completed
// any half-done I/O exit, so a vCPU held back is always at an instruction
// boundary.
//
// The vCPU thread times its own sleep with a futex wait: the kernel wakes
// it at the hold's end to the microsecond, without the Go scheduler in
// between (runtime timers are only as fine as the netpoller's 1 ms, and
// waking a goroutine locked to a thread takes a scheduler hand-off per
// vCPU: on the loaded 2-core test host, holds released through a
// condition variable ended milliseconds late, some by hundreds).
// Every kick bumps the vCPU's futex word and wakes it, so Pause and Stop
// (which kick) end a sleep at once, as does SetThrottle(0); the vCPU then
// re-checks what it was asked to do under the VM's lock. While the VM is
// paused (or not yet started, or ended) the ticker starts no holds:
// throttling is a no-op then and takes effect again on Resume.

const (
	// MaxThrottle is the highest throttle percentage.
	MaxThrottle = 99

	// throttleSlice is how long the vCPUs run between two holds; a hold
	// lasts slice*pct/(100-pct), so a period (hold plus run) is 20 ms at
	// 50 %, 50 ms at 80 % and 100 ms at 90 %. 10 ms is QEMU's cpu-throttle
	// timeslice, with the same scheme, so percentages mean what operators
	// know from QEMU. Why a fixed run slice rather than a fixed period:
	//   - every hold costs the guest more than its length: the vCPU thread
	//     must be woken, and the guest comes back to caches and TLBs the
	//     host used for something else. On bare metal that is tens of
	//     microseconds; on the nested PVM test host it is milliseconds (the
	//     outer hypervisor gives the idle CPU away during a hold: steal
	//     time rises while throttled). A run slice that does not shrink as
	//     the percentage grows keeps that cost a bounded share of what the
	//     guest gets. Measured there at 50 %, the guest wrote at 0.19, 0.25
	//     and 0.41 of its unthrottled rate with 2, 10 and 40 ms slices; a
	//     fixed 10 ms period would leave 2 ms slices at 80 %.
	//   - holds stay short where they can: 10 ms at 50 %, 40 ms at 80 %.
	//     The guest is slowed evenly rather than frozen, and every period
	//     still brings it its timer ticks. Longer slices would mean longer
	//     holds.
	throttleSlice = 10 * time.Millisecond

	// throttleMaxPeriods bounds a period to this many slices (100 ms), so
	// that no hold is longer than 99 ms: above 90 % the run slice shrinks
	// instead (5 ms at 95 %, 1 ms at 99 %), where QEMU would freeze the
	// guest for up to 990 ms at a time. A guest stopped for longer than
	// that starts to look dead to its peers (TCP retransmission timers
	// start at 200 ms).
	throttleMaxPeriods = 10
)

// throttle is the VM's throttling state. ctl serialises turning the ticker
// on and off (SetThrottle, Close) and guards stop and done; wake is
// atomic; the other fields are guarded by VM.mu.
type throttle struct {
	ctl  sync.Mutex
	stop chan struct{} // closed to end the ticker; nil when it is off
	done chan struct{} // closed by the ticker when it has ended

	pct       int
	slice     time.Duration // 0 = throttleSlice (tests lengthen it)
	holdUntil time.Time     // end of the current hold; zero when none
	sleeping  int           // vCPUs in a throttle sleep now
	slept     time.Duration // summed over vCPUs, finished sleeps
	active    time.Duration // wall time with pct > 0, up to since
	since     time.Time     // when active was last brought up to date
	ended     bool          // the VM ended: active no longer grows

	wake [MaxCPUs]atomic.Uint32 // futex words, one per vCPU: bumped by every kick
}

// ThrottleStats says how much the guest was slowed and for how long.
type ThrottleStats struct {
	Percent int           // the current setting
	Active  time.Duration // wall time with throttling > 0 (paused time included) until it was set to 0 or the VM ended, summed over every time it was on
	Slept   time.Duration // time the vCPUs were held back, summed over vCPUs
}

// throttlePhases splits one period at pct percent into the time the vCPUs
// are held back and the time they run; slice 0 means throttleSlice.
func throttlePhases(pct int, slice time.Duration) (hold, run time.Duration) {
	if slice <= 0 {
		slice = throttleSlice
	}
	if pct <= 0 {
		return 0, slice
	}
	period := min(slice*100/time.Duration(100-pct), throttleMaxPeriods*slice)
	hold = period * time.Duration(pct) / 100
	return hold, period - hold
}

// SetThrottle makes every vCPU sleep pct percent of its time (0 = off, up
// to MaxThrottle), in holds of 10ms*pct/(100-pct) between 10 ms runs (see
// throttleSlice; never more than 99 ms at a time), so that the guest's
// progress, and its dirty rate, drops to about (100-pct)% (somewhat below
// where each hold costs the guest extra, see throttleSlice). It may be
// called at any time, paused or not; the setting holds until changed. A
// change applies from the next period; 0 ends a hold in progress at once.
func (v *VM) SetThrottle(pct int) error {
	if pct < 0 || pct > MaxThrottle {
		return fmt.Errorf("throttle %d%% out of range 0..%d", pct, MaxThrottle)
	}
	v.thr.ctl.Lock()
	defer v.thr.ctl.Unlock()
	v.mu.Lock()
	v.thr.accrueLocked(time.Now())
	v.thr.pct = pct
	if pct == 0 && !v.thr.holdUntil.IsZero() {
		v.thr.holdUntil = time.Time{}
		for _, c := range v.cpus {
			c.wakeFromThrottle()
		}
	}
	v.mu.Unlock()
	switch {
	case pct > 0 && v.thr.stop == nil:
		v.thr.stop, v.thr.done = make(chan struct{}), make(chan struct{})
		go v.throttleLoop(v.thr.stop, v.thr.done)
	case pct == 0:
		v.stopThrottleLocked()
	}
	return nil
}

// Throttle is the current throttle percentage.
func (v *VM) Throttle() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.thr.pct
}

// ThrottleStats reports the throttle setting and how much it has held the
// guest back so far.
func (v *VM) ThrottleStats() ThrottleStats {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.thr.accrueLocked(time.Now())
	return ThrottleStats{Percent: v.thr.pct, Active: v.thr.active, Slept: v.thr.slept}
}

// accrueLocked brings active up to now.
func (t *throttle) accrueLocked(now time.Time) {
	if t.pct > 0 && !t.ended && now.After(t.since) {
		t.active += now.Sub(t.since)
	}
	t.since = now
}

// holdLocked reports whether a hold is on now, and forgets one that has
// ended.
func (t *throttle) holdLocked() bool {
	if t.holdUntil.IsZero() {
		return false
	}
	if time.Now().Before(t.holdUntil) {
		return true
	}
	t.holdUntil = time.Time{}
	return false
}

// stopThrottle ends the ticker (Close), leaving the setting as it is.
func (v *VM) stopThrottle() {
	v.thr.ctl.Lock()
	defer v.thr.ctl.Unlock()
	v.stopThrottleLocked()
}

func (v *VM) stopThrottleLocked() {
	if v.thr.stop == nil {
		return
	}
	close(v.thr.stop)
	<-v.thr.done
	v.thr.stop, v.thr.done = nil, nil
}

// throttleLoop is the ticker: it starts a hold every period until stopped
// or the VM ends.
func (v *VM) throttleLoop(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	timer := time.NewTimer(0) // the first hold at once
	defer timer.Stop()
	next := time.Now()
	for {
		select {
		case <-stop:
			return
		case <-v.done:
			v.mu.Lock()
			v.thr.accrueLocked(time.Now())
			v.thr.ended = true
			v.thr.holdUntil = time.Time{}
			v.mu.Unlock()
			return
		case <-timer.C:
		}
		now := time.Now()
		v.mu.Lock()
		hold, run := throttlePhases(v.thr.pct, v.thr.slice)
		if hold > 0 && v.started && !v.pauseReq && !v.stopping {
			// Set under v.mu before the kick: a vCPU that checked before
			// clears immediate_exit before the kick sets it again.
			v.thr.holdUntil = now.Add(hold)
			for _, c := range v.cpus {
				c.kick()
			}
		}
		// Otherwise paused, not started or stopping: no hold this period.
		v.mu.Unlock()
		// Periods keep to a fixed schedule, so a late tick lengthens the
		// run phase before it and shortens the one after: the average
		// holds. A run phase is never cut below half, though.
		next = next.Add(hold + run)
		if earliest := now.Add(hold + run/2); next.Before(earliest) {
			next = earliest
		}
		timer.Reset(time.Until(next))
	}
}

// throttleSleepLocked holds the vCPU back while a throttle hold is on and
// the VM is neither pausing nor stopping. Called with v.mu held, at an
// instruction boundary (no I/O exit pending completion); it drops the lock
// while it sleeps.
//
// A pause or stop ends the hold for every vCPU: after Resume they all run
// until the next period. (Were it kept, each vCPU would go back to it only
// at its next exit, one by one, and a vCPU held while it owns a guest
// spinlock would leave the others spinning on it.)
func (c *vcpu) throttleSleepLocked() {
	v := c.vm
	var start time.Time
	for !v.pauseReq && !v.stopping && v.thr.holdLocked() {
		if start.IsZero() {
			start = time.Now()
			v.thr.sleeping++
		}
		// The word is read under v.mu: whoever changes what the vCPU
		// should do (under v.mu) and then kicks it makes the wait return.
		word := &v.thr.wake[c.id]
		seq := word.Load()
		d := time.Until(v.thr.holdUntil)
		v.mu.Unlock()
		futexWait(word, seq, d)
		v.mu.Lock()
	}
	if !start.IsZero() {
		v.thr.sleeping--
		v.thr.slept += time.Since(start)
	}
	if v.pauseReq || v.stopping {
		v.thr.holdUntil = time.Time{}
	}
}

// wakeFromThrottle ends the vCPU's throttle sleep, if any (see kick).
func (c *vcpu) wakeFromThrottle() {
	word := &c.vm.thr.wake[c.id]
	word.Add(1)
	futexWake(word)
}

const (
	futexWaitOp  = 0   // FUTEX_WAIT
	futexWakeOp  = 1   // FUTEX_WAKE
	futexPrivate = 128 // FUTEX_PRIVATE_FLAG
)

// futexWait sleeps for up to d unless *word differs from seq or a
// futexWake on word comes first. Spurious returns (signals) are fine: the
// caller re-checks.
func futexWait(word *atomic.Uint32, seq uint32, d time.Duration) {
	if d <= 0 {
		return
	}
	ts := unix.NsecToTimespec(d.Nanoseconds())
	_, _, _ = unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(word)), futexWaitOp|futexPrivate,
		uintptr(seq), uintptr(unsafe.Pointer(&ts)), 0, 0)
}

// futexWake wakes every thread waiting on word.
func futexWake(word *atomic.Uint32) {
	_, _, _ = unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(word)), futexWakeOp|futexPrivate,
		math.MaxInt32, 0, 0, 0)
}
