//go:build cgo

package main

import (
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/pkcs11"
)

// registerPKCS11 adds the PKCS#11 backend (it loads the token's module with
// dlopen, so it needs cgo).
func registerPKCS11(r *keyservice.Registry) { r.Register("pkcs11", pkcs11.Open) }
