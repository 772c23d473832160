package hubclient

import (
	"errors"
	"fmt"
	"regexp"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is a call the hub refused or that failed on the way: the gRPC code, the hub's message,
// and for validation errors the edge and field at fault. Use errors.As to get it.
type Error struct {
	// Code is the gRPC status code (InvalidArgument for a rejected edge, Unauthenticated for a
	// wrong token, Unavailable when the hub cannot be reached, ...).
	Code codes.Code
	// Message is the hub's explanation.
	Message string
	// EdgeID is the edge a validation error is about; empty otherwise.
	EdgeID string
	// Field is the first field a validation error names (e.g. "firewallConfig.rateLimits[0].rate").
	Field string
}

func (e *Error) Error() string {
	return fmt.Sprintf("hubclient: %s: %s", e.Code, e.Message)
}

// The hub words validation errors as `edge "<id>": <field>: <problem>[; <field>: <problem>]`.
var invalidEdge = regexp.MustCompile(`^edge "([^"]*)": ([^:;]+):`)

// wrap turns a gRPC error into an *Error; nil stays nil.
func wrap(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	result := &Error{Code: st.Code(), Message: st.Message()}
	if m := invalidEdge.FindStringSubmatch(st.Message()); m != nil {
		result.EdgeID, result.Field = m[1], m[2]
	}
	return result
}

// IsCode reports whether err is an *Error with the given code.
func IsCode(err error, code codes.Code) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == code
}
