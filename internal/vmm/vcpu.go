package vmm

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ferry-vmm/ferry/internal/kvm"
)

// vcpu is one virtual CPU and the OS thread that runs it. Fields guarded by
// vm.mu: parked, exited.
type vcpu struct {
	vm  *VM
	kvm *kvm.VCPU
	id  int
	tid atomic.Int32

	parked bool
	exited bool

	// pendingCompletion is set after an exit whose instruction finishes
	// only on the next KVM_RUN (port I/O and MMIO reads).
	pendingCompletion bool

	Exits atomic.Uint64
}

func addrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

// kick makes the vCPU leave KVM_RUN soon: immediate_exit covers the window
// before entry, the signal the time inside the guest. It also ends a
// throttle sleep (throttle.go), so that the vCPU sees the request.
func (c *vcpu) kick() {
	c.kvm.RunData().SetImmediateExit(true)
	if tid := c.tid.Load(); tid != 0 {
		_ = unix.Tgkill(unix.Getpid(), int(tid), kickSignal)
	}
	c.wakeFromThrottle()
}

func (c *vcpu) loop(ready chan<- struct{}) {
	// The thread stays locked for the goroutine's life and dies with it, so
	// a late kick can never hit a thread that runs something else.
	runtime.LockOSThread()
	c.tid.Store(int32(unix.Gettid()))
	ready <- struct{}{}
	err := c.runUntilStopped()
	v := c.vm
	if err != nil {
		v.finish(nil, err)
	}
	v.mu.Lock()
	c.exited = true
	c.tid.Store(0)
	v.running--
	v.cond.Broadcast()
	v.mu.Unlock()
}

func (c *vcpu) runUntilStopped() error {
	run := c.kvm.RunData()
	for {
		if stop, err := c.parkIfRequested(); stop || err != nil {
			return err
		}
		err := c.kvm.Run()
		if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
			continue
		}
		if err != nil {
			return fmt.Errorf("vCPU %d: KVM_RUN: %w", c.id, err)
		}
		c.Exits.Add(1)
		if err := c.handleExit(run); err != nil {
			return err
		}
	}
}

// parkIfRequested blocks while the VM is paused, or during a throttle
// hold (throttle.go). Before either it completes any half-done I/O
// instruction by entering KVM_RUN with immediate_exit set, so the saved
// state is at an instruction boundary.
func (c *vcpu) parkIfRequested() (stop bool, err error) {
	v := c.vm
	v.mu.Lock()
	if !v.pauseReq && !v.stopping && !v.thr.holdLocked() {
		c.kvm.RunData().SetImmediateExit(false)
		v.mu.Unlock()
		// A kick may have landed between the check and the clear; the
		// next loop turn notices the request.
		return false, nil
	}
	v.mu.Unlock()
	if c.pendingCompletion {
		c.kvm.RunData().SetImmediateExit(true)
		if err := c.kvm.Run(); err != nil && !errors.Is(err, unix.EINTR) {
			return true, fmt.Errorf("vCPU %d: completing I/O before pause: %w", c.id, err)
		}
		c.pendingCompletion = false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	c.throttleSleepLocked()
	if v.pauseReq || v.stopping {
		c.parked = true
		v.cond.Broadcast()
		for v.pauseReq && !v.stopping {
			v.cond.Wait()
		}
		c.parked = false
		if !v.stopping {
			c.markPaused()
		}
	}
	c.kvm.RunData().SetImmediateExit(false)
	return v.stopping, nil
}

func (c *vcpu) handleExit(run *kvm.Run) error {
	c.pendingCompletion = false
	switch reason := run.ExitReason(); reason {
	case kvm.ExitIO:
		io := run.IO()
		data := run.IOData()
		if data == nil {
			return c.broken(fmt.Sprintf("port I/O exit with bad data offset %#x", io.DataOffset))
		}
		size := int(io.Size)
		for i := 0; i+size <= len(data); i += size {
			if io.Direction == kvm.IOOut {
				c.vm.PIO.Write(uint64(io.Port), data[i:i+size])
			} else {
				c.vm.PIO.Read(uint64(io.Port), data[i:i+size])
			}
		}
		c.pendingCompletion = io.Direction == kvm.IOIn
	case kvm.ExitMMIO:
		m := run.MMIO()
		n := int(m.Len)
		if n > len(m.Data) {
			return c.broken(fmt.Sprintf("MMIO exit of %d bytes", n))
		}
		if m.IsWrite != 0 {
			c.vm.MMIO.Write(m.PhysAddr, m.Data[:n])
		} else {
			c.vm.MMIO.Read(m.PhysAddr, m.Data[:n])
			c.pendingCompletion = true
		}
	case kvm.ExitHLT:
		// Only without an in-kernel irqchip; ours halts in the kernel.
	case kvm.ExitIntr:
	case kvm.ExitSystemEvent:
		switch ev := run.SystemEvent(); ev.Type {
		case kvm.SystemEventReset:
			c.vm.finish(&Exit{Reason: ExitReset}, nil)
		case kvm.SystemEventShutdown:
			c.vm.finish(&Exit{Reason: ExitPoweroff}, nil)
		default:
			return c.broken(fmt.Sprintf("system event %d (crash)", ev.Type))
		}
	case kvm.ExitShutdown:
		return c.broken("KVM_EXIT_SHUTDOWN (triple fault)")
	case kvm.ExitFailEntry:
		return c.broken(fmt.Sprintf("KVM_EXIT_FAIL_ENTRY (hardware reason %#x)", run.FailEntry().HardwareEntryFailureReason))
	case kvm.ExitInternalError:
		in := run.Internal()
		n := min(int(in.NData), len(in.Data))
		return c.broken(fmt.Sprintf("KVM_EXIT_INTERNAL_ERROR suberror %d data %x", in.Suberror, in.Data[:n]))
	default:
		return c.broken("unexpected exit " + kvm.ExitName(reason))
	}
	return nil
}

// GuestError is a vCPU exit that means the guest cannot continue.
type GuestError struct {
	CPU       int
	What      string
	Registers string
}

func (e *GuestError) Error() string {
	return fmt.Sprintf("guest failed on vCPU %d: %s; %s", e.CPU, e.What, e.Registers)
}

func (c *vcpu) broken(what string) error {
	return &GuestError{CPU: c.id, What: what, Registers: registerDump(c.kvm)}
}

// markPaused tells a kvmclock guest that the host stopped it
// (PVCLOCK_GUEST_STOPPED, through KVM_KVMCLOCK_CTRL), so that its
// soft-lockup watchdog does not count the pause as a CPU stuck in the
// kernel; QEMU does the same whenever a stopped VM runs again. A guest that
// has not enabled kvmclock makes KVM refuse (EINVAL), which is harmless.
// Called on the vCPU's own thread, which holds KVM's vCPU lock anyway.
func (c *vcpu) markPaused() {
	if err := c.kvm.KVMClockCtrl(); err != nil && !errors.Is(err, unix.EINVAL) {
		c.vm.log.Debug("KVM_KVMCLOCK_CTRL", "vcpu", c.id, "err", err)
	}
}
