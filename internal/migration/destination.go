package migration

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/ferry-vmm/ferry/internal/state"
	"github.com/ferry-vmm/ferry/internal/version"
	"github.com/ferry-vmm/ferry/internal/vmm"
	"github.com/ferry-vmm/ferry/internal/wire"
)

// Destination receives a VM.
type Destination struct {
	// Config gives the console and logger of the VM to be built; memory
	// size and vCPUs come from the source.
	Config vmm.Config
	// Admit, if set, may refuse a migration after seeing its Hello (a VM
	// of that name exists, the host is full ...).
	Admit func(h *wire.Hello) error
	// Commit, if set, is called after the state is restored and before the
	// guest starts: it is the point of no return, where the destination's
	// host records that it runs the guest (the source's Resolve asks
	// there). An error stops the migration with the guest never run here.
	Commit func(id string) error
	Log    *slog.Logger

	// onRestored sees the VM after its state is applied, before it runs (tests).
	onRestored func(*vmm.VM)
}

// DestReport is the destination's view.
type DestReport struct {
	ID           string        `json:"id"`
	VM           string        `json:"vm"`
	Mode         string        `json:"mode"`
	PagesLoaded  uint64        `json:"pages_loaded"`
	BytesRecv    uint64        `json:"bytes_received"`
	RestoreTime  time.Duration `json:"restore_time_ns"`
	TotalTime    time.Duration `json:"total_time_ns"`
	Iterations   int           `json:"iterations"`
	RestoreNotes []string      `json:"restore_warnings,omitempty"`
}

// Run receives a migration on rw. On success it returns the VM, already
// running. On failure nothing runs and the partly received VM is gone.
func (d *Destination) Run(ctx context.Context, rw io.ReadWriter) (*vmm.VM, *DestReport, error) {
	if d.Log == nil {
		d.Log = slog.New(slog.DiscardHandler)
	}
	conn := wire.NewConn(rw)
	start := time.Now()
	rep := &DestReport{}
	// Reads block; a cancelled context must still end the wait.
	stop := context.AfterFunc(ctx, func() {
		if c, ok := rw.(interface{ SetReadDeadline(time.Time) error }); ok {
			c.SetReadDeadline(time.Unix(1, 0))
		}
	})
	defer stop()
	vm, err := d.receive(ctx, conn, rep)
	rep.BytesRecv = conn.BytesReceived()
	rep.TotalTime = time.Since(start)
	if err != nil {
		if vm != nil {
			vm.Close()
		}
		// Tell the source, if it still listens, why.
		var pe peerErr
		if !errors.As(err, &pe) {
			conn.WriteMsg(&wire.Error{Code: wire.ErrorInternal, Message: err.Error()})
		}
		return nil, rep, err
	}
	return vm, rep, nil
}

// peerErr marks errors that came from the source (no need to echo them).
type peerErr struct{ error }

func (d *Destination) receive(ctx context.Context, conn *wire.Conn, rep *DestReport) (*vmm.VM, error) {
	msg, err := conn.ReadMsg()
	if err != nil {
		return nil, fmt.Errorf("waiting for the source's hello: %w", err)
	}
	hello, ok := msg.(*wire.Hello)
	if !ok {
		return nil, fmt.Errorf("source opened with %T instead of hello", msg)
	}
	rep.ID, rep.VM, rep.Mode = hex.EncodeToString(hello.MigrationID[:]), hello.VMName, hello.Mode
	refuse := func(code wire.RefuseCode, err error) (*vmm.VM, error) {
		conn.WriteMsg(&wire.Refuse{Code: code, Reason: err.Error()})
		return nil, peerErr{fmt.Errorf("refused migration of %q: %w", hello.VMName, err)}
	}
	welcome, refusal := wire.Negotiate(hello, version.Version)
	if refusal != nil {
		conn.WriteMsg(refusal)
		return nil, peerErr{fmt.Errorf("refused migration of %q: %s", hello.VMName, refusal.Reason)}
	}
	if hello.Mode != string(ModePreCopy) && hello.Mode != string(ModeStopCopy) {
		return refuse(wire.RefuseOptions, fmt.Errorf("mode %q is not supported here", hello.Mode))
	}
	if d.Admit != nil {
		if err := d.Admit(hello); err != nil {
			return refuse(wire.RefuseBusy, err)
		}
	}
	vm, err := vmm.NewForRestore(hello.Header, d.Config)
	if err != nil {
		return refuse(wire.RefuseLayout, err)
	}
	if err := vm.CheckGuestCPUID(hello.CPUID); err != nil {
		vm.Close()
		return refuse(wire.RefuseCPU, err)
	}
	if err := conn.WriteMsg(welcome); err != nil {
		return vm, fmt.Errorf("answering the source: %w", err)
	}
	mem := vm.Memory()
	var machine *state.Machine
	for {
		if err := ctx.Err(); err != nil {
			return vm, err
		}
		msg, err := conn.ReadMsg()
		if err != nil {
			var fe *wire.FrameError
			if errors.As(err, &fe) && !fe.Truncated && fe.Err == nil { // bad bytes, not a broken stream
				return vm, fmt.Errorf("corrupt data from the source: %w", err)
			}
			return vm, fmt.Errorf("connection from the source lost: %w", err)
		}
		switch m := msg.(type) {
		case *wire.Pages:
			n, err := m.Decode(hello.Header, func(gpa uint64, data []byte) error {
				dst, err := mem.Slice(gpa, uint64(len(data)))
				if err != nil {
					return err
				}
				copy(dst, data)
				return nil
			})
			if err != nil {
				return vm, fmt.Errorf("bad pages from the source (iteration %d): %w", m.Iteration, err)
			}
			rep.PagesLoaded += uint64(n)
		case *wire.IterationDone:
			rep.Iterations = int(m.Iteration) + 1
			if err := conn.WriteMsg(&wire.IterationAck{Iteration: m.Iteration, PagesReceived: rep.PagesLoaded}); err != nil {
				return vm, fmt.Errorf("acknowledging iteration %d: %w", m.Iteration, err)
			}
		case *wire.MachineState:
			mach, warnings, err := m.Decode(hello.Header)
			if err != nil {
				return vm, fmt.Errorf("bad machine state from the source: %w", err)
			}
			machine = mach
			rep.RestoreNotes = append(rep.RestoreNotes, warnings...)
		case *wire.Complete:
			if machine == nil {
				return vm, errors.New("source completed without sending the machine state")
			}
			if m.Pages != rep.PagesLoaded {
				return vm, fmt.Errorf("source sent %d pages, %d arrived", m.Pages, rep.PagesLoaded)
			}
			return d.finish(conn, vm, machine, rep)
		case *wire.Cancel:
			return vm, peerErr{fmt.Errorf("source cancelled the migration: %s", m.Reason)}
		case *wire.Error:
			return vm, peerErr{fmt.Errorf("source failed (%s): %s", m.Code, m.Message)}
		default:
			return vm, fmt.Errorf("unexpected %T from the source", msg)
		}
	}
}

// finish restores the state, passes the point of no return, starts the
// guest and confirms to the source.
func (d *Destination) finish(conn *wire.Conn, vm *vmm.VM, m *state.Machine, rep *DestReport) (*vmm.VM, error) {
	t := time.Now()
	if err := vm.Restore(m); err != nil {
		return vm, err
	}
	rep.RestoreNotes = append(rep.RestoreNotes, vm.RestoreWarnings()...)
	if d.onRestored != nil {
		d.onRestored(vm)
	}
	if d.Commit != nil {
		if err := d.Commit(rep.ID); err != nil {
			return vm, fmt.Errorf("commit refused: %w", err)
		}
	}
	if err := vm.Start(); err != nil {
		return vm, err
	}
	rep.RestoreTime = time.Since(t)
	// From here the guest runs here whatever happens to the connection: the
	// source learns it from this message or, if it is lost, by asking.
	if err := conn.WriteMsg(&wire.Resumed{UnixNano: time.Now().UnixNano(), RestoreTime: rep.RestoreTime}); err != nil {
		d.Log.Warn("guest runs here but the source did not get the confirmation", "err", err)
	}
	return vm, nil
}
