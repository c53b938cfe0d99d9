package main

import (
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/awskms"
	"github.com/kubekms/kubekms/keyservice/azurekv"
	"github.com/kubekms/kubekms/keyservice/gcpkms"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/keyservice/tpm"
	"github.com/kubekms/kubekms/keyservice/vault"
)

// newRegistry lists the key services this binary supports.
func newRegistry() *keyservice.Registry {
	r := keyservice.NewRegistry()
	r.Register(softkey.Scheme, softkey.Open)
	registerPKCS11(r)
	r.Register(awskms.Scheme, awskms.Open)
	r.Register(gcpkms.Scheme, gcpkms.Open)
	r.Register(azurekv.Scheme, azurekv.Open)
	r.Register(tpm.Scheme, tpm.Open)
	for _, s := range vault.Schemes() {
		r.Register(s, vault.Open)
	}
	return r
}
