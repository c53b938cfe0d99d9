package main

import (
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/pkcs11"
	"github.com/kubekms/kubekms/keyservice/softkey"
)

// newRegistry lists the key services this binary supports.
func newRegistry() *keyservice.Registry {
	r := keyservice.NewRegistry()
	r.Register(softkey.Scheme, softkey.Open)
	r.Register("pkcs11", pkcs11.Open)
	return r
}
