package pkcs11

import (
	"context"
	"testing"

	"github.com/kubekms/kubekms/keyservice"
)

// go test -run '^$' -bench . -benchtime 2000x ./keyservice/pkcs11/

func benchSetup(b *testing.B) (*softHSM, *Service, keyservice.WrapResult) {
	h := newSoftHSM(b)
	h.keygen(testLabel)
	svc := h.open(b, h.uri(";object="+testLabel, ""), keyservice.Options{})
	res, err := svc.Wrap(context.Background(), make([]byte, kekSize))
	if err != nil {
		b.Fatal(err)
	}
	return h, svc, res
}

func BenchmarkWrap(b *testing.B) {
	_, svc, _ := benchSetup(b)
	kek := make([]byte, kekSize)
	for b.Loop() {
		if _, err := svc.Wrap(context.Background(), kek); err != nil {
			b.Fatal(err)
		}
	}
}

// Warm: session pooled, key handle cached: one C_DecryptInit + C_Decrypt.
func BenchmarkUnwrapWarm(b *testing.B) {
	_, svc, res := benchSetup(b)
	for b.Loop() {
		if _, err := svc.Unwrap(context.Background(), res.KeyID, res.Wrapped); err != nil {
			b.Fatal(err)
		}
	}
}

// Cold key: session pooled, but the key is looked up again (C_FindObjects
// and attribute reads) as for the first Unwrap of a key ID.
func BenchmarkUnwrapColdKey(b *testing.B) {
	_, svc, res := benchSetup(b)
	for b.Loop() {
		svc.forgetHandles()
		if _, err := svc.Unwrap(context.Background(), res.KeyID, res.Wrapped); err != nil {
			b.Fatal(err)
		}
	}
}

// Cold service: a new Service per Unwrap (slot scan, C_OpenSession, login
// check, key lookup, decrypt, close), as after a plugin restart. Another
// service keeps the module initialized, as the running plugin would.
func BenchmarkUnwrapColdService(b *testing.B) {
	h, _, res := benchSetup(b)
	uri := h.uri(";object="+testLabel, "")
	for b.Loop() {
		svc, err := Open(context.Background(), uri, keyservice.Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := svc.Unwrap(context.Background(), res.KeyID, res.Wrapped); err != nil {
			b.Fatal(err)
		}
		_ = svc.Close()
	}
}
