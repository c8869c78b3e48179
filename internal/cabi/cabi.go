// Package cabi is test support: it checks Go mirrors of kernel ABI
// structures and constants against the C headers, by compiling and running
// a small C program that prints each C expression's value.
//
// It owns nothing at run time and must not be imported by non-test code.
package cabi

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Fact is one number that must agree between Go and the C headers: a
// struct size, a field offset, a constant or an ioctl request code.
type Fact struct {
	C  string  // a C expression, e.g. "sizeof(struct kvm_regs)"
	Go uintptr // the Go definition's value
}

// Check compiles a program including headers that prints every fact's C
// expression and reports each that differs from its Go value. It skips the
// test when the first header or gcc is missing.
func Check(t *testing.T, headers []string, facts []Fact) {
	t.Helper()
	if _, err := os.Stat(filepath.Join("/usr/include", headers[0])); err != nil {
		t.Skipf("kernel headers not installed (/usr/include/%s); .ci/run installs linux-libc-dev", headers[0])
	}
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		t.Skip("gcc not installed")
	}
	var src strings.Builder
	src.WriteString("#include <stdio.h>\n#include <stddef.h>\n")
	for _, h := range headers {
		fmt.Fprintf(&src, "#include <%s>\n", h)
	}
	src.WriteString("int main(void){\n")
	for _, f := range facts {
		fmt.Fprintf(&src, "printf(\"%%llu\\n\", (unsigned long long)(%s));\n", f.C)
	}
	src.WriteString("return 0;}\n")
	dir := t.TempDir()
	cfile, bin := filepath.Join(dir, "abi.c"), filepath.Join(dir, "abi")
	if err := os.WriteFile(cfile, []byte(src.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(gcc, "-o", bin, cfile).CombinedOutput(); err != nil {
		t.Fatalf("compiling ABI probe: %v\n%s", err, out)
	}
	out, err := exec.Command(bin).Output()
	if err != nil {
		t.Fatalf("running ABI probe: %v", err)
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	n := 0
	for ; sc.Scan(); n++ {
		v, err := strconv.ParseUint(sc.Text(), 10, 64)
		if err != nil || n >= len(facts) {
			t.Fatalf("bad probe line %d: %q", n, sc.Text())
		}
		if uintptr(v) != facts[n].Go {
			t.Errorf("%s: the headers say %d (%#x), Go has %d (%#x)", facts[n].C, v, v, facts[n].Go, facts[n].Go)
		}
	}
	if n != len(facts) {
		t.Fatalf("probe printed %d lines, want %d", n, len(facts))
	}
}
