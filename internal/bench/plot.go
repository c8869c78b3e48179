package bench

import (
	"cmp"
	"fmt"
	"image/color"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/ferry-vmm/ferry/internal/units"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

// Every figure has the same canvas so the summary's images line up; the
// legend gets a strip on the right, outside the data, so it never hides
// a line.
const (
	plotWidth  = 9 * vg.Inch
	plotHeight = 4.5 * vg.Inch
	plotDPI    = 120
	plotPad    = 6 * vg.Millimeter
	// plotDataTicks is how many distinct x values still get a labelled
	// tick each; more would crowd, so default ticks take over.
	plotDataTicks = 8
	// plotLogRatio is the spread (max/min) from which an axis is log:
	// downtimes range from a few ms to a forced 60 s stop.
	plotLogRatio = 20
)

// plotFigure is one plot ready to be saved as name.png and name.svg.
type plotFigure struct {
	name   string
	plot   *plot.Plot
	legend plot.Legend
}

// WritePlots writes a PNG and an SVG of every plot of the scenarios in s
// into dir and returns the file names, relative to dir, in a fixed
// order. Failed runs (not finished, an error, or guest errors) are not
// plotted; scenarios without a plot, or without a good run, add nothing.
func WritePlots(dir string, s *Set) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating the plot directory: %w", err)
	}
	var files []string
	for _, name := range sumPresent(s) {
		figs, err := plotScenario(name, plotRuns(s, name))
		if err != nil {
			return files, fmt.Errorf("plotting scenario %s: %w", name, err)
		}
		for _, f := range figs {
			names, err := f.save(dir)
			files = append(files, names...)
			if err != nil {
				return files, err
			}
		}
	}
	return files, nil
}

// WriteMarkdownPlots embeds the PNGs among files (as returned by
// WritePlots) in markdown, grouped by scenario, each with a link to its
// SVG. It writes nothing when there are no plots.
func WriteMarkdownPlots(w io.Writer, files []string) error {
	var b strings.Builder
	section := ""
	for _, f := range files {
		base, ok := strings.CutSuffix(f, ".png")
		if !ok {
			continue
		}
		if section == "" {
			b.WriteString("\n## Plots\n")
		}
		if sc := plotScenarioOf(base); sc != section {
			section = sc
			fmt.Fprintf(&b, "\n### %s\n", sumScenarioInfo(sc).title)
		}
		alt := strings.ReplaceAll(strings.TrimPrefix(base, section+"-"), "-", " ")
		fmt.Fprintf(&b, "\n![%s: %s](%s)", section, alt, f)
		if slices.Contains(files, base+".svg") {
			fmt.Fprintf(&b, " ([SVG](%s.svg))", base)
		}
		b.WriteString("\n")
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("writing the plot list: %w", err)
	}
	return nil
}

// plotScenarioOf returns the scenario a plot file belongs to: the
// longest scenario name its base name starts with.
func plotScenarioOf(base string) string {
	best := ""
	for _, sc := range sumScenarios {
		if strings.HasPrefix(base, sc.name+"-") && len(sc.name) > len(best) {
			best = sc.name
		}
	}
	if best == "" {
		best, _, _ = strings.Cut(base, "-")
	}
	return best
}

// plotRuns returns the runs of a scenario whose numbers can be trusted.
func plotRuns(s *Set, scenario string) []*Result {
	return slices.DeleteFunc(sumRuns(s, scenario), func(r *Result) bool { return !sumOK(r) })
}

// plotScenario builds the figures of one scenario; smoke and unknown
// scenarios have none.
func plotScenario(name string, runs []*Result) ([]plotFigure, error) {
	if len(runs) == 0 {
		return nil, nil
	}
	switch name {
	case "dirty-rate":
		figs, err := plotLineFigures(name, runs, plotXDirtyRate)
		if err != nil {
			return nil, err
		}
		tl, err := plotTimeline(name, runs)
		if err != nil || tl == nil {
			return figs, err
		}
		return append(figs, *tl), nil
	case "working-set":
		return plotLineFigures(name, runs, plotXWorkingSet)
	case "idle":
		return plotLineFigures(name, runs, plotXMemory)
	case "optimizations":
		return plotOptimizations(name, runs)
	case "offline":
		return plotOffline(name, runs)
	}
	return nil, nil
}

// plotX is the parameter a scenario's line plots have on the x axis.
type plotX struct {
	name  string
	unit  string
	size  float64 // base units (bytes, bytes/s) per axis unit
	get   func(*Result) float64
	log   bool // always log, as in the seed paper's tenfold steps
	title string
}

var (
	plotXDirtyRate = plotX{"guest dirty rate", "MiB/s", 1 << 20,
		func(r *Result) float64 { return float64(r.Guest.DirtyRate) }, true, "guest dirty rate"}
	plotXWorkingSet = plotX{"working set", "MiB", 1 << 20,
		func(r *Result) float64 { return float64(r.Guest.WorkingSet) }, false, "working set"}
	plotXMemory = plotX{"guest memory", "GiB", 1 << 30,
		func(r *Result) float64 { return float64(r.Guest.MemMiB) * (1 << 20) }, false, "guest memory size"}
)

// plotKind is what a measurement counts, which decides its units.
type plotKind int

const (
	plotTime  plotKind = iota // seconds
	plotBytes                 // bytes
)

// plotMetric is a measurement a figure shows on its y axis.
type plotMetric struct {
	name  string // in the file name
	title string
	axis  string
	kind  plotKind
	get   func(*Result) float64 // seconds or bytes
}

var (
	plotDowntime  = plotMetric{"downtime", "Downtime", "downtime", plotTime, func(r *Result) float64 { return r.Downtime.Seconds() }}
	plotTotalTime = plotMetric{"total-time", "Total migration time", "total time", plotTime, func(r *Result) float64 { return r.TotalTime.Seconds() }}
	plotSent      = plotMetric{"bytes", "Data sent (both directions)", "bytes sent", plotBytes, sumBytes}
	plotLineSet   = []plotMetric{plotDowntime, plotTotalTime, plotSent}
)

// plotUnit is an axis unit: its name and its size in base units.
type plotUnit struct {
	name string
	size float64
}

// plotUnitFor picks ms or s, MiB or GiB, so that the largest value reads
// as a number of units, not a fraction or thousands of them.
func plotUnitFor(kind plotKind, largest float64) plotUnit {
	switch {
	case kind == plotTime && largest < 1:
		return plotUnit{"ms", 1e-3}
	case kind == plotTime:
		return plotUnit{"s", 1}
	case largest < 1<<30:
		return plotUnit{"MiB", 1 << 20}
	}
	return plotUnit{"GiB", 1 << 30}
}

// plotFloor is the smallest value a log axis shows; smaller ones,
// zeros above all, are drawn at it and the axis label says so.
func plotFloor(kind plotKind) (float64, string) {
	if kind == plotTime {
		return sumDowntimeFloor.Seconds(), "1 ms"
	}
	return 1 << 20, "1 MiB"
}

// plotKey identifies a line: one system running one technique.
type plotKey struct {
	system     string
	technique  string
	precopyFor time.Duration
}

func plotKeyOf(r *Result) plotKey { return plotKey{r.System, r.Technique, r.PrecopyFor} }

func (k plotKey) label() string {
	if k.precopyFor > 0 {
		return fmt.Sprintf("%s %s (%s pre-copy)", k.system, k.technique, sumShortDuration(k.precopyFor))
	}
	return k.system + " " + k.technique
}

func plotCompareKeys(a, b plotKey) int {
	return sumCompareRuns(&Result{System: a.system, Technique: a.technique, PrecopyFor: a.precopyFor},
		&Result{System: b.system, Technique: b.technique, PrecopyFor: b.precopyFor})
}

// plotSeries is one line's points, in base units, sorted by x.
type plotSeries struct {
	key plotKey
	xys plotter.XYs
}

// plotCollect groups runs into lines, one point per x value: the median
// of the runs there, so repetitions do not zigzag the line.
func plotCollect(runs []*Result, x func(*Result) float64, y func(*Result) float64) []plotSeries {
	vals := map[plotKey]map[float64][]float64{}
	for _, r := range runs {
		xv := x(r)
		if xv <= 0 {
			continue // not set: no place on the axis
		}
		k := plotKeyOf(r)
		if vals[k] == nil {
			vals[k] = map[float64][]float64{}
		}
		vals[k][xv] = append(vals[k][xv], y(r))
	}
	var out []plotSeries
	for k, byX := range vals {
		s := plotSeries{key: k}
		for xv, ys := range byX {
			s.xys = append(s.xys, plotter.XY{X: xv, Y: sumMedian(ys)})
		}
		slices.SortFunc(s.xys, func(a, b plotter.XY) int { return cmp.Compare(a.X, b.X) })
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b plotSeries) int { return plotCompareKeys(a.key, b.key) })
	return out
}

// plotLineFigures draws downtime, total time and bytes against the
// scenario's parameter, one line per system × technique.
func plotLineFigures(scenario string, runs []*Result, x plotX) ([]plotFigure, error) {
	st := plotStylerFor(runs)
	var figs []plotFigure
	for _, m := range plotLineSet {
		series := plotCollect(runs, x.get, m.get)
		if len(series) == 0 {
			return nil, nil
		}
		f, err := plotLineFigure(scenario, x, m, series, st)
		if err != nil {
			return nil, fmt.Errorf("%s plot: %w", m.name, err)
		}
		figs = append(figs, f)
	}
	return figs, nil
}

func plotLineFigure(scenario string, x plotX, m plotMetric, series []plotSeries, st plotStyler) (plotFigure, error) {
	p := plotNew(fmt.Sprintf("%s vs %s", m.title, x.title))
	ylabel := plotScaleY(&p.Y, m, series)
	p.Y.Label.Text = ylabel
	plotScaleX(&p.X, x, series)
	p.Add(plotter.NewGrid())
	f := plotFigure{name: scenario + "-" + m.name, plot: p, legend: plotLegend()}
	for _, s := range series {
		if err := plotAddLine(&f, s, st, 1); err != nil {
			return f, err
		}
	}
	plotFixY(&p.Y)
	plotFixX(&p.X, x, series)
	return f, nil
}

// plotScaleY picks the y unit and scale for the series, converts them in
// place, and returns the axis label. Log when the values span decades.
func plotScaleY(ax *plot.Axis, m plotMetric, series []plotSeries) string {
	lo, hi := plotRange(series, func(p plotter.XY) float64 { return p.Y })
	u := plotUnitFor(m.kind, hi)
	floor, floorText := plotFloor(m.kind)
	log := hi > floor && hi/max(lo, floor) >= plotLogRatio
	clamped := false
	for _, s := range series {
		for i := range s.xys {
			if log && s.xys[i].Y < floor {
				s.xys[i].Y, clamped = floor, true
			}
			s.xys[i].Y /= u.size
		}
	}
	label := fmt.Sprintf("%s (%s)", m.axis, u.name)
	if log {
		ax.Scale, ax.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
		label = fmt.Sprintf("%s (%s, log scale)", m.axis, u.name)
		if clamped {
			// Two lines: one would outgrow the axis and squash the plot.
			label = fmt.Sprintf("%s (%s, log scale)\nbelow %s drawn at %s", m.axis, u.name, floorText, floorText)
		}
	}
	return label
}

// plotScaleX converts the series' x values to the axis unit and labels
// the axis; plotFixX sets its range once the data is added.
func plotScaleX(ax *plot.Axis, x plotX, series []plotSeries) {
	for _, s := range series {
		for i := range s.xys {
			s.xys[i].X /= x.size
		}
	}
	ax.Label.Text = fmt.Sprintf("%s (%s)", x.name, x.unit)
	lo, hi := plotRange(series, func(p plotter.XY) float64 { return p.X })
	if x.log || hi/lo >= plotLogRatio {
		ax.Scale, ax.Tick.Marker = plot.LogScale{}, plot.LogTicks{Prec: -1}
		ax.Label.Text = fmt.Sprintf("%s (%s, log scale)", x.name, x.unit)
	}
	if xs := plotDistinctX(series); len(xs) <= plotDataTicks {
		ticks := make(plot.ConstantTicks, len(xs))
		for i, v := range xs {
			ticks[i] = plot.Tick{Value: v, Label: plotNumber(v)}
		}
		ax.Tick.Marker = ticks
	}
}

// plotFixX pads the x range so the outermost markers clear the frame.
func plotFixX(ax *plot.Axis, x plotX, series []plotSeries) {
	lo, hi := plotRange(series, func(p plotter.XY) float64 { return p.X })
	if _, log := ax.Scale.(plot.LogScale); log {
		f := math.Max(math.Pow(hi/lo, 0.05), 1.25)
		ax.Min, ax.Max = lo/f, hi*f
		return
	}
	pad := (hi - lo) * 0.05
	if pad == 0 {
		pad = math.Max(lo*0.1, 1)
	}
	ax.Min, ax.Max = lo-pad, hi+pad
}

// plotFixY widens a log y axis to whole decades, so both ends carry a
// labelled tick (gonum's log ticks label only powers of ten) and it stays
// strictly positive; it starts a linear one at 0 so bars and lines are
// read from the same baseline.
func plotFixY(ax *plot.Axis) {
	if _, log := ax.Scale.(plot.LogScale); log {
		ax.Min = math.Pow10(int(math.Floor(math.Log10(ax.Min) + 1e-9)))
		ax.Max = math.Pow10(int(math.Ceil(math.Log10(ax.Max) - 1e-9)))
		if ax.Max <= ax.Min {
			ax.Max = ax.Min * 10
		}
		return
	}
	ax.Min = math.Min(ax.Min, 0)
	if ax.Max <= ax.Min {
		ax.Max = ax.Min + 1
	}
	ax.Max *= 1.08
}

func plotRange(series []plotSeries, get func(plotter.XY) float64) (lo, hi float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, s := range series {
		for _, p := range s.xys {
			lo, hi = math.Min(lo, get(p)), math.Max(hi, get(p))
		}
	}
	return lo, hi
}

func plotDistinctX(series []plotSeries) []float64 {
	var xs []float64
	for _, s := range series {
		for _, p := range s.xys {
			if !slices.Contains(xs, p.X) {
				xs = append(xs, p.X)
			}
		}
	}
	slices.Sort(xs)
	return xs
}

// plotNumber formats a tick value without trailing zeros.
func plotNumber(v float64) string {
	if v == math.Trunc(v) && math.Abs(v) < 1e9 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.3g", v)
}

// plotAddLine draws a series as a line with markers; every marks-th
// point gets a marker, so dense timelines stay readable.
func plotAddLine(f *plotFigure, s plotSeries, st plotStyler, marks int) error {
	line, err := plotter.NewLine(s.xys)
	if err != nil {
		return fmt.Errorf("line %s: %w", s.key.label(), err)
	}
	var dots plotter.XYs
	for i := 0; i < len(s.xys); i += marks {
		dots = append(dots, s.xys[i])
	}
	sc, err := plotter.NewScatter(dots)
	if err != nil {
		return fmt.Errorf("markers %s: %w", s.key.label(), err)
	}
	line.LineStyle, sc.GlyphStyle = st.style(s.key)
	f.plot.Add(line, sc)
	f.legend.Add(s.key.label(), line, sc)
	return nil
}

// plotTimeline draws the workload's rate through the migration at the
// highest dirty rate (the seed paper's Figure 11), one line per system ×
// technique; nil if no run there has a timeline.
func plotTimeline(scenario string, runs []*Result) (*plotFigure, error) {
	top := int64(0)
	for _, r := range runs {
		if len(r.Timeline) > 0 {
			top = max(top, r.Guest.DirtyRate)
		}
	}
	series := plotTimelineSeries(runs, top)
	if len(series) == 0 {
		return nil, nil
	}
	p := plotNew("Application performance during migration at " + sumRate(top) + " dirtied")
	p.X.Label.Text = "time since the migration started (s)"
	p.Y.Label.Text = "workload rate (% of the rate before)"
	f := plotFigure{name: scenario + "-timeline", plot: p, legend: plotLegend()}
	p.Add(plotter.NewGrid())
	lo, hi := plotRange(series, func(p plotter.XY) float64 { return p.X })
	if err := plotReference(p, lo, hi, 100); err != nil {
		return nil, err
	}
	st := plotStylerFor(runs)
	for _, s := range series {
		if err := plotAddLine(&f, s, st, max(len(s.xys)/12, 1)); err != nil {
			return nil, err
		}
	}
	plotFixY(&p.Y)
	return &f, nil
}

// plotTimelineSeries takes each line's first run at the dirty rate: a
// timeline is one run's story, a median of several would be nobody's.
func plotTimelineSeries(runs []*Result, rate int64) []plotSeries {
	var out []plotSeries
	seen := map[plotKey]bool{}
	for _, r := range runs {
		k := plotKeyOf(r)
		if r.Guest.DirtyRate != rate || len(r.Timeline) == 0 || seen[k] {
			continue
		}
		seen[k] = true
		s := plotSeries{key: k}
		for _, pt := range r.Timeline {
			s.xys = append(s.xys, plotter.XY{X: pt.T, Y: pt.Relative * 100})
		}
		slices.SortStableFunc(s.xys, func(a, b plotter.XY) int { return cmp.Compare(a.X, b.X) })
		out = append(out, s)
	}
	return out
}

// plotReference draws a thin grey line at y from x lo to hi: the level
// the workload ran at before the migration.
func plotReference(p *plot.Plot, lo, hi, y float64) error {
	if lo == hi {
		hi = lo + 1
	}
	l, err := plotter.NewLine(plotter.XYs{{X: lo, Y: y}, {X: hi, Y: y}})
	if err != nil {
		return fmt.Errorf("reference line: %w", err)
	}
	l.LineStyle = draw.LineStyle{Color: color.Gray{Y: 150}, Width: vg.Points(1), Dashes: []vg.Length{vg.Points(2), vg.Points(2)}}
	p.Add(l)
	return nil
}

// plotCat is one bar position: a system's variant.
type plotCat struct {
	system  string
	variant string
}

// plotCats lists the bar positions of runs, each system's together.
func plotCats(runs []*Result) []plotCat {
	var cats []plotCat
	for _, r := range runs {
		c := plotCat{r.System, r.Variant}
		if !slices.Contains(cats, c) {
			cats = append(cats, c)
		}
	}
	return cats
}

// plotOptimizations draws grouped bars of bytes, total time and downtime
// for every variant of each system, one bar per technique.
func plotOptimizations(scenario string, runs []*Result) ([]plotFigure, error) {
	cats := plotCats(runs)
	var figs []plotFigure
	for _, m := range []plotMetric{plotSent, plotTotalTime, plotDowntime} {
		f, err := plotBarFigure(scenario, m, runs, cats)
		if err != nil {
			return nil, fmt.Errorf("%s bars: %w", m.name, err)
		}
		figs = append(figs, f)
	}
	return figs, nil
}

func plotBarFigure(scenario string, m plotMetric, runs []*Result, cats []plotCat) (plotFigure, error) {
	p := plotNew(m.title + " per optimization set")
	f := plotFigure{name: scenario + "-" + m.name, plot: p, legend: plotLegend()}
	techs := plotTechniques(runs)
	vals := plotBarValues(runs, m.get)
	u := plotUnitFor(m.kind, plotMax(vals))
	p.Y.Label.Text = fmt.Sprintf("%s (%s)", m.axis, u.name)
	width := plotBarWidth(len(cats), len(techs))
	st := plotStylerFor(runs)
	for ti, tech := range techs {
		offset := (vg.Length(ti) - vg.Length(len(techs)-1)/2) * width
		for _, seg := range plotSegments(cats) {
			bars := plotBars{f: &f, cats: cats, seg: seg, width: width, offset: offset}
			key := tech
			key.system = cats[seg[0]].system
			if err := bars.add(key, st, func(c plotCat) (float64, bool) {
				v, ok := vals[c][tech]
				return v / u.size, ok
			}, func(v float64) string { return plotHuman(m.kind, v*u.size) }); err != nil {
				return f, err
			}
		}
	}
	// Long names ("multifd4-zstd") break at the hyphen so neighbours
	// do not overlap when a system has many variants.
	plotNominal(p, cats, func(c plotCat) string { return strings.ReplaceAll(c.variant, "-", "-\n") + "\n" + c.system })
	plotFixY(&p.Y)
	return f, nil
}

// plotTech is a technique with its pre-copy length: a plotKey without
// the system, which the bar position already gives.
type plotTech = plotKey

func plotTechOf(r *Result) plotTech {
	return plotTech{technique: r.Technique, precopyFor: r.PrecopyFor}
}

// plotBarValues is the median of each category's and technique's runs.
func plotBarValues(runs []*Result, get func(*Result) float64) map[plotCat]map[plotTech]float64 {
	by := map[plotCat]map[plotTech][]float64{}
	for _, r := range runs {
		c := plotCat{r.System, r.Variant}
		if by[c] == nil {
			by[c] = map[plotTech][]float64{}
		}
		by[c][plotTechOf(r)] = append(by[c][plotTechOf(r)], get(r))
	}
	out := map[plotCat]map[plotTech]float64{}
	for c, techs := range by {
		out[c] = map[plotTech]float64{}
		for t, vs := range techs {
			out[c][t] = sumMedian(vs)
		}
	}
	return out
}

func plotMax(vals map[plotCat]map[plotTech]float64) float64 {
	m := 0.0
	for _, techs := range vals {
		for _, v := range techs {
			m = math.Max(m, v)
		}
	}
	return m
}

// plotCatValues is the median of each category's runs, for figures with
// one bar per category.
func plotCatValues(runs []*Result, get func(*Result) float64) map[plotCat]float64 {
	by := map[plotCat][]*Result{}
	for _, r := range runs {
		c := plotCat{r.System, r.Variant}
		by[c] = append(by[c], r)
	}
	out := map[plotCat]float64{}
	for c, rs := range by {
		out[c] = sumMedianOf(rs, get)
	}
	return out
}

// plotTechniques lists the techniques of runs in the usual order.
func plotTechniques(runs []*Result) []plotTech {
	var ts []plotTech
	for _, r := range runs {
		if t := plotTechOf(r); !slices.Contains(ts, t) {
			ts = append(ts, t)
		}
	}
	slices.SortFunc(ts, plotCompareKeys)
	return ts
}

// plotSegments splits categories into each system's run of indices: a
// bar chart draws one colour, and each system has its own.
func plotSegments(cats []plotCat) [][]int {
	var segs [][]int
	for i, c := range cats {
		if i == 0 || c.system != cats[i-1].system {
			segs = append(segs, nil)
		}
		segs[len(segs)-1] = append(segs[len(segs)-1], i)
	}
	return segs
}

// plotBarWidth shares about 80% of the data width among the bars.
func plotBarWidth(cats, perCat int) vg.Length {
	area := plotWidth - 3*vg.Inch
	w := area * 0.8 / vg.Length(max(cats, 1)) / vg.Length(max(perCat, 1))
	return min(w, vg.Points(36))
}

// plotBars adds one system's bars of one series, with their values
// written above them.
type plotBars struct {
	f      *plotFigure
	cats   []plotCat
	seg    []int
	width  vg.Length
	offset vg.Length
}

func (b plotBars) add(key plotKey, st plotStyler, value func(plotCat) (float64, bool), label func(float64) string) error {
	vals := make(plotter.Values, len(b.seg))
	labels := plotter.XYLabels{}
	for i, ci := range b.seg {
		v, ok := value(b.cats[ci])
		if !ok {
			continue
		}
		vals[i] = v
		labels.XYs = append(labels.XYs, plotter.XY{X: float64(ci), Y: v})
		labels.Labels = append(labels.Labels, label(v))
	}
	chart, err := plotter.NewBarChart(vals, b.width)
	if err != nil {
		return fmt.Errorf("bars %s: %w", key.label(), err)
	}
	chart.XMin, chart.Offset = float64(b.seg[0]), b.offset
	line, _ := st.style(key)
	chart.Color, chart.LineStyle.Width = line.Color, 0
	b.f.plot.Add(chart)
	b.f.legend.Add(key.label(), chart)
	return plotAddLabels(b.f.plot, labels, b.offset)
}

// plotAddLabels writes values above their bars.
func plotAddLabels(p *plot.Plot, labels plotter.XYLabels, offset vg.Length) error {
	if len(labels.XYs) == 0 {
		return nil
	}
	l, err := plotter.NewLabels(labels)
	if err != nil {
		return fmt.Errorf("bar labels: %w", err)
	}
	for i := range l.TextStyle {
		l.TextStyle[i].XAlign = text.XCenter
		l.TextStyle[i].Font.Size = vg.Points(8)
	}
	l.Offset = vg.Point{X: offset, Y: vg.Points(2)}
	p.Add(l)
	return nil
}

// plotNominal names the bar positions and pads them half a bar's room.
func plotNominal(p *plot.Plot, cats []plotCat, name func(plotCat) string) {
	names := make([]string, len(cats))
	for i, c := range cats {
		names[i] = name(c)
	}
	p.NominalX(names...)
	p.X.Min, p.X.Max = -0.5, float64(len(cats))-0.5
	p.X.Label.Text = ""
}

// plotHuman renders a bar's value in the summary's units.
func plotHuman(kind plotKind, v float64) string {
	if kind == plotTime {
		return sumDuration(time.Duration(v * float64(time.Second)))
	}
	return units.FormatBytes(uint64(math.Max(v, 0)))
}

// plotPhases are the offline phases, stacked bottom to top.
var plotPhases = []struct {
	name string
	get  func(*Offline) time.Duration
}{
	{"save", func(o *Offline) time.Duration { return o.SaveTime }},
	{"transfer", func(o *Offline) time.Duration { return o.TransferTime }},
	{"restore", func(o *Offline) time.Duration { return o.RestoreTime }},
}

// plotOffline draws the offline phases stacked per system and variant,
// and the saved state's size.
func plotOffline(scenario string, runs []*Result) ([]plotFigure, error) {
	runs = slices.DeleteFunc(slices.Clone(runs), func(r *Result) bool { return r.Offline == nil })
	if len(runs) == 0 {
		return nil, nil
	}
	cats := plotCats(runs)
	phases, err := plotOfflinePhases(scenario, runs, cats)
	if err != nil {
		return nil, err
	}
	size, err := plotOfflineSize(scenario, runs, cats)
	if err != nil {
		return nil, err
	}
	return []plotFigure{phases, size}, nil
}

func plotOfflinePhases(scenario string, runs []*Result, cats []plotCat) (plotFigure, error) {
	p := plotNew("Offline migration: save, transfer and restore")
	f := plotFigure{name: scenario + "-phases", plot: p, legend: plotLegend()}
	total := plotCatValues(runs, func(r *Result) float64 { return sumOfflineTotal(r).Seconds() })
	u := plotUnitFor(plotTime, slices.Max(slices.Collect(maps.Values(total))))
	p.Y.Label.Text = fmt.Sprintf("time (%s)", u.name)
	width := plotBarWidth(len(cats), 1)
	for _, seg := range plotSegments(cats) {
		var below *plotter.BarChart
		for pi, ph := range plotPhases {
			vals := plotCatValues(runs, func(r *Result) float64 { return ph.get(r.Offline).Seconds() })
			chart, err := plotPhaseBars(&f, cats, seg, width, below, pi, func(c plotCat) float64 {
				return vals[c] / u.size
			})
			if err != nil {
				return f, fmt.Errorf("%s bars: %w", ph.name, err)
			}
			below = chart
		}
		if err := plotSegmentLabels(p, cats, seg, total, u, plotTime); err != nil {
			return f, err
		}
	}
	plotNominal(p, cats, func(c plotCat) string { return c.system + "\n" + c.variant })
	plotFixY(&p.Y)
	return f, nil
}

// plotPhaseBars stacks one phase of one system on the phase below; the
// phases are shades of the system's colours, darkest first.
func plotPhaseBars(f *plotFigure, cats []plotCat, seg []int, width vg.Length, below *plotter.BarChart, phase int, value func(plotCat) float64) (*plotter.BarChart, error) {
	vals := make(plotter.Values, len(seg))
	for i, ci := range seg {
		vals[i] = value(cats[ci])
	}
	chart, err := plotter.NewBarChart(vals, width)
	if err != nil {
		return nil, err
	}
	system := cats[seg[0]].system
	chart.XMin, chart.LineStyle.Width = float64(seg[0]), 0
	chart.Color = plotPhaseColor(system, phase)
	if below != nil {
		chart.StackOn(below)
	}
	f.plot.Add(chart)
	f.legend.Add(system+" "+plotPhases[phase].name, chart)
	return chart, nil
}

// plotSegmentLabels writes each bar's total above it.
func plotSegmentLabels(p *plot.Plot, cats []plotCat, seg []int, vals map[plotCat]float64, u plotUnit, kind plotKind) error {
	var labels plotter.XYLabels
	for _, ci := range seg {
		v := vals[cats[ci]]
		labels.XYs = append(labels.XYs, plotter.XY{X: float64(ci), Y: v / u.size})
		labels.Labels = append(labels.Labels, plotHuman(kind, v))
	}
	return plotAddLabels(p, labels, 0)
}

func plotOfflineSize(scenario string, runs []*Result, cats []plotCat) (plotFigure, error) {
	p := plotNew("Offline migration: size of the saved state")
	f := plotFigure{name: scenario + "-state-size", plot: p, legend: plotLegend()}
	vals := plotCatValues(runs, func(r *Result) float64 { return float64(r.Offline.StateBytes) })
	u := plotUnitFor(plotBytes, slices.Max(slices.Collect(maps.Values(vals))))
	p.Y.Label.Text = fmt.Sprintf("saved state (%s)", u.name)
	width := plotBarWidth(len(cats), 1)
	st := plotStylerFor(runs)
	for _, seg := range plotSegments(cats) {
		bars := plotBars{f: &f, cats: cats, seg: seg, width: width}
		key := plotKey{system: cats[seg[0]].system, technique: "offline"}
		if err := bars.add(key, st, func(c plotCat) (float64, bool) {
			v, ok := vals[c]
			return v / u.size, ok
		}, func(v float64) string { return plotHuman(plotBytes, v*u.size) }); err != nil {
			return f, err
		}
	}
	plotNominal(p, cats, func(c plotCat) string { return c.system + "\n" + c.variant })
	plotFixY(&p.Y)
	return f, nil
}

// Colours: ferry in cool colours, QEMU in warm ones, anything else in
// greys, so a system is recognisable at a glance in every figure; the
// shade within a family tells techniques apart (with the marker).
var plotFamilies = map[string][]color.RGBA{
	"ferry": {
		{0x1f, 0x4e, 0x9c, 0xff}, // precopy: blue
		{0x1a, 0x93, 0x85, 0xff}, // postcopy: teal
		{0x6a, 0x3d, 0x9a, 0xff}, // hybrid: purple
		{0x00, 0x97, 0xc4, 0xff}, // hybrid, 2nd pre-copy length: cyan
		{0x3a, 0x7d, 0x44, 0xff}, // hybrid, 3rd: green
		{0x5c, 0x6b, 0xc0, 0xff}, // stopcopy: indigo
		{0x45, 0x5a, 0x64, 0xff}, // other: slate
	},
	"qemu": {
		{0xc0, 0x39, 0x2b, 0xff}, // precopy: red
		{0xe6, 0x7e, 0x22, 0xff}, // postcopy: orange
		{0x8c, 0x51, 0x0a, 0xff}, // hybrid: brown
		{0xd8, 0x1b, 0x60, 0xff}, // hybrid, 2nd: magenta
		{0xb8, 0x86, 0x0b, 0xff}, // hybrid, 3rd: gold
		{0xf0, 0x62, 0x92, 0xff}, // stopcopy: pink
		{0x8d, 0x6e, 0x63, 0xff}, // other: taupe
	},
}

var plotGreys = []color.RGBA{
	{0x40, 0x40, 0x40, 0xff}, {0x70, 0x70, 0x70, 0xff}, {0x90, 0x90, 0x90, 0xff},
	{0x55, 0x55, 0x55, 0xff}, {0xa0, 0xa0, 0xa0, 0xff}, {0x30, 0x30, 0x30, 0xff}, {0x80, 0x80, 0x80, 0xff},
}

func plotColor(system string, shade int) color.RGBA {
	fam, ok := plotFamilies[system]
	if !ok {
		fam = plotGreys
	}
	return fam[shade%len(fam)]
}

// plotPhaseColor shades a system's base colour: darkest at the bottom.
func plotPhaseColor(system string, phase int) color.RGBA {
	c := plotColor(system, 0)
	mix := func(v uint8) uint8 { return uint8(float64(v) + (255-float64(v))*0.3*float64(phase)) }
	return color.RGBA{mix(c.R), mix(c.G), mix(c.B), 0xff}
}

// plotStyler gives a line its colour, dashes and marker. Hybrid lines
// differ by pre-copy length, ranked over the scenario so a length keeps
// its shade in every figure of the scenario.
type plotStyler struct {
	hybrid []time.Duration
}

func plotStylerFor(runs []*Result) plotStyler {
	var st plotStyler
	for _, r := range runs {
		if r.Technique == "hybrid" && !slices.Contains(st.hybrid, r.PrecopyFor) {
			st.hybrid = append(st.hybrid, r.PrecopyFor)
		}
	}
	slices.Sort(st.hybrid)
	return st
}

func (st plotStyler) shade(k plotKey) int {
	switch k.technique {
	case "precopy":
		return 0
	case "postcopy":
		return 1
	case "hybrid":
		return 2 + max(slices.Index(st.hybrid, k.precopyFor), 0)%3
	case "stopcopy":
		return 5
	}
	return 6
}

func (st plotStyler) style(k plotKey) (draw.LineStyle, draw.GlyphStyle) {
	c := plotColor(k.system, st.shade(k))
	line := draw.LineStyle{Color: c, Width: vg.Points(1.5)}
	switch k.system {
	case "ferry":
	case "qemu":
		line.Dashes = []vg.Length{vg.Points(6), vg.Points(3)}
	default:
		line.Dashes = []vg.Length{vg.Points(2), vg.Points(2)}
	}
	return line, draw.GlyphStyle{Color: c, Radius: vg.Points(3.5), Shape: plotGlyph(k.technique)}
}

// plotGlyph marks a technique the same way for both systems.
func plotGlyph(technique string) draw.GlyphDrawer {
	switch technique {
	case "precopy":
		return draw.CircleGlyph{}
	case "postcopy":
		return draw.PyramidGlyph{}
	case "hybrid":
		return draw.BoxGlyph{}
	case "stopcopy":
		return draw.CrossGlyph{}
	case "offline":
		return draw.RingGlyph{}
	}
	return draw.PlusGlyph{}
}

func plotNew(title string) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.Title.Padding = vg.Points(8)
	p.Title.TextStyle.Font.Size = vg.Points(13)
	return p
}

func plotLegend() plot.Legend {
	l := plot.NewLegend()
	l.Top, l.Left = true, true
	l.TextStyle.Font = font.From(plot.DefaultFont, vg.Points(10))
	l.Padding = vg.Points(3)
	return l
}

// save writes the figure as PNG and SVG and returns their names.
func (f plotFigure) save(dir string) ([]string, error) {
	var names []string
	for _, ext := range []string{"png", "svg"} {
		name := f.name + "." + ext
		if err := f.write(filepath.Join(dir, name), ext); err != nil {
			return names, fmt.Errorf("writing plot %s: %w", name, err)
		}
		names = append(names, name)
	}
	return names, nil
}

func (f plotFigure) write(path, ext string) (err error) {
	var c vg.CanvasWriterTo
	if ext == "svg" {
		c = vgsvg.New(plotWidth, plotHeight)
	} else {
		c = vgimg.PngCanvas{Canvas: vgimg.NewWith(vgimg.UseWH(plotWidth, plotHeight), vgimg.UseDPI(plotDPI))}
	}
	if err := f.draw(c); err != nil {
		return err
	}
	out, err := os.Create(path)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	}()
	_, err = c.WriteTo(out)
	return err
}

// draw renders the plot left of the legend. gonum panics on data it
// cannot place (say a non-positive value on a log axis); that is turned
// into an error so one bad figure does not lose the others.
func (f plotFigure) draw(c vg.CanvasWriterTo) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("drawing: %v", r)
		}
	}()
	dc := draw.New(c)
	dc.SetColor(color.White)
	dc.Fill(dc.Rectangle.Path())
	lw := f.legendWidth()
	f.plot.Draw(draw.Crop(dc, 0, -lw, 0, 0))
	if lw > 0 {
		top := f.plot.Title.TextStyle.Rectangle(f.plot.Title.Text).Size().Y + f.plot.Title.Padding
		f.legend.Draw(draw.Crop(dc, plotWidth-lw+plotPad/2, 0, 0, -top))
	}
	return nil
}

// legendWidth is the strip the legend needs, 0 without a legend.
func (f plotFigure) legendWidth() vg.Length {
	w := f.legend.Rectangle(draw.Canvas{}).Size().X
	if w == 0 {
		return 0
	}
	return w + plotPad
}
