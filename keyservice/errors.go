package keyservice

import (
	"context"
	"errors"
	"fmt"
)

// Class says what the caller should do about a key-service error.
type Class int

const (
	// ClassUnknown is an error nobody classified; treated like a transient
	// error for outage tolerance but not retried.
	ClassUnknown Class = iota
	// ClassTransient: unreachable, timeout, throttled. Retried with backoff;
	// covered by the outage grace period.
	ClassTransient
	// ClassRevoked: key disabled, destroyed, or access denied. Cached local
	// KEKs wrapped by this key are dropped (crypto-shredding).
	ClassRevoked
	// ClassInvalid: the service refused the input (a tampered or foreign
	// wrapped key). Bad input, not an outage.
	ClassInvalid
)

func (c Class) String() string {
	switch c {
	case ClassTransient:
		return "transient"
	case ClassRevoked:
		return "revoked"
	case ClassInvalid:
		return "invalid"
	default:
		return "unknown"
	}
}

// Error is a classified key-service error.
type Error struct {
	Class Class
	Op    string // "wrap", "unwrap", "probe", ...
	Err   error
}

func (e *Error) Error() string { return fmt.Sprintf("key service %s (%s): %v", e.Op, e.Class, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

// Transient returns err classified as transient.
func Transient(op string, err error) error { return &Error{Class: ClassTransient, Op: op, Err: err} }

// Revoked returns err classified as revoked.
func Revoked(op string, err error) error { return &Error{Class: ClassRevoked, Op: op, Err: err} }

// Invalid returns err classified as invalid input.
func Invalid(op string, err error) error { return &Error{Class: ClassInvalid, Op: op, Err: err} }

// Classify returns the class of err. Context deadlines and cancellations are
// transient.
func Classify(err error) Class {
	if err == nil {
		return ClassUnknown
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Class
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return ClassTransient
	}
	return ClassUnknown
}
