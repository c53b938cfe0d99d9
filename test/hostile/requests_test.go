package hostile

import (
	"bytes"
	"context"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/testservers/localkms"
	"github.com/kubekms/kubekms/internal/testservers/softhsm"
	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/internal/testutil"
)

// deployment is how serve runs on one key service.
type deployment struct {
	keyURI string
	env    []string
	flags  []string // extra serve flags
}

// backend starts one key service for a test.
type backend struct {
	name  string
	setup func(t *testing.T, dir string) deployment
}

func backends() []backend {
	return []backend{
		{"softkey", func(_ *testing.T, dir string) deployment { return deployment{keyURI: softkeyURI(dir)} }},
		{"pkcs11-softhsm", func(t *testing.T, _ string) deployment {
			tk := softhsm.Start(t)
			tk.Keygen(softhsm.KeyLabel)
			return deployment{keyURI: tk.URI(";object="+softhsm.KeyLabel, ""), env: tk.Env()}
		}},
		{"awskms-local-kms", func(t *testing.T, dir string) deployment {
			const key = "7f3a9b20-1c2d-4e5f-8a6b-7c8d9e0f1a2b"
			srv := localkms.Start(t, localkms.Seed{AESKeys: []string{key}, Aliases: map[string]string{"alias/hostile": key}})
			return deployment{keyURI: "awskms:///alias/hostile?endpoint=" + srv.Forward(t),
				env: localkms.ClientEnv(filepath.Join(dir, "no-aws-config")), flags: []string{"--cluster-name", "hostile"}}
		}},
		{"vault", func(t *testing.T, _ string) deployment {
			return deployment{keyURI: vaultserver.New(t, vaultserver.Options{}).NewTransitKey(t).URI()}
		}},
	}
}

// Undecodable, malformed and forged requests against every backend: each is
// InvalidArgument (ResourceExhausted over the size limit) with a message
// that says what is wrong, is logged and counted, and leaves the plugin
// healthy; every ciphertext it answered still decrypts.
func TestHostileRequests(t *testing.T) {
	for _, b := range backends() {
		t.Run(b.name, func(t *testing.T) {
			dir := shortDir(t)
			d := b.setup(t, dir)
			s := startServe(t, append(serveArgs(dir, d.keyURI), d.flags...), d.env, nil)
			var l ledger
			if failed := l.encrypt(s, 5); len(failed) > 0 {
				t.Fatalf("Encrypt failed: %v", failed)
			}
			good := l.answers[0].resp
			// Format 3 (the default): the local KEK inside the ciphertext.
			kek := hierarchy.Sealed{Ciphertext: good.Ciphertext, Annotations: good.Annotations}.LocalKEK()
			if len(kek) == 0 || len(good.Annotations) != 0 {
				t.Fatalf("Encrypt answer is not seal format 3: %d-byte local KEK, %d annotations", len(kek), len(good.Annotations))
			}
			flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[(i+len(b))%len(b)] ^= 1; return b }
			raw := func(method string, body []byte) func() error {
				return func() error {
					var out []byte
					return s.conn.Invoke(ctxT(t), method, &body, &out, grpc.ForceCodecV2(testutil.RawCodec{}))
				}
			}
			decrypt := func(req *kmsapi.DecryptRequest) func() error {
				return func() error { req.Uid = "hostile"; _, err := s.kms.Decrypt(ctxT(t), req); return err }
			}
			before := s.invalidArgs()
			cases := []struct {
				name string
				call func() error
				code codes.Code
				msg  string
			}{
				{"Decrypt: not protobuf", raw("/v2.KeyManagementService/Decrypt", []byte{0xff, 0xff, 0x01}), codes.InvalidArgument, "not a valid DecryptRequest"},
				{"Decrypt: uid not UTF-8", raw("/v2.KeyManagementService/Decrypt", []byte{0x12, 2, 0xc3, 0x28}), codes.InvalidArgument, "invalid UTF-8"},
				{"Decrypt: key_id not UTF-8", raw("/v2.KeyManagementService/Decrypt", []byte{0x1a, 1, 0xff}), codes.InvalidArgument, "invalid UTF-8"},
				{"Encrypt: truncated field", raw("/v2.KeyManagementService/Encrypt", []byte{0x0a, 0x7f, 1}), codes.InvalidArgument, "not a valid EncryptRequest"},
				{"Status: not protobuf", raw("/v2.KeyManagementService/Status", []byte{0x07}), codes.InvalidArgument, "not a valid StatusRequest"},
				{"v1beta1 Decrypt: not protobuf", raw("/v1beta1.KeyManagementService/Decrypt", []byte{0xff}), codes.InvalidArgument, "not a valid DecryptRequest"},
				{"Encrypt: empty plaintext", func() error {
					_, err := s.kms.Encrypt(ctxT(t), &kmsapi.EncryptRequest{Uid: "hostile"})
					return err
				}, codes.InvalidArgument, "plaintext is empty"},
				{"Decrypt: tampered ciphertext", decrypt(&kmsapi.DecryptRequest{Ciphertext: flip(good.Ciphertext, -1), KeyId: good.KeyId, Annotations: good.Annotations}),
					codes.InvalidArgument, "failed authentication"},
				{"Decrypt: forged key_id", decrypt(&kmsapi.DecryptRequest{Ciphertext: good.Ciphertext, KeyId: good.KeyId + "x", Annotations: good.Annotations}),
					codes.InvalidArgument, ""},
				{"Decrypt: forged wrapped local KEK", decrypt(&kmsapi.DecryptRequest{Ciphertext: flip(good.Ciphertext, 3+len(kek)-1), KeyId: good.KeyId}),
					codes.InvalidArgument, ""},
				{"Decrypt: forged creation time", decrypt(&kmsapi.DecryptRequest{Ciphertext: flip(good.Ciphertext, 3+4), KeyId: good.KeyId}),
					codes.InvalidArgument, "failed authentication"},
				{"Decrypt: local KEK also in an annotation", decrypt(&kmsapi.DecryptRequest{Ciphertext: good.Ciphertext, KeyId: good.KeyId,
					Annotations: map[string][]byte{hierarchy.AnnotationKey: kek}}), codes.InvalidArgument, "carries its local KEK itself"},
				{"Decrypt: format 2 without its annotation", decrypt(&kmsapi.DecryptRequest{Ciphertext: append([]byte{2}, good.Ciphertext[3+len(kek):]...), KeyId: good.KeyId}),
					codes.InvalidArgument, "is missing"},
				{"Decrypt: over 64 KiB", decrypt(&kmsapi.DecryptRequest{Ciphertext: good.Ciphertext, KeyId: good.KeyId,
					Annotations: map[string][]byte{"big.example.com": make([]byte, 70000)}}), codes.ResourceExhausted, ""},
			}
			invalid := 0
			for _, tc := range cases {
				err := tc.call()
				st, _ := status.FromError(err)
				if st.Code() != tc.code || !strings.Contains(st.Message(), tc.msg) {
					t.Errorf("%s: %v; want %v saying %q", tc.name, err, tc.code, tc.msg)
				}
				if tc.code == codes.InvalidArgument {
					invalid++
				}
			}
			if got := s.invalidArgs() - before; got < invalid {
				t.Errorf("kubekms_grpc_requests_total counted %d InvalidArgument answers, want %d", got, invalid)
			}
			if !strings.Contains(s.logs.String(), "not a valid DecryptRequest") {
				t.Error("undecodable requests were not logged")
			}
			s.waitHealthy(5 * time.Second)
			l.encrypt(s, 5)
			s.kill(syscall.SIGTERM)
			l.verify(t, freshServe(t, d.keyURI, d.env, nil, d.flags...))
		})
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// invalidArgs counts the InvalidArgument answers in kubekms_grpc_requests_total.
func (s *server) invalidArgs() int {
	s.t.Helper()
	return int(s.metric("kubekms_grpc_requests_total", map[string]string{"code": "InvalidArgument"}))
}
