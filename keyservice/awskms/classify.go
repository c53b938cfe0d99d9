package awskms

import (
	"context"
	"errors"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/smithy-go"

	"github.com/kubekms/kubekms/keyservice"
)

// KMS error codes by what they mean for the key hierarchy.
var (
	// The key is disabled, pending deletion or import, gone, unavailable, or
	// this principal may no longer use it: cached local KEKs must go.
	revokedCodes = map[string]bool{
		"DisabledException":        true,
		"KMSInvalidStateException": true,
		"NotFoundException":        true,
		"AccessDeniedException":    true,
		"KeyUnavailableException":  true,
	}
	// KMS refused the input: a tampered, foreign or mis-bound ciphertext (a
	// different encryption context also gives InvalidCiphertextException), or
	// a key that cannot encrypt.
	invalidCodes = map[string]bool{
		"InvalidCiphertextException": true,
		"IncorrectKeyException":      true,
		"InvalidKeyUsageException":   true,
		"ValidationException":        true,
	}
	// KMS-specific server-side failures that the SDK's generic checks (HTTP
	// 5xx, throttling codes) may not name.
	transientCodes = map[string]bool{
		"KMSInternalException":       true,
		"DependencyTimeoutException": true,
		"InternalFailure":            true,
		"ServiceUnavailable":         true,
	}
)

var (
	retryables = retry.IsErrorRetryables(retry.DefaultRetryables)
	throttles  = retry.IsErrorThrottles(retry.DefaultThrottles)
	timeouts   = retry.IsErrorTimeouts(retry.DefaultTimeouts)
)

// classify wraps err from a KMS call as a keyservice error of the right class:
// modeled KMS errors by code, then network errors, throttling, timeouts and
// HTTP 5xx as transient (the SDK's own retry checks decide what those are).
// Anything else is returned unclassified.
func classify(op string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return keyservice.Transient(op, err)
	}
	var apiErr smithy.APIError
	if errors.As(err, &apiErr) {
		code := apiErr.ErrorCode()
		switch {
		case revokedCodes[code]:
			return keyservice.Revoked(op, err)
		case invalidCodes[code]:
			return keyservice.Invalid(op, err)
		case transientCodes[code]:
			return keyservice.Transient(op, err)
		}
	}
	if throttles.IsErrorThrottle(err) == aws.TrueTernary ||
		retryables.IsErrorRetryable(err) == aws.TrueTernary ||
		timeouts.IsErrorTimeout(err) == aws.TrueTernary {
		return keyservice.Transient(op, err)
	}
	var respErr *awshttp.ResponseError
	if errors.As(err, &respErr) && respErr.HTTPStatusCode() >= 500 {
		return keyservice.Transient(op, err)
	}
	return err
}
