// Package vmm is ferry's virtual machine monitor: it assembles a VM from
// KVM (internal/kvm), guest RAM (internal/guestmem), a boot loader
// (internal/boot) and emulated devices (internal/devices), runs one OS
// thread per vCPU, dispatches exits to the port-I/O and MMIO buses, and can
// stop every vCPU at a consistent point and resume it (migration pauses
// guests constantly).
//
// It must not know about migration, daemons or the CLI: those sit above it
// and drive it through this package's API.
package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/ferry-vmm/ferry/internal/boot"
	"github.com/ferry-vmm/ferry/internal/devices"
	"github.com/ferry-vmm/ferry/internal/guestmem"
	"github.com/ferry-vmm/ferry/internal/kvm"
)

// Platform addresses.
const (
	COM1Port   = 0x3f8
	COM1IRQ    = 4
	ExitPort   = devices.ControlPort
	i8042Data  = 0x60
	i8042Cmd   = 0x64
	cmosPort   = 0x70
	postPort   = 0x80
	tssAddr    = 0xfffbd000
	identMapAt = 0xfffbc000

	// MaxCPUs is the most vCPUs ferry gives one guest.
	MaxCPUs = 64
)

// Config describes a VM to build.
type Config struct {
	MemSize uint64
	CPUs    int
	Kernel  []byte // ELF with a PVH note, or bzImage
	Initrd  []byte
	Cmdline string
	Console io.Writer // serial output; nil discards
	Logger  *slog.Logger
	// RNG adds a virtio entropy device (virtio-rng over PCI), so that a
	// Linux guest has entropy at boot; it brings the PCI bus with it.
	RNG bool

	forRestore bool // set by NewForRestore: no kernel, state applied later
}

// ExitReason says why a VM stopped without a VMM error.
type ExitReason int

const (
	// ExitGuest means the guest wrote its status to the exit device.
	ExitGuest ExitReason = iota
	// ExitReset means the guest asked for a reset (i8042, system event).
	ExitReset
	// ExitPoweroff means the guest powered off (system event).
	ExitPoweroff
	// ExitStopped means the host stopped the VM (Stop, context cancelled).
	ExitStopped
)

func (r ExitReason) String() string {
	switch r {
	case ExitGuest:
		return "guest exit"
	case ExitReset:
		return "reset"
	case ExitPoweroff:
		return "power off"
	case ExitStopped:
		return "stopped by host"
	}
	return fmt.Sprintf("exit reason %d", int(r))
}

// Exit is how a VM ended.
type Exit struct {
	Reason ExitReason
	Status uint8 // the guest's status for ExitGuest
}

// VM is a running or runnable virtual machine.
type VM struct {
	cfg  Config
	log  *slog.Logger
	sys  *kvm.System
	kvm  *kvm.VM
	mem  *guestmem.Memory
	cpus []*vcpu

	devMem *devMemory  // guest RAM as devices see it (devmem.go)
	pci    *pciDevices // the PCI bus and its functions; nil: none (pcidev.go)

	hostCPUID  []kvm.CPUIDEntry // vCPU 0's effective CPUID on this host
	hostTSCKHz uint32           // the TSC frequency KVM gave vCPU 0 at creation (0: unknown)
	msrList    []uint32         // saveable MSRs, probed on first capture

	restoreWarnings []string

	PIO  devices.Bus
	MMIO devices.Bus

	Serial  *devices.Serial
	CMOS    *devices.CMOS
	I8042   *devices.I8042
	Control *devices.Control
	POST    *devices.Post
	ACPIPM  *devices.ACPIPM

	mu       sync.Mutex
	cond     *sync.Cond
	started  bool
	pauseReq bool
	stopping bool
	running  int // vCPU threads alive
	exit     *Exit
	err      error
	done     chan struct{}

	thr throttle // vCPU throttling (throttle.go)
}

// New builds a VM: KVM objects, RAM, irqchip, PIT, devices, vCPUs, and the
// kernel loaded with its boot structures. It does not start the vCPUs.
func New(cfg Config) (*VM, error) {
	if cfg.CPUs < 1 || cfg.CPUs > MaxCPUs {
		return nil, fmt.Errorf("vCPU count %d out of range 1..%d", cfg.CPUs, MaxCPUs)
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	v := &VM{cfg: cfg, log: cfg.Logger, done: make(chan struct{})}
	v.cond = sync.NewCond(&v.mu)
	if err := v.build(); err != nil {
		v.Close()
		return nil, err
	}
	return v, nil
}

func (v *VM) build() error {
	var err error
	if v.sys, err = kvm.Open(); err != nil {
		return err
	}
	if v.sys.CheckExtension(kvm.CapImmediateExit) == 0 {
		return errors.New("KVM lacks KVM_CAP_IMMEDIATE_EXIT, which ferry needs to pause vCPUs reliably")
	}
	if v.kvm, err = v.sys.CreateVM(); err != nil {
		return err
	}
	if v.mem, err = guestmem.New(v.cfg.MemSize); err != nil {
		return err
	}
	v.devMem = newDevMemory(v.mem)
	if err := v.setupPlatform(); err != nil {
		return err
	}
	if v.cfg.forRestore {
		// Memory and registers come from a saved state; nothing to load.
		return v.createVCPUs(nil)
	}
	opts := boot.Options{Kernel: v.cfg.Kernel, Initrd: v.cfg.Initrd, Cmdline: v.cfg.Cmdline, CPUs: v.cfg.CPUs}
	if v.cfg.wantsPCI() {
		if err := v.setupPCI(); err != nil {
			return fmt.Errorf("PCI devices: %w", err)
		}
		opts.PCI = bootPCI(pciLayout())
	}
	entry, err := boot.Load(v.mem, opts)
	if err != nil {
		return fmt.Errorf("loading kernel: %w", err)
	}
	return v.createVCPUs(entry)
}

// setupPlatform registers RAM and creates the in-kernel interrupt
// controllers, the PIT and the emulated devices.
func (v *VM) setupPlatform() error {
	if err := v.registerRAM(0); err != nil {
		return err
	}
	// Needed on Intel VMX for real-mode emulation; other backends ignore or
	// refuse it, which is harmless.
	if v.sys.CheckExtension(kvm.CapSetTSSAddr) != 0 {
		if err := v.kvm.SetTSSAddr(tssAddr); err != nil {
			v.log.Debug("KVM_SET_TSS_ADDR refused", "err", err)
		}
		if err := v.kvm.SetIdentityMapAddr(identMapAt); err != nil {
			v.log.Debug("KVM_SET_IDENTITY_MAP_ADDR refused", "err", err)
		}
	}
	if err := v.kvm.CreateIRQChip(); err != nil {
		return err
	}
	if err := v.kvm.CreatePIT2(); err != nil {
		return err
	}
	v.Serial = devices.NewSerial(v.cfg.Console, devices.IRQFunc(func(high bool) {
		if err := v.kvm.IRQLine(COM1IRQ, high); err != nil {
			v.log.Warn("serial interrupt", "err", err)
		}
	}))
	v.CMOS = devices.NewCMOS()
	low, high := v.mem.Size(), uint64(0)
	if low > guestmem.MMIOHoleStart {
		low, high = guestmem.MMIOHoleStart, low-guestmem.MMIOHoleStart
	}
	v.CMOS.SetMemorySizes(low, high)
	v.I8042 = devices.NewI8042(func() { v.finish(&Exit{Reason: ExitReset}, nil) })
	v.Control = devices.NewControl(func(status uint8) { v.finish(&Exit{Reason: ExitGuest, Status: status}, nil) })
	v.POST = devices.NewPost()
	v.ACPIPM = devices.NewACPIPM(boot.ACPISleepTypeS5, func() { v.finish(&Exit{Reason: ExitPoweroff}, nil) })
	for _, d := range []struct {
		name       string
		base, size uint64
		dev        devices.Device
	}{
		{"com1", COM1Port, 8, v.Serial},
		{"i8042-data", i8042Data, 1, v.I8042.DataPort()},
		{"i8042-cmd", i8042Cmd, 1, v.I8042.CommandPort()},
		{"cmos", cmosPort, 2, v.CMOS},
		{"post", postPort, 1, v.POST},
		{"exit", ExitPort, 4, v.Control},
		{"acpi-pm1-event", boot.ACPIPM1EventPort, 4, v.ACPIPM.EventBlock()},
		{"acpi-pm1-control", boot.ACPIPM1ControlPort, 2, v.ACPIPM.ControlBlock()},
	} {
		if err := v.PIO.Register(d.name, d.base, d.size, d.dev); err != nil {
			return err
		}
	}
	return nil
}

// registerRAM installs (or re-installs with new flags) one KVM memory slot
// per RAM region.
func (v *VM) registerRAM(flags uint32) error {
	for i, r := range v.mem.Regions() {
		err := v.kvm.SetUserMemoryRegion(kvm.UserspaceMemoryRegion{
			Slot: uint32(i), Flags: flags, GuestPhysAddr: r.GPA, MemorySize: r.Size,
			UserspaceAddr: uint64(addrOf(v.mem.Bytes()[r.Offset:])),
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func (v *VM) createVCPUs(entry *boot.Entry) error {
	supported, err := v.sys.SupportedCPUID()
	if err != nil {
		return err
	}
	for id := 0; id < v.cfg.CPUs; id++ {
		c, err := v.kvm.CreateVCPU(id)
		if err != nil {
			return err
		}
		vc := &vcpu{vm: v, kvm: c, id: id}
		v.cpus = append(v.cpus, vc)
		khz, err := c.GetTSCKHz()
		if err != nil {
			khz = 0 // the guest calibrates itself
		}
		if err := c.SetCPUID2(guestCPUID(supported, id, v.cfg.CPUs, khz)); err != nil {
			return err
		}
		if id == 0 {
			v.hostTSCKHz = khz
			// What KVM actually gives a vCPU on this host: the reference for
			// admitting saved or migrating guests. (Under PVM it holds more
			// than KVM_GET_SUPPORTED_CPUID reports.)
			if v.hostCPUID, err = c.GetCPUID2(); err != nil {
				return err
			}
		}
		if err := setupLAPIC(c); err != nil {
			return err
		}
		if id != 0 || entry == nil {
			continue // APs wait for INIT/SIPI from the guest; restores set state later
		}
		sregs, err := c.GetSregs()
		if err != nil {
			return err
		}
		regs, sregs, err := entryState(entry, sregs)
		if err != nil {
			return err
		}
		if err := c.SetSregs(sregs); err != nil {
			return err
		}
		if err := c.SetRegs(regs); err != nil {
			return err
		}
	}
	return nil
}

// Memory is the guest's RAM.
func (v *VM) Memory() *guestmem.Memory { return v.mem }

// KVM is the underlying KVM VM (for state capture and dirty logging).
func (v *VM) KVM() *kvm.VM { return v.kvm }

// NumCPUs is the number of vCPUs.
func (v *VM) NumCPUs() int { return len(v.cpus) }

// kickSignal interrupts a vCPU thread's KVM_RUN. The process must not die of
// it, so it is routed to a channel nobody reads.
var kickSignal = unix.SIGUSR2

var kickOnce sync.Once

func installKickHandler() {
	kickOnce.Do(func() {
		signal.Notify(make(chan os.Signal, 1), kickSignal)
	})
}

// Start launches one locked OS thread per vCPU.
func (v *VM) Start() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.started {
		return errors.New("VM already started")
	}
	installKickHandler()
	v.resumeDevices() // restored devices wait paused for their VM to start
	v.started = true
	v.running = len(v.cpus)
	ready := make(chan struct{}, len(v.cpus))
	for _, c := range v.cpus {
		go c.loop(ready)
	}
	for range v.cpus {
		<-ready // every thread id is known before anyone may kick
	}
	return nil
}

// Wait blocks until the VM ends and says how.
func (v *VM) Wait() (Exit, error) {
	<-v.done
	v.mu.Lock()
	for v.running > 0 {
		v.cond.Wait()
	}
	defer v.mu.Unlock()
	if v.err != nil {
		return Exit{}, v.err
	}
	return *v.exit, nil
}

// Run starts the VM and waits for it; cancelling ctx stops it.
func (v *VM) Run(ctx context.Context) (Exit, error) {
	if err := v.Start(); err != nil {
		return Exit{}, err
	}
	stop := context.AfterFunc(ctx, v.Stop)
	defer stop()
	return v.Wait()
}

// Outcome says how the VM ended, once Done is closed, without waiting for
// its vCPU threads to finish (Wait does).
func (v *VM) Outcome() (Exit, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.err != nil {
		return Exit{}, v.err
	}
	if v.exit == nil {
		return Exit{}, errors.New("the VM is still running")
	}
	return *v.exit, nil
}

// Done is closed when the VM has ended (guest exit, error or Stop).
func (v *VM) Done() <-chan struct{} { return v.done }

// finish records how the VM ended (the first cause wins) and stops every
// vCPU.
func (v *VM) finish(exit *Exit, err error) {
	v.mu.Lock()
	if v.exit != nil || v.err != nil {
		v.mu.Unlock()
		return
	}
	v.exit, v.err = exit, err
	v.stopping = true
	close(v.done)
	v.cond.Broadcast()
	v.mu.Unlock()
	v.kickAll()
}

// Stop ends the VM from the host side.
func (v *VM) Stop() { v.finish(&Exit{Reason: ExitStopped}, nil) }

// Fail ends the VM from the host side because it cannot go on (a
// post-copy migration lost the source of its memory): Wait returns err.
func (v *VM) Fail(err error) { v.finish(nil, err) }

// Pause stops every vCPU at an instruction boundary with no I/O exit half
// done, so that the machine state can be read consistently. It returns when
// all vCPUs are parked, or with an error if the VM ended meanwhile.
func (v *VM) Pause() error {
	v.mu.Lock()
	if !v.started || v.stopping {
		why := v.endedLocked()
		v.mu.Unlock()
		return errors.New("pause: VM is not running" + why)
	}
	v.pauseReq = true
	v.mu.Unlock()
	v.kickAll()
	v.mu.Lock()
	defer v.mu.Unlock()
	for !v.allParkedLocked() && !v.stopping {
		v.cond.Wait()
	}
	if v.stopping {
		return errors.New("pause: VM stopped" + v.endedLocked())
	}
	v.pauseDevices() // no vCPU rings a doorbell now; finish the chains in hand
	return nil
}

// endedLocked says how an ended VM ended, for an error about it: the
// guest's failure (a triple fault with the registers) tells more than
// "not running".
func (v *VM) endedLocked() string {
	switch {
	case v.err != nil:
		return " (" + v.err.Error() + ")"
	case v.exit != nil:
		return fmt.Sprintf(" (it ended: %s, status %d)", v.exit.Reason, v.exit.Status)
	}
	return ""
}

// Resume lets paused vCPUs run again.
func (v *VM) Resume() {
	v.resumeDevices()
	v.mu.Lock()
	v.pauseReq = false
	v.cond.Broadcast()
	v.mu.Unlock()
}

// Paused reports whether every vCPU is parked.
func (v *VM) Paused() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.pauseReq && v.allParkedLocked()
}

func (v *VM) allParkedLocked() bool {
	for _, c := range v.cpus {
		if !c.parked && !c.exited {
			return false
		}
	}
	return true
}

func (v *VM) kickAll() {
	for _, c := range v.cpus {
		c.kick()
	}
}

// Close releases everything. The VM must have ended (or never started).
func (v *VM) Close() error {
	v.Stop()
	v.stopThrottle()
	v.mu.Lock()
	for v.running > 0 {
		v.cond.Wait()
	}
	v.mu.Unlock()
	v.closeDevices()
	var errs []error
	for _, c := range v.cpus {
		errs = append(errs, c.kvm.Close())
	}
	v.cpus = nil
	if v.kvm != nil {
		errs = append(errs, v.kvm.Close())
		v.kvm = nil
	}
	if v.mem != nil {
		errs = append(errs, v.mem.Close())
		v.mem = nil
	}
	if v.sys != nil {
		errs = append(errs, v.sys.Close())
		v.sys = nil
	}
	return errors.Join(errs...)
}

// VCPU returns vCPU i's KVM handle, for reading and writing its state while
// the VM is paused (KVM serialises vCPU ioctls, and a parked vCPU thread
// makes none).
func (v *VM) VCPU(i int) *kvm.VCPU { return v.cpus[i].kvm }
