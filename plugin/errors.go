package plugin

import (
	"errors"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
)

// toStatus maps an error to the gRPC status the apiserver should see:
// bad input is InvalidArgument, a revoked key FailedPrecondition, an outage
// Unavailable. Nothing becomes Unknown.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	if errors.Is(err, hierarchy.ErrBadRequest) {
		return status.Error(codes.InvalidArgument, strings.Replace(err.Error(), hierarchy.ErrBadRequest.Error()+": ", "", 1))
	}
	switch keyservice.Classify(err) {
	case keyservice.ClassInvalid:
		return status.Errorf(codes.InvalidArgument, "key service refused the wrapped local KEK (altered or foreign annotation or key_id): %v", err)
	case keyservice.ClassRevoked:
		return status.Errorf(codes.FailedPrecondition, "key revoked: %v", err)
	default:
		return status.Errorf(codes.Unavailable, "key service unavailable: %v", err)
	}
}

func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

func internalErr(format string, args ...any) error {
	return status.Errorf(codes.Internal, format, args...)
}
