package pkcs11

import (
	"errors"

	p11 "github.com/miekg/pkcs11"
)

// failure says how a failed PKCS#11 call is handled: whether one retry after
// recovery can help, and what class the error gets if it persists.
type failure int

const (
	// failOther: not understood; returned unclassified.
	failOther failure = iota
	// failToken: the session, token or device is gone or not responding.
	// Recovery drops all sessions, finds the token again (re-initializing
	// the module if it no longer lists it) and retries once; Transient if
	// it persists.
	failToken
	// failHandle: the object handle is stale. Recovery forgets cached
	// handles and retries (which looks the key up again); Revoked if the
	// key is gone.
	failHandle
	// failLogin: the session is not logged in (someone logged the token
	// out). Recovery reopens sessions, which logs in again; Revoked if it
	// persists.
	failLogin
	// failDenied: wrong or locked PIN, key use not permitted. Revoked, and
	// never retried: a retried wrong PIN burns the token's PIN attempts.
	failDenied
	// failBadInput: the token rejected the ciphertext. Invalid.
	failBadInput
)

// errTokenAbsent is returned when no slot holds the token the URI names.
var errTokenAbsent = errors.New("token not present")

func classifyFailure(err error) failure {
	if errors.Is(err, errTokenAbsent) {
		return failToken
	}
	var ckr p11.Error
	if !errors.As(err, &ckr) {
		return failOther
	}
	switch ckr {
	case p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED, p11.CKR_SESSION_COUNT,
		p11.CKR_TOKEN_NOT_PRESENT, p11.CKR_TOKEN_NOT_RECOGNIZED, p11.CKR_DEVICE_REMOVED,
		p11.CKR_DEVICE_ERROR, p11.CKR_DEVICE_MEMORY, p11.CKR_CRYPTOKI_NOT_INITIALIZED,
		p11.CKR_SLOT_ID_INVALID, p11.CKR_GENERAL_ERROR, p11.CKR_FUNCTION_FAILED,
		p11.CKR_OPERATION_ACTIVE, p11.CKR_HOST_MEMORY, p11.CKR_FUNCTION_CANCELED:
		return failToken
	case p11.CKR_OBJECT_HANDLE_INVALID, p11.CKR_KEY_HANDLE_INVALID:
		return failHandle
	case p11.CKR_USER_NOT_LOGGED_IN:
		return failLogin
	case p11.CKR_PIN_INCORRECT, p11.CKR_PIN_LOCKED, p11.CKR_PIN_EXPIRED, p11.CKR_PIN_INVALID,
		p11.CKR_PIN_LEN_RANGE, p11.CKR_USER_PIN_NOT_INITIALIZED, p11.CKR_KEY_FUNCTION_NOT_PERMITTED:
		return failDenied
	case p11.CKR_ENCRYPTED_DATA_INVALID, p11.CKR_ENCRYPTED_DATA_LEN_RANGE:
		return failBadInput
	}
	return failOther
}
