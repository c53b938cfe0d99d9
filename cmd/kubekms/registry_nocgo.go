//go:build !cgo

package main

import (
	"context"
	"errors"

	"github.com/kubekms/kubekms/keyservice"
)

// registerPKCS11 in a static (CGO_ENABLED=0) build says why pkcs11: URIs
// cannot work instead of calling the scheme unknown.
func registerPKCS11(r *keyservice.Registry) {
	r.Register("pkcs11", func(context.Context, string, keyservice.Options) (keyservice.Service, error) {
		return nil, errors.New("this kubekms was built without cgo; the PKCS#11 backend needs a cgo build (CGO_ENABLED=1)")
	})
}
