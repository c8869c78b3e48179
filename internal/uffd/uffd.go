// Package uffd is ferry's typed wrapper over Linux userfaultfd(2): one
// userfaultfd descriptor, the address ranges registered on it in MISSING
// mode, the ioctls that resolve faults (UFFDIO_COPY, UFFDIO_ZEROPAGE,
// UFFDIO_WAKE), and a blocking reader of page-fault events that Close can
// interrupt.
//
// It owns the userfaultfd and a private eventfd used to wake blocked readers,
// nothing else. It never maps, unmaps or frees memory: the caller owns every
// mapping it registers and must keep it mapped while it is registered. It
// must not know about guests, KVM or migration, nor import other ferry
// packages: deciding what belongs at a faulting address is the caller's
// business (internal/migration and up).
//
// Faults taken by the kernel on behalf of a process (copy_from_user,
// get_user_pages as KVM does for a vCPU) are reported as well as user-mode
// ones: the descriptor is never created with UFFD_USER_MODE_ONLY. That needs
// CAP_SYS_PTRACE, access to /dev/userfaultfd, or the sysctl
// vm.unprivileged_userfaultfd=1.
//
// A thread that touches a missing page of a registered range sleeps in the
// kernel until the page is placed or the range is woken. Inside a system
// call (KVM_RUN, read(2), Populate) that is harmless to the Go runtime. A
// goroutine that touches such a page from Go code is different: the runtime
// believes it is running, so it keeps its P, and when the access is in code
// that cannot be preempted asynchronously (copy, which is runtime.memmove,
// among others) a garbage collection waits for it forever, stopping the
// goroutine that would have placed the page: the whole process deadlocks.
// Go code in the process that handles the faults must therefore reach
// registered memory only through system calls, or after Populate.
package uffd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

var (
	// ErrExists reports that a page being placed is already present: another
	// Copy or ZeroPage placed it first (or the range is not missing).
	ErrExists = errors.New("page already present")
	// ErrClosed is returned by every method once Close has been called.
	ErrClosed = errors.New("uffd: closed")
	// ErrUnavailable is wrapped by Open's error when this process may not
	// create a userfaultfd that also reports kernel-mode faults, or the
	// kernel has no userfaultfd support at all.
	ErrUnavailable = errors.New("uffd: userfaultfd unavailable")
)

var pageSize = uint64(unix.Getpagesize())

// retryBudget bounds how long Copy and ZeroPage keep retrying an ioctl that
// returns EAGAIN without placing anything (the kernel does so while the
// address space is being changed under it).
const retryBudget = time.Second

// FD is one userfaultfd. Its methods may be called from any goroutine,
// concurrently with each other.
type FD struct {
	fd       int    // the userfaultfd, O_NONBLOCK
	wakeFD   int    // eventfd, made readable by Close to wake ReadFaults
	features uint64 // reported by UFFDIO_API
	ioctls   uint64 // reported by UFFDIO_API
	threadID bool   // UFFD_FEATURE_THREAD_ID enabled: fault messages carry the TID

	// mu is read-held by every method while it uses the descriptors and
	// write-held by Close to close them, so a descriptor number is never
	// used after it has been closed (and possibly reused).
	mu      sync.RWMutex
	closed  atomic.Bool
	closeMu sync.Mutex

	regionsMu sync.Mutex
	regions   []region // registered ranges, disjoint
}

// region is one registered range [start, end) and whether the kernel offers
// UFFDIO_ZEROPAGE on it.
type region struct {
	start, end uintptr
	zeroPage   bool
}

// Open creates a userfaultfd (close-on-exec, non-blocking) and performs the
// UFFDIO_API handshake, asking for thread IDs in fault messages when the
// kernel offers them. If the userfaultfd system call is refused with EPERM it
// falls back to /dev/userfaultfd. When neither works the error wraps
// ErrUnavailable and names the sysctl vm.unprivileged_userfaultfd.
func Open() (*FD, error) {
	return open(create)
}

func open(newFD func() (int, error)) (*FD, error) {
	fd, api, err := handshake(newFD, featureThreadID)
	if errors.Is(err, unix.EINVAL) {
		// A kernel that lacks UFFD_FEATURE_THREAD_ID rejects the request,
		// and UFFDIO_API may only be attempted once per descriptor.
		fd, api, err = handshake(newFD, 0)
	}
	if err != nil {
		return nil, err
	}
	wfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("uffd: eventfd: %w", err)
	}
	return &FD{
		fd:       fd,
		wakeFD:   wfd,
		features: api.Features,
		ioctls:   api.Ioctls,
		threadID: api.Features&featureThreadID != 0,
	}, nil
}

// handshake creates a descriptor and performs UFFDIO_API on it, requesting
// the given features (only those the kernel reports are enabled; it fails
// with EINVAL on any other).
func handshake(newFD func() (int, error), features uint64) (int, uffdioAPI, error) {
	fd, err := newFD()
	if err != nil {
		return -1, uffdioAPI{}, err
	}
	api := uffdioAPI{API: uffdAPI, Features: features}
	if err := ioctl(fd, ioAPI, &api); err != nil {
		unix.Close(fd)
		return -1, uffdioAPI{}, fmt.Errorf("uffd: UFFDIO_API (features %#x): %w", features, err)
	}
	if features&^api.Features != 0 {
		unix.Close(fd)
		return -1, uffdioAPI{}, fmt.Errorf("uffd: UFFDIO_API: features %#x requested, kernel offers %#x: %w",
			features, api.Features, unix.EINVAL)
	}
	return fd, api, nil
}

const fdFlags = unix.O_CLOEXEC | unix.O_NONBLOCK

// create makes a new userfaultfd with userfaultfd(2), or through
// /dev/userfaultfd when the system call is refused.
func create() (int, error) {
	fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, fdFlags, 0, 0)
	if e == 0 {
		return int(fd), nil
	}
	if e == unix.ENOSYS {
		return -1, fmt.Errorf("%w: userfaultfd(2): %v (kernel built without CONFIG_USERFAULTFD?)", ErrUnavailable, e)
	}
	if e != unix.EPERM {
		return -1, fmt.Errorf("uffd: userfaultfd(2): %w", e)
	}
	dfd, derr := createFromDevice()
	if derr != nil {
		return -1, fmt.Errorf("%w: userfaultfd(2): %v (reporting kernel-mode faults needs CAP_SYS_PTRACE "+
			"or sysctl vm.unprivileged_userfaultfd=1); fallback: %v", ErrUnavailable, e, derr)
	}
	return dfd, nil
}

// devicePath is the userfaultfd device node (a variable for tests).
var devicePath = "/dev/userfaultfd"

// createFromDevice makes a new userfaultfd with USERFAULTFD_IOC_NEW on
// /dev/userfaultfd, which is governed by the device node's permissions
// rather than by vm.unprivileged_userfaultfd.
func createFromDevice() (int, error) {
	dev, err := unix.Open(devicePath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", devicePath, err)
	}
	defer unix.Close(dev)
	fd, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), ioNew, fdFlags)
	if e != 0 {
		return -1, fmt.Errorf("%s USERFAULTFD_IOC_NEW: %w", devicePath, e)
	}
	return int(fd), nil
}

// Features returns the UFFD_FEATURE_* bits the kernel reported in the
// UFFDIO_API handshake: everything it supports, of which this package
// enables only UFFD_FEATURE_THREAD_ID.
func (u *FD) Features() uint64 { return u.features }

// acquire read-locks u.mu for a method that uses the descriptors; the caller
// must RUnlock when it returns nil.
func (u *FD) acquire() error {
	u.mu.RLock()
	if u.closed.Load() {
		u.mu.RUnlock()
		return ErrClosed
	}
	return nil
}

// checkRange rejects ranges the kernel would reject with a bare EINVAL.
func checkRange(op string, addr uintptr, length uint64) error {
	if uint64(addr)%pageSize != 0 || length%pageSize != 0 || length == 0 || uint64(addr)+length < uint64(addr) {
		return fmt.Errorf("uffd: %s %#x+%#x: address and length must be multiples of the page size (%d) and the length positive",
			op, addr, length, pageSize)
	}
	return nil
}

// Register registers [addr, addr+length) in MISSING mode: from now on a
// thread touching a page of it that is not present sleeps until the page is
// placed (Copy, ZeroPage) or the range is woken, and ReadFaults reports the
// fault. addr and length must be page-aligned. Registering a range again
// replaces the earlier registration.
func (u *FD) Register(addr uintptr, length uint64) error {
	if err := checkRange("register", addr, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	r := uffdioRegister{Range: uffdioRange{Start: uint64(addr), Len: length}, Mode: registerModeMissing}
	if err := ioctl(u.fd, ioRegister, &r); err != nil {
		return fmt.Errorf("uffd: UFFDIO_REGISTER %#x+%#x: %w", addr, length, err)
	}
	u.regionsMu.Lock()
	defer u.regionsMu.Unlock()
	u.forget(addr, length)
	u.regions = append(u.regions, region{start: addr, end: addr + uintptr(length), zeroPage: r.Ioctls&(1<<ioctlBitZeroPage) != 0})
	return nil
}

// Unregister removes [addr, addr+length) from the descriptor. Threads
// sleeping on a fault in it are woken, and later accesses to its missing
// pages no longer fault to the handler (they get zero-filled pages).
func (u *FD) Unregister(addr uintptr, length uint64) error {
	if err := checkRange("unregister", addr, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	r := uffdioRange{Start: uint64(addr), Len: length}
	if err := ioctl(u.fd, ioUnregister, &r); err != nil {
		return fmt.Errorf("uffd: UFFDIO_UNREGISTER %#x+%#x: %w", addr, length, err)
	}
	u.regionsMu.Lock()
	defer u.regionsMu.Unlock()
	u.forget(addr, length)
	return nil
}

// forget drops [addr, addr+length) from u.regions, trimming or splitting
// regions that overlap it. u.regionsMu must be held.
func (u *FD) forget(addr uintptr, length uint64) {
	start, end := addr, addr+uintptr(length)
	var kept []region
	for _, r := range u.regions {
		if r.end <= start || r.start >= end {
			kept = append(kept, r)
			continue
		}
		if r.start < start {
			kept = append(kept, region{start: r.start, end: start, zeroPage: r.zeroPage})
		}
		if r.end > end {
			kept = append(kept, region{start: end, end: r.end, zeroPage: r.zeroPage})
		}
	}
	u.regions = kept
}

// zeroPageOffered reports whether UFFDIO_ZEROPAGE may be used on
// [addr, addr+length): false if any registered range overlapping it was
// registered without the kernel offering it.
func (u *FD) zeroPageOffered(addr uintptr, length uint64) bool {
	start, end := addr, addr+uintptr(length)
	u.regionsMu.Lock()
	defer u.regionsMu.Unlock()
	for _, r := range u.regions {
		if r.start < end && start < r.end && !r.zeroPage {
			return false
		}
	}
	return true
}

// Copy atomically places len(src) bytes (a multiple of the page size) at
// dst, which must be page-aligned and inside a registered range, with
// UFFDIO_COPY. If wake is set, threads sleeping on faults in the range are
// woken; otherwise the caller wakes them later with Wake.
//
// If a page in the range is already present, Copy stops there and returns
// an error wrapping ErrExists: the pages before it have been placed, the
// ones after it have not. With wake set it also wakes the present page,
// since whoever placed it may not have.
func (u *FD) Copy(dst uintptr, src []byte, wake bool) error {
	if err := checkRange("copy", dst, uint64(len(src))); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	return u.copy(dst, src, wake)
}

func (u *FD) copy(dst uintptr, src []byte, wake bool) error {
	var mode uint64
	if !wake {
		mode = copyModeDontWake
	}
	return u.fill("UFFDIO_COPY", dst, uint64(len(src)), wake, func(off uint64) (int64, error) {
		c := uffdioCopy{
			Dst:  uint64(dst) + off,
			Src:  unsafe.Pointer(&src[off]),
			Len:  uint64(len(src)) - off,
			Mode: mode,
		}
		err := ioctl(u.fd, ioCopy, &c)
		return c.Copy, err
	})
}

// ZeroPage places zero-filled pages on [dst, dst+length) with
// UFFDIO_ZEROPAGE, or, where the kernel does not offer that ioctl for the
// registered range, with UFFDIO_COPY from a zero buffer. wake and ErrExists
// are as for Copy.
func (u *FD) ZeroPage(dst uintptr, length uint64, wake bool) error {
	if err := checkRange("zeropage", dst, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	if !u.zeroPageOffered(dst, length) {
		return u.copyZeros(dst, length, wake)
	}
	var mode uint64
	if !wake {
		mode = zeroPageModeDontWake
	}
	return u.fill("UFFDIO_ZEROPAGE", dst, length, wake, func(off uint64) (int64, error) {
		z := uffdioZeroPage{Range: uffdioRange{Start: uint64(dst) + off, Len: length - off}, Mode: mode}
		err := ioctl(u.fd, ioZeroPage, &z)
		return z.ZeroPage, err
	})
}

// zeros is the source of ZeroPage's UFFDIO_COPY fallback. Only the kernel
// reads it.
var zeros = make([]byte, max(64<<10, pageSize))

func (u *FD) copyZeros(dst uintptr, length uint64, wake bool) error {
	for off := uint64(0); off < length; {
		n := min(length-off, uint64(len(zeros)))
		if err := u.copy(dst+uintptr(off), zeros[:n], wake); err != nil {
			return err
		}
		off += n
	}
	return nil
}

// fill drives a placing ioctl (UFFDIO_COPY or UFFDIO_ZEROPAGE) over
// [dst, dst+length). place issues the ioctl for the part starting at offset
// off and returns the count the kernel wrote back (bytes placed, or a
// negative errno) and the ioctl's error. The kernel reports a partial
// placement as EAGAIN with a positive count; fill continues with the rest.
func (u *FD) fill(name string, dst uintptr, length uint64, wake bool, place func(off uint64) (int64, error)) error {
	var off uint64
	var deadline time.Time
	for off < length {
		n, err := place(off)
		if err == nil {
			return nil
		}
		if n > 0 {
			off += uint64(n)
		}
		switch {
		case err == unix.EAGAIN && n > 0:
			deadline = time.Time{}
		case err == unix.EAGAIN:
			// Nothing placed: the address space is changing; try again.
			if deadline.IsZero() {
				deadline = time.Now().Add(retryBudget)
			} else if time.Now().After(deadline) {
				return fmt.Errorf("uffd: %s %#x+%#x: still failing after %v: %w", name, dst+uintptr(off), length-off, retryBudget, err)
			}
			runtime.Gosched()
		case err == unix.EEXIST:
			at := dst + uintptr(off)
			if wake {
				r := uffdioRange{Start: uint64(at), Len: pageSize}
				if werr := ioctl(u.fd, ioWake, &r); werr != nil {
					return fmt.Errorf("uffd: %s at %#x: %w (and UFFDIO_WAKE: %v)", name, at, ErrExists, werr)
				}
			}
			return fmt.Errorf("uffd: %s at %#x: %w", name, at, ErrExists)
		default:
			return fmt.Errorf("uffd: %s %#x+%#x: %w", name, dst+uintptr(off), length-off, err)
		}
	}
	return nil
}

// Wake wakes the threads sleeping on faults in [addr, addr+length), after
// pages were placed there without waking.
func (u *FD) Wake(addr uintptr, length uint64) error {
	if err := checkRange("wake", addr, length); err != nil {
		return err
	}
	if err := u.acquire(); err != nil {
		return err
	}
	defer u.mu.RUnlock()
	r := uffdioRange{Start: uint64(addr), Len: length}
	if err := ioctl(u.fd, ioWake, &r); err != nil {
		return fmt.Errorf("uffd: UFFDIO_WAKE %#x+%#x: %w", addr, length, err)
	}
	return nil
}

// Fault is one page fault on a registered range.
type Fault struct {
	Addr  uintptr // faulting address, rounded down to the page size
	Write bool    // the access was a write
	TID   uint32  // faulting thread, or 0 if the kernel does not report it
}

// maxMsgs bounds the messages one ReadFaults reads.
const maxMsgs = 64

type readState struct {
	msgs [maxMsgs]uffdMsg
	fds  [2]unix.PollFd
}

var readPool = sync.Pool{New: func() any { return new(readState) }}

// ReadFaults blocks until at least one page fault is pending, then appends
// the pending faults to buf (at most max(cap(buf)-len(buf), 1), up to 64)
// and returns the extended slice. Every fault is reported once; the thread
// that took it sleeps until its page is placed or woken. The same page may
// be reported more than once when several threads fault on it, or when a
// thread's sleep is interrupted by a signal and it faults again. Events other
// than page faults are discarded.
//
// After Close, or when Close is called while it blocks, ReadFaults returns
// ErrClosed.
func (u *FD) ReadFaults(buf []Fault) ([]Fault, error) {
	if err := u.acquire(); err != nil {
		return buf, err
	}
	defer u.mu.RUnlock()
	st := readPool.Get().(*readState)
	defer readPool.Put(st)
	want := min(max(cap(buf)-len(buf), 1), maxMsgs)
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&st.msgs[0])), want*msgSize)
	for {
		if u.closed.Load() {
			return buf, ErrClosed
		}
		n, err := unix.Read(u.fd, raw)
		switch {
		case err == nil:
			before := len(buf)
			for i := range n / msgSize {
				m := &st.msgs[i]
				if m.Event != eventPagefault {
					continue
				}
				f := Fault{Addr: uintptr(m.Address &^ (pageSize - 1)), Write: m.Flags&pagefaultFlagWrite != 0}
				if u.threadID {
					f.TID = m.PTID
				}
				buf = append(buf, f)
			}
			if len(buf) > before {
				return buf, nil
			}
			continue
		case err == unix.EINTR:
			continue
		case err != unix.EAGAIN:
			return buf, fmt.Errorf("uffd: read: %w", err)
		}
		// Nothing pending: sleep until a fault arrives or Close signals.
		st.fds[0] = unix.PollFd{Fd: int32(u.fd), Events: unix.POLLIN}
		st.fds[1] = unix.PollFd{Fd: int32(u.wakeFD), Events: unix.POLLIN}
		if _, err := unix.Poll(st.fds[:], -1); err != nil && err != unix.EINTR {
			return buf, fmt.Errorf("uffd: poll: %w", err)
		}
		if st.fds[1].Revents != 0 {
			return buf, ErrClosed
		}
		if st.fds[0].Revents&(unix.POLLERR|unix.POLLNVAL) != 0 {
			return buf, fmt.Errorf("uffd: poll: revents %#x", st.fds[0].Revents)
		}
	}
}

// Close wakes any ReadFaults blocked on u (it returns ErrClosed), waits for
// methods in progress to return and closes the descriptor. Closing it
// unregisters every range and wakes every thread sleeping on a fault; their
// accesses then proceed as if the range had never been registered. Close is
// safe to call more than once and concurrently with any method; later calls
// return nil.
func (u *FD) Close() error {
	u.closeMu.Lock()
	defer u.closeMu.Unlock()
	if u.closed.Load() {
		return nil
	}
	u.closed.Store(true)
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	_, werr := unix.Write(u.wakeFD, one[:])
	u.mu.Lock()
	defer u.mu.Unlock()
	err := unix.Close(u.fd)
	unix.Close(u.wakeFD)
	u.fd, u.wakeFD = -1, -1
	if werr != nil {
		return fmt.Errorf("uffd: waking readers: %w", werr)
	}
	if err != nil {
		return fmt.Errorf("uffd: close: %w", err)
	}
	return nil
}

// Populate makes every page of [addr, addr+length) present by faulting it
// in from inside the kernel (madvise MADV_POPULATE_READ, or
// MADV_POPULATE_WRITE if write is set; Linux 5.14 and later). Missing pages
// of registered ranges fault to their userfaultfd like any other access and
// Populate returns once they have been placed, but the calling goroutine
// sleeps in a system call, where it neither holds a P nor delays garbage
// collection. It is how Go code should touch registered memory before
// reading or writing it directly (see the package comment). It is not a
// method: the handler resolving the faults may live in another process.
func Populate(addr uintptr, length uint64, write bool) error {
	if err := checkRange("populate", addr, length); err != nil {
		return err
	}
	advice := unix.MADV_POPULATE_READ
	if write {
		advice = unix.MADV_POPULATE_WRITE
	}
	for {
		_, _, e := unix.Syscall(unix.SYS_MADVISE, addr, uintptr(length), uintptr(advice))
		switch e {
		case 0:
			return nil
		case unix.EINTR:
			// A signal interrupted a fault; pages already present are
			// quick to pass over again.
			continue
		}
		return fmt.Errorf("uffd: populate %#x+%#x: %w", addr, length, e)
	}
}
