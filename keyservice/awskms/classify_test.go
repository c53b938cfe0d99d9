package awskms

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"syscall"
	"testing"

	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/kubekms/kubekms/keyservice"
)

// opErr wraps err the way the SDK returns it from a client call.
func opErr(err error) error {
	return &smithy.OperationError{ServiceID: "KMS", OperationName: "Decrypt", Err: err}
}

func apiErr(code string, status int) error {
	return opErr(&awshttp.ResponseError{
		ResponseError: &smithyhttp.ResponseError{
			Response: &smithyhttp.Response{Response: &http.Response{StatusCode: status}},
			Err:      &smithy.GenericAPIError{Code: code, Message: "test"},
		},
		RequestID: "req-1",
	})
}

func httpStatus(status int) error {
	return opErr(&awshttp.ResponseError{
		ResponseError: &smithyhttp.ResponseError{
			Response: &smithyhttp.Response{Response: &http.Response{StatusCode: status}},
			Err:      errors.New("unexpected response"),
		},
	})
}

func TestClassify(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: &net.AddrError{Err: "connect: connection refused"}}
	tests := []struct {
		name string
		err  error
		want keyservice.Class
	}{
		// Revoked: the key is unusable or this principal lost access.
		{"disabled", apiErr("DisabledException", 400), keyservice.ClassRevoked},
		{"disabled modeled", opErr(&types.DisabledException{Message: new("x")}), keyservice.ClassRevoked},
		{"invalid state", apiErr("KMSInvalidStateException", 400), keyservice.ClassRevoked},
		{"invalid state modeled", opErr(&types.KMSInvalidStateException{}), keyservice.ClassRevoked},
		{"not found", opErr(&types.NotFoundException{}), keyservice.ClassRevoked},
		{"access denied", apiErr("AccessDeniedException", 400), keyservice.ClassRevoked},
		{"key unavailable", opErr(&types.KeyUnavailableException{}), keyservice.ClassRevoked},
		// Invalid: the input was refused.
		{"invalid ciphertext", opErr(&types.InvalidCiphertextException{}), keyservice.ClassInvalid},
		{"incorrect key", opErr(&types.IncorrectKeyException{}), keyservice.ClassInvalid},
		{"key usage", opErr(&types.InvalidKeyUsageException{}), keyservice.ClassInvalid},
		{"validation", apiErr("ValidationException", 400), keyservice.ClassInvalid},
		// Transient: unreachable, slow, throttled, failing server side.
		{"deadline", fmt.Errorf("call: %w", context.DeadlineExceeded), keyservice.ClassTransient},
		{"canceled", opErr(context.Canceled), keyservice.ClassTransient},
		{"connection refused", opErr(&smithy.OperationError{Err: refused}), keyservice.ClassTransient},
		{"connection refused errno", opErr(&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}), keyservice.ClassTransient},
		{"connection reset", opErr(&net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}), keyservice.ClassTransient},
		{"throttling", apiErr("ThrottlingException", 400), keyservice.ClassTransient},
		{"limit exceeded", opErr(&types.LimitExceededException{}), keyservice.ClassTransient},
		{"kms internal", opErr(&types.KMSInternalException{}), keyservice.ClassTransient},
		{"dependency timeout", opErr(&types.DependencyTimeoutException{}), keyservice.ClassTransient},
		{"http 500", httpStatus(500), keyservice.ClassTransient},
		{"http 503", apiErr("ServiceUnavailable", 503), keyservice.ClassTransient},
		{"http 507", httpStatus(507), keyservice.ClassTransient},
		{"request timeout", apiErr("RequestTimeoutException", 408), keyservice.ClassTransient},
		// Unknown: nothing says what it is.
		{"plain", errors.New("boom"), keyservice.ClassUnknown},
		{"bad credentials", apiErr("UnrecognizedClientException", 400), keyservice.ClassUnknown},
		{"http 400", httpStatus(400), keyservice.ClassUnknown},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := classify("unwrap", tc.err)
			if got := keyservice.Classify(err); got != tc.want {
				t.Fatalf("class = %v, want %v (%v)", got, tc.want, err)
			}
			if !errors.Is(err, tc.err) {
				t.Fatalf("classified error %v does not wrap the original", err)
			}
		})
	}
	if classify("wrap", nil) != nil {
		t.Fatal("classify(nil) != nil")
	}
}
