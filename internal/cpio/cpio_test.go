package cpio

import (
	"bytes"
	"strconv"
	"testing"
)

// parse reads newc records back: name → entry, in order.
func parse(t *testing.T, b []byte) []Entry {
	t.Helper()
	var out []Entry
	off := 0
	field := func(i int) uint32 {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
		if err != nil {
			t.Fatalf("header field %d at %d: %v", i, off, err)
		}
		return uint32(v)
	}
	for {
		if string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d", off)
		}
		mode, size, nameSize, major, minor := field(1), field(6), field(11), field(9), field(10)
		name := string(b[off+110 : off+110+int(nameSize)-1])
		p := off + 110 + int(nameSize)
		p = (p + 3) &^ 3
		data := b[p : p+int(size)]
		off = (p + int(size) + 3) &^ 3
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out = append(out, Entry{Name: name, Mode: mode, Data: data, Major: major, Minor: minor})
	}
}

func TestWriteReadBack(t *testing.T) {
	in := []Entry{
		{Name: "bin/sh", Mode: ModeLink | 0o777, Data: []byte("busybox")},
		{Name: "a/b/c", Mode: ModeReg | 0o644, Data: []byte("hello, initramfs")},
		{Name: "dev/console", Mode: ModeChr | 0o600, Major: 5, Minor: 1},
		{Name: "a", Mode: ModeDir | 0o700},
	}
	var b bytes.Buffer
	if err := Write(&b, WithParents(in), 0); err != nil {
		t.Fatal(err)
	}
	if b.Len()%4 != 0 {
		t.Fatalf("archive of %d bytes: not a multiple of 4, a second archive could not follow", b.Len())
	}
	got := parse(t, b.Bytes())
	var names []string
	for _, e := range got {
		names = append(names, e.Name)
	}
	want := []string{"bin", "bin/sh", "a", "a/b", "a/b/c", "dev", "dev/console"}
	if len(names) != len(want) {
		t.Fatalf("entries %v, want %v", names, want)
	}
	for i := range want {
		if names[i] != want[i] {
			t.Fatalf("entries %v, want %v", names, want)
		}
	}
	if got[2].Mode != ModeDir|0o700 {
		t.Errorf("listed directory moved forward lost its mode: %o", got[2].Mode)
	}
	if string(got[4].Data) != "hello, initramfs" || got[6].Major != 5 || got[6].Minor != 1 {
		t.Errorf("contents: %+v %+v", got[4], got[6])
	}
	if _, err := Clean("/"); err == nil {
		t.Error("the root accepted as an entry")
	}
	if n, _ := Clean("//x/../y/"); n != "y" {
		t.Errorf("Clean: %q", n)
	}
}
