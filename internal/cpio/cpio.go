// Package cpio writes cpio archives in the "newc" format that the Linux
// kernel unpacks as its initramfs. It owns the record layout and the order
// of entries (every directory before what it holds); it reads no files and
// knows nothing of what an archive is for.
//
// A newc record is a 110-byte ASCII header, the NUL-terminated name padded
// to four bytes, and the data padded to four bytes:
//
//	"070701" ino mode uid gid nlink mtime filesize devmajor devminor
//	         rdevmajor rdevminor namesize check      (13 × 8 hex digits)
//	name\0 [pad] data [pad]
//	... "TRAILER!!!" record last
//
// The kernel accepts several archives one after another as one initramfs,
// later entries replacing earlier ones of the same name; the lab builds a
// host's initrd that way (a cached base, then a per-run payload).
package cpio

import (
	"errors"
	"fmt"
	"io"
	"path"
)

// File type bits of the mode field (the same values as in stat(2)).
const (
	ModeDir  = 0o040000
	ModeReg  = 0o100000
	ModeLink = 0o120000
	ModeChr  = 0o020000
	ModeBlk  = 0o060000
	typeMask = 0o170000
)

// Entry is one archive member.
type Entry struct {
	Name         string // path inside the archive; a leading slash is dropped
	Mode         uint32 // type bits | permission bits
	UID, GID     uint32
	Data         []byte // file contents or link target
	Major, Minor uint32 // device number, for device nodes
}

// IsDir reports whether e is a directory.
func (e Entry) IsDir() bool { return e.Mode&typeMask == ModeDir }

// Clean returns name as an archive path (no leading slash, cleaned), or an
// error for the root itself.
func Clean(name string) (string, error) {
	n := path.Clean("/" + name)
	if n == "/" {
		return "", errors.New("the root directory cannot be an entry")
	}
	return n[1:], nil
}

// WithParents returns entries with every directory placed before the
// entries inside it, since the kernel does not create missing parents when
// it unpacks an archive. A directory listed later is moved forward with
// the mode it is listed with; one not listed at all is added with 0755.
func WithParents(entries []Entry) []Entry {
	dirs := map[string]Entry{}
	for _, e := range entries {
		if e.IsDir() {
			dirs[e.Name] = e
		}
	}
	var out []Entry
	done := map[string]bool{}
	for _, e := range entries {
		var parents []string
		for d := path.Dir(e.Name); d != "." && d != "/"; d = path.Dir(d) {
			parents = append(parents, d)
		}
		for i := len(parents) - 1; i >= 0; i-- {
			d := parents[i]
			if done[d] {
				continue
			}
			p, ok := dirs[d]
			if !ok {
				p = Entry{Name: d, Mode: ModeDir | 0o755}
			}
			out = append(out, p)
			done[d] = true
		}
		if done[e.Name] {
			continue // a directory already moved forward
		}
		out = append(out, e)
		done[e.Name] = true
	}
	return out
}

// Write writes entries (in the order given: see WithParents) and the
// trailer to w, every record with modification time mtime.
func Write(w io.Writer, entries []Entry, mtime uint32) error {
	c := &writer{w: w, mtime: mtime}
	for _, e := range entries {
		if e.Name == "" || len(e.Name) > 4095 {
			return fmt.Errorf("cpio: bad entry name %q", e.Name)
		}
		if uint64(len(e.Data)) > 0xffffffff {
			return fmt.Errorf("cpio: %s: %d bytes do not fit the 32-bit size field", e.Name, len(e.Data))
		}
		c.add(e)
	}
	c.record(0, "TRAILER!!!", 0, 0, 0, 1, 0, nil, 0, 0)
	return c.err
}

type writer struct {
	w     io.Writer
	off   int64
	ino   uint32
	mtime uint32
	err   error
}

func (c *writer) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.off += int64(n)
	c.err = err
}

func (c *writer) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *writer) record(ino uint32, name string, mode, uid, gid, nlink, mtime uint32, data []byte, major, minor uint32) {
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		ino, mode, uid, gid, nlink, mtime, uint32(len(data)),
		0, 0, // major and minor of the device holding the file
		major, minor, // the device a node stands for
		uint32(len(name)+1), 0) // name size with its NUL, checksum (unused)
	c.write([]byte(hdr))
	c.write(append([]byte(name), 0))
	c.pad()
	c.write(data)
	c.pad()
}

func (c *writer) add(e Entry) {
	nlink := uint32(1)
	if e.IsDir() {
		nlink = 2
	}
	c.ino++
	c.record(c.ino, e.Name, e.Mode, e.UID, e.GID, nlink, c.mtime, e.Data, e.Major, e.Minor)
}
