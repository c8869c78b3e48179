package bench

import (
	"bytes"
	"encoding/xml"
	"errors"
	"image/png"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

func plotTestWrite(t *testing.T, s *Set) (string, []string) {
	t.Helper()
	dir := t.TempDir()
	files, err := WritePlots(dir, s)
	if err != nil {
		t.Fatalf("WritePlots: %v", err)
	}
	for _, f := range files {
		plotTestCheckFile(t, filepath.Join(dir, f))
	}
	return dir, files
}

// plotTestCheckFile checks a PNG decodes to the canvas size and an SVG is
// well-formed XML with an <svg> root.
func plotTestCheckFile(t *testing.T, path string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	switch filepath.Ext(path) {
	case ".png":
		img, err := png.Decode(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		wantW := int(math.Round(float64(plotWidth/vg.Inch) * plotDPI))
		if b := img.Bounds(); b.Dx() != wantW {
			t.Errorf("%s: %d pixels wide, want %d", path, b.Dx(), wantW)
		}
	case ".svg":
		root, err := plotTestSVGRoot(data)
		if err != nil || root != "svg" {
			t.Fatalf("%s: root %q, %v", path, root, err)
		}
	default:
		t.Errorf("%s: unexpected file type", path)
	}
}

// plotTestSVGRoot parses the whole document and returns its root element.
func plotTestSVGRoot(data []byte) (string, error) {
	d := xml.NewDecoder(bytes.NewReader(data))
	root := ""
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			return root, nil
		}
		if err != nil {
			return root, err
		}
		if se, ok := tok.(xml.StartElement); ok && root == "" {
			root = se.Name.Local
		}
	}
}

func TestWritePlotsEveryScenario(t *testing.T) {
	_, files := plotTestWrite(t, sumTestSet())
	var want []string
	for _, base := range []string{
		"dirty-rate-downtime", "dirty-rate-total-time", "dirty-rate-bytes", "dirty-rate-timeline",
		"working-set-downtime", "working-set-total-time", "working-set-bytes",
		"idle-downtime", "idle-total-time", "idle-bytes",
		"optimizations-bytes", "optimizations-total-time", "optimizations-downtime",
		"offline-phases", "offline-state-size",
	} {
		want = append(want, base+".png", base+".svg")
	}
	if !slices.Equal(files, want) {
		t.Errorf("plots:\n got %q\nwant %q", files, want)
	}
}

func TestWritePlotsDeterministic(t *testing.T) {
	a, files := plotTestWrite(t, sumTestSet())
	b, again := plotTestWrite(t, sumTestSet())
	if !slices.Equal(files, again) {
		t.Fatalf("file lists differ: %q vs %q", files, again)
	}
	for _, f := range files {
		x, _ := os.ReadFile(filepath.Join(a, f))
		y, _ := os.ReadFile(filepath.Join(b, f))
		if !bytes.Equal(x, y) {
			t.Errorf("%s differs between two renderings of the same set", f)
		}
	}
}

func TestPlotsLeaveOutFailedRuns(t *testing.T) {
	s := sumTestSet()
	runs := plotRuns(s, "dirty-rate")
	for _, r := range runs {
		if !r.Finished || r.Error != "" || r.GuestErrors > 0 {
			t.Errorf("failed run %q kept for plotting", r.Label)
		}
	}
	if len(runs) != 18-2 {
		t.Errorf("%d dirty-rate runs to plot, want 16", len(runs))
	}
	for _, series := range plotCollect(runs, plotXDirtyRate.get, plotDowntime.get) {
		for _, p := range series.xys {
			if p.Y == (777 * time.Millisecond).Seconds() {
				t.Errorf("%s plots the guest-error run's downtime", series.key.label())
			}
		}
	}
	// A scenario with nothing but failed runs has no plots and no error.
	for i := range s.Results {
		s.Results[i].Error = "boom"
	}
	if _, files := plotTestWrite(t, s); len(files) != 0 {
		t.Errorf("failed runs plotted: %q", files)
	}
}

// plotTestOneRun is a set holding one finished run of scenario, changed
// by edit.
func plotTestOneRun(scenario string, edit func(*Result)) *Set {
	r := sumTestRun(scenario, "ferry", "precopy", 1024, 512*sumTestMiB, 100*sumTestMiB, 20*time.Millisecond)
	r.Offline = &Offline{StateBytes: 1 << 30, SaveTime: time.Second, TransferTime: time.Second, RestoreTime: time.Second}
	r.Timeline = []RatePoint{{T: 1, Relative: 1}}
	edit(&r)
	return &Set{Results: []Result{r}}
}

func TestPlotsSinglePointAndZeros(t *testing.T) {
	zero := func(r *Result) {
		r.Downtime, r.TotalTime, r.BytesForward, r.BytesBack = 0, 0, 0, 0
		r.Offline = &Offline{}
		r.Timeline = []RatePoint{{T: 0, Relative: 0}}
	}
	for _, sc := range []string{"dirty-rate", "working-set", "idle", "optimizations", "offline", "smoke", "custom"} {
		for name, edit := range map[string]func(*Result){"single": func(*Result) {}, "zeros": zero} {
			t.Run(sc+"/"+name, func(t *testing.T) {
				_, files := plotTestWrite(t, plotTestOneRun(sc, edit))
				if (sc == "smoke" || sc == "custom") != (len(files) == 0) {
					t.Errorf("plots %q", files)
				}
			})
		}
	}
}

func TestPlotsSkipRunsWithoutParameter(t *testing.T) {
	// A dirty rate of 0 has no place on a log axis: no points, no plots.
	s := plotTestOneRun("dirty-rate", func(r *Result) { r.Guest.DirtyRate = 0; r.Timeline = nil })
	if _, files := plotTestWrite(t, s); len(files) != 0 {
		t.Errorf("plotted a run without a dirty rate: %q", files)
	}
}

func TestPlotLogScaleClampsZeros(t *testing.T) {
	series := []plotSeries{{xys: plotter.XYs{{X: 1, Y: 0}, {X: 2, Y: 0.005}, {X: 3, Y: 60}}}}
	var ax plot.Axis
	label := plotScaleY(&ax, plotDowntime, series)
	if _, ok := ax.Scale.(plot.LogScale); !ok {
		t.Fatalf("downtimes from 0 to 60 s not on a log scale")
	}
	if !strings.Contains(label, "log scale)\nbelow 1 ms drawn at 1 ms") || !strings.Contains(label, "(s,") {
		t.Errorf("label %q", label)
	}
	if got := series[0].xys[0].Y; got != 0.001 {
		t.Errorf("zero drawn at %v s, want the 1 ms floor", got)
	}
	narrow := []plotSeries{{xys: plotter.XYs{{X: 1, Y: 0.010}, {X: 2, Y: 0.030}}}}
	var lin plot.Axis
	if label := plotScaleY(&lin, plotDowntime, narrow); label != "downtime (ms)" || narrow[0].xys[1].Y != 30 {
		t.Errorf("narrow range: label %q, value %v", label, narrow[0].xys[1].Y)
	}
}

func TestPlotStylesKeepSystemsApart(t *testing.T) {
	st := plotStyler{hybrid: []time.Duration{3 * time.Second, 5 * time.Second}}
	fl, fg := st.style(plotKey{"ferry", "precopy", 0})
	ql, qg := st.style(plotKey{"qemu", "precopy", 0})
	if fl.Color == ql.Color || len(fl.Dashes) != 0 || len(ql.Dashes) == 0 {
		t.Error("ferry and QEMU lines look alike")
	}
	if fg.Shape != qg.Shape {
		t.Error("one technique, two markers")
	}
	h3, _ := st.style(plotKey{"ferry", "hybrid", 3 * time.Second})
	h5, _ := st.style(plotKey{"ferry", "hybrid", 5 * time.Second})
	if h3.Color == h5.Color {
		t.Error("hybrid pre-copy lengths share a colour")
	}
}

func TestWriteMarkdownPlots(t *testing.T) {
	var b strings.Builder
	files := []string{"dirty-rate-downtime.png", "dirty-rate-downtime.svg", "offline-phases.png", "offline-phases.svg"}
	if err := WriteMarkdownPlots(&b, files); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"## Plots", "### Scenario I: downtime vs guest dirty rate", "### Offline migration",
		"![dirty-rate: downtime](dirty-rate-downtime.png) ([SVG](dirty-rate-downtime.svg))",
		"![offline: phases](offline-phases.png)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("markdown lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	if err := WriteMarkdownPlots(&b, nil); err != nil || b.Len() != 0 {
		t.Errorf("no plots wrote %q, %v", b.String(), err)
	}
}
