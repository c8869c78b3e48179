package uffd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

const testTimeout = 10 * time.Second

// TestMain sets up the runtime for goroutines that fault on registered
// memory from Go code (readPage copies the page out with copy). Such a
// goroutine keeps its P while it sleeps, so there must be Ps to spare for
// the handler; and the runtime cannot preempt it inside memmove, so a
// garbage collection starting meanwhile would wait for it forever while
// stopping the handler (see the package comment). Automatic collection is
// therefore off in this test binary; TestPopulateDuringGC collects on
// purpose while faulting the safe way.
func TestMain(m *testing.M) {
	runtime.GOMAXPROCS(max(runtime.GOMAXPROCS(0), 4))
	debug.SetGCPercent(-1)
	os.Exit(m.Run())
}

var ps = int(pageSize)

// openOrSkip opens a userfaultfd, skipping the test when the machine does
// not allow one that reports kernel-mode faults.
func openOrSkip(tb testing.TB) *FD {
	tb.Helper()
	u, err := Open()
	if errors.Is(err, ErrUnavailable) {
		tb.Skipf("userfaultfd unavailable here: %v", err)
	}
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { u.Close() })
	return u
}

// shmem is a memfd of some pages mapped MAP_SHARED, as guest RAM is.
type shmem struct {
	fd   int
	mem  []byte
	base uintptr
}

func newShmem(tb testing.TB, pages int) *shmem {
	tb.Helper()
	fd, err := unix.MemfdCreate("uffd-test", unix.MFD_CLOEXEC)
	if err != nil {
		tb.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(pages*ps)); err != nil {
		tb.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, pages*ps, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		unix.Munmap(mem)
		unix.Close(fd)
	})
	return &shmem{fd: fd, mem: mem, base: uintptr(unsafe.Pointer(&mem[0]))}
}

func (s *shmem) addr(page int) uintptr { return s.base + uintptr(page*ps) }
func (s *shmem) page(page int) []byte  { return s.mem[page*ps : (page+1)*ps] }

// registered opens a userfaultfd and registers a fresh memfd mapping of the
// given size on it.
func registered(tb testing.TB, pages int) (*FD, *shmem) {
	tb.Helper()
	if runtime.GOMAXPROCS(0) < 2 {
		// A goroutine sleeping in a fault from Go code keeps its P, and the
		// handler needs one (see TestMain).
		tb.Skip("needs GOMAXPROCS >= 2 (run without -cpu 1)")
	}
	u := openOrSkip(tb)
	s := newShmem(tb, pages)
	if err := u.Register(s.base, uint64(len(s.mem))); err != nil {
		tb.Fatal(err)
	}
	return u, s
}

// pattern is recognisable content for page n.
func pattern(n int) []byte {
	p := make([]byte, ps)
	for i := range p {
		p[i] = byte(n*7 + i%251 + 1)
	}
	return p
}

type touchResult struct {
	tid  int
	data []byte
}

// readPage reads page n of s from a goroutine locked to its own thread and
// delivers a copy of it. The read sleeps in the kernel until the page is
// placed. The faulting thread's ID is sent on tid (if not nil) just before
// the access.
func readPage(s *shmem, n int, tid chan<- int) <-chan touchResult {
	ch := make(chan touchResult, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		me := unix.Gettid()
		if tid != nil {
			tid <- me
		}
		out := make([]byte, ps)
		copy(out, s.page(n))
		ch <- touchResult{tid: me, data: out}
	}()
	return ch
}

func await[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(testTimeout):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

type faultsResult struct {
	faults []Fault
	err    error
}

// readFaults calls ReadFaults in a goroutine so the test can time it out.
func readFaults(u *FD) <-chan faultsResult {
	ch := make(chan faultsResult, 1)
	go func() {
		f, err := u.ReadFaults(make([]Fault, 0, 8))
		ch <- faultsResult{f, err}
	}()
	return ch
}

func nextFault(t *testing.T, u *FD) Fault {
	t.Helper()
	r := await(t, readFaults(u), "a fault event")
	if r.err != nil {
		t.Fatalf("ReadFaults: %v", r.err)
	}
	if len(r.faults) != 1 {
		t.Fatalf("ReadFaults returned %d faults, want 1: %+v", len(r.faults), r.faults)
	}
	return r.faults[0]
}

// stillBlocked checks that a reader has not completed yet.
func stillBlocked[T any](t *testing.T, ch <-chan T) {
	t.Helper()
	select {
	case <-ch:
		t.Fatal("access completed before its page was placed")
	case <-time.After(20 * time.Millisecond):
	}
}

func TestOpenReportsFeatures(t *testing.T) {
	u := openOrSkip(t)
	t.Logf("features %#x, api ioctls %#x, thread IDs %v", u.Features(), u.ioctls, u.threadID)
	if u.Features()&featureThreadID == 0 {
		t.Logf("kernel does not report UFFD_FEATURE_THREAD_ID; Fault.TID will be 0")
	}
}

// roundTrip faults on one page from another thread and resolves it with
// Copy, checking the event and what the reader sees.
func roundTrip(t *testing.T, u *FD, s *shmem) {
	tids := make(chan int, 1)
	done := readPage(s, 5, tids)
	tid := await(t, tids, "the reader to start")
	f := nextFault(t, u)
	if f.Addr != s.addr(5) || f.Write {
		t.Fatalf("fault %+v, want read at %#x", f, s.addr(5))
	}
	if u.threadID && int(f.TID) != tid {
		t.Errorf("fault TID %d, reader thread %d", f.TID, tid)
	}
	stillBlocked(t, done)
	if err := u.Copy(f.Addr, pattern(5), true); err != nil {
		t.Fatal(err)
	}
	if got := await(t, done, "the reader to resume"); !bytes.Equal(got.data, pattern(5)) {
		t.Fatalf("reader saw %x..., want %x...", got.data[:8], pattern(5)[:8])
	}
}

func TestCopyResolvesFault(t *testing.T) {
	u, s := registered(t, 64)
	roundTrip(t, u, s)
}

func TestDevUserfaultfd(t *testing.T) {
	u, err := open(createFromDevice)
	if err != nil {
		t.Skipf("/dev/userfaultfd not usable here: %v", err)
	}
	defer u.Close()
	s := newShmem(t, 64)
	if err := u.Register(s.base, uint64(len(s.mem))); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, u, s)
}

// TestOpenWithoutPtrace drops CAP_SYS_PTRACE on one thread so that the
// userfaultfd system call is refused there (as for an unprivileged process
// with vm.unprivileged_userfaultfd=0), and opens from that thread: first
// through the /dev/userfaultfd fallback, then with the device missing too.
func TestOpenWithoutPtrace(t *testing.T) {
	if b, err := os.ReadFile("/proc/sys/vm/unprivileged_userfaultfd"); err != nil || string(bytes.TrimSpace(b)) != "0" {
		t.Skip("vm.unprivileged_userfaultfd is not 0: the system call would not be refused")
	}
	type result struct {
		viaDevice, noDevice error
		skip                string
	}
	ch := make(chan result, 1)
	go func() {
		// Capabilities are per thread: this one is changed and, being
		// locked when the goroutine exits, is then discarded.
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			ch <- result{skip: fmt.Sprintf("capget: %v", err)}
			return
		}
		if data[0].Effective&(1<<unix.CAP_SYS_PTRACE) == 0 {
			ch <- result{skip: "no CAP_SYS_PTRACE to drop"}
			return
		}
		data[0].Effective &^= 1 << unix.CAP_SYS_PTRACE
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			ch <- result{skip: fmt.Sprintf("capset: %v", err)}
			return
		}
		var r result
		var u *FD
		if u, r.viaDevice = Open(); r.viaDevice == nil {
			u.Close()
		}
		saved := devicePath
		devicePath = "/nonexistent/userfaultfd"
		if u, r.noDevice = Open(); r.noDevice == nil {
			u.Close()
		}
		devicePath = saved
		ch <- r
	}()
	r := await(t, ch, "the capability-less thread")
	if r.skip != "" {
		t.Skip(r.skip)
	}
	if _, err := os.Stat(devicePath); err == nil && r.viaDevice != nil {
		t.Errorf("Open without CAP_SYS_PTRACE, %s present: %v", devicePath, r.viaDevice)
	}
	if !errors.Is(r.noDevice, ErrUnavailable) || !strings.Contains(r.noDevice.Error(), "vm.unprivileged_userfaultfd") {
		t.Errorf("Open with neither: %v; want ErrUnavailable naming vm.unprivileged_userfaultfd", r.noDevice)
	}
	t.Logf("with neither: %v", r.noDevice)
}

// TestKernelModeFault faults from inside a system call (write(2) reading
// the registered page with copy_from_user), the way KVM touches guest RAM
// on behalf of a vCPU.
func TestKernelModeFault(t *testing.T) {
	u, s := registered(t, 64)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	wrote := make(chan error, 1)
	go func() {
		_, err := unix.Write(p[1], s.page(9))
		wrote <- err
	}()
	f := nextFault(t, u)
	if f.Addr != s.addr(9) || f.Write {
		t.Fatalf("fault %+v, want read at %#x", f, s.addr(9))
	}
	stillBlocked(t, wrote)
	if err := u.Copy(f.Addr, pattern(9), true); err != nil {
		t.Fatal(err)
	}
	if err := await(t, wrote, "write(2) to resume"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, ps)
	if _, err := unix.Read(p[0], got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, pattern(9)) {
		t.Fatal("pipe carried the wrong data")
	}
}

func TestZeroPage(t *testing.T) {
	u, s := registered(t, 64)
	if !u.zeroPageOffered(s.base, uint64(len(s.mem))) {
		t.Log("kernel does not offer UFFDIO_ZEROPAGE on shmem; ZeroPage uses the UFFDIO_COPY fallback")
	}
	// A write fault, resolved with a zero page.
	wrote := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		s.page(7)[10] = 0x5a
		close(wrote)
	}()
	f := nextFault(t, u)
	if f.Addr != s.addr(7) || !f.Write {
		t.Fatalf("fault %+v, want write at %#x", f, s.addr(7))
	}
	stillBlocked(t, wrote)
	if err := u.ZeroPage(f.Addr, pageSize, true); err != nil {
		t.Fatal(err)
	}
	await(t, wrote, "the writer to resume")
	want := make([]byte, ps)
	want[10] = 0x5a
	if !bytes.Equal(s.page(7), want) {
		t.Fatal("page 7 is not zero apart from the byte written")
	}

	// Placed ahead of any fault, several pages at once: reading them
	// must not fault (no handler is running).
	if err := u.ZeroPage(s.addr(20), 4*pageSize, false); err != nil {
		t.Fatal(err)
	}
	for n := 20; n < 24; n++ {
		if got := await(t, readPage(s, n, nil), "reading a placed zero page"); !bytes.Equal(got.data, make([]byte, ps)) {
			t.Fatalf("page %d not zero", n)
		}
	}
}

// TestZeroPageFallback forces the UFFDIO_COPY path that ZeroPage takes
// where the kernel does not offer UFFDIO_ZEROPAGE.
func TestZeroPageFallback(t *testing.T) {
	u, s := registered(t, 64)
	u.regionsMu.Lock()
	for i := range u.regions {
		u.regions[i].zeroPage = false
	}
	u.regionsMu.Unlock()
	if u.zeroPageOffered(s.addr(3), pageSize) {
		t.Fatal("zeroPageOffered ignores the recorded ioctls")
	}
	done := readPage(s, 3, nil)
	f := nextFault(t, u)
	if err := u.ZeroPage(f.Addr, pageSize, true); err != nil {
		t.Fatal(err)
	}
	if got := await(t, done, "the reader to resume"); !bytes.Equal(got.data, make([]byte, ps)) {
		t.Fatal("page not zero")
	}
	// Larger than the zero buffer: several UFFDIO_COPY calls.
	n := len(zeros)/ps + 2
	if err := u.ZeroPage(s.addr(10), uint64(n*ps), false); err != nil {
		t.Fatal(err)
	}
	if err := u.ZeroPage(s.addr(10+n-1), pageSize, false); !errors.Is(err, ErrExists) {
		t.Fatalf("zeroing a placed page again: %v, want ErrExists", err)
	}
}

func TestErrExists(t *testing.T) {
	u, s := registered(t, 64)
	if err := u.Copy(s.addr(1), pattern(1), false); err != nil {
		t.Fatal(err)
	}
	err := u.Copy(s.addr(1), pattern(2), true)
	if !errors.Is(err, ErrExists) {
		t.Fatalf("second Copy: %v, want ErrExists", err)
	}
	t.Logf("second Copy: %v", err)
	if err := u.ZeroPage(s.addr(1), pageSize, true); !errors.Is(err, ErrExists) {
		t.Fatalf("ZeroPage over a placed page: %v, want ErrExists", err)
	}
	if !bytes.Equal(s.page(1), pattern(1)) {
		t.Fatal("first placement was overwritten")
	}

	// A multi-page Copy that runs into a present page places the pages
	// before it and stops there.
	if err := u.Copy(s.addr(12), pattern(12), false); err != nil {
		t.Fatal(err)
	}
	src := slices.Concat(pattern(10), pattern(11), pattern(99), pattern(13))
	if err := u.Copy(s.addr(10), src, true); !errors.Is(err, ErrExists) {
		t.Fatalf("Copy over pages 10-13 with 12 present: %v, want ErrExists", err)
	}
	for n, want := range map[int][]byte{10: pattern(10), 11: pattern(11), 12: pattern(12)} {
		if !bytes.Equal(s.page(n), want) {
			t.Errorf("page %d has the wrong content", n)
		}
	}
	// Page 13 is still missing and faults.
	done := readPage(s, 13, nil)
	if f := nextFault(t, u); f.Addr != s.addr(13) {
		t.Fatalf("fault at %#x, want page 13 at %#x", f.Addr, s.addr(13))
	}
	if err := u.Copy(s.addr(13), pattern(13), true); err != nil {
		t.Fatal(err)
	}
	await(t, done, "the reader of page 13")
}

func TestBadRanges(t *testing.T) {
	u, s := registered(t, 4)
	for name, err := range map[string]error{
		"unaligned copy":      u.Copy(s.base+1, pattern(0), false),
		"short copy":          u.Copy(s.base, pattern(0)[:100], false),
		"empty copy":          u.Copy(s.base, nil, false),
		"unaligned zeropage":  u.ZeroPage(s.base, 100, false),
		"unaligned register":  u.Register(s.base+8, pageSize),
		"zero-length wake":    u.Wake(s.base, 0),
		"wrapping unregister": u.Unregister(^uintptr(0)&^uintptr(ps-1), 2*pageSize),
	} {
		if err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	// Outside any registered range the kernel refuses the placement.
	other := newShmem(t, 1)
	if err := u.Copy(other.base, pattern(0), false); err == nil || errors.Is(err, ErrExists) {
		t.Errorf("Copy to an unregistered range: %v", err)
	}
}

// TestConcurrentFaults has several threads fault at once, on different
// pages and on the same page, with one handler goroutine resolving them.
// The handler places nothing until it has seen faults on every page, and as
// many on the shared page as it has readers, so the readers are asleep in
// the kernel at the same time. (A reader can be counted twice: the runtime's
// preemption signal interrupts a long fault sleep, and the access faults
// again.)
func TestConcurrentFaults(t *testing.T) {
	const distinct, same = 8, 6
	// Each sleeping reader holds a P (see the package comment): leave room
	// for the handler.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(distinct + same + 2))
	u, s := registered(t, 64)

	var handled []Fault // written by the handler before it closes resolving
	var exists int      // written by the handler before it closes resolved
	resolving := make(chan struct{})
	resolved := make(chan struct{}) // closed after placing for each fault
	handlerDone := make(chan error, 1)
	place := func(f Fault) error {
		n := int((f.Addr - s.base) / uintptr(ps))
		err := u.Copy(f.Addr, pattern(n), true)
		if errors.Is(err, ErrExists) {
			return nil
		}
		return err
	}
	go func() {
		buf := make([]Fault, 0, 16)
		seen := map[uintptr]int{}
		for len(seen) < distinct+1 || seen[s.addr(50)] < same {
			var err error
			if buf, err = u.ReadFaults(buf[:0]); err != nil {
				handlerDone <- err
				return
			}
			handled = append(handled, buf...)
			for _, f := range buf {
				seen[f.Addr]++
			}
		}
		close(resolving)
		for _, f := range handled {
			n := int((f.Addr - s.base) / uintptr(ps))
			err := u.Copy(f.Addr, pattern(n), true)
			if errors.Is(err, ErrExists) {
				exists++
			} else if err != nil {
				handlerDone <- err
				return
			}
		}
		close(resolved)
		// Serve any fault taken again after a signal interrupted a sleep.
		for {
			var err error
			if buf, err = u.ReadFaults(buf[:0]); err != nil {
				handlerDone <- err
				return
			}
			for _, f := range buf {
				if err := place(f); err != nil {
					handlerDone <- err
					return
				}
			}
		}
	}()

	type reader struct {
		page int
		ch   <-chan touchResult
	}
	var readers []reader
	for i := range distinct {
		readers = append(readers, reader{30 + i, readPage(s, 30+i, nil)})
	}
	for range same {
		readers = append(readers, reader{50, readPage(s, 50, nil)})
	}
	await(t, resolving, "every reader to fault")
	for _, r := range readers {
		got := await(t, r.ch, fmt.Sprintf("reader of page %d", r.page))
		if !bytes.Equal(got.data, pattern(r.page)) {
			t.Errorf("reader of page %d saw the wrong data", r.page)
		}
	}
	// The first placement on page 50 woke all its readers; the handler may
	// still be placing it again for the other faults.
	await(t, resolved, "the handler to place a page for every fault")
	u.Close()
	if err := await(t, handlerDone, "the handler to stop"); !errors.Is(err, ErrClosed) {
		t.Fatalf("handler: %v", err)
	}
	pages := map[uintptr]int{}
	for _, f := range handled {
		pages[f.Addr]++
	}
	if len(pages) != distinct+1 || pages[s.addr(50)] < same {
		t.Errorf("faults per page %v, want %d pages and %d faults on page 50", pages, distinct+1, same)
	}
	if exists < same-1 {
		t.Errorf("%d placements found the page present, want at least %d", exists, same-1)
	}
	t.Logf("%d fault events for %d readers on %d pages; %d placements found the page present",
		len(handled), distinct+same, len(pages), exists)
}

func TestCloseWakesReadFaults(t *testing.T) {
	u, _ := registered(t, 4)
	ch := readFaults(u)
	stillBlocked(t, ch)
	closed := make(chan error, 1)
	go func() { closed <- u.Close() }()
	if r := await(t, ch, "ReadFaults to return after Close"); !errors.Is(r.err, ErrClosed) {
		t.Fatalf("ReadFaults after Close: %v, want ErrClosed", r.err)
	}
	if err := await(t, closed, "Close to return"); err != nil {
		t.Fatal(err)
	}
	if _, err := u.ReadFaults(nil); !errors.Is(err, ErrClosed) {
		t.Errorf("ReadFaults on a closed FD: %v", err)
	}
	if err := u.Copy(0, pattern(0), true); !errors.Is(err, ErrClosed) {
		t.Errorf("Copy on a closed FD: %v", err)
	}
	if err := u.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestUnregister(t *testing.T) {
	u, s := registered(t, 64)
	// A thread already sleeping on a fault is woken by Unregister and reads
	// zeros.
	done := readPage(s, 4, nil)
	nextFault(t, u)
	stillBlocked(t, done)
	if err := u.Unregister(s.base, uint64(len(s.mem))); err != nil {
		t.Fatal(err)
	}
	if got := await(t, done, "the reader to be woken by Unregister"); !bytes.Equal(got.data, make([]byte, ps)) {
		t.Fatal("woken reader did not see zeros")
	}
	// Later accesses do not fault: no handler is running.
	for _, n := range []int{0, 17, 63} {
		if got := await(t, readPage(s, n, nil), "reading an unregistered page"); !bytes.Equal(got.data, make([]byte, ps)) {
			t.Fatalf("page %d not zero", n)
		}
	}
	if len(u.regions) != 0 {
		t.Errorf("regions left after Unregister: %+v", u.regions)
	}
	// Unregistering part of a range keeps the rest registered.
	if err := u.Register(s.addr(32), 8*pageSize); err != nil {
		t.Fatal(err)
	}
	if err := u.Unregister(s.addr(34), 2*pageSize); err != nil {
		t.Fatal(err)
	}
	if got := await(t, readPage(s, 35, nil), "reading an unregistered page"); got.data[0] != 0 {
		t.Fatal("page 35 not zero")
	}
	done = readPage(s, 38, nil)
	if f := nextFault(t, u); f.Addr != s.addr(38) {
		t.Fatalf("fault at %#x, want %#x", f.Addr, s.addr(38))
	}
	if err := u.Wake(s.addr(38), pageSize); err != nil {
		t.Fatal(err)
	}
	// Woken without a page, the reader faults again; resolve it properly.
	if f := nextFault(t, u); f.Addr != s.addr(38) {
		t.Fatalf("fault at %#x, want %#x", f.Addr, s.addr(38))
	}
	if err := u.Copy(s.addr(38), pattern(38), true); err != nil {
		t.Fatal(err)
	}
	if got := await(t, done, "the reader of page 38"); !bytes.Equal(got.data, pattern(38)) {
		t.Fatal("page 38 has the wrong data")
	}
	zp := u.zeroPageOffered(s.addr(32), pageSize)
	want := []region{{s.addr(32), s.addr(34), zp}, {s.addr(36), s.addr(40), zp}}
	if !slices.Equal(u.regions, want) {
		t.Errorf("regions %+v, want %+v", u.regions, want)
	}
}

// serve resolves every fault on s with the page's pattern, after the given
// delay, until u is closed, then reports ReadFaults' error (ErrClosed) or
// the first other failure.
func serve(u *FD, s *shmem, delay time.Duration) <-chan error {
	done := make(chan error, 1)
	go func() {
		buf := make([]Fault, 0, 16)
		for {
			var err error
			if buf, err = u.ReadFaults(buf[:0]); err != nil {
				done <- err
				return
			}
			for _, f := range buf {
				time.Sleep(delay)
				n := int((f.Addr - s.base) / uintptr(ps))
				if err := u.Copy(f.Addr, pattern(n), true); err != nil && !errors.Is(err, ErrExists) {
					done <- err
					return
				}
			}
		}
	}()
	return done
}

// TestPopulateDuringGC faults on registered memory the way Go code in the
// handling process should, through Populate, while garbage collections run
// continuously. The faulting goroutines sleep in madvise, so collections
// complete and the handler keeps running.
func TestPopulateDuringGC(t *testing.T) {
	u, s := registered(t, 64)
	// Slow enough that collections run while faults are pending.
	handler := serve(u, s, time.Millisecond)
	stop := make(chan struct{})
	gcs := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				gcs <- n
				return
			default:
				runtime.GC()
				n++
			}
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Go(func() {
			// Each goroutine populates 16 pages at once; the handler sees a
			// fault for each page in turn.
			start := g * 16
			errs <- Populate(s.addr(start), 16*pageSize, g%2 == 1)
		})
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	await(t, finished, "Populate to return while collecting garbage")
	close(stop)
	t.Logf("%d garbage collections while populating", <-gcs)
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	for n := range 64 {
		if !bytes.Equal(s.page(n), pattern(n)) {
			t.Fatalf("page %d has the wrong content", n)
		}
	}
	u.Close()
	if err := await(t, handler, "the handler to stop"); !errors.Is(err, ErrClosed) {
		t.Fatal(err)
	}
	if err := Populate(s.base+1, pageSize, false); err == nil {
		t.Error("Populate accepted an unaligned address")
	}
}

// BenchmarkFaultRoundTrip measures one missing-page fault resolved through
// the userfaultfd: a thread reads a missing page, the handler goroutine
// wakes in ReadFaults, places the page with Copy and the reader resumes.
// ns/op is the whole round trip as the faulting thread sees it, p50-ns and
// p99-ns its distribution. The faulting and the handling thread are left to
// the scheduler, pinned to one CPU, or pinned to two different CPUs: each
// round trip has two cross-thread wake-ups, whose cost depends mostly on
// whether they cross CPUs (an idle CPU must be woken, which is expensive
// in a virtual machine).
func BenchmarkFaultRoundTrip(b *testing.B) {
	b.Run("unpinned", func(b *testing.B) { benchRoundTrip(b, -1, -1) })
	b.Run("same-cpu", func(b *testing.B) { benchRoundTrip(b, 0, 0) })
	if runtime.NumCPU() >= 2 {
		b.Run("cross-cpu", func(b *testing.B) { benchRoundTrip(b, 0, 1) })
	}
}

// pinThread locks the calling goroutine to its thread and, if cpu >= 0,
// that thread to the CPU. The goroutine must exit without unlocking, so
// that the pinned thread exits too.
func pinThread(cpu int) error {
	runtime.LockOSThread()
	if cpu < 0 {
		return nil
	}
	var set unix.CPUSet
	set.Set(cpu)
	return unix.SchedSetaffinity(0, &set)
}

func benchRoundTrip(b *testing.B, readerCPU, handlerCPU int) {
	const pages = 4096
	u, s := registered(b, pages)
	src := pattern(1)
	handlerDone := make(chan error, 1)
	go func() {
		if err := pinThread(handlerCPU); err != nil {
			handlerDone <- err
			return
		}
		buf := make([]Fault, 0, 16)
		for {
			var err error
			if buf, err = u.ReadFaults(buf[:0]); err != nil {
				handlerDone <- err
				return
			}
			for _, f := range buf {
				if err := u.Copy(f.Addr, src, true); err != nil && !errors.Is(err, ErrExists) {
					handlerDone <- err
					return
				}
			}
		}
	}()
	lat := make([]time.Duration, 0, b.N)
	done := make(chan error)
	b.ResetTimer()
	go func() {
		if err := pinThread(readerCPU); err != nil {
			done <- err
			return
		}
		var sum byte
		for i := range b.N {
			n := i % pages
			if n == 0 && i > 0 {
				b.StopTimer()
				// Make every page missing again.
				if err := unix.Fallocate(s.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, int64(len(s.mem))); err != nil {
					done <- err
					return
				}
				b.StartTimer()
			}
			t0 := time.Now()
			sum += s.mem[n*ps+n%ps]
			lat = append(lat, time.Since(t0))
		}
		sink = sum
		done <- nil
	}()
	err := <-done
	b.StopTimer()
	u.Close()
	if err != nil {
		b.Fatal(err)
	}
	if err := <-handlerDone; !errors.Is(err, ErrClosed) {
		b.Fatal(err)
	}
	slices.Sort(lat)
	q := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Nanoseconds()) }
	b.ReportMetric(q(0.5), "p50-ns")
	b.ReportMetric(q(0.99), "p99-ns")
}

// BenchmarkFirstTouchNoUffd is the baseline for BenchmarkFaultRoundTrip: a
// first read of a shmem page with no userfaultfd (the kernel allocates a
// zero page itself).
func BenchmarkFirstTouchNoUffd(b *testing.B) {
	const pages = 4096
	s := newShmem(b, pages)
	var sum byte
	b.ResetTimer()
	for i := range b.N {
		n := i % pages
		if n == 0 && i > 0 {
			b.StopTimer()
			if err := unix.Fallocate(s.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, int64(len(s.mem))); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		sum += s.mem[n*ps]
	}
	sink = sum
}

var sink byte
