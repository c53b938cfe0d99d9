//lint:file-ignore SA1019 KMS v1beta1 is deprecated upstream; kubekms serves it on purpose so clusters can migrate from v1 to v2.

package plugin_test

import (
	"context"
	"path/filepath"
	"testing"

	kmsv1 "k8s.io/kms/apis/v1beta1"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
)

// FuzzV1Decrypt feeds untrusted v1beta1 ciphertexts (the self-describing
// framing) to the v1 service: never a panic, never a forged success.
func FuzzV1Decrypt(f *testing.F) {
	svc, err := softkey.Open(context.Background(), "softkey://"+filepath.Join(f.TempDir(), "keyring.json"), keyservice.Options{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { svc.Close() }) // stops its keyring watch
	h, err := hierarchy.New(context.Background(), svc, hierarchy.Config{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(h.Close)
	v1 := plugin.NewV1(h, plugin.Options{})
	enc, err := v1.Encrypt(context.Background(), &kmsv1.EncryptRequest{Plain: seed})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(enc.Cipher)
	f.Add(enc.Cipher[:30])
	f.Add([]byte{2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add([]byte{2, 1, 'k', 1, 1})
	f.Fuzz(func(t *testing.T, cipher []byte) {
		out, err := v1.Decrypt(context.Background(), &kmsv1.DecryptRequest{Cipher: cipher})
		if err == nil && string(cipher) != string(enc.Cipher) {
			t.Fatalf("forged v1 cipher accepted (%d bytes -> %d)", len(cipher), len(out.Plain))
		}
	})
}
