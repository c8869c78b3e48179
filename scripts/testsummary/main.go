// Command testsummary reads `go test -json` streams and prints what make
// test shows: each package's result, the failures with their output, how
// many tests ran against this machine's /dev/kvm, how many inside the
// lab's emulated hosts, how many skipped and why, and a closing
// "N passed, N failed, N skipped" line. Counts are of leaf tests (a test
// with subtests counts through its subtests); a package that failed
// without a failing test (build error, panic, timeout) counts as one
// failure.
//
// Usage:
//
//	testsummary [-log FILE] HOST.json [LAB.json]
//
// HOST.json is the run on this machine; LAB.json, if given, is the run of
// KVM tests inside an emulated lab host (scripts/kvm-in-lab). The test
// output of both goes to -log as plain text. Exit status 1 if anything
// failed.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
)

// Markers the tests print (internal/testguest, internal/lab).
const (
	markKVM = "KVM-TEST-RAN"
	markLab = "LAB-TEST-RAN"
)

type event struct {
	Action     string
	ImportPath string // build-output events
	Package    string
	Test       string
	Elapsed    float64
	Output     string
}

type test struct {
	pkg, name string
	result    string // pass, fail, skip, or "" (never ended: the package died)
	output    []string
	kvm, lab  bool
	where     string // "host" or "lab"
}

type pkgResult struct {
	name    string
	result  string
	elapsed float64
	output  []string
	where   string
}

type run struct {
	build []string         // compiler output of packages that did not build
	tests map[string]*test // pkg + " " + name
	order []string
	pkgs  []*pkgResult
}

func read(path, where string, r *run, log io.Writer) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	pkgs := map[string]*pkgResult{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		var e event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			// go test prints build errors as plain text before its JSON.
			fmt.Fprintln(log, sc.Text())
			continue
		}
		if e.Action == "output" || e.Action == "build-output" {
			io.WriteString(log, e.Output)
		}
		if e.Action == "build-output" {
			r.build = append(r.build, e.Output)
			continue
		}
		if e.Package == "" {
			continue
		}
		p := pkgs[e.Package]
		if p == nil {
			p = &pkgResult{name: e.Package, where: where}
			pkgs[e.Package] = p
			r.pkgs = append(r.pkgs, p)
		}
		if e.Test == "" {
			switch e.Action {
			case "output":
				p.output = append(p.output, e.Output)
			case "pass", "fail", "skip":
				p.result, p.elapsed = e.Action, e.Elapsed
			}
			continue
		}
		key := where + " " + e.Package + " " + e.Test
		t := r.tests[key]
		if t == nil {
			t = &test{pkg: e.Package, name: e.Test, where: where}
			r.tests[key] = t
			r.order = append(r.order, key)
		}
		switch e.Action {
		case "output":
			t.output = append(t.output, e.Output)
			t.kvm = t.kvm || strings.Contains(e.Output, markKVM)
			t.lab = t.lab || strings.Contains(e.Output, markLab)
		case "pass", "fail", "skip":
			t.result = e.Action
		}
	}
	return sc.Err()
}

// leaves returns the tests with no subtests, each marked KVM or lab when
// it or a parent printed the marker.
func (r *run) leaves() []*test {
	parent := map[string]bool{}
	for _, k := range r.order {
		t := r.tests[k]
		for n := t.name; strings.Contains(n, "/"); {
			n = n[:strings.LastIndex(n, "/")]
			parent[t.where+" "+t.pkg+" "+n] = true
		}
	}
	var out []*test
	for _, k := range r.order {
		if parent[k] {
			continue
		}
		t := r.tests[k]
		for n := t.name; strings.Contains(n, "/"); {
			n = n[:strings.LastIndex(n, "/")]
			if p := r.tests[t.where+" "+t.pkg+" "+n]; p != nil {
				t.kvm, t.lab = t.kvm || p.kvm, t.lab || p.lab
			}
		}
		out = append(out, t)
	}
	return out
}

var fileLine = regexp.MustCompile(`^\s*\S+\.go:\d+: `)

// skipReason is the message a skipped test gave (t.Skip's text).
func skipReason(t *test) string {
	for i := len(t.output) - 1; i >= 0; i-- {
		l := strings.TrimSpace(t.output[i])
		if l == "" || strings.HasPrefix(l, "--- SKIP") || strings.HasPrefix(l, "=== ") {
			continue
		}
		if fileLine.MatchString(t.output[i]) {
			l = strings.TrimSpace(fileLine.ReplaceAllString(t.output[i], ""))
		}
		if l == "" {
			break
		}
		return l
	}
	return "(no reason given)"
}

func short(pkg string) string {
	return strings.TrimPrefix(pkg, "github.com/ferry-vmm/ferry/")
}

func main() {
	logPath := flag.String("log", "", "write the tests' plain output here")
	flag.Parse()
	if flag.NArg() < 1 || flag.NArg() > 2 {
		fmt.Fprintln(os.Stderr, "usage: testsummary [-log FILE] HOST.json [LAB.json]")
		os.Exit(2)
	}
	var log io.Writer = io.Discard
	if *logPath != "" {
		f, err := os.Create(*logPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(2)
		}
		defer f.Close()
		log = f
	}
	r := &run{tests: map[string]*test{}}
	for i, where := range []string{"host", "lab"} {
		if i >= flag.NArg() {
			break
		}
		fmt.Fprintf(log, "===== %s run: %s =====\n", where, flag.Arg(i))
		if err := read(flag.Arg(i), where, r, log); err != nil {
			fmt.Fprintln(os.Stderr, "testsummary:", err)
			os.Exit(2)
		}
	}
	os.Exit(report(os.Stdout, r))
}

func report(w io.Writer, r *run) int {
	leaves := r.leaves()
	count := map[string]map[string]int{} // where+pkg → result → n
	for _, t := range leaves {
		k := t.where + " " + t.pkg
		if count[k] == nil {
			count[k] = map[string]int{}
		}
		count[k][t.result]++
	}
	failed := 0
	for _, p := range r.pkgs {
		c := count[p.where+" "+p.name]
		label := "    "
		if p.where == "lab" {
			label = "lab "
		}
		res := p.result
		switch res {
		case "pass":
			res = "ok"
		case "fail":
			res = "FAIL"
		case "":
			res = "FAIL (no result: killed or timed out)"
		}
		if c == nil && p.result == "skip" {
			continue // no test files
		}
		fmt.Fprintf(w, "%s%-4s %-32s %6.1fs  %d passed, %d failed, %d skipped\n", label, res, short(p.name), p.elapsed, c["pass"], c["fail"], c["skip"])
		if p.result != "pass" && p.result != "skip" && c["fail"] == 0 {
			failed++ // failed outside any test
			fmt.Fprintf(w, "     package output:\n%s", indent(last(p.output, 30)))
		}
	}
	var passed, skipped, kvmHost, kvmLab, labTests int
	reasons := map[string]int{}
	var failures []*test
	for _, t := range leaves {
		switch t.result {
		case "pass":
			passed++
		case "skip":
			skipped++
			reasons[skipReason(t)]++
			continue
		default:
			failed++
			failures = append(failures, t)
		}
		switch {
		case t.kvm && t.where == "lab":
			kvmLab++
		case t.kvm:
			kvmHost++
		}
		if t.lab {
			labTests++
		}
	}
	if len(r.build) > 0 {
		fmt.Fprintf(w, "build errors:\n%s", indent(last(r.build, 40)))
	}
	for _, t := range failures {
		fmt.Fprintf(w, "--- FAIL: %s %s (%s)\n%s", short(t.pkg), t.name, t.where, indent(last(t.output, 60)))
	}
	fmt.Fprintf(w, "KVM tests: %d ran on this machine's /dev/kvm, %d inside the lab's emulated SVM hosts; lab tests (Linux guests, emulated hosts): %d\n",
		kvmHost, kvmLab, labTests)
	if skipped > 0 {
		fmt.Fprintf(w, "skipped %d, why:\n", skipped)
		type rc struct {
			reason string
			n      int
		}
		var rs []rc
		for k, n := range reasons {
			rs = append(rs, rc{k, n})
		}
		sort.Slice(rs, func(i, j int) bool { return rs[i].n > rs[j].n || rs[i].n == rs[j].n && rs[i].reason < rs[j].reason })
		for _, x := range rs {
			fmt.Fprintf(w, "  %4d  %s\n", x.n, x.reason)
		}
	}
	fmt.Fprintf(w, "%d passed, %d failed, %d skipped\n", passed, failed, skipped)
	if failed > 0 {
		return 1
	}
	return 0
}

func last(lines []string, n int) []string {
	if len(lines) > n {
		return lines[len(lines)-n:]
	}
	return lines
}

func indent(lines []string) string {
	var b strings.Builder
	for _, l := range lines {
		b.WriteString("     ")
		b.WriteString(strings.TrimRight(l, "\n"))
		b.WriteString("\n")
	}
	return b.String()
}
