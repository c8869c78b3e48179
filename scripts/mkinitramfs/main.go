// Command mkinitramfs writes a cpio archive in the "newc" format that the
// Linux kernel unpacks as its initramfs (internal/cpio), gzip-compressed
// when the output name ends in .gz and plain otherwise (a plain archive
// unpacks faster where the kernel itself is emulated, as in the lab).
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
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/ferry-vmm/ferry/internal/cpio"
)

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
	entries = cpio.WithParents(entries)
	if err := writeArchive(*out, entries, uint32(*mtime)); err != nil {
		fatalf("%v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "mkinitramfs: "+format+"\n", args...)
	os.Exit(1)
}

func parseSpec(r io.Reader, specName string) ([]cpio.Entry, error) {
	var entries []cpio.Entry
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
		if seen[e.Name] {
			return nil, fmt.Errorf("%s:%d: %q is listed twice", specName, lineNo, "/"+e.Name)
		}
		seen[e.Name] = true
		entries = append(entries, e)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return entries, nil
}

func parseLine(f []string) (cpio.Entry, error) {
	want := map[string]int{"dir": 5, "file": 6, "slink": 6, "nod": 8}
	n, ok := want[f[0]]
	if !ok {
		return cpio.Entry{}, fmt.Errorf("unknown entry type %q", f[0])
	}
	if len(f) != n {
		return cpio.Entry{}, fmt.Errorf("%s takes %d fields, got %d", f[0], n-1, len(f)-1)
	}
	var e cpio.Entry
	name, err := cpio.Clean(f[1])
	if err != nil {
		return e, err
	}
	e.Name = name

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
	e.Mode, e.UID, e.GID = uint32(perm), uint32(uid), uint32(gid)

	switch f[0] {
	case "dir":
		e.Mode |= cpio.ModeDir
	case "file":
		st, err := os.Stat(f[2])
		if err != nil {
			return e, err
		}
		if !st.Mode().IsRegular() {
			return e, fmt.Errorf("%s is not a regular file", f[2])
		}
		if e.Data, err = os.ReadFile(f[2]); err != nil {
			return e, err
		}
		e.Mode |= cpio.ModeReg
	case "slink":
		e.Data = []byte(f[2])
		e.Mode |= cpio.ModeLink
	case "nod":
		switch rest[3] {
		case "c":
			e.Mode |= cpio.ModeChr
		case "b":
			e.Mode |= cpio.ModeBlk
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
		e.Major, e.Minor = uint32(major), uint32(minor)
	}
	return e, nil
}

func writeArchive(out string, entries []cpio.Entry, mtime uint32) error {
	tmp, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename

	bw := bufio.NewWriter(tmp)
	var w io.Writer = bw
	var zw *gzip.Writer
	if strings.HasSuffix(out, ".gz") {
		if zw, err = gzip.NewWriterLevel(bw, gzip.BestCompression); err != nil {
			tmp.Close()
			return err
		}
		w = zw
	}
	if err := cpio.Write(w, entries, mtime); err != nil {
		tmp.Close()
		return err
	}
	if zw != nil {
		if err := zw.Close(); err != nil {
			tmp.Close()
			return err
		}
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
