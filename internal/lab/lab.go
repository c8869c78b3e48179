// Package lab runs ferry on emulated hosts with real hardware
// virtualization: each host is a qemu-system-x86_64 process under TCG
// with AMD SVM and nested paging, booting Debian's cloud kernel, whose
// own kvm-amd gives it a /dev/kvm. There ferry meets VMX/SVM semantics
// and boots stock Linux guests, on machines whose /dev/kvm is PVM or
// missing. See docs/lab.md.
//
//	 this machine                          lab host 1 (QEMU, TCG)
//	┌──────────────────────────┐          ┌──────────────────────────┐
//	│ Lab ── Client ── 127.0.0.1:P1 ─hostfwd─► agent (ferry lab-agent)│
//	│  │                       │          │   ferry daemon, VMMs     │
//	│  Hub 127.0.0.1:H ◄── socket netdev ─┤ link NIC 10.77.0.1/24    │
//	│  │  (Ethernet hub,       │          └──────────────────────────┘
//	│  │   Cut = link down)    │          ┌──────────────────────────┐
//	│  └──────────────── socket netdev ───┤ link NIC 10.77.0.2/24    │
//	│    Client ──── 127.0.0.1:P2 ─hostfwd─► agent       lab host 2 │
//	└──────────────────────────┘          └──────────────────────────┘
//
// A host's initrd is the cached base image from scripts/lab-host.sh
// (modules, busybox, tc, /init) followed by a payload archive made at
// start: a static ferry and the guest images, under /opt/ferry. Each
// host's control NIC is QEMU user networking with restrict=on: the host
// reaches nothing but the forwarded agent port; traffic between hosts
// never leaves the QEMU processes and the hub.
//
// The package owns the QEMU processes, the hub, the agent protocol and
// the layout of a host (paths, addresses, daemon). It drives ferry only
// through its CLI inside the hosts, exactly as an operator would, and
// must not import the VMM, daemon or migration packages.
package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferry-vmm/ferry/internal/cpio"
)

// Paths inside a lab host.
const (
	HostFerry   = "/opt/ferry/bin/ferry"
	HostGuest   = "/opt/ferry/bin/ferry-guest.elf" // next to ferry: found by --guest test
	HostLinux   = "/opt/ferry/linux/vmlinuz"
	HostInitrd  = "/opt/ferry/linux/initrd.cpio.gz"
	HostDataDir = "/var/lib/ferry"
	DaemonPort  = 7700
)

// DefaultCPU is the emulated hosts' CPU model: an AMD EPYC with SVM and
// nested paging, without XSAVE. QEMU 7.2's TCG does not check the SVM
// XSETBV intercept, so a nested guest's xsetbv never reaches KVM, which
// then reloads XCR0 = 1 at every entry: AVX code takes #UD and Linux
// warns that its XSAVE sizes disagree. Without XSAVE, guests use FXSAVE
// and SSE, which the emulator carries correctly (docs/lab.md).
const DefaultCPU = "EPYC-v3,+svm,+npt,-xsave"

// DefaultAccel is QEMU's accelerator for the hosts: TCG. Lab hosts have
// one CPU each (Config.CPUs, kvm-in-lab): with two, a nested guest's vCPU
// now and then resumed with the emulated host's own state under
// multi-threaded TCG, and a 2-vCPU Linux guest hung at boot under
// thread=single (docs/lab.md, "Lab host shapes").
const DefaultAccel = "tcg"

// Config says what lab to start.
type Config struct {
	Hosts    int    // how many emulated hosts (default 2)
	MemMB    int    // each host's RAM (default 3072)
	CPUs     int    // each host's CPUs (default 1)
	CPU      string // QEMU CPU model (default $FERRY_LAB_CPU, else DefaultCPU)
	Accel    string // QEMU -accel (default $FERRY_LAB_ACCEL, else DefaultAccel)
	ImageDir string // scripts/lab-host.sh's output: vmlinuz, host.cpio
	Ferry    string // a static ferry binary for the hosts
	Guest    string // the test guest image (optional)
	Linux    string // the Linux guest's bzImage (optional)
	Initrd   string // the Linux guest's initramfs (optional)
	Files    []File // more files for every host
	Dir      string // where consoles and the initrd go (default: a new temp dir)
	Cmdline  string // added to every host's kernel command line
	QEMU     string // qemu-system-x86_64 (default: from $PATH)
	// BootTimeout bounds one host's boot (default 3 minutes).
	BootTimeout time.Duration
	// Log, if set, gets a line for each step.
	Log io.Writer
}

// File is a file placed in every host at start.
type File struct {
	Src  string // on this machine
	Path string // in the host (absolute)
	Mode os.FileMode
}

// Lab is a set of running emulated hosts joined by a hub.
type Lab struct {
	Hosts []*Host
	Hub   *Hub
	Dir   string

	cfg     Config
	ownDir  bool
	closeMu sync.Mutex
	closed  bool
}

func (c *Config) defaults() {
	if c.Hosts == 0 {
		c.Hosts = 2
	}
	if c.MemMB == 0 {
		c.MemMB = 3072
	}
	if c.CPUs == 0 {
		c.CPUs = 1
	}
	if c.CPU == "" {
		c.CPU = os.Getenv("FERRY_LAB_CPU")
	}
	if c.CPU == "" {
		c.CPU = DefaultCPU
	}
	if c.Accel == "" {
		c.Accel = os.Getenv("FERRY_LAB_ACCEL")
	}
	if c.Accel == "" {
		c.Accel = DefaultAccel
	}
	if c.QEMU == "" {
		c.QEMU = "qemu-system-x86_64"
	}
	if c.BootTimeout == 0 {
		c.BootTimeout = 3 * time.Minute
	}
}

func (l *Lab) logf(format string, args ...any) {
	if l.cfg.Log != nil {
		fmt.Fprintf(l.cfg.Log, "lab: "+format+"\n", args...)
	}
}

// Start boots the hosts (one after another: booting is CPU-bound and
// the machine has few cores) and returns when every agent answers.
func Start(ctx context.Context, cfg Config) (_ *Lab, err error) {
	cfg.defaults()
	if cfg.Hosts < 1 || cfg.Hosts > 16 {
		return nil, fmt.Errorf("lab: %d hosts: between 1 and 16", cfg.Hosts)
	}
	qemu, err := exec.LookPath(cfg.QEMU)
	if err != nil {
		return nil, fmt.Errorf("lab: %s not found (Debian package qemu-system-x86): %w", cfg.QEMU, err)
	}
	if err := checkStatic(cfg.Ferry); err != nil {
		return nil, err
	}
	l := &Lab{cfg: cfg, Dir: cfg.Dir}
	if l.Dir == "" {
		if l.Dir, err = os.MkdirTemp("", "ferry-lab-"); err != nil {
			return nil, err
		}
		l.ownDir = true
	}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	initrd := filepath.Join(l.Dir, "initrd.cpio")
	if err := l.writeInitrd(initrd); err != nil {
		return nil, err
	}
	if l.Hub, err = NewHub(); err != nil {
		return nil, err
	}
	token := make([]byte, 24)
	rand.Read(token)
	for i := 1; i <= cfg.Hosts; i++ {
		spec := hostSpec{
			name: fmt.Sprintf("host%d", i), ip: fmt.Sprintf("10.77.0.%d", i), index: i,
			memMB: cfg.MemMB, cpus: cfg.CPUs, cpu: cfg.CPU, accel: cfg.Accel,
			kernel: filepath.Join(cfg.ImageDir, "vmlinuz"), initrd: initrd,
			hub: l.Hub.Addr(), dir: l.Dir, token: hex.EncodeToString(token), extraCmdline: cfg.Cmdline,
			tscKHz: tscKHz(),
		}
		t0 := time.Now()
		l.logf("booting %s (%s, %d MiB, %d CPU, -accel %s: every instruction emulated)", spec.name, cfg.CPU, cfg.MemMB, cfg.CPUs, cfg.Accel)
		h, err := startHost(ctx, qemu, spec, cfg.BootTimeout)
		if err != nil {
			return nil, err
		}
		l.Hosts = append(l.Hosts, h)
		l.logf("%s ready in %.1fs: /dev/kvm from kvm-amd on emulated SVM, link %s", h.Name, time.Since(t0).Seconds(), h.IP)
	}
	return l, nil
}

// tscKHz is this machine's TSC rate in kHz as its kernel reports it (the
// "cpu MHz" of /proc/cpuinfo, which is the TSC rate on the constant-TSC
// machines the lab runs on), or 0.
func tscKHz() int {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil || mhz <= 0 {
				return 0
			}
			return int(mhz*1000 + 0.5)
		}
	}
	return 0
}

// checkStatic refuses a ferry binary that needs a dynamic loader: the
// hosts have no C library for it.
func checkStatic(path string) error {
	if path == "" {
		return errors.New("lab: no ferry binary given")
	}
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("lab: %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("lab: %s is dynamically linked; the lab hosts need a static ferry (CGO_ENABLED=0 go build)", path)
		}
	}
	return nil
}

// writeInitrd writes the base image followed by this run's payload.
func (l *Lab) writeInitrd(path string) error {
	base := filepath.Join(l.cfg.ImageDir, "host.cpio")
	if _, err := os.Stat(base); err != nil {
		return fmt.Errorf("lab: host image missing (build it with scripts/lab-host.sh or make lab-image): %w", err)
	}
	files := []File{{l.cfg.Ferry, HostFerry, 0o755}}
	if l.cfg.Guest != "" {
		files = append(files, File{l.cfg.Guest, HostGuest, 0o644})
	}
	if l.cfg.Linux != "" {
		files = append(files, File{l.cfg.Linux, HostLinux, 0o644}, File{l.cfg.Initrd, HostInitrd, 0o644})
	}
	files = append(files, l.cfg.Files...)
	var entries []cpio.Entry
	for _, f := range files {
		data, err := os.ReadFile(f.Src)
		if err != nil {
			return fmt.Errorf("lab: payload: %w", err)
		}
		name, err := cpio.Clean(f.Path)
		if err != nil {
			return fmt.Errorf("lab: payload %s: %w", f.Path, err)
		}
		entries = append(entries, cpio.Entry{Name: name, Mode: cpio.ModeReg | uint32(f.Mode.Perm()), Data: data})
	}
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	defer out.Close()
	in, err := os.Open(base)
	if err != nil {
		return err
	}
	defer in.Close()
	if _, err := io.Copy(out, in); err != nil {
		return err
	}
	// The kernel reads archives one after another, each starting on a
	// 4-byte boundary; the base ends on one (cpio pads every record).
	if err := cpio.Write(out, cpio.WithParents(entries), 0); err != nil {
		return fmt.Errorf("lab: payload: %w", err)
	}
	return out.Close()
}

// Close stops every host and the hub. It is safe to call more than once.
func (l *Lab) Close() error {
	l.closeMu.Lock()
	defer l.closeMu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	for _, h := range l.Hosts {
		h.Kill()
	}
	if l.Hub != nil {
		l.Hub.Close()
	}
	if l.ownDir && os.Getenv("FERRY_LAB_KEEP") == "" {
		os.RemoveAll(l.Dir)
	}
	return nil
}

// Consoles returns every host's console, for a failure report.
func (l *Lab) Consoles() string {
	var b bytes.Buffer
	for _, h := range l.Hosts {
		con, _ := os.ReadFile(h.Console)
		fmt.Fprintf(&b, "--- %s console (last 3000 bytes) ---\n%s\n", h.Name, tail(con, 3000))
	}
	return b.String()
}

// Token returns a fresh random token (exported for `ferry lab-agent` tests).
func Token() string {
	b := make([]byte, 24)
	rand.Read(b)
	return hex.EncodeToString(b)
}
