package vmm

import (
	"encoding/binary"
	"testing"
)

func TestVectorList(t *testing.T) {
	var regs [1024]byte
	if got := vectorList(regs[:], lapicIRR); got != "[]" {
		t.Fatalf("empty IRR: %s", got)
	}
	binary.LittleEndian.PutUint32(regs[lapicIRR+16*1:], 1<<16) // vector 48
	binary.LittleEndian.PutUint32(regs[lapicIRR+16*7:], 1<<31) // vector 255
	binary.LittleEndian.PutUint32(regs[lapicISR:], 1<<3)       // in ISR, not IRR
	if got := vectorList(regs[:], lapicIRR); got != "[48 255]" {
		t.Fatalf("IRR: %s", got)
	}
	if got := mpStateName(3); got != "halted" {
		t.Fatalf("mp state 3: %s", got)
	}
}
