// Package snapshot saves a running VM to a state file and brings one back:
// pause at a consistent point, capture the machine state, stream it and the
// guest's memory through the internal/state encoding, then resume or stop;
// and the reverse. This is also off-line migration (save, transfer,
// restore): the reports give Δs and Δr of Δm = Δs + Δt + Δr.
//
// It drives internal/vmm and internal/state and owns nothing else; it must
// not know about control sockets, daemons or the CLI.
package snapshot

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/vmm"
)

// SaveOptions choose how a VM is saved.
type SaveOptions struct {
	Compress bool // zstd-compress memory chunks
	Resume   bool // resume the guest afterwards instead of stopping it
}

// SaveReport says what a save did.
type SaveReport struct {
	Path          string        `json:"path"`
	Paused        time.Duration `json:"paused_ns"` // the guest's downtime
	Total         time.Duration `json:"total_ns"`
	BytesWritten  uint64        `json:"bytes_written"`
	PagesWritten  uint64        `json:"pages_written"`
	PagesSkipped  uint64        `json:"pages_skipped"` // zero pages elided
	Compressed    bool          `json:"compressed"`
	Resumed       bool          `json:"resumed"`
	VCPUs         int           `json:"vcpus"`
	MemoryBytes   uint64        `json:"memory_bytes"`
	StateChecksum string        `json:"-"`
}

// countingWriter counts bytes on their way to the file.
type countingWriter struct {
	w io.Writer
	n uint64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += uint64(n)
	return n, err
}

// SaveFile saves vm to path. On failure the VM is resumed (nothing is lost)
// and the partial file removed.
func SaveFile(vm *vmm.VM, path string, opts SaveOptions) (SaveReport, error) {
	tmp := path + ".partial"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return SaveReport{}, fmt.Errorf("save: %w", err)
	}
	rep, err := Save(vm, f, opts)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("save: closing %s: %w", tmp, cerr)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return rep, err
	}
	rep.Path = path
	return rep, nil
}

// Save pauses vm, writes its state and memory to w, and resumes or stops
// it. If writing fails the guest is resumed whatever opts.Resume says.
func Save(vm *vmm.VM, w io.Writer, opts SaveOptions) (SaveReport, error) {
	start := time.Now()
	rep := SaveReport{Compressed: opts.Compress, VCPUs: vm.NumCPUs(), MemoryBytes: vm.Memory().Size()}
	if err := vm.Pause(); err != nil {
		return rep, fmt.Errorf("save: %w", err)
	}
	pausedAt := time.Now()
	err := write(vm, w, opts, &rep)
	rep.Paused = time.Since(pausedAt)
	if err != nil || opts.Resume {
		vm.Resume()
		rep.Resumed = true
	} else {
		vm.Stop()
	}
	rep.Total = time.Since(start)
	if err != nil {
		return rep, fmt.Errorf("save (guest resumed): %w", err)
	}
	return rep, nil
}

func write(vm *vmm.VM, w io.Writer, opts SaveOptions, rep *SaveReport) error {
	m, err := vm.Capture()
	if err != nil {
		return err
	}
	cw := &countingWriter{w: w}
	bw := bufio.NewWriterSize(cw, 1<<20)
	sw, err := state.NewWriter(bw, m.Header, state.WriterOptions{Compress: opts.Compress})
	if err != nil {
		return err
	}
	if err := sw.WriteMachine(m); err != nil {
		return err
	}
	mem := vm.Memory()
	stats, err := sw.WriteMemory(mem.Bytes(), mem.Regions())
	if err != nil {
		return err
	}
	if err := sw.Close(); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	rep.PagesWritten, rep.PagesSkipped = stats.Pages, stats.ZeroPages
	rep.BytesWritten = cw.n
	return nil
}

// RestoreReport says what a restore did.
type RestoreReport struct {
	Path         string        `json:"path"`
	Duration     time.Duration `json:"duration_ns"` // until the VM is ready to run (Δr)
	PagesLoaded  uint64        `json:"pages_loaded"`
	VCPUs        int           `json:"vcpus"`
	MemoryBytes  uint64        `json:"memory_bytes"`
	Warnings     []string      `json:"warnings,omitempty"`
	MemorySHA256 string        `json:"memory_sha256"`
}

// RestoreFile reads a state file and builds a VM from it, ready to Start.
// cfg supplies the console and logger; memory size and vCPUs come from the
// file. Nothing runs if any section is missing, corrupt or incompatible.
func RestoreFile(path string, cfg vmm.Config) (*vmm.VM, RestoreReport, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, RestoreReport{}, fmt.Errorf("restore: %w", err)
	}
	defer f.Close()
	vm, rep, err := restore(bufio.NewReaderSize(f, 1<<20), cfg, state.ReaderOptions{RequireEOF: true})
	rep.Path = path
	return vm, rep, err
}

// Restore is RestoreFile on a stream (which may go on after the state).
func Restore(r io.Reader, cfg vmm.Config) (*vmm.VM, RestoreReport, error) {
	return restore(r, cfg, state.ReaderOptions{})
}

func restore(r io.Reader, cfg vmm.Config, opts state.ReaderOptions) (*vmm.VM, RestoreReport, error) {
	start := time.Now()
	var rep RestoreReport
	sr, err := state.NewReader(r, opts)
	if err != nil {
		return nil, rep, fmt.Errorf("restore: %w", err)
	}
	vm, err := vmm.NewForRestore(sr.Header(), cfg)
	if err != nil {
		return nil, rep, fmt.Errorf("restore: %w", err)
	}
	mem := vm.Memory()
	var m state.Machine
	warnings, err := sr.ReadAll(&m, func(gpa uint64, data []byte) error {
		rep.PagesLoaded++
		dst, err := mem.Slice(gpa, uint64(len(data)))
		if err != nil {
			return fmt.Errorf("page at %#x: %w", gpa, err)
		}
		copy(dst, data)
		return nil
	})
	if err != nil {
		vm.Close()
		return nil, rep, fmt.Errorf("restore: %w", err)
	}
	if err := vm.Restore(&m); err != nil { // its errors say "restore: ..."
		vm.Close()
		return nil, rep, err
	}
	rep.Warnings = append(warnings, vm.RestoreWarnings()...)
	rep.VCPUs = vm.NumCPUs()
	rep.MemoryBytes = mem.Size()
	rep.Duration = time.Since(start)
	if s, ok := sr.MemorySummary(); ok {
		rep.MemorySHA256 = fmt.Sprintf("%x", s.SHA256)
	}
	return vm, rep, nil
}
