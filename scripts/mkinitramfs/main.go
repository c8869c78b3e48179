// Command mkinitramfs writes a gzip-compressed cpio archive in the "newc"
// format that the Linux kernel unpacks as its initramfs.
//
// The archive is described by a spec in the format of the kernel's
// usr/gen_init_cpio, one entry a line ('#' starts a comment):
//
//	dir   <name> <mode> <uid> <gid>
//	file  <name> <source> <mode> <uid> <gid>
//	slink <name> <target> <mode> <uid> <gid>
//	nod   <name> <mode> <uid> <gid> <c|b> <major> <minor>
//
// Modes are octal permission bits. Device nodes are written as archive
// entries, so building an archive with /dev/console in it needs no
// privileges; the kernel creates the node when it unpacks the archive.
// Parent directories that the spec does not list are added with mode
// 0755. Every timestamp is the same fixed value (-mtime, by default
// $SOURCE_DATE_EPOCH or 0), so the same inputs give the same bytes.
//
// Usage:
//
//	mkinitramfs -o initrd.cpio.gz spec|-
package main

import (
	"bufio"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
)

// File type bits of the cpio mode field (the same values as in stat(2)).
const (
	modeDir  = 0o040000
	modeReg  = 0o100000
	modeLink = 0o120000
	modeChr  = 0o020000
	modeBlk  = 0o060000
)

type entry struct {
	name         string // without a leading slash
	mode         uint32 // type bits | permission bits
	uid, gid     uint32
	data         []byte // file contents or link target
	major, minor uint32 // device number, for nod entries
}

func main() {
	out := flag.String("o", "initrd.cpio.gz", "output file")
	defMtime := int64(0)
	if s := os.Getenv("SOURCE_DATE_EPOCH"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			fatalf("SOURCE_DATE_EPOCH=%q: %v", s, err)
		}
		defMtime = v
	}
	mtime := flag.Int64("mtime", defMtime, "modification time stored for every entry (seconds since the epoch)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [-o out.cpio.gz] [-mtime N] spec|-\n", filepath.Base(os.Args[0]))
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	if *mtime < 0 || *mtime > 0xffffffff {
		fatalf("-mtime %d does not fit the archive's 32-bit field", *mtime)
	}

	var spec io.Reader = os.Stdin
	specName := "<stdin>"
	if a := flag.Arg(0); a != "-" {
		f, err := os.Open(a)
		if err != nil {
			fatalf("%v", err)
		}
		defer f.Close()
		spec, specName = f, a
	}
	entries, err := parseSpec(spec, specName)
	if err != nil {
		fatalf("%v", err)
	}
	entries = addParents(entries)
	if err := writeArchive(*out, entries, uint32(*mtime)); err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "mkinitramfs: "+format+"\n", args...)
	os.Exit(1)
}

func parseSpec(r io.Reader, specName string) ([]entry, error) {
	var entries []entry
	seen := map[string]bool{}
	sc := bufio.NewScanner(r)
	for lineNo := 1; sc.Scan(); lineNo++ {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		e, err := parseLine(fields)
		if err != nil {
			return nil, fmt.Errorf("%s:%d: %v", specName, lineNo, err)
		}
		if seen[e.name] {
			return nil, fmt.Errorf("%s:%d: %q is listed twice", specName, lineNo, "/"+e.name)
		}
		seen[e.name] = true
		entries = append(entries, e)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return entries, nil
}

func parseLine(f []string) (entry, error) {
	want := map[string]int{"dir": 5, "file": 6, "slink": 6, "nod": 8}
	n, ok := want[f[0]]
	if !ok {
		return entry{}, fmt.Errorf("unknown entry type %q", f[0])
	}
	if len(f) != n {
		return entry{}, fmt.Errorf("%s takes %d fields, got %d", f[0], n-1, len(f)-1)
	}
	var e entry
	name := path.Clean("/" + f[1])
	if name == "/" {
		return e, errors.New("the root directory cannot be an entry")
	}
	e.name = name[1:]

	// Mode, uid and gid follow the name, or the name and a source/target.
	rest := f[2:]
	if f[0] == "file" || f[0] == "slink" {
		rest = f[3:]
	}
	perm, err := strconv.ParseUint(rest[0], 8, 32)
	if err != nil || perm > 0o7777 {
		return e, fmt.Errorf("bad mode %q", rest[0])
	}
	uid, err := strconv.ParseUint(rest[1], 10, 32)
	if err != nil {
		return e, fmt.Errorf("bad uid %q", rest[1])
	}
	gid, err := strconv.ParseUint(rest[2], 10, 32)
	if err != nil {
		return e, fmt.Errorf("bad gid %q", rest[2])
	}
	e.mode, e.uid, e.gid = uint32(perm), uint32(uid), uint32(gid)

	switch f[0] {
	case "dir":
		e.mode |= modeDir
	case "file":
		st, err := os.Stat(f[2])
		if err != nil {
			return e, err
		}
		if !st.Mode().IsRegular() {
			return e, fmt.Errorf("%s is not a regular file", f[2])
		}
		if e.data, err = os.ReadFile(f[2]); err != nil {
			return e, err
		}
		e.mode |= modeReg
	case "slink":
		e.data = []byte(f[2])
		e.mode |= modeLink
	case "nod":
		switch rest[3] {
		case "c":
			e.mode |= modeChr
		case "b":
			e.mode |= modeBlk
		default:
			return e, fmt.Errorf("device type %q is neither c nor b", rest[3])
		}
		major, err := strconv.ParseUint(rest[4], 10, 32)
		if err != nil {
			return e, fmt.Errorf("bad major %q", rest[4])
		}
		minor, err := strconv.ParseUint(rest[5], 10, 32)
		if err != nil {
			return e, fmt.Errorf("bad minor %q", rest[5])
		}
		e.major, e.minor = uint32(major), uint32(minor)
	}
	return e, nil
}

// addParents makes every directory come before the entries inside it,
// since the kernel does not create missing parents when it unpacks an
// archive. A directory listed later in the spec is moved forward, with
// the mode the spec gives it; one not listed at all is added with 0755.
func addParents(entries []entry) []entry {
	dirs := map[string]entry{}
	for _, e := range entries {
		if e.mode&0o170000 == modeDir {
			dirs[e.name] = e
		}
	}
	var out []entry
	done := map[string]bool{}
	for _, e := range entries {
		var parents []string
		for d := path.Dir(e.name); d != "."; d = path.Dir(d) {
			parents = append(parents, d)
		}
		for i := len(parents) - 1; i >= 0; i-- {
			d := parents[i]
			if done[d] {
				continue
			}
			p, ok := dirs[d]
			if !ok {
				p = entry{name: d, mode: modeDir | 0o755}
			}
			out = append(out, p)
			done[d] = true
		}
		if done[e.name] {
			continue // a directory already moved forward
		}
		out = append(out, e)
		done[e.name] = true
	}
	return out
}

func writeArchive(out string, entries []entry, mtime uint32) error {
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename

	bw := bufio.NewWriter(tmp)
	zw, err := gzip.NewWriterLevel(bw, gzip.BestCompression)
	if err != nil {
		return err
	}
	cw := &cpioWriter{w: zw, mtime: mtime}
	for _, e := range entries {
		cw.add(e)
	}
	cw.trailer()
	if cw.err != nil {
		tmp.Close()
		return cw.err
	}
	if err := zw.Close(); err != nil {
		tmp.Close()
		return err
	}
	if err := bw.Flush(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), out)
}

// cpioWriter writes newc ("070701") records: a 110-byte ASCII header of
// the magic and thirteen 8-digit hex fields, the NUL-terminated name, and
// the data, with the name and the data each padded to a multiple of four
// bytes from the start of the archive.
type cpioWriter struct {
	w     io.Writer
	off   int64
	ino   uint32
	mtime uint32
	err   error
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil {
		return
	}
	n, err := c.w.Write(b)
	c.off += int64(n)
	c.err = err
}

func (c *cpioWriter) pad() {
	if r := c.off % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) record(ino uint32, name string, mode, uid, gid, nlink, mtime uint32, data []byte, major, minor uint32) {
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

func (c *cpioWriter) add(e entry) {
	nlink := uint32(1)
	if e.mode&0o170000 == modeDir {
		nlink = 2
	}
	c.ino++
	c.record(c.ino, e.name, e.mode, e.uid, e.gid, nlink, c.mtime, e.data, e.major, e.minor)
}

func (c *cpioWriter) trailer() {
	c.record(0, "TRAILER!!!", 0, 0, 0, 1, 0, nil, 0, 0)
}
