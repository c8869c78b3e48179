package bench

import (
	"cmp"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/ferry-vmm/ferry/internal/units"
)

// Other engineers add files to this package at the same time, so every
// unexported name here carries a "sum" prefix (and plot.go's a "plot"
// prefix) to keep clear of theirs.

// sumScenario describes how one scenario is rendered.
type sumScenario struct {
	name  string
	title string
	about string
	// primary is the parameter the scenario varies; it always gets a
	// column. Empty for scenarios without one.
	primary string
	// labels adds the runs' own labels to the table, for scenarios whose
	// runs are not told apart by the usual parameters.
	labels bool
}

// sumScenarios is the fixed order of the sections; scenarios not listed
// follow in name order, as tables only.
var sumScenarios = []sumScenario{
	{"smoke", "Smoke test", "One short run per system and technique: does everything work end to end.", "", true},
	{"dirty-rate", "Scenario I: downtime vs guest dirty rate",
		"Working set fixed, the guest's dirty rate grows tenfold between runs (the seed paper's Figures 6 and 11).", "dirty rate", false},
	{"working-set", "Scenario II: downtime vs working set",
		"Dirty rate fixed, the working set grows; hybrid with several pre-copy lengths (the seed paper's Figures 8 and 10).", "working set", false},
	{"idle", "Idle guests",
		"Idle guests of growing memory: the cost of moving memory nobody writes.", "memory", false},
	{"optimizations", "Optimizations",
		"The same dirty guest with each optimization set of each system.", "variant", false},
	{"offline", "Offline migration",
		"Save → transfer → restore (TRESCCA D3.4's Δm = Δs + Δt + Δr).", "", false},
}

// sumScenarioInfo returns how to render the named scenario; unknown ones
// are rendered as plain tables under their own name.
func sumScenarioInfo(name string) sumScenario {
	for _, sc := range sumScenarios {
		if sc.name == name {
			return sc
		}
	}
	title := name
	if title == "" {
		title = "(no scenario)"
	}
	return sumScenario{name: name, title: title, labels: true}
}

// sumPresent returns the scenarios of s in section order.
func sumPresent(s *Set) []string {
	seen := map[string]bool{}
	for i := range s.Results {
		seen[s.Results[i].Scenario] = true
	}
	var names []string
	for _, sc := range sumScenarios {
		if seen[sc.name] {
			names = append(names, sc.name)
			delete(seen, sc.name)
		}
	}
	var rest []string
	for name := range seen {
		rest = append(rest, name)
	}
	slices.Sort(rest)
	return append(names, rest...)
}

// sumRuns returns the runs of one scenario in table order.
func sumRuns(s *Set, scenario string) []*Result {
	var runs []*Result
	for i := range s.Results {
		if s.Results[i].Scenario == scenario {
			runs = append(runs, &s.Results[i])
		}
	}
	slices.SortStableFunc(runs, sumCompareRuns)
	return runs
}

// sumCompareRuns orders runs by system, technique, then parameters, so
// tables read like the plots' legends.
func sumCompareRuns(a, b *Result) int {
	return cmp.Or(
		cmp.Compare(sumRank(sumSystemOrder, a.System), sumRank(sumSystemOrder, b.System)),
		cmp.Compare(a.System, b.System),
		cmp.Compare(sumRank(sumTechniqueOrder, a.Technique), sumRank(sumTechniqueOrder, b.Technique)),
		cmp.Compare(a.Technique, b.Technique),
		cmp.Compare(a.PrecopyFor, b.PrecopyFor),
		cmp.Compare(sumRank(sumVariantOrder, a.Variant), sumRank(sumVariantOrder, b.Variant)),
		cmp.Compare(a.Variant, b.Variant),
		cmp.Compare(a.Guest.MemMiB, b.Guest.MemMiB),
		cmp.Compare(a.Guest.WorkingSet, b.Guest.WorkingSet),
		cmp.Compare(a.Guest.DirtyRate, b.Guest.DirtyRate),
		sumCompareOffline(a.Offline, b.Offline),
	)
}

func sumCompareOffline(a, b *Offline) int {
	ac, bc := a != nil && a.Compressed, b != nil && b.Compressed
	switch {
	case ac == bc:
		return 0
	case bc:
		return -1
	}
	return 1
}

var (
	sumSystemOrder    = []string{"ferry", "qemu"}
	sumTechniqueOrder = []string{"precopy", "postcopy", "hybrid", "stopcopy", "offline"}
	sumVariantOrder   = []string{"none", "raw", "zstd", "lz4", "delta", "dedup", "streams4", "xbzrle", "multifd4", "multifd4-zstd", "all"}
)

// sumRank is v's place in order; values not listed sort after it.
func sumRank(order []string, v string) int {
	if i := slices.Index(order, v); i >= 0 {
		return i
	}
	return len(order)
}

// sumOK reports whether a run's numbers may be plotted and compared: it
// finished, reported no error, and the guest found its memory intact.
func sumOK(r *Result) bool {
	return r.Finished && r.Error == "" && r.GuestErrors == 0
}

// WriteSummary writes s as markdown: the machine and link, then one
// section per scenario with a computed ferry-vs-QEMU comparison and a
// table of every run, failed ones included and marked.
func WriteSummary(w io.Writer, s *Set) error {
	var b strings.Builder
	sumHeader(&b, s)
	for _, name := range sumPresent(s) {
		sumSection(&b, sumScenarioInfo(name), sumRuns(s, name), s.Link)
	}
	if _, err := io.WriteString(w, b.String()); err != nil {
		return fmt.Errorf("writing the benchmark summary: %w", err)
	}
	return nil
}

func sumHeader(b *strings.Builder, s *Set) {
	b.WriteString("# ferry bench results\n\n")
	m := s.Machine
	host := sumJoin(", ", m.CPU, sumIf(m.CPUs > 0, fmt.Sprintf("%d CPUs", m.CPUs)),
		sumIf(m.MemoryGiB > 0, fmt.Sprintf("%d GiB", m.MemoryGiB)))
	fmt.Fprintf(b, "- machine: %s\n", sumOr(host, "unknown"))
	fmt.Fprintf(b, "- kernel: %s; KVM: %s\n", sumOr(m.Kernel, "unknown"), sumOr(m.KVM, "unknown"))
	fmt.Fprintf(b, "- ferry: %s; QEMU: %s\n", sumOr(m.Ferry, "unknown"), sumOr(m.QEMU, "unknown"))
	fmt.Fprintf(b, "- link: %s\n", sumLink(s.Link))
	failed := 0
	for i := range s.Results {
		if !sumOK(&s.Results[i]) {
			failed++
		}
	}
	run := sumJoin(", ", sumIf(s.Profile != "", "profile "+s.Profile),
		sumIf(!s.Started.IsZero(), "started "+s.Started.UTC().Format(time.RFC3339)),
		sumIf(s.Duration > 0, "took "+sumDuration(time.Duration(s.Duration*float64(time.Second)))),
		fmt.Sprintf("%d runs, %d failed", len(s.Results), failed))
	fmt.Fprintf(b, "- run: %s\n\n", run)
	b.WriteString("Downtime is what the guest saw: its longest heartbeat gap less the beat interval. " +
		"Bytes are the link's counters (→ source to destination, ← back). " +
		"Degradation is the workload's lost work during the migration.\n")
}

func sumSection(b *strings.Builder, sc sumScenario, runs []*Result, link Link) {
	fmt.Fprintf(b, "\n## %s (`%s`)\n\n", sc.title, sc.name)
	if sc.about != "" {
		b.WriteString(sc.about + "\n\n")
	}
	params := sumParamsFor(sc, runs, link)
	if common := sumCommon(params, runs); common != "" {
		b.WriteString("All runs: " + common + ".\n\n")
	}
	if cmp := sumComparison(sc, runs); cmp != "" {
		b.WriteString(cmp + "\n")
	}
	sumTable(sc, params, runs, link).write(b)
}

// sumParam is a parameter of a run that may get a table column: the ones
// that differ between a scenario's runs do, the others are stated once.
type sumParam struct {
	name string
	cell func(r *Result, link Link) string
}

var sumParams = []sumParam{
	{"memory", func(r *Result, _ Link) string { return sumSize(uint64(r.Guest.MemMiB) << 20) }},
	{"vCPUs", func(r *Result, _ Link) string { return sumIf(r.Guest.CPUs > 0, fmt.Sprint(r.Guest.CPUs)) }},
	{"workload", func(r *Result, _ Link) string { return r.Guest.Workload }},
	{"working set", func(r *Result, _ Link) string { return sumSize(uint64(max(r.Guest.WorkingSet, 0))) }},
	{"dirty rate", func(r *Result, _ Link) string { return sumRate(r.Guest.DirtyRate) }},
	{"variant", func(r *Result, _ Link) string { return r.Variant }},
	{"link", func(r *Result, set Link) string { return sumIf(r.Link != set, sumLink(r.Link)) }},
}

// sumParamsFor returns the parameter columns of a scenario's table: its
// primary parameter and whatever else varies between its runs.
func sumParamsFor(sc sumScenario, runs []*Result, link Link) []sumParam {
	var cols []sumParam
	for _, p := range sumParams {
		if p.name == sc.primary || len(sumValues(p, runs, link)) > 1 {
			cols = append(cols, p)
		}
	}
	return cols
}

// sumValues returns the distinct non-empty values a parameter takes.
func sumValues(p sumParam, runs []*Result, link Link) []string {
	var vals []string
	for _, r := range runs {
		if v := p.cell(r, link); v != "" && !slices.Contains(vals, v) {
			vals = append(vals, v)
		}
	}
	return vals
}

// sumCommon states the parameters every run shares ("memory 1 GiB, …").
func sumCommon(cols []sumParam, runs []*Result) string {
	var parts []string
	for _, p := range sumParams {
		if slices.ContainsFunc(cols, func(c sumParam) bool { return c.name == p.name }) {
			continue
		}
		// Link differences are reported against the set's link, so an
		// empty cell means "the set's link", already in the header.
		if vals := sumValues(p, runs, Link{}); len(vals) == 1 && p.name != "link" {
			parts = append(parts, p.name+" "+vals[0])
		}
	}
	return strings.Join(parts, ", ")
}

// sumColumn is one table column.
type sumColumn struct {
	head string
	cell func(*Result) string
}

// sumTableData is a markdown table.
type sumTableData struct {
	head []string
	rows [][]string
}

func sumTable(sc sumScenario, params []sumParam, runs []*Result, link Link) sumTableData {
	cols := sumColumns(sc, params, runs, link)
	var t sumTableData
	for _, c := range cols {
		t.head = append(t.head, c.head)
	}
	for _, r := range runs {
		row := make([]string, len(cols))
		for i, c := range cols {
			row[i] = sumCell(c.cell(r))
		}
		t.rows = append(t.rows, row)
	}
	return t
}

// sumColumns lays out a scenario's table: who and how, the parameters,
// the scenario's measurements, then whether the run can be trusted.
func sumColumns(sc sumScenario, params []sumParam, runs []*Result, link Link) []sumColumn {
	cols := []sumColumn{
		{"system", func(r *Result) string { return r.System }},
		{"technique", sumTechnique},
	}
	if sc.labels {
		cols = append(cols, sumColumn{"run", func(r *Result) string { return r.Label }})
	}
	for _, p := range params {
		cols = append(cols, sumColumn{p.name, func(r *Result) string { return sumOr(p.cell(r, link), "—") }})
	}
	if sc.name == "offline" {
		cols = append(cols, sumOfflineColumns()...)
	}
	cols = append(cols, sumMeasureColumns(sc, runs)...)
	return append(cols,
		sumColumn{"guest check", sumGuestCheck},
		sumColumn{"status", sumStatus})
}

func sumMeasureColumns(sc sumScenario, runs []*Result) []sumColumn {
	cols := []sumColumn{
		{"downtime", sumMeasured(func(r *Result) string { return sumDuration(r.Downtime) })},
		{"total time", sumMeasured(func(r *Result) string { return sumDuration(r.TotalTime) })},
		{"bytes →", sumMeasured(func(r *Result) string { return units.FormatBytes(r.BytesForward) })},
		{"bytes ←", sumMeasured(func(r *Result) string { return units.FormatBytes(r.BytesBack) })},
	}
	if sc.name == "optimizations" {
		cols = append(cols, sumColumn{"bytes vs none", sumVersusNone(runs)})
	}
	return append(cols, sumColumn{"degradation", sumDegradation})
}

func sumOfflineColumns() []sumColumn {
	phase := func(get func(*Offline) string) func(*Result) string {
		return func(r *Result) string {
			if r.Offline == nil {
				return "—"
			}
			return get(r.Offline)
		}
	}
	return []sumColumn{
		{"compressed", phase(func(o *Offline) string { return sumIf(o.Compressed, "yes") + sumIf(!o.Compressed, "no") })},
		{"state", phase(func(o *Offline) string { return units.FormatBytes(o.StateBytes) })},
		{"save", phase(func(o *Offline) string { return sumDuration(o.SaveTime) })},
		{"transfer", phase(func(o *Offline) string { return sumDuration(o.TransferTime) })},
		{"restore", phase(func(o *Offline) string { return sumDuration(o.RestoreTime) })},
	}
}

// sumMeasured shows a failed run's numbers only where it has any: a zero
// there means "never measured", not "took no time".
func sumMeasured(cell func(*Result) string) func(*Result) string {
	return func(r *Result) string {
		if !sumOK(r) && r.TotalTime == 0 && r.Downtime == 0 && r.BytesForward == 0 {
			return "—"
		}
		return cell(r)
	}
}

// sumVersusNone compares a run's bytes with the median of the same
// system's and technique's unoptimized runs.
func sumVersusNone(runs []*Result) func(*Result) string {
	base := map[string][]float64{}
	key := func(r *Result) string { return r.System + "/" + sumTechnique(r) }
	for _, r := range runs {
		if sumOK(r) && r.Variant == "none" {
			base[key(r)] = append(base[key(r)], sumBytes(r))
		}
	}
	return func(r *Result) string {
		b, ok := base[key(r)]
		if !ok || !sumOK(r) || r.Variant == "none" || sumMedian(b) == 0 {
			return "—"
		}
		return fmt.Sprintf("%+.0f%%", (sumBytes(r)/sumMedian(b)-1)*100)
	}
}

func sumTechnique(r *Result) string {
	if r.PrecopyFor > 0 {
		return fmt.Sprintf("%s (%s pre-copy)", r.Technique, sumShortDuration(r.PrecopyFor))
	}
	return r.Technique
}

func sumDegradation(r *Result) string {
	if !sumOK(r) || (r.Baseline == 0 && r.Degradation == 0) {
		return "—"
	}
	return fmt.Sprintf("%.1f%%", r.Degradation*100)
}

func sumGuestCheck(r *Result) string {
	switch {
	case r.GuestErrors > 0:
		return fmt.Sprintf("**guest saw %d errors**", r.GuestErrors)
	case r.GuestChecked > 0:
		return fmt.Sprintf("ok (%d pages)", r.GuestChecked)
	case r.Finished:
		return "no errors, no pages re-checked" // the guest rewrote nothing after the move
	}
	return "—"
}

func sumStatus(r *Result) string {
	switch {
	case r.Error != "":
		return "**failed**: " + sumShorten(r.Error, 80)
	case !r.Finished:
		return "**did not finish**"
	case r.GuestErrors > 0:
		return "**failed**: guest memory check"
	case r.ForcedStop:
		return "ok, forced stop-and-copy"
	}
	return "ok"
}

// sumShorten keeps an error's first line and at most n runes of it: the
// full text is in the JSON.
func sumShorten(s string, n int) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}

// sumCell keeps a value from breaking the table.
func sumCell(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	return strings.ReplaceAll(s, "|", `\|`)
}

func (t sumTableData) write(b *strings.Builder) {
	b.WriteString("| " + strings.Join(t.head, " | ") + " |\n")
	b.WriteString("|" + strings.Repeat("---|", len(t.head)) + "\n")
	for _, row := range t.rows {
		b.WriteString("| " + strings.Join(row, " | ") + " |\n")
	}
}

// sumMetric is a measurement the ferry-vs-QEMU line compares.
type sumMetric struct {
	name string
	get  func(*Result) float64
}

// sumDowntimeFloor stands in for shorter downtimes in ratios and log
// plots: a ratio to 0 says nothing, and heartbeats cannot resolve less.
const sumDowntimeFloor = time.Millisecond

var (
	sumLiveMetrics = []sumMetric{
		{"downtime", func(r *Result) float64 { return max(r.Downtime, sumDowntimeFloor).Seconds() }},
		{"total time", func(r *Result) float64 { return r.TotalTime.Seconds() }},
		{"bytes", sumBytes},
	}
	sumOfflineMetrics = []sumMetric{
		{"save+transfer+restore", func(r *Result) float64 { return sumOfflineTotal(r).Seconds() }},
		{"state size", func(r *Result) float64 { return float64(r.Offline.StateBytes) }},
	}
)

func sumBytes(r *Result) float64 { return float64(r.BytesForward + r.BytesBack) }

func sumOfflineTotal(r *Result) time.Duration {
	o := r.Offline
	return o.SaveTime + o.TransferTime + o.RestoreTime
}

// sumComparison computes the "ferry vs QEMU" lines of a scenario: for
// each technique, the median over parameter points both systems ran of
// ferry's value divided by QEMU's.
func sumComparison(sc sumScenario, runs []*Result) string {
	metrics := sumLiveMetrics
	if sc.name == "offline" {
		metrics = sumOfflineMetrics
	}
	groups := sumPairs(runs)
	var lines []string
	for _, g := range groups {
		if line := sumCompareGroup(g, metrics); line != "" {
			lines = append(lines, "- "+line)
		}
	}
	if sc.name == "optimizations" {
		lines = append(lines, sumBestVariants(runs)...)
	}
	if len(lines) == 0 {
		return ""
	}
	return "ferry vs QEMU (median over matched runs of ferry ÷ QEMU; downtimes under 1 ms count as 1 ms):\n\n" +
		strings.Join(lines, "\n") + "\n"
}

// sumGroup holds, for one technique, each parameter point's runs by system.
type sumGroup struct {
	technique string
	points    map[string]map[string][]*Result // point → system → runs
	order     []string
}

// sumPairs groups a scenario's good runs by technique and parameter point.
func sumPairs(runs []*Result) []*sumGroup {
	var groups []*sumGroup
	byTech := map[string]*sumGroup{}
	for _, r := range runs {
		if !sumOK(r) || (r.Scenario == "offline" && r.Offline == nil) {
			continue
		}
		g := byTech[sumTechnique(r)]
		if g == nil {
			g = &sumGroup{technique: sumTechnique(r), points: map[string]map[string][]*Result{}}
			byTech[g.technique] = g
			groups = append(groups, g)
		}
		pt := sumPointKey(r)
		if g.points[pt] == nil {
			g.points[pt] = map[string][]*Result{}
			g.order = append(g.order, pt)
		}
		g.points[pt][r.System] = append(g.points[pt][r.System], r)
	}
	return groups
}

// sumPointKey names the parameters two runs must share to be compared.
func sumPointKey(r *Result) string {
	g := r.Guest
	k := fmt.Sprintf("%d/%d/%d/%d/%s/%s", g.MemMiB, g.CPUs, g.WorkingSet, g.DirtyRate, g.Workload, r.Variant)
	if r.Offline != nil {
		k += fmt.Sprintf("/%t", r.Offline.Compressed)
	}
	return k
}

func sumCompareGroup(g *sumGroup, metrics []sumMetric) string {
	var parts []string
	n := 0
	for _, m := range metrics {
		var ratios []float64
		for _, pt := range g.order {
			f, q := g.points[pt]["ferry"], g.points[pt]["qemu"]
			if len(f) == 0 || len(q) == 0 {
				continue
			}
			fv, qv := sumMedianOf(f, m.get), sumMedianOf(q, m.get)
			if qv > 0 && fv > 0 {
				ratios = append(ratios, fv/qv)
			}
		}
		if len(ratios) > 0 {
			parts = append(parts, m.name+" "+sumVerdict(sumMedian(ratios)))
			n = max(n, len(ratios))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return fmt.Sprintf("%s (%d matched point%s): %s", g.technique, n, sumIf(n != 1, "s"), strings.Join(parts, ", "))
}

// sumVerdict words a ferry ÷ QEMU ratio where lower is better.
func sumVerdict(ratio float64) string {
	switch {
	case ratio < 1/1.05:
		return fmt.Sprintf("%.2f (ferry %s× lower)", ratio, sumFactor(1/ratio))
	case ratio > 1.05:
		return fmt.Sprintf("%.2f (ferry %s× higher)", ratio, sumFactor(ratio))
	}
	return fmt.Sprintf("%.2f (about equal)", ratio)
}

func sumFactor(f float64) string {
	if f >= 10 {
		return fmt.Sprintf("%.0f", f)
	}
	return fmt.Sprintf("%.1f", f)
}

// sumBestVariants names each system's best optimization set by bytes and
// by total time, since the two systems offer different sets and only
// "none" pairs up.
func sumBestVariants(runs []*Result) []string {
	var lines []string
	for _, m := range sumLiveMetrics[1:] {
		best := map[string]string{}
		val := map[string]float64{}
		for _, sys := range sumSystemOrder {
			best[sys], val[sys] = sumBest(runs, sys, m.get)
		}
		if best["ferry"] == "" || best["qemu"] == "" || val["qemu"] == 0 {
			continue
		}
		lines = append(lines, fmt.Sprintf("- best variant by %s: ferry %s, QEMU %s: %s",
			m.name, best["ferry"], best["qemu"], sumVerdict(val["ferry"]/val["qemu"])))
	}
	return lines
}

// sumBest returns the variant whose median is lowest, naming the
// technique too when the scenario ran several.
func sumBest(runs []*Result, system string, get func(*Result) float64) (string, float64) {
	by := map[string][]*Result{}
	var names []string
	several := slices.ContainsFunc(runs, func(r *Result) bool { return r.Technique != runs[0].Technique })
	for _, r := range runs {
		if sumOK(r) && r.System == system {
			k := r.Variant + sumIf(several, " ("+sumTechnique(r)+")")
			if by[k] == nil {
				names = append(names, k)
			}
			by[k] = append(by[k], r)
		}
	}
	bestName, bestVal := "", math.Inf(1)
	for _, k := range names {
		if v := sumMedianOf(by[k], get); v < bestVal {
			bestName, bestVal = k, v
		}
	}
	return bestName, bestVal
}

func sumMedianOf(runs []*Result, get func(*Result) float64) float64 {
	vals := make([]float64, len(runs))
	for i, r := range runs {
		vals[i] = get(r)
	}
	return sumMedian(vals)
}

// sumMedian returns the median of vals (0 for none); repeated runs are
// summarised by it so one outlier does not move a point.
func sumMedian(vals []float64) float64 {
	if len(vals) == 0 {
		return 0
	}
	v := slices.Clone(vals)
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

// sumDuration renders d in ms below a second and in s above.
func sumDuration(d time.Duration) string {
	ms := float64(d) / float64(time.Millisecond)
	switch {
	case d < 10*time.Millisecond:
		return fmt.Sprintf("%.1f ms", ms)
	case d < time.Second:
		return fmt.Sprintf("%.0f ms", ms)
	case d < 100*time.Second:
		return fmt.Sprintf("%.2f s", d.Seconds())
	}
	return fmt.Sprintf("%.0f s", d.Seconds())
}

// sumSize renders a parameter size compactly ("512 MiB", "1 GiB"); empty
// for 0, which means "not set".
func sumSize(n uint64) string {
	if n == 0 {
		return ""
	}
	return strings.Replace(units.FormatBytes(n), ".0 ", " ", 1)
}

func sumRate(n int64) string {
	if n <= 0 {
		return ""
	}
	return sumSize(uint64(n)) + "/s"
}

func sumLink(l Link) string {
	if l.Rate == "" && l.Latency == 0 {
		return "unknown"
	}
	return sumJoin(", ", sumOr(l.Rate, "unknown rate"), sumIf(l.Latency > 0, sumDuration(l.Latency)+" latency"))
}

func sumIf(cond bool, s string) string {
	if cond {
		return s
	}
	return ""
}

func sumOr(s, alt string) string {
	if s == "" {
		return alt
	}
	return s
}

// sumJoin joins the non-empty parts.
func sumJoin(sep string, parts ...string) string {
	return strings.Join(slices.DeleteFunc(parts, func(p string) bool { return p == "" }), sep)
}

// sumShortDuration renders a parameter duration: "5 s", "500 ms".
func sumShortDuration(d time.Duration) string {
	if d%time.Second == 0 {
		return fmt.Sprintf("%d s", d/time.Second)
	}
	return fmt.Sprintf("%d ms", d.Milliseconds())
}
