package state

import (
	"encoding/hex"
	"fmt"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/ferry-vmm/ferry/internal/kvm"
	"github.com/ferry-vmm/ferry/internal/pci"
)

// Difference is one field that differs between two machine states. Path
// names the field ("vcpu[1].regs.rip", "vcpu[0].msr[TSC]",
// "ioapic.redir[4]", "vcpu[0].xsave[0x240:0x250]"); A and B are its values
// in the two states, "(absent)" where one state does not have it.
type Difference struct {
	Path string `json:"path"`
	A    string `json:"a"`
	B    string `json:"b"`
}

const absent = "(absent)"

// volatileFields are the fields that change merely because time passes
// between two captures of the same machine, or that KVM derives from
// other fields and recomputes lazily; Diff skips them unless asked.
// "[*]" stands for any index. docs/state-format.md lists them with reasons.
var volatileFields = []string{
	"header.created_unix_nano",
	"vcpu[*].msr[TSC]",
	"vcpu[*].msr[HV_VP_RUNTIME]",     // Hyper-V: the vCPU's run time, 100 ns units
	"vcpu[*].msr[HV_TIME_REF_COUNT]", // Hyper-V: time since boot, 100 ns units
	"vcpu[*].lapic[0x390]",
	// PPR is derived from TPR and the in-service vectors, which are
	// compared. KVM_SET_LAPIC computes it before it counts the restored
	// ISR (kvm_apic_set_state: apic_update_ppr, then
	// kvm_apic_update_apicv), so a vCPU saved inside an interrupt handler
	// reads back PPR = TPR until KVM's next interrupt check recomputes it.
	"vcpu[*].lapic[0xa0]",
	"pit.channels[*].count_load_time",
	"clock.clock",
	"clock.realtime",
	"clock.host_tsc",
	"devices.cmos.ram[0x00]", // seconds
	"devices.cmos.ram[0x02]", // minutes
	"devices.cmos.ram[0x04]", // hours
	"devices.cmos.ram[0x06]", // day of week
	"devices.cmos.ram[0x07]", // day of month
	"devices.cmos.ram[0x08]", // month
	"devices.cmos.ram[0x09]", // year
	"devices.cmos.ram[0x32]", // century
}

// VolatileFields lists the path patterns of the fields Diff leaves out
// unless asked for volatile fields ("[*]" matches any index). The CMOS
// clock bytes count as volatile only while the clock runs (status B's SET
// bit clear in both states).
func VolatileFields() []string { return slices.Clone(volatileFields) }

var indexRE = regexp.MustCompile(`\[[0-9]+\]`)

func isVolatile(path string) bool {
	if slices.Contains(volatileFields, path) {
		return true
	}
	return slices.Contains(volatileFields, indexRE.ReplaceAllString(path, "[*]"))
}

// Diff compares two machine states field by field and lists every
// difference, in a stable order. With volatile false, the fields listed by
// VolatileFields are left out.
func Diff(a, b *Machine, volatile bool) []Difference {
	d := &differ{volatile: volatile}
	d.value("header", reflect.ValueOf(a.Header), reflect.ValueOf(b.Header))
	d.vcpus(a.VCPUs, b.VCPUs)
	d.value("pic", reflect.ValueOf(a.PIC), reflect.ValueOf(b.PIC))
	d.value("ioapic", reflect.ValueOf(a.IOAPIC), reflect.ValueOf(b.IOAPIC))
	d.value("pit", reflect.ValueOf(a.PIT), reflect.ValueOf(b.PIT))
	d.value("clock", reflect.ValueOf(a.Clock), reflect.ValueOf(b.Clock))
	d.cmosClockRuns = a.Devices.CMOS.RAM[0x0b]&0x80 == 0 && b.Devices.CMOS.RAM[0x0b]&0x80 == 0
	d.value("devices", reflect.ValueOf(a.Devices), reflect.ValueOf(b.Devices))
	d.pci(a.PCI, b.PCI)
	return d.out
}

type differ struct {
	volatile      bool
	cmosClockRuns bool
	out           []Difference
}

func (d *differ) add(path, a, b string) {
	if !d.volatile && isVolatile(path) {
		if !strings.HasPrefix(path, "devices.cmos.ram[") || d.cmosClockRuns {
			return
		}
	}
	d.out = append(d.out, Difference{Path: path, A: a, B: b})
}

func (d *differ) vcpus(a, b []VCPU) {
	byID := func(vs []VCPU) map[uint32]*VCPU {
		m := make(map[uint32]*VCPU, len(vs))
		for i := range vs {
			m[vs[i].ID] = &vs[i]
		}
		return m
	}
	am, bm := byID(a), byID(b)
	var ids []uint32
	for id := range am {
		ids = append(ids, id)
	}
	for id := range bm {
		if _, ok := am[id]; !ok {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	for _, id := range ids {
		p := fmt.Sprintf("vcpu[%d]", id)
		va, vb := am[id], bm[id]
		switch {
		case va == nil:
			d.add(p, absent, "(present)")
		case vb == nil:
			d.add(p, "(present)", absent)
		default:
			d.vcpu(p, va, vb)
		}
	}
}

func (d *differ) vcpu(p string, a, b *VCPU) {
	d.value(p+".regs", reflect.ValueOf(a.Regs), reflect.ValueOf(b.Regs))
	d.value(p+".sregs", reflect.ValueOf(a.Sregs), reflect.ValueOf(b.Sregs))
	d.value(p+".sregs2", reflect.ValueOf(a.Sregs2), reflect.ValueOf(b.Sregs2))
	d.value(p+".fpu", reflect.ValueOf(a.FPU), reflect.ValueOf(b.FPU))
	d.bytes(p+".xsave", a.XSave, b.XSave)
	d.value(p+".xcrs", reflect.ValueOf(a.XCRs), reflect.ValueOf(b.XCRs))
	d.msrs(p, a.MSRs, b.MSRs)
	d.lapic(p+".lapic", &a.LAPIC, &b.LAPIC)
	d.value(p+".events", reflect.ValueOf(a.Events), reflect.ValueOf(b.Events))
	d.value(p+".debug_regs", reflect.ValueOf(a.DebugRegs), reflect.ValueOf(b.DebugRegs))
	d.value(p+".mp_state", reflect.ValueOf(a.MPState), reflect.ValueOf(b.MPState))
	d.cpuid(p, a.CPUID, b.CPUID)
	if a.TSCKHz != b.TSCKHz {
		d.add(p+".tsc_khz", strconv.FormatUint(uint64(a.TSCKHz), 10), strconv.FormatUint(uint64(b.TSCKHz), 10))
	}
}

func (d *differ) msrs(p string, a, b []kvm.MSREntry) {
	am := make(map[uint32]uint64, len(a))
	var idx []uint32
	for _, e := range a {
		if _, ok := am[e.Index]; !ok {
			idx = append(idx, e.Index)
		}
		am[e.Index] = e.Data
	}
	bm := make(map[uint32]uint64, len(b))
	for _, e := range b {
		if _, ok := am[e.Index]; !ok {
			if _, ok := bm[e.Index]; !ok {
				idx = append(idx, e.Index)
			}
		}
		bm[e.Index] = e.Data
	}
	slices.Sort(idx)
	for _, i := range idx {
		path := fmt.Sprintf("%s.msr[%s]", p, MSRName(i))
		va, oka := am[i]
		vb, okb := bm[i]
		switch {
		case !oka:
			d.add(path, absent, hexString(vb))
		case !okb:
			d.add(path, hexString(va), absent)
		case va != vb:
			d.add(path, hexString(va), hexString(vb))
		}
	}
}

func (d *differ) lapic(p string, a, b *kvm.LAPICState) {
	for off := 0; off < len(a.Regs); off += 0x10 {
		ra, rb := lapicReg(a, off), lapicReg(b, off)
		if ra != rb {
			d.add(fmt.Sprintf("%s[%#x]", p, off), hexString(uint64(ra)), hexString(uint64(rb)))
		}
		if [12]byte(a.Regs[off+4:off+16]) != [12]byte(b.Regs[off+4:off+16]) {
			d.add(fmt.Sprintf("%s.raw[%#x:%#x]", p, off+4, off+16),
				hex.EncodeToString(a.Regs[off+4:off+16]), hex.EncodeToString(b.Regs[off+4:off+16]))
		}
	}
}

func (d *differ) cpuid(p string, a, b []kvm.CPUIDEntry) {
	type key struct{ fn, index, n uint32 }
	keyed := func(es []kvm.CPUIDEntry) (map[key]kvm.CPUIDEntry, []key) {
		m := make(map[key]kvm.CPUIDEntry, len(es))
		var keys []key
		for _, e := range es {
			k := key{e.Function, e.Index, 0}
			for {
				if _, ok := m[k]; !ok {
					break
				}
				k.n++
			}
			m[k] = e
			keys = append(keys, k)
		}
		return m, keys
	}
	am, ak := keyed(a)
	bm, bk := keyed(b)
	keys := ak
	for _, k := range bk {
		if _, ok := am[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(x, y key) int {
		switch {
		case x.fn != y.fn:
			return cmpU32(x.fn, y.fn)
		case x.index != y.index:
			return cmpU32(x.index, y.index)
		}
		return cmpU32(x.n, y.n)
	})
	for _, k := range keys {
		path := fmt.Sprintf("%s.cpuid[%#x/%#x]", p, k.fn, k.index)
		if k.n > 0 {
			path = fmt.Sprintf("%s.cpuid[%#x/%#x#%d]", p, k.fn, k.index, k.n)
		}
		ea, oka := am[k]
		eb, okb := bm[k]
		switch {
		case !oka:
			d.add(path, absent, "(present)")
		case !okb:
			d.add(path, "(present)", absent)
		default:
			d.value(path, reflect.ValueOf(ea), reflect.ValueOf(eb))
		}
	}
}

func cmpU32(a, b uint32) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// fieldNames overrides the derived snake_case name of some fields.
var fieldNames = map[string]string{
	"RedirTbl": "redir",
	"TSCKHz":   "tsc_khz",
	"XSave":    "xsave",
	"RXFIFO":   "rx_fifo",
	"DB":       "db",
	"FTWX":     "ftwx",
}

// snakeCase turns a Go field name into a path element: "InterruptBitmap"
// → "interrupt_bitmap", "APICBase" → "apic_base", "NrXCRs" → "nr_xcrs",
// "CR0" → "cr0".
func snakeCase(name string) string {
	if n, ok := fieldNames[name]; ok {
		return n
	}
	r := []rune(name)
	var words []string
	start := 0
	for i := 1; i < len(r); i++ {
		prevUpper := unicode.IsUpper(r[i-1])
		if !unicode.IsUpper(r[i]) {
			continue
		}
		// A new word starts at an upper-case letter after a lower-case
		// letter or digit, or at the last upper-case letter of a run that
		// continues in lower case (but not for a plural "s": "XCRs").
		switch {
		case !prevUpper:
			words = append(words, string(r[start:i]))
			start = i
		case i+1 < len(r) && unicode.IsLower(r[i+1]) && !(r[i+1] == 's' && (i+2 == len(r) || unicode.IsUpper(r[i+2]))):
			words = append(words, string(r[start:i]))
			start = i
		}
	}
	words = append(words, string(r[start:]))
	return strings.ToLower(strings.Join(words, "_"))
}

var durationType = reflect.TypeOf(time.Duration(0))

// value compares two values of the same type, recursively.
func (d *differ) value(p string, a, b reflect.Value) {
	switch a.Kind() {
	case reflect.Struct:
		t := a.Type()
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			if !f.IsExported() {
				continue // padding
			}
			d.value(p+"."+snakeCase(f.Name), a.Field(i), b.Field(i))
		}
	case reflect.Pointer:
		switch {
		case a.IsNil() && b.IsNil():
		case a.IsNil():
			d.add(p, absent, "(present)")
		case b.IsNil():
			d.add(p, "(present)", absent)
		default:
			d.value(p, a.Elem(), b.Elem())
		}
	case reflect.Array:
		if a.Type().Elem().Kind() == reflect.Uint8 {
			ab, bb := make([]byte, a.Len()), make([]byte, b.Len())
			reflect.Copy(reflect.ValueOf(ab), a)
			reflect.Copy(reflect.ValueOf(bb), b)
			if strings.HasSuffix(p, "cmos.ram") {
				for i := range ab {
					if ab[i] != bb[i] {
						d.add(fmt.Sprintf("%s[0x%02x]", p, i), hexString(uint64(ab[i])), hexString(uint64(bb[i])))
					}
				}
				return
			}
			d.bytes(p, ab, bb)
			return
		}
		for i := 0; i < a.Len(); i++ {
			d.value(fmt.Sprintf("%s[%d]", p, i), a.Index(i), b.Index(i))
		}
	case reflect.Slice:
		if a.Type().Elem().Kind() == reflect.Uint8 {
			d.bytes(p, a.Bytes(), b.Bytes())
			return
		}
		if a.Len() != b.Len() {
			d.add(p+".len", strconv.Itoa(a.Len()), strconv.Itoa(b.Len()))
		}
		for i := 0; i < a.Len() && i < b.Len(); i++ {
			d.value(fmt.Sprintf("%s[%d]", p, i), a.Index(i), b.Index(i))
		}
		for i := b.Len(); i < a.Len(); i++ {
			d.add(fmt.Sprintf("%s[%d]", p, i), "(present)", absent)
		}
		for i := a.Len(); i < b.Len(); i++ {
			d.add(fmt.Sprintf("%s[%d]", p, i), absent, "(present)")
		}
	default:
		if sa, sb := scalarString(a), scalarString(b); sa != sb {
			d.add(p, sa, sb)
		}
	}
}

func hexString(v uint64) string { return "0x" + strconv.FormatUint(v, 16) }

// scalarString renders a basic value: unsigned integers in hex, signed in
// decimal (durations as durations), the rest as Go prints them.
func scalarString(v reflect.Value) string {
	if v.Type() == durationType {
		return time.Duration(v.Int()).String()
	}
	switch v.Kind() {
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return hexString(v.Uint())
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return strconv.FormatInt(v.Int(), 10)
	case reflect.String:
		return strconv.Quote(v.String())
	}
	return fmt.Sprint(v.Interface())
}

// maxShownBytes bounds the bytes shown for one differing range.
const maxShownBytes = 32

// bytes compares byte strings: short ones (at most 32 bytes) as a whole,
// longer ones as the differing ranges at 16-byte granularity
// ("xsave[0x240:0x250]"), plus their lengths when those differ.
func (d *differ) bytes(p string, a, b []byte) {
	n := max(len(a), len(b))
	if n <= maxShownBytes {
		if string(a) != string(b) {
			d.add(p, bytesString(a), bytesString(b))
		}
		return
	}
	if len(a) != len(b) {
		d.add(p+".len", strconv.Itoa(len(a)), strconv.Itoa(len(b)))
	}
	at := func(s []byte, lo, hi int) string {
		lo, hi = min(lo, len(s)), min(hi, len(s))
		if lo == hi {
			return absent
		}
		out := hex.EncodeToString(s[lo:min(hi, lo+maxShownBytes)])
		if hi-lo > maxShownBytes {
			out += fmt.Sprintf("... (%d bytes)", hi-lo)
		}
		return out
	}
	const block = 16
	for lo := 0; lo < n; {
		if string(sliceAt(a, lo, lo+block)) == string(sliceAt(b, lo, lo+block)) {
			lo += block
			continue
		}
		hi := lo + block
		for hi < n && string(sliceAt(a, hi, hi+block)) != string(sliceAt(b, hi, hi+block)) {
			hi += block
		}
		hi = min(hi, n)
		d.add(fmt.Sprintf("%s[%#x:%#x]", p, lo, hi), at(a, lo, hi), at(b, lo, hi))
		lo = hi
	}
}

func bytesString(b []byte) string {
	if len(b) == 0 {
		return "(empty)"
	}
	return hex.EncodeToString(b)
}

func sliceAt(s []byte, lo, hi int) []byte {
	lo, hi = min(lo, len(s)), min(hi, len(s))
	return s[lo:hi]
}

// pci compares the PCI states: slots and virtio functions keyed by slot
// number ("pci.slot[3].config[0x10:0x20]", "pci.virtio[3].queues[0].next_avail").
func (d *differ) pci(a, b *PCI) {
	switch {
	case a == nil && b == nil:
		return
	case a == nil:
		d.add("pci", absent, "(present)")
		return
	case b == nil:
		d.add("pci", "(present)", absent)
		return
	}
	if a.Bus.Conf1Address != b.Bus.Conf1Address {
		d.add("pci.conf1_address", hexString(uint64(a.Bus.Conf1Address)), hexString(uint64(b.Bus.Conf1Address)))
	}
	slotMap := func(ss []pci.SlotState) map[int]*pci.SlotState {
		m := make(map[int]*pci.SlotState, len(ss))
		for i := range ss {
			m[ss[i].Slot] = &ss[i]
		}
		return m
	}
	as, bs := slotMap(a.Bus.Slots), slotMap(b.Bus.Slots)
	for _, n := range unionKeys(as, bs) {
		p := fmt.Sprintf("pci.slot[%d]", n)
		sa, sb := as[n], bs[n]
		switch {
		case sa == nil:
			d.add(p, absent, "(present)")
		case sb == nil:
			d.add(p, "(present)", absent)
		default:
			if sa.Name != sb.Name {
				d.add(p+".name", strconv.Quote(sa.Name), strconv.Quote(sb.Name))
			}
			d.bytes(p+".config", sa.Config.Data, sb.Config.Data)
		}
	}
	fnMap := func(fs []VirtioFunction) map[int]*VirtioFunction {
		m := make(map[int]*VirtioFunction, len(fs))
		for i := range fs {
			m[fs[i].Slot] = &fs[i]
		}
		return m
	}
	af, bf := fnMap(a.Virtio), fnMap(b.Virtio)
	for _, n := range unionKeys(af, bf) {
		p := fmt.Sprintf("pci.virtio[%d]", n)
		fa, fb := af[n], bf[n]
		switch {
		case fa == nil:
			d.add(p, absent, "(present)")
		case fb == nil:
			d.add(p, "(present)", absent)
		default:
			if fa.Type != fb.Type {
				d.add(p+".type", hexString(uint64(fa.Type)), hexString(uint64(fb.Type)))
			}
			d.value(p, reflect.ValueOf(fa.State), reflect.ValueOf(fb.State))
		}
	}
}

// unionKeys returns the keys of a and b, ascending.
func unionKeys[V any](a, b map[int]V) []int {
	keys := make([]int, 0, len(a)+len(b))
	for k := range a {
		keys = append(keys, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}
