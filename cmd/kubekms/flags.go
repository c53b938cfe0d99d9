package main

import (
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/pflag"
)

// Flags whose values are checked when they are parsed, so a bad value ends
// the command with a clear message before it does anything.

// checkedDuration is a duration flag that must be > 0 (or >= 0 with zeroOK).
type checkedDuration struct {
	p      *time.Duration
	zeroOK bool
}

func (d checkedDuration) String() string {
	if d.p == nil {
		return "0s"
	}
	return d.p.String()
}
func (d checkedDuration) Type() string { return "duration" }
func (d checkedDuration) Set(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("want a duration like 30s or 5m")
	}
	if v < 0 || v == 0 && !d.zeroOK {
		if d.zeroOK {
			return fmt.Errorf("want a duration >= 0")
		}
		return fmt.Errorf("want a duration > 0")
	}
	*d.p = v
	return nil
}

// durationVar defines a duration flag that must be > 0.
func durationVar(fl *pflag.FlagSet, p *time.Duration, name string, value time.Duration, usage string) {
	*p = value
	fl.Var(checkedDuration{p: p}, name, usage)
}

// optionalDurationVar defines a duration flag that must be >= 0 (0: off).
func optionalDurationVar(fl *pflag.FlagSet, p *time.Duration, name string, value time.Duration, usage string) {
	*p = value
	fl.Var(checkedDuration{p: p, zeroOK: true}, name, usage)
}

// rangedInt is an integer flag within [lo, hi].
type rangedInt[T int | uint64] struct {
	p      *T
	lo, hi T
}

func (r rangedInt[T]) String() string {
	if r.p == nil {
		return "0"
	}
	return fmt.Sprint(*r.p)
}
func (r rangedInt[T]) Type() string { return "int" }
func (r rangedInt[T]) Set(s string) error {
	v, err := strconv.ParseInt(s, 0, 64)
	if err != nil {
		return fmt.Errorf("want a whole number from %v to %v", r.lo, r.hi)
	}
	if v < int64(r.lo) || uint64(v) > uint64(r.hi) {
		return fmt.Errorf("want a whole number from %v to %v", r.lo, r.hi)
	}
	*r.p = T(v)
	return nil
}

// intVar defines an int flag within [lo, hi].
func intVar(fl *pflag.FlagSet, p *int, name string, value, lo, hi int, usage string) {
	*p = value
	fl.Var(rangedInt[int]{p, lo, hi}, name, usage)
}

// uint64Var defines a uint64 flag within [lo, hi] (max below 2^63).
func uint64Var(fl *pflag.FlagSet, p *uint64, name string, value, lo, hi uint64, usage string) {
	*p = value
	fl.Var(rangedInt[uint64]{p, lo, hi}, name, usage)
}
