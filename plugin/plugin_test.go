//lint:file-ignore SA1019 KMS v1beta1 is deprecated upstream; kubekms serves it on purpose so clusters can migrate from v1 to v2.

package plugin_test

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	kmsv1 "k8s.io/kms/apis/v1beta1"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/internal/testutil"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/keyservicetest"
	"github.com/kubekms/kubekms/keyservice/softkey"
	"github.com/kubekms/kubekms/plugin"
)

// env is a plugin on a temp socket over a real softkey keyring.
type env struct {
	dir     string
	keyring string
	svc     *keyservicetest.Counting
	logs    *testutil.SyncBuffer
	socket  string
	stop    func()
	v2      kmsapi.KeyManagementServiceClient
	v1      kmsv1.KeyManagementServiceClient
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir, err := os.MkdirTemp("", "kk") // short: unix socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &env{dir: dir, keyring: filepath.Join(dir, "keyring.json"), logs: &testutil.SyncBuffer{}, socket: filepath.Join(dir, "kms.sock")}
	raw, err := softkey.Open(context.Background(), "softkey://"+e.keyring, keyservice.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() }) // stops its keyring watch
	e.svc = keyservicetest.NewCounting(raw)
	e.start(t)
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	e.v2 = kmsapi.NewKeyManagementServiceClient(conn)
	e.v1 = kmsv1.NewKeyManagementServiceClient(conn)
	return e
}

// start runs a plugin process equivalent: hierarchy with file state + gRPC server.
func (e *env) start(t *testing.T) {
	t.Helper()
	log := slog.New(slog.NewJSONHandler(e.logs, nil))
	h, err := hierarchy.New(context.Background(), e.svc, hierarchy.Config{
		Logger: log, State: hierarchy.FileState{Path: filepath.Join(e.dir, "state.json")},
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := plugin.Listen("unix://"+e.socket, plugin.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv := plugin.NewGRPCServer(h, plugin.Options{Logger: log})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := plugin.Serve(ctx, srv, l, 5*time.Second); err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	stopped := false
	e.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		<-done
		h.Close()
	}
	t.Cleanup(e.stop)
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

var seed = bytes.Repeat([]byte{7}, 32)

func (e *env) encrypt(t *testing.T) *kmsapi.EncryptResponse {
	t.Helper()
	r, err := e.v2.Encrypt(ctx(t), &kmsapi.EncryptRequest{Plaintext: seed, Uid: "enc-uid"})
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	return r
}

func TestStatus(t *testing.T) {
	e := newEnv(t)
	st, err := e.v2.Status(ctx(t), &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != "v2" || st.Healthz != "ok" || !strings.HasPrefix(st.KeyId, "softkey:") {
		t.Fatalf("Status = %+v", st)
	}
	if e.svc.Calls("wrap") != 1 {
		t.Fatalf("start-up made %d wraps, want 1", e.svc.Calls("wrap"))
	}
	for range 20 {
		if _, err := e.v2.Status(ctx(t), &kmsapi.StatusRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	if e.svc.Crypto() != 1 {
		t.Fatalf("Status polls made %d paid remote calls, want none beyond start-up", e.svc.Crypto()-1)
	}
}

func TestBadRequests(t *testing.T) {
	e := newEnv(t)
	good := e.encrypt(t)
	kek := hierarchy.Sealed{Ciphertext: good.Ciphertext, Annotations: good.Annotations}.LocalKEK()
	if len(kek) == 0 || good.Ciphertext[0] != 3 {
		t.Fatalf("default seal: format %d, %d-byte local KEK", good.Ciphertext[0], len(kek))
	}
	seal := good.Ciphertext[3+len(kek):]
	flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 1; return b }
	withAnn := func(k string, v []byte) map[string][]byte { return map[string][]byte{k: v} }
	type dec = kmsapi.DecryptRequest
	cases := []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"encrypt empty plaintext", encCall(e, nil), codes.InvalidArgument, "plaintext is empty"},
		{"encrypt oversized plaintext", encCall(e, make([]byte, hierarchy.MaxPlaintext+1)), codes.InvalidArgument, "plaintext is"},
		{"decrypt empty ciphertext", decCall(e, &dec{KeyId: good.KeyId, Annotations: good.Annotations}), codes.InvalidArgument, "ciphertext is empty"},
		{"decrypt oversized ciphertext", decCall(e, &dec{Ciphertext: make([]byte, 1025), KeyId: good.KeyId, Annotations: good.Annotations}), codes.InvalidArgument, "more than the 1024"},
		{"decrypt unknown format", decCall(e, &dec{Ciphertext: append([]byte{9}, good.Ciphertext[1:]...), KeyId: good.KeyId, Annotations: good.Annotations}), codes.InvalidArgument, "unknown format version"},
		{"decrypt tampered ciphertext", decCall(e, &dec{Ciphertext: flip(good.Ciphertext, len(good.Ciphertext)-1), KeyId: good.KeyId, Annotations: good.Annotations}), codes.InvalidArgument, "failed authentication"},
		{"decrypt empty key_id", decCall(e, &dec{Ciphertext: good.Ciphertext, Annotations: good.Annotations}), codes.InvalidArgument, "key_id"},
		{"decrypt oversized key_id", decCall(e, &dec{Ciphertext: good.Ciphertext, KeyId: strings.Repeat("k", 1025), Annotations: good.Annotations}), codes.InvalidArgument, "key_id"},
		{"decrypt key_id mismatch", decCall(e, &dec{Ciphertext: good.Ciphertext, KeyId: good.KeyId + "0", Annotations: good.Annotations}), codes.InvalidArgument, ""},
		{"decrypt format 2 without its annotation", decCall(e, &dec{Ciphertext: append([]byte{2}, seal...), KeyId: good.KeyId}), codes.InvalidArgument, "local-kek.kubekms.io is missing"},
		{"decrypt format 3 with an annotation", decCall(e, &dec{Ciphertext: good.Ciphertext, KeyId: good.KeyId, Annotations: withAnn(hierarchy.AnnotationKey, kek)}), codes.InvalidArgument, "carries its local KEK itself"},
		{"decrypt local KEK cut short", decCall(e, &dec{Ciphertext: good.Ciphertext[:3+len(kek)+20], KeyId: good.KeyId}), codes.InvalidArgument, "too short"},
		{"decrypt tampered local KEK", decCall(e, &dec{Ciphertext: flip(good.Ciphertext, 3+len(kek)-1), KeyId: good.KeyId}), codes.InvalidArgument, ""},
		{"decrypt local KEK created time", decCall(e, &dec{Ciphertext: flip(good.Ciphertext, 3+4), KeyId: good.KeyId}), codes.InvalidArgument, "failed authentication"},
		{"decrypt non-DNS annotation key", decCall(e, &dec{Ciphertext: good.Ciphertext, KeyId: good.KeyId, Annotations: withAnn("Not_A_Domain", []byte("x"))}), codes.InvalidArgument, "fully qualified domain name"},
		{"decrypt oversized annotations", decCall(e, &dec{Ciphertext: good.Ciphertext, KeyId: good.KeyId, Annotations: withAnn("big.example.com", make([]byte, 33000))}), codes.InvalidArgument, "annotations are"},
		{"decrypt request over the size limit", decCall(e, &dec{Ciphertext: good.Ciphertext, KeyId: good.KeyId, Annotations: withAnn("big.example.com", make([]byte, plugin.MaxRequestBytes))}), codes.ResourceExhausted, ""},
		{"v1 decrypt empty", func() error { _, err := e.v1.Decrypt(ctx(t), &kmsv1.DecryptRequest{}); return err }, codes.InvalidArgument, "cipher is empty"},
		{"v1 decrypt truncated", func() error {
			_, err := e.v1.Decrypt(ctx(t), &kmsv1.DecryptRequest{Cipher: []byte{2, 200}})
			return err
		}, codes.InvalidArgument, "truncated"},
		{"v1 decrypt unknown framing", func() error {
			_, err := e.v1.Decrypt(ctx(t), &kmsv1.DecryptRequest{Cipher: []byte{9, 1, 2}})
			return err
		}, codes.InvalidArgument, "framing"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			st, _ := status.FromError(err)
			if st.Code() != tc.code {
				t.Fatalf("code %v (%v), want %v", st.Code(), err, tc.code)
			}
			if !strings.Contains(st.Message(), tc.msg) {
				t.Fatalf("message %q does not say %q", st.Message(), tc.msg)
			}
		})
	}
	// The plugin stays healthy and working after all that.
	st, err := e.v2.Status(ctx(t), &kmsapi.StatusRequest{})
	if err != nil || st.Healthz != "ok" {
		t.Fatalf("after bad requests: %+v, %v", st, err)
	}
	if _, err := e.v2.Decrypt(ctx(t), &kmsapi.DecryptRequest{Ciphertext: good.Ciphertext, KeyId: good.KeyId, Annotations: good.Annotations}); err != nil {
		t.Fatalf("good Decrypt after bad requests: %v", err)
	}
}

func encCall(e *env, p []byte) func() error {
	return func() error {
		_, err := e.v2.Encrypt(context.Background(), &kmsapi.EncryptRequest{Plaintext: p, Uid: "u"})
		return err
	}
}

func decCall(e *env, r *kmsapi.DecryptRequest) func() error {
	return func() error {
		r.Uid = "u"
		_, err := e.v2.Decrypt(context.Background(), r)
		return err
	}
}

func TestKeyServiceFailureCodes(t *testing.T) {
	e := newEnv(t)
	good := e.encrypt(t)
	// A fresh plugin (no cached KEK) facing a failing key service.
	e.stop()
	e2 := &env{dir: e.dir, keyring: e.keyring, svc: e.svc, logs: e.logs, socket: e.socket}
	if err := os.Remove(filepath.Join(e.dir, "state.json")); err != nil {
		t.Fatal(err)
	}
	e2.start(t)
	req := &kmsapi.DecryptRequest{Ciphertext: good.Ciphertext, KeyId: good.KeyId, Annotations: good.Annotations, Uid: "u"}
	e.svc.FailNext(10, keyservice.Transient("unwrap", os.ErrDeadlineExceeded))
	if _, err := e.v2.Decrypt(ctx(t), req); status.Code(err) != codes.Unavailable {
		t.Fatalf("key service down: %v, want Unavailable", err)
	}
	e.svc.FailNext(1, keyservice.Revoked("unwrap", os.ErrPermission))
	if _, err := e.v2.Decrypt(ctx(t), req); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("key revoked: %v, want FailedPrecondition", err)
	}
	e.svc.FailNext(0, nil)
	if _, err := e.v2.Decrypt(ctx(t), req); err != nil {
		t.Fatalf("key service back: %v", err)
	}
}

// TestEconomics: 10,000 Encrypt and Decrypt calls through gRPC, with a plugin
// restart in the middle, cost at most 2 remote crypto calls.
func TestEconomics(t *testing.T) {
	e := newEnv(t)
	var sealed []*kmsapi.EncryptResponse
	for i := range 5000 {
		if i == 2500 {
			e.stop()
			e.start(t)
		}
		r := e.encrypt(t)
		if i%100 == 0 {
			sealed = append(sealed, r)
		}
		if _, err := e.v2.Decrypt(ctx(t), &kmsapi.DecryptRequest{Ciphertext: r.Ciphertext, KeyId: r.KeyId, Annotations: r.Annotations, Uid: "d"}); err != nil {
			t.Fatalf("Decrypt %d: %v", i, err)
		}
	}
	for _, r := range sealed {
		got, err := e.v2.Decrypt(ctx(t), &kmsapi.DecryptRequest{Ciphertext: r.Ciphertext, KeyId: r.KeyId, Annotations: r.Annotations, Uid: "d"})
		if err != nil || !bytes.Equal(got.Plaintext, seed) {
			t.Fatalf("Decrypt after restart: %v", err)
		}
	}
	t.Logf("10,000 calls + restart: %d wraps, %d unwraps, %d probes", e.svc.Calls("wrap"), e.svc.Calls("unwrap"), e.svc.Calls("probe"))
	if n := e.svc.Crypto(); n > 2 {
		t.Fatalf("%d remote crypto calls, want at most 2", n)
	}
}

func TestUIDLoggedWithoutKeyMaterial(t *testing.T) {
	e := newEnv(t)
	r := e.encrypt(t)
	const uid = "5b3a0f3e-9a8c-4f7e-8a51-0d6f4b7a2c11"
	if _, err := e.v2.Decrypt(ctx(t), &kmsapi.DecryptRequest{Ciphertext: r.Ciphertext, KeyId: r.KeyId, Annotations: r.Annotations, Uid: uid}); err != nil {
		t.Fatal(err)
	}
	_, _ = e.v2.Decrypt(ctx(t), &kmsapi.DecryptRequest{Ciphertext: r.Ciphertext[:5], KeyId: r.KeyId, Annotations: r.Annotations, Uid: "bad-" + uid})
	logs := e.logs.String()
	for _, want := range []string{`"uid":"` + uid + `"`, `"method":"Decrypt"`, `"outcome":"OK"`, `"key_id":"` + r.KeyId + `"`, `"uid":"bad-` + uid + `"`, `"outcome":"InvalidArgument"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s", want)
		}
	}
	ring, err := softkey.Load(e.keyring)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range [][]byte{seed, ring.Versions[0].Key} {
		for _, enc := range []string{string(secret), hexOf(secret), b64Of(secret)} {
			if strings.Contains(logs, enc) {
				t.Fatal("logs contain key material or plaintext")
			}
		}
	}
}

func TestV1beta1(t *testing.T) {
	e := newEnv(t)
	v, err := e.v1.Version(ctx(t), &kmsv1.VersionRequest{Version: "v1beta1"})
	if err != nil || v.Version != "v1beta1" || v.RuntimeName != "kubekms" {
		t.Fatalf("Version = %+v, %v", v, err)
	}
	enc, err := e.v1.Encrypt(ctx(t), &kmsv1.EncryptRequest{Plain: seed})
	if err != nil {
		t.Fatal(err)
	}
	dec, err := e.v1.Decrypt(ctx(t), &kmsv1.DecryptRequest{Cipher: enc.Cipher})
	if err != nil || !bytes.Equal(dec.Plain, seed) {
		t.Fatalf("v1 Decrypt: %v", err)
	}
	bad := bytes.Clone(enc.Cipher)
	bad[len(bad)-1] ^= 1
	if _, err := e.v1.Decrypt(ctx(t), &kmsv1.DecryptRequest{Cipher: bad}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("tampered v1 cipher: %v", err)
	}
}

func TestSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "kk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "run", "kms.sock")
	l, err := plugin.Listen("unix://"+path, plugin.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v (%v), want 0600", st.Mode().Perm(), err)
	}
	if d, _ := os.Stat(filepath.Dir(path)); d.Mode().Perm() != 0o700 {
		t.Fatalf("created socket folder mode %v, want 0700", d.Mode().Perm())
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if _, err := plugin.Listen("unix://"+path, plugin.SocketOptions{}); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("second Listen on a live socket: %v", err)
	}
	l.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left after Close: %v", err)
	}
	// A stale socket (its process died: nothing answers) is replaced.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	l2, err := plugin.Listen("unix://"+path, plugin.SocketOptions{Mode: 0o660})
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o660 {
		t.Fatalf("--socket-mode 0660 gave %v", st.Mode().Perm())
	}
	l2.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left after Close: %v", err)
	}
	// A regular file is never removed.
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := plugin.Listen("unix://"+path, plugin.SocketOptions{}); err == nil {
		t.Fatal("Listen removed a regular file")
	}
	// A world-writable folder is refused unless allowed.
	open := filepath.Join(dir, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := plugin.Listen("unix://"+filepath.Join(open, "k.sock"), plugin.SocketOptions{}); err == nil || !strings.Contains(err.Error(), "writable by every user") {
		t.Fatalf("world-writable folder: %v", err)
	}
	l3, err := plugin.Listen("unix://"+filepath.Join(open, "k.sock"), plugin.SocketOptions{AllowInsecureDir: true})
	if err != nil {
		t.Fatalf("world-writable folder, allowed: %v", err)
	}
	l3.Close()
	// Abstract sockets have no file.
	l4, err := plugin.Listen("unix:///@kubekms-test-"+filepath.Base(dir), plugin.SocketOptions{})
	if err != nil {
		t.Fatalf("abstract socket: %v", err)
	}
	l4.Close()
	if _, err := plugin.Listen("tcp://127.0.0.1:1", plugin.SocketOptions{}); err == nil {
		t.Fatal("a tcp endpoint was accepted")
	}
}

// Closing a listener removes its socket file only if the path still names
// it: an older instance's shutdown leaves a newer instance's socket alone.
func TestSocketCloseRemovesOnlyItsOwn(t *testing.T) {
	dir, err := os.MkdirTemp("", "kk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "kms.sock")
	old, err := plugin.Listen("unix://"+path, plugin.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil { // tmpfiles clean-up, or an operator
		t.Fatal(err)
	}
	newer, err := plugin.Listen("unix://"+path, plugin.SocketOptions{})
	if err != nil {
		t.Fatal(err)
	}
	old.Close()
	if st, err := os.Lstat(path); err != nil || st.Mode().Type() != os.ModeSocket {
		t.Fatalf("the older listener's Close removed the newer socket: %v", err)
	}
	newer.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left after its own listener closed: %v", err)
	}
}

// Requests that are not valid protobuf (or whose strings are not UTF-8) are
// InvalidArgument, logged like any call; the plugin goes on serving.
func TestUndecodableRequests(t *testing.T) {
	e := newEnv(t)
	conn, err := grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	for _, tc := range []struct {
		name, method string
		body         []byte
		msg          string
	}{
		{"v2 decrypt garbage", "/v2.KeyManagementService/Decrypt", []byte{0xff, 0xff, 0xff}, "not a valid DecryptRequest"},
		{"v2 decrypt uid not UTF-8", "/v2.KeyManagementService/Decrypt", []byte{0x12, 2, 0xff, 0xfe}, "invalid UTF-8"},
		{"v2 decrypt key_id not UTF-8", "/v2.KeyManagementService/Decrypt", []byte{0x1a, 1, 0xc0}, "invalid UTF-8"},
		{"v2 encrypt truncated field", "/v2.KeyManagementService/Encrypt", []byte{0x0a, 30, 1, 2}, "not a valid EncryptRequest"},
		{"v2 status garbage", "/v2.KeyManagementService/Status", []byte{0x0f}, "not a valid StatusRequest"},
		{"v1 decrypt garbage", "/v1beta1.KeyManagementService/Decrypt", []byte{0xff}, "not a valid DecryptRequest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out []byte
			err := conn.Invoke(ctx(t), tc.method, &tc.body, &out, grpc.ForceCodecV2(testutil.RawCodec{}))
			st, _ := status.FromError(err)
			if st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), tc.msg) {
				t.Fatalf("%s: %v; want InvalidArgument saying %q", tc.method, err, tc.msg)
			}
		})
	}
	if logs := e.logs.String(); !strings.Contains(logs, `"outcome":"InvalidArgument"`) || !strings.Contains(logs, "not a valid DecryptRequest") {
		t.Fatalf("undecodable requests were not logged: %s", logs)
	}
	good := e.encrypt(t)
	if _, err := e.v2.Decrypt(ctx(t), &kmsapi.DecryptRequest{Ciphertext: good.Ciphertext, KeyId: good.KeyId, Annotations: good.Annotations}); err != nil {
		t.Fatalf("good Decrypt after undecodable requests: %v", err)
	}
}
