// Package daemon is ferry's host daemon: one per host. It runs each VM in
// its own VMM child process, keeps the inventory, serves the local CLI on a
// unix socket and other daemons on TCP with mutually authenticated TLS 1.3
// (internal/trust), and orchestrates migrations between hosts: it asks the
// destination daemon for an incoming VMM process and tells the source VMM
// process to send its VM there. The API is JSON lines (docs/daemon-api.md).
//
// It sits at the top of the stack below the CLI: it may use control,
// migration and trust, and must not be imported by any of them.
package daemon

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/ferry-vmm/ferry/internal/migration"
	"github.com/ferry-vmm/ferry/internal/trust"
)

// Request is one API call, from the CLI (unix socket) or a peer daemon (TLS).
type Request struct {
	Op string `json:"op"`
	// VM selection and creation (run).
	Name    string `json:"name,omitempty"`
	Guest   string `json:"guest,omitempty"`
	Kernel  string `json:"kernel,omitempty"`
	Initrd  string `json:"initrd,omitempty"`
	Cmdline string `json:"cmdline,omitempty"`
	Mem     string `json:"mem,omitempty"`
	CPUs    int    `json:"cpus,omitempty"`
	RNG     bool   `json:"rng,omitempty"` // a virtio entropy device
	// Migration: the destination daemon and the settings (set uses
	// Bandwidth alone).
	To string `json:"to,omitempty"`
	migration.Params
	// Trust pool.
	Addr        string `json:"addr,omitempty"`
	Fingerprint string `json:"fingerprint,omitempty"`
	// Console.
	Follow bool   `json:"follow,omitempty"`
	Input  []byte `json:"input,omitempty"`
	// Migration arbitration (commit from a local VMM, resolve from a peer).
	ID string `json:"id,omitempty"`
	// probe from a peer: how many bytes to send back.
	ProbeBytes int64 `json:"probe_bytes,omitempty"`
	// vm-status from a peer: the window for the workload rate.
	WindowFrom int64 `json:"window_from,omitempty"`
	WindowTo   int64 `json:"window_to,omitempty"`
}

// VMInfo describes one VM in the inventory.
type VMInfo struct {
	Name    string    `json:"name"`
	State   string    `json:"state"` // starting, running, incoming, migrating, exited
	PID     int       `json:"pid"`
	Mem     string    `json:"mem,omitempty"`
	CPUs    int       `json:"cpus,omitempty"`
	Started time.Time `json:"started"`
	Exit    string    `json:"exit,omitempty"`
}

// Identity is a daemon's host identity.
type Identity struct {
	Name        string `json:"name"`
	Fingerprint string `json:"fingerprint"`
	Listen      string `json:"listen"`
}

// Response answers a Request. Streams (migrate, console) send several
// lines; all but the last carry Progress or Console.
type Response struct {
	OK        bool                `json:"ok"`
	Error     string              `json:"error,omitempty"`
	VMs       []VMInfo            `json:"vms,omitempty"`
	VM        *VMInfo             `json:"vm,omitempty"`
	Nodes     []trust.Entry       `json:"nodes,omitempty"`
	Identity  *Identity           `json:"identity,omitempty"`
	Progress  *migration.Progress `json:"progress,omitempty"`
	Migration *migration.Report   `json:"migration,omitempty"`
	Console   string              `json:"console,omitempty"`
	Addr      string              `json:"addr,omitempty"`
	Running   bool                `json:"running,omitempty"`
	More      bool                `json:"more,omitempty"` // a stream line; another follows
	Beat      int64               `json:"first_beat_unix_nano,omitempty"`
	WorkRate  float64             `json:"work_rate,omitempty"` // vm-status with a window
	// Prediction answers a migrate with dry_run.
	Prediction *migration.Prediction `json:"prediction,omitempty"`
	// ProbeBytes: raw bytes that follow this line (peer op probe).
	ProbeBytes int64 `json:"probe_bytes,omitempty"`
}

// Call sends req on conn and reads the answer; stream lines go to each.
func Call(conn net.Conn, req Request, each func(Response)) (*Response, error) {
	b, _ := json.Marshal(req)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("sending %s: %w", req.Op, err)
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil, fmt.Errorf("%s: the daemon closed the connection without an answer", req.Op)
			}
			return nil, fmt.Errorf("%s: %w", req.Op, err)
		}
		var resp Response
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("%s: malformed answer: %w", req.Op, err)
		}
		if resp.More {
			if each != nil {
				each(resp)
			}
			continue
		}
		if !resp.OK {
			return &resp, errors.New(resp.Error)
		}
		return &resp, nil
	}
}

// Dial connects to a daemon's unix API socket.
func Dial(socket string) (net.Conn, error) {
	c, err := net.DialTimeout("unix", socket, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("no ferry daemon answers on %s (start one with `ferry daemon`): %w", socket, err)
	}
	return c, nil
}
